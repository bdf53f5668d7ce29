"""TrainConfig: the optimiser, the learning-rate schedule and the loop's cadence.

One section of the typed experiment (train/experiment.py). Defaults are the release's recipe
(docs/algorithm.md); every value that cannot work is refused with the field, the value and the
fix.
"""

from __future__ import annotations

import dataclasses
import math

from emo_jax.config import ConfigError, ConfigMixin

SCHEDULES = ("cosine", "linear", "constant", "linear_from_checkpoint")
# What TrainConfig.weight_decay_exempt may exempt from weight decay (trainer.decay_mask).
WEIGHT_DECAY_EXEMPT = ("embedding", "embedding_and_norms")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigMixin):
  """Optimiser, schedule and loop settings. Defaults are the release's recipe
  (docs/algorithm.md)."""
  steps: int = 1000
  # Length of the learning-rate schedule; 0 = `steps`. A run's first start fixes it and resumes
  # keep it, so raising `steps` later extends training along the same curve (past its end the
  # rate stays at the final value) instead of rewriting the rates of steps already taken.
  schedule_steps: int = 0
  learning_rate: float = 4e-3
  warmup_steps: int = 2000
  # "cosine": warm-up then cosine to final_lr_fraction * peak; "linear": warm-up then linear
  # decay to 0; "constant": warm-up then flat; "linear_from_checkpoint": the release's anneal,
  # only with continue_from: from the rate the continued checkpoint's last step used linearly
  # to 0 over `steps`, no warm-up (`learning_rate` and `warmup_steps` do not apply).
  schedule: str = "cosine"
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  # Parameters weight decay skips, one of WEIGHT_DECAY_EXEMPT: "embedding" (the input
  # embedding only, as the release: its RMSNorm weights are decayed) or "embedding_and_norms"
  # (also every norm scale, the common choice since decay pulls a scale towards 0, not 1).
  weight_decay_exempt: str = "embedding_and_norms"
  grad_clip: float = 1.0
  # The global batch is split into this many micro-batches whose gradients are averaged.
  grad_accum_steps: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  # Peak FLOP/s of one device for MFU; 0 = look the device up (unknown devices report none).
  peak_flops: float = 0.0
  # Start a new run from these parameters (a parameter checkpoint, e.g. a Hugging Face import
  # or a pruned model, or another run's workdir) with a fresh optimiser. Ignored on resume.
  init_from: str = ""
  # Continue another run (its workdir) as the release anneals: its newest checkpoint's
  # parameters, Adam moments, step count and data position carry over, and this run trains
  # `steps` more steps on top with schedule "linear_from_checkpoint" (train/continuation.py).
  # The architecture may change only where the parameter shapes stay (e.g. a StdMoE continued
  # with the document pool on). Read at the first start; a resume keeps the recorded start.
  continue_from: str = ""
  # With continue_from: carry the data iterator's position over (the same data stream, as the
  # release). False starts this run's data stream at its beginning (another anneal mix).
  continue_data_position: bool = True

  def __post_init__(self):
    positive = ("steps", "grad_accum_steps", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints")
    for name in positive:
      if getattr(self, name) < 1:
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: must be >= 1")
    if self.schedule not in SCHEDULES:
      raise ConfigError(f"TrainConfig.schedule={self.schedule!r} is invalid: allowed values are "
                        f"{list(SCHEDULES)}")
    if self.schedule_steps < 0:
      raise ConfigError(f"TrainConfig.schedule_steps={self.schedule_steps!r} is invalid: must "
                        "be >= 0 (0 = train.steps)")
    if self.warmup_steps < 0:
      raise ConfigError(f"TrainConfig.warmup_steps={self.warmup_steps!r} is invalid: must be >= 0")
    if self.eval_batches < 1:
      raise ConfigError(f"TrainConfig.eval_batches={self.eval_batches!r} is invalid: an "
                        "evaluation needs at least one batch; set eval_batches >= 1 (it runs "
                        "every eval_every steps and at the last step)")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ConfigError(f"TrainConfig.learning_rate={self.learning_rate!r} is invalid: it "
                        "would make the update of step 1 non-finite; set a finite number > 0 "
                        "(the release's peak is 4e-3)")
    if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
      raise ConfigError(f"TrainConfig.grad_clip={self.grad_clip!r} is invalid: it is the "
                        "largest global gradient norm, so it must be a finite number > 0 "
                        "(the release clips at 1.0)")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: Adam's "
                          "moment decay must lie in [0, 1) (the release uses b1=0.9, b2=0.95)")
    if not self.eps > 0:
      raise ConfigError(f"TrainConfig.eps={self.eps!r} is invalid: must be > 0")
    if not self.weight_decay >= 0:
      raise ConfigError(f"TrainConfig.weight_decay={self.weight_decay!r} is invalid: must be "
                        ">= 0")
    if self.weight_decay_exempt not in WEIGHT_DECAY_EXEMPT:
      raise ConfigError(f"TrainConfig.weight_decay_exempt={self.weight_decay_exempt!r} is "
                        f"invalid: allowed values are {list(WEIGHT_DECAY_EXEMPT)} (the release "
                        "exempts the embedding only)")
    continues = self.schedule == "linear_from_checkpoint"
    if continues != bool(self.continue_from):
      raise ConfigError(
          f"TrainConfig.continue_from={self.continue_from!r} with schedule={self.schedule!r} is "
          "invalid: a continued run anneals from its checkpoint's rate, so set both "
          "train.continue_from=WORKDIR and train.schedule='linear_from_checkpoint', or neither")
    if continues and self.warmup_steps:
      raise ConfigError(f"TrainConfig.warmup_steps={self.warmup_steps!r} is invalid with "
                        "schedule='linear_from_checkpoint': a continued run starts at the rate "
                        "its checkpoint ended at, with no second warm-up; set warmup_steps=0")
    if self.continue_from and self.init_from:
      raise ConfigError("TrainConfig.init_from and continue_from are both set: init_from starts "
                        "fresh from parameters, continue_from carries a run's optimiser and "
                        "data on; set one of them")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ConfigError(f"TrainConfig.final_lr_fraction={self.final_lr_fraction!r} is invalid: "
                        "must lie in [0, 1]")
