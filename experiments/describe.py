"""Prints a model's parameter counts and shapes as one JSON object (no allocation).

  python -m experiments.describe --config configs/emo_1b14b.py
  python -m experiments.describe --config configs/tiny.py --config.model.num_layers=4
"""

import json

from absl import app, flags
from ml_collections import config_flags

from emo_jax.config import model_config_from
from emo_jax.model import describe

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(describe(model_config_from(_CONFIG.value)), indent=1))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
