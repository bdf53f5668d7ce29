"""Trains an EMO / StdMoE / dense model, or resumes the run already in --workdir.

  python -m experiments.train --config configs/demo.py --workdir workdirs/demo
  python -m experiments.train --config configs/tiny.py --workdir /tmp/tiny --config.train.steps=20

Restarting the same command after a crash or kill continues from the last checkpoint.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from emo_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our progress at INFO; the libraries' (Orbax logs every file it renames) at WARNING.
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("emo_jax").setLevel(std_logging.INFO)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
