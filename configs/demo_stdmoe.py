"""The demo's standard-MoE baseline: configs/demo.py without the document pool.

  python -m experiments.train --config configs/demo_stdmoe.py --workdir workdirs/demo_stdmoe

Same model, data, steps and seed as the EMO demo, so the two runs differ only in routing.
"""

import importlib.util
import pathlib

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("demo", pathlib.Path(__file__).with_name("demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()
  config.name = "demo_stdmoe"
  config.model.pool = False
  return config
