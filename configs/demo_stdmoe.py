"""The demo's standard-MoE baseline: configs/demo.py without the document pool.

  python -m experiments.train --config configs/demo_stdmoe.py --workdir workdirs/demo_stdmoe

Same model, data, steps and seed as the EMO demo, so the two runs differ only in routing.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.name = "demo_stdmoe"
  config.model.pool = False
  # The release's baselines attend across the documents of a packed row.
  config.model.document_attention = False
  return config
