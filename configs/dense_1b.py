"""Dense 1B: OLMo-2 style pre-norm decoder, no QK-norm, SwiGLU MLP of width 8192.

Shapes and parameter counts, without allocating anything:
  python -m experiments.describe --config configs/dense_1b.py
"""

import ml_collections

from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "dense_1b"
  # Every ModelConfig field, overridable on the command line, e.g. --config.model.num_layers=4
  config.model = ModelConfig(num_experts=0, num_shared_experts=0, pool=False, mlp_hidden=8192).to_dict()
  return config
