"""The release's StdMoE -> EMO anneal: the 1 T-token StdMoE continued for 50 B tokens as an EMO.

The StdMoE 1b14b run's last checkpoint (workdirs/stdmoe_1b14b) is continued with EMO's
architecture settings: the document pool on (8 to 128 experts), attention within documents and
a 32-expert in-loop evaluation pool. The parameter shapes are the same, so parameters, Adam
moments, step count and data position carry over; the rate falls linearly from the StdMoE's
last rate to 0 over 11,920 steps, no warm-up (docs/algorithm.md, "Training recipe"):
  python -m experiments.train --config configs/stdmoe_1b14b_emoanneal.py --workdir workdirs/stdmoe_1b14b_emoanneal
  python -m experiments.describe --config configs/stdmoe_1b14b_emoanneal.py
"""

import ml_collections

from configs import emo_1b14b
from configs.emo_1b14b_anneal import anneal


def get_config() -> ml_collections.ConfigDict:
  return anneal(emo_1b14b.get_config(), "stdmoe_1b14b_emoanneal", "workdirs/stdmoe_1b14b")
