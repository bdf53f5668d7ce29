"""Trains an EMO / StdMoE / dense model, or resumes the run already in --workdir.

  python -m experiments.train --config configs/demo.py --workdir workdirs/demo
  python -m experiments.train --config configs/tiny.py --workdir /tmp/tiny --config.train.steps=20

Restarting the same command after a crash or kill continues from the last checkpoint. Multi-host:
run the same command on every host with --distributed (cluster from the environment: TPU pods,
SLURM) or with --coordinator_address/--num_processes/--process_id.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import sys

from absl import flags
from ml_collections import config_flags

from emo_jax.train.checkpoint import CheckpointMismatchError
from emo_jax.config import ConfigError
from emo_jax.model.sharding import initialize_distributed
from emo_jax.train.trainer import NonFiniteLossError, train_and_evaluate
from emo_jax.train.workdir import WorkdirBusyError, WorkdirUnusableError
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-host run described by the "
                                 "environment (TPU pod slice, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  cli.start(argv)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train_and_evaluate(cli.experiment(_CONFIG.value), _WORKDIR.value)
  except (ConfigError, CheckpointMismatchError, WorkdirBusyError, WorkdirUnusableError,
          NonFiniteLossError) as e:
    sys.exit(f"error: {e}")  # a setting, a workdir or a diverged run: the message says what to do


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
