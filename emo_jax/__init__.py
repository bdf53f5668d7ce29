"""emo_jax: EMO (document-pool mixture of experts) in JAX / Flax NNX.

The package is four wings over a shared config (docs/architecture.md):

  emo_jax.model      what the network computes (Transformer, MoE, routing, kernels)
  emo_jax.train      the trainer, checkpoints, validation perplexity
  emo_jax.inference  generation and the OpenAI-compatible server
  emo_jax.study      expert selection, subset evaluation, the reproduction, routing analysis

beside `data/` (corpora, tokenizers, the Grain pipeline), `convert/` (Hugging Face) and
`tasks/` (benchmarks). The names a user needs first are importable from here; they load on
first use, so `import emo_jax` stays cheap and starts no thread (emo_jax/host_memory.py).
"""

import importlib

from emo_jax import moved_modules

_EXPORTS = {
    "ConfigError": "emo_jax.config",
    "ModelConfig": "emo_jax.config",
    "Experiment": "emo_jax.train.experiment",
    "ExecutionConfig": "emo_jax.model.execution",
    "MeshConfig": "emo_jax.model.sharding",
    "Transformer": "emo_jax.model.transformer",
    "count_params": "emo_jax.model.transformer",
    "DataConfig": "emo_jax.data.corpus",
    "TrainConfig": "emo_jax.train.config",
    "load_model": "emo_jax.convert.loading",
    "load_checkpoint": "emo_jax.convert.loading",
    "load_tokenizer": "emo_jax.data.tokenizer",
    "train_and_evaluate": "emo_jax.train.trainer",
}

__all__ = sorted(_EXPORTS)

moved_modules.install()


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'emo_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
