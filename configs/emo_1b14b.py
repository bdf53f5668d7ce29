"""EMO 1b14b, the released model (1 T tokens): 128 experts (127 routed top-7 + 1 shared),
document pool on.

Shapes and parameter counts, without allocating anything:
  python -m experiments.describe --config configs/emo_1b14b.py
"""

import ml_collections

from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "emo_1b14b"
  # Every ModelConfig field, overridable on the command line, e.g. --config.model.num_layers=4
  config.model = ModelConfig().to_dict()
  return config
