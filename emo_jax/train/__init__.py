"""The training wing: from a typed experiment to a workdir (docs/architecture.md, "Training").

  trainer.py      TrainConfig, the optimizer and schedule, train_step, train_and_evaluate
  checkpoint.py   Orbax checkpoints of the train state, the data iterator and the config
  evaluate.py     validation perplexity per domain and the unigram baseline
  metrics.py      metrics.jsonl, TensorBoard and the progress lines
  workdir.py      one trainer per workdir (a lock)
  memory_plan.py  parameter, optimizer and activation bytes per device before a run
"""

from emo_jax.train.trainer import (NonFiniteLossError, TrainConfig, train_and_evaluate,
                                   train_step)

__all__ = ["NonFiniteLossError", "TrainConfig", "train_and_evaluate", "train_step"]
