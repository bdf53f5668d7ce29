"""One way to load a model: `load_model(path) -> (ModelConfig, graphdef, params)`.

A path is a training workdir, a parameter checkpoint (`train.checkpoint.save_params`, e.g. a
pruned subset) or a Hugging Face import; `train.checkpoint.load_params` reads all three, and
configs saved before the execution split are read by `execution.saved_model_config`. The model
is built for inference (`inference_execution`): the routed experts run dropless, because
capacity drops would make a row's output depend on the other rows of its batch.
`load_tokenizer` knows the byte tokenizer ("bytes") and every tokenizer file
(data/tokenizer.py).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.config import ModelConfig
from emo_jax.convert import hf, orbax_io
from emo_jax.data.tokenizer import load_tokenizer
from emo_jax.model.execution import ExecutionConfig, saved_model_config
from emo_jax.model.transformer import Transformer
from emo_jax.train import checkpoint as ckpt_lib

__all__ = ["SOURCE_FILE", "build_model", "inference_execution", "load_checkpoint",
           "load_model", "load_tokenizer", "tokenizer_spec"]

SOURCE_FILE = "source.json"  # beside a pruned checkpoint: where it came from, its tokenizer


def inference_execution(cfg: ModelConfig,
                        execution: ExecutionConfig | None = None) -> ExecutionConfig:
  """`execution` (default: ExecutionConfig()) set up for inference: dropless expert capacity,
  no rematerialisation."""
  execution = ExecutionConfig() if execution is None else execution
  changes: dict[str, Any] = {"remat": False}
  if cfg.is_moe and execution.expert_backend == "capacity":
    changes["capacity_factor"] = max(execution.capacity_factor,
                                     cfg.num_routed_experts / cfg.top_k)
  return execution.replace(**changes)


def build_model(cfg: ModelConfig, params: Any, execution: ExecutionConfig | None = None):
  """(graphdef, params as jax arrays) of the inference model for a parameter tree."""
  run = inference_execution(cfg, execution)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), execution=run))
  graphdef, _ = nnx.split(abstract)
  return graphdef, jax.tree.map(jnp.asarray, params)


def load_model(path: str | pathlib.Path, *, execution: ExecutionConfig | None = None,
               step: int | None = None, **config_changes: Any):
  """(ModelConfig, graphdef, params) of the model at `path` (a training workdir: its newest
  checkpoint, or that of `step`).

  `config_changes` replace architecture fields that do not change the parameters, e.g.
  `eval_pool_size=None` to route as the released inference does (no document pool).
  """
  params, model_config = ckpt_lib.load_params(path, step=step)
  cfg = saved_model_config(model_config)
  if config_changes:
    cfg = cfg.replace(**config_changes)
  graphdef, params = build_model(cfg, params, execution)
  return cfg, graphdef, params


def tokenizer_spec(checkpoint) -> str | None:
  """The tokenizer of a training workdir or parameter checkpoint: "bytes", a path, or None.

  A pruned checkpoint names it in source.json; otherwise the HF converter's resolution (the
  run's data config, or the tokenizer folder of an import) is used.
  """
  path = pathlib.Path(checkpoint)
  if (path / SOURCE_FILE).is_file():
    return json.loads((path / SOURCE_FILE).read_text()).get("tokenizer")
  return hf.resolve_tokenizer(orbax_io.ParamSource(path))


def load_checkpoint(checkpoint, *, tokenizer: str | None = None,
                    execution: ExecutionConfig | None = None):
  """(ModelConfig, graphdef, params, tokenizer or None, tokenizer spec) of a checkpoint:
  `load_model` and its tokenizer (`tokenizer` overrides it; "none" loads none)."""
  cfg, graphdef, params = load_model(checkpoint, execution=execution)
  spec = tokenizer or tokenizer_spec(checkpoint)
  tok = load_tokenizer(spec) if spec and spec != "none" else None
  return cfg, graphdef, params, tok, spec
