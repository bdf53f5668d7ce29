"""StdMoE 1b14b trained on 130 B tokens (30,995 steps): the ablation baseline.

Shapes and parameter counts, without allocating anything:
  python -m experiments.describe --config configs/stdmoe_1b14b_130b.py
"""

import ml_collections

from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "stdmoe_1b14b_130b"
  # Every ModelConfig field, overridable on the command line, e.g. --config.model.num_layers=4
  config.model = ModelConfig(pool=False).to_dict()
  return config
