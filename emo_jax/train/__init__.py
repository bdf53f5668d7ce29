"""The training wing: from a typed experiment to a workdir (docs/architecture.md, "Training").

  experiment.py   Experiment: the typed run (model, execution, data, train, mesh), parsed once
  config.py       TrainConfig: optimiser, schedule and loop cadence
  trainer.py      the loss, the optimizer and schedule, train_step, train_and_evaluate
  checkpoint.py   Orbax checkpoints of the train state, the data iterator and the config
  evaluate.py     validation perplexity per domain and the unigram baseline
  metrics.py      metrics.jsonl, TensorBoard and the progress lines
  workdir.py      one trainer per workdir (a lock)
  memory_plan.py  parameter, optimizer and activation bytes per device before a run
"""

from emo_jax.train.config import TrainConfig
from emo_jax.train.experiment import Experiment
from emo_jax.train.trainer import NonFiniteLossError, train_and_evaluate, train_step

__all__ = ["Experiment", "NonFiniteLossError", "TrainConfig", "train_and_evaluate", "train_step"]
