"""The StdMoE twin of configs/repro.py: the same model, data and steps without the pool.

  python -m experiments.train --config configs/repro_stdmoe.py --workdir workdirs/repro_stdmoe
"""

import ml_collections

from configs import repro


def get_config() -> ml_collections.ConfigDict:
  config = repro.get_config()
  config.name = "repro_stdmoe"
  config.model.pool = False
  # The release's baselines attend across the documents of a packed row.
  config.model.document_attention = False
  return config
