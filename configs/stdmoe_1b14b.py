"""StdMoE 1b14b: EMO's architecture and losses without the document pool (the baseline).

Shapes and parameter counts, without allocating anything:
  python -m experiments.describe --config configs/stdmoe_1b14b.py
"""

import ml_collections

from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "stdmoe_1b14b"
  # Every ModelConfig field, overridable on the command line, e.g. --config.model.num_layers=4
  config.model = ModelConfig(pool=False).to_dict()
  return config
