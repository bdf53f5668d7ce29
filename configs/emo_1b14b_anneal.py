"""EMO 1b14b's anneal, as the release: 50 B tokens on top of the 1 T-token run's last checkpoint.

The run continues workdirs/emo_1b14b (train.continue_from: parameters, Adam moments, step count
and data position carry over) for 11,920 steps of 1,024 x 4,096 tokens, the learning rate falling
linearly from the rate the checkpoint's last step used to 0, with no warm-up
(docs/algorithm.md, "Training recipe"). Train the base run first, then:
  python -m experiments.train --config configs/emo_1b14b_anneal.py --workdir workdirs/emo_1b14b_anneal
  python -m experiments.describe --config configs/emo_1b14b_anneal.py
(--config.train.continue_from=WORKDIR names another base run.)
"""

import ml_collections

from configs import emo_1b14b

# 50 B tokens in steps of 1,024 rows x 4,096 tokens (the release rounds down).
ANNEAL_STEPS = 50_000_000_000 // (1024 * 4096)


def anneal(config: ml_collections.ConfigDict, name: str, base_workdir: str,
           steps: int = ANNEAL_STEPS) -> ml_collections.ConfigDict:
  """`config` turned into the release's anneal of the run in `base_workdir`."""
  config.name = name
  config.train.update(continue_from=base_workdir, schedule="linear_from_checkpoint",
                      steps=steps, schedule_steps=0, warmup_steps=0)
  return config


def get_config() -> ml_collections.ConfigDict:
  return anneal(emo_1b14b.get_config(), "emo_1b14b_anneal", "workdirs/emo_1b14b")
