"""Per-device memory of a config on a mesh, and whether it fits a chip (no device needed).

  python -m experiments.plan_memory --config configs/emo_1b14b.py --mesh fsdp=8 --chip h100-80gb
  python -m experiments.plan_memory --config configs/emo_1b14b.py --mesh fsdp=16,expert=4 \
      --chip tpu-v5p --micro_batch 2

Prints a table and, as its last line, the plan as one JSON object.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json

from absl import app, flags
from ml_collections import config_flags

from emo_jax.train import memory_plan
from emo_jax.model import sharding
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_MESH = flags.DEFINE_string("mesh", "fsdp=8", "Axis sizes, e.g. data=2,fsdp=8,expert=4.")
_CHIP = flags.DEFINE_enum("chip", None, sorted(memory_plan.CHIPS), "Chip to check the fit on.")
_MICRO_BATCH = flags.DEFINE_integer("micro_batch", 1, "Sequences per device per micro-step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")


def parse_mesh(text: str) -> dict:
  sizes = dict.fromkeys(sharding.AXES, 1)
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if name not in sizes or not value.isdigit():
      raise app.UsageError(f"--mesh item {item!r}: expected AXIS=N with AXIS in {sharding.AXES}")
    sizes[name] = int(value)
  return sizes


def main(argv):
  cli.start(argv)
  experiment = cli.experiment(_CONFIG.value)
  cfg, execution = experiment.model, experiment.execution
  result = memory_plan.plan(cfg, parse_mesh(_MESH.value), micro_batch=_MICRO_BATCH.value,
                            seq_len=_SEQ_LEN.value, chip=_CHIP.value, execution=execution)
  for key in ("params_bytes", "optimizer_bytes", "gradient_bytes", "activation_bytes",
              "total_bytes"):
    print(f"{key[:-6]:<12}{result[key] / 2**30:10.2f} GiB per device")
  if "fits" in result:
    print(f"{result['chip']}: {result['chip_bytes'] / 2**30:.0f} GiB -> "
          f"{'fits' if result['fits'] else 'does NOT fit'} (90 % usable)")
  print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
