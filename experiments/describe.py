"""Prints a model's parameters by component as a table, or everything as JSON (no allocation).

  python -m experiments.describe --config configs/emo_1b14b.py
  python -m experiments.describe --config configs/tiny.py --config.model.num_layers=4
  python -m experiments.describe --config configs/tiny.py --json   # counts, config and shapes

The table (emo_jax/model/summary.py) gives embeddings, attention, routed experts, shared expert,
router and norms with their share, the parameters one token uses (active), the active count
without the embeddings, and the bytes of the weights at bf16 and fp32.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json

from absl import flags
from ml_collections import config_flags

from emo_jax.model import summary
from emo_jax.model.transformer import describe
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object (counts by component, config, "
                          "every parameter's shape) instead of the table.")


def main(argv):
  cli.start(argv)
  experiment = cli.experiment(_CONFIG.value)
  cfg = experiment.model
  described = describe(cfg)
  counts = summary.parameter_summary(cfg, described["params"])
  if _JSON.value:
    print(json.dumps({**described, **counts}, indent=1))
  else:
    print(summary.format_table(counts, cfg, name=experiment.name))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
