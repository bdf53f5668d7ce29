"""Continuing a run on top of its newest checkpoint: the release's anneal.

The release anneals its 1 T-token models for 50 B more tokens on top of the last checkpoint:
parameters, Adam moments, the step count and the data loader's position carry over, and the
learning rate falls linearly to 0 from the rate the checkpoint's last step used, with no
second warm-up; it also anneals a StdMoE checkpoint with the document pool turned on. With
`train.continue_from=W` and `train.schedule="linear_from_checkpoint"` the trainer does the same
(docs/algorithm.md, "Training recipe"):

* the new workdir's first start reads W's newest checkpoint (W locked meanwhile, so a trainer
  still writing it is refused) and records where it started (schedule.Continuation) in its own
  config; its resumes read that record and never W again, so W may be moved away afterwards;
* the model may change only where the parameter shapes stay (pool, loss weights, attention
  masking): other changes are refused naming the parameters and the fields that differ;
* the data position carries over only onto the same data stream (refused otherwise, unless
  `train.continue_data_position=False` starts the new data at its beginning).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping

from flax import nnx

from emo_jax.config import ConfigError, ModelConfig
from emo_jax.model.execution import split_model_fields
from emo_jax.model.transformer import Transformer
from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train.config import TrainConfig
from emo_jax.train.schedule import Continuation, last_learning_rate
from emo_jax.train.workdir import WorkdirLock

log = logging.getLogger(__name__)


def recorded(tc: TrainConfig, saved: Mapping[str, Any] | None) -> Continuation | None:
  """The Continuation a resumed continued run recorded at its first start (None for a run that
  continues nothing). `saved` is the config of the workdir's newest readable checkpoint."""
  if not tc.continue_from:
    return None
  start = (saved or {}).get("continuation")
  if not start:
    raise ConfigError(f"train.continue_from={tc.continue_from} is set but this workdir already "
                      "holds checkpoints of a run that continued nothing; use a new --workdir "
                      "for the continued run")
  return Continuation.from_dict(start)


class Source:
  """The run being continued, locked while it is read: its newest checkpoint's step and config.

  `close` releases the lock once the state is restored (or the start failed).
  """

  def __init__(self, workdir: str | pathlib.Path):
    self.workdir = pathlib.Path(workdir).absolute()
    checkpoints = self.workdir / "checkpoints"
    if not checkpoints.is_dir():
      raise ConfigError(
          f"train.continue_from={workdir} holds no training checkpoints ({checkpoints} is "
          "missing): pass the --workdir of a training run (a parameter-only checkpoint has no "
          "optimiser state to continue: start from it with train.init_from)")
    self._lock = WorkdirLock(self.workdir)
    self._checkpointer = ckpt_lib.Checkpointer(checkpoints, save_every=1, async_save=False)
    steps = self._checkpointer.all_steps()
    if not steps:
      self.close()
      raise ConfigError(f"train.continue_from={workdir} holds no finished checkpoint yet; train "
                        "it first (or wait for its first save)")
    self.step = steps[-1]
    try:
      self.record = self._checkpointer.saved_config(self.step)
    except Exception as e:  # pylint: disable=broad-except
      self.close()
      raise ckpt_lib.NoUsableCheckpointError(
          f"the newest checkpoint of train.continue_from={workdir} (step {self.step}) cannot be "
          f"read ({type(e).__name__}: {e}); resume that run once so it falls back to a readable "
          "checkpoint, then continue it") from None
    self.continuation = Continuation(workdir=str(self.workdir), step=self.step,
                                     learning_rate=last_learning_rate(self.record, self.step))

  def close(self) -> None:
    if getattr(self, "_checkpointer", None) is not None:
      self._checkpointer.close()
      self._checkpointer = None
    self._lock.release()

  def check_compatible(self, model: ModelConfig, like_params: Any, record: Mapping[str, Any],
                       tc: TrainConfig) -> None:
    """Refuses a model whose parameter shapes differ from the checkpoint's, and (when the data
    position carries over) another data stream; each error names what differs and the fix."""
    saved_model = ModelConfig.from_dict(split_model_fields(self.record["model"])[0])
    theirs = ckpt_lib.param_shapes(nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Transformer(saved_model, rngs=nnx.Rngs(0))))))
    ours = ckpt_lib.param_shapes(like_params)
    if theirs != ours:
      differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
      fields = ckpt_lib.incompatible_fields({"model": saved_model.to_dict()},
                                            {"model": model.to_dict()})
      raise ConfigError(
          f"train.continue_from={self.workdir} holds another parameter layout: the parameters "
          f"{differ[:6]} differ (checkpoint {[theirs.get(k) for k in differ[:6]]}, model "
          f"{[ours.get(k) for k in differ[:6]]}). A continued run may change only what keeps the "
          "shapes (the pool, loss weights, attention masking); restore these fields or start "
          "fresh with train.init_from:" + "".join("\n  " + f for f in fields))
    if tc.continue_data_position:
      stream = lambda r: {"data": r.get("data", {}), "data_stream": r.get("data_stream", {})}
      changed = ckpt_lib.incompatible_fields(stream(self.record), stream(record))
      if changed:
        raise ConfigError(
            f"train.continue_from={self.workdir} trained on another data stream, so its data "
            "position means nothing here:\n  " + "\n  ".join(changed) +
            "\nContinue on its data, or set train.continue_data_position=False to read this "
            "data from its beginning")

  def restore(self, abstract_state: Any, data_iterator, tc: TrainConfig) -> Any:
    """The train state of the newest checkpoint, with the data iterator moved to its position
    when train.continue_data_position is on."""
    try:
      state = self._checkpointer.restore(
          self.step, abstract_state, data_iterator if tc.continue_data_position else None)
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt_lib.NoUsableCheckpointError(
          f"the checkpoint at step {self.step} of train.continue_from={self.workdir} cannot be "
          f"read ({type(e).__name__}: {e}); resume that run once so it falls back to a readable "
          "checkpoint, then continue it") from None
    c = self.continuation
    log.info("continuing %s from step %d: %d more steps to step %d, the learning rate from "
             "%.3g (its last step's) linearly to 0; data %s", self.workdir, c.step, tc.steps,
             c.step + tc.steps, c.learning_rate,
             "from its position there" if tc.continue_data_position else "from its beginning")
    return state

