"""StdMoE 1b4b: 32 experts (31 routed top-7 + 1 shared), no pool.

Shapes and parameter counts, without allocating anything:
  python -m experiments.describe --config configs/stdmoe_1b4b.py
"""

import ml_collections

from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "stdmoe_1b4b"
  # Every ModelConfig field, overridable on the command line, e.g. --config.model.num_layers=4
  config.model = ModelConfig(num_experts=32, pool=False).to_dict()
  return config
