"""The learning-rate schedule of a run, including one that continues another run's checkpoint.

A schedule is a function of the optimiser's step count (0 for the first step). Fresh runs warm
up to `TrainConfig.learning_rate` and then follow `schedule` ("cosine", "linear", "constant").
A continuation (`train.continue_from`, emo_jax/train/continuation.py) keeps the count of the run
it continues, so its schedule, "linear_from_checkpoint", is written in that count: the first
step after the checkpoint's step S takes the rate the checkpoint's own last step took, and the
rate falls linearly to 0 over the continuation's steps, with no warm-up. This is the release's
anneal (docs/algorithm.md, "Training recipe").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import optax

from emo_jax.config import ConfigError
from emo_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Continuation:
  """Where a continued run starts: the workdir and step of the checkpoint it continues, and the
  rate that checkpoint's last step used (the continuation's first rate)."""
  workdir: str
  step: int
  learning_rate: float

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Continuation":
    return cls(workdir=str(values["workdir"]), step=int(values["step"]),
               learning_rate=float(values["learning_rate"]))


def learning_rate_schedule(tc: TrainConfig,
                           continuation: Continuation | None = None) -> optax.Schedule:
  """The rate of each optimiser count of a run with TrainConfig `tc`.

  "linear_from_checkpoint" needs the `continuation` it starts from; the other schedules refuse
  one, since their counts start at 0.
  """
  decay_steps = max(tc.schedule_steps or tc.steps, 1)
  if tc.schedule == "linear_from_checkpoint":
    if continuation is None:
      raise ConfigError("TrainConfig.schedule='linear_from_checkpoint' starts from a checkpoint: "
                        "set train.continue_from to the workdir of the run to continue")
    return optax.linear_schedule(continuation.learning_rate, 0.0, decay_steps,
                                 transition_begin=continuation.step)
  if continuation is not None:
    raise ConfigError(f"TrainConfig.schedule={tc.schedule!r} cannot continue a checkpoint: set "
                      "train.schedule='linear_from_checkpoint'")
  warmup = max(tc.warmup_steps, 0)
  decay_steps = max(decay_steps - warmup, 1)
  peak = tc.learning_rate
  if tc.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=tc.final_lr_fraction)
  elif tc.schedule == "linear":
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def last_learning_rate(record: Mapping[str, Any], step: int) -> float:
  """The rate the last step (the `step`-th) of the run whose checkpoint config is `record` used.

  `record` is what the trainer writes beside each checkpoint: its "train" section and, for a
  run that itself continued another, its "continuation".
  """
  if step < 1:
    raise ConfigError(f"a checkpoint at step {step} has taken no step, so it has no learning "
                      "rate to continue from; continue a run that trained at least one step")
  tc = TrainConfig.from_dict(record["train"])
  saved = record.get("continuation")
  schedule = learning_rate_schedule(tc, Continuation.from_dict(saved) if saved else None)
  return float(schedule(step - 1))
