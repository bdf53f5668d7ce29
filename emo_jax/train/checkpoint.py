"""Orbax checkpoints of a training run: train state, data-iterator state and config together.

A run must be able to die at any moment (preemption, SIGKILL, a full disk) and the next start in
the same workdir must continue exactly where the last good checkpoint left it. Orbax gives the
atomicity (a save is written to a temporary directory and renamed when complete, so a save cut
short is never mistaken for a checkpoint); this module adds what a trainer needs around it:

* the Grain iterator state (one file per process) beside the train state, so a resumed run sees
  exactly the batches it would have seen;
* the experiment config, so an incompatible restart is refused with the fields that differ
  (every architecture field, config.ModelConfig; the data stream, with the fingerprint of its
  documents, data.fingerprint; the length of the learning-rate schedule; the execution section,
  execution.ExecutionConfig, is free to change);
* restore-latest that falls back to the previous checkpoint, saying so and naming the error,
  when the latest one is unreadable (corrupted or truncated files). A checkpoint that reads but
  does not fit the data is refused like a config change and stays where it is: only what cannot
  be read is moved to `corrupt_checkpoints/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from emo_jax.config import ModelConfig
from emo_jax.data import fingerprint as fingerprint_lib
from emo_jax.data.pipeline import IteratorStateMismatchError
from emo_jax.model.execution import split_model_fields

log = logging.getLogger(__name__)

# Data fields that decide which documents come in which order: the saved iterator state means
# nothing under other values. (seq_len and batch_size may change: the state points at a
# document and an offset into it.) The `data_stream` section adds the fingerprint of the
# documents themselves (data.fingerprint).
DATA_STREAM_FIELDS = ("corpus", "data_dir", "tokenizer", "seed", "synthetic_documents")
# Train fields a resumed run must keep: the schedule's length decides every later learning rate,
# and a continued run's start (train/continuation.py) is fixed at its first start.
TRAIN_FIELDS = ("schedule_steps", "continue_from")


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written by an incompatible config."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none can be read."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  config: dict


def incompatible_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Dotted names of the fields whose change makes the saved checkpoint unusable.

  Every ModelConfig field counts (the architecture is what the checkpoint is); a field that one
  side lacks (a config written before the field existed, or an execution field that configs
  saved before the split kept in the model section) is not compared.
  """
  architecture = tuple(f.name for f in dataclasses.fields(ModelConfig))
  out = []
  for section, fields in (("model", architecture), ("data", DATA_STREAM_FIELDS),
                          ("train", TRAIN_FIELDS)):
    old, new = saved.get(section, {}), current.get(section, {})
    for name in fields:
      if name in old and name in new and old[name] != new[name]:
        out.append(f"{section}.{name}: checkpoint has {old[name]!r}, config has {new[name]!r}")
  out += fingerprint_lib.changed_fields(saved.get("data_stream", {}),
                                        current.get("data_stream", {}))
  return out


class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the last `keep`, restores latest."""

  def __init__(self, directory: str | pathlib.Path, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator, config: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Starts saving (returns at once when asynchronous); False if not a save step."""
    return self._manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iterator),
                                config=ocp.args.JsonSave(dict(config))))

  def saved_config(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"])

  def latest_readable_config(self) -> dict | None:
    """The config of the newest checkpoint whose config reads, or None."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.saved_config(step)
      except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
        continue
    return None

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """The train state of checkpoint `step`; given a data iterator, also moves it to the
    position saved there. No compatibility check and no fallback (restore_latest does both)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def restore_latest(self, abstract_state: Any, data_iterator,
                     config: Mapping[str, Any]) -> Restored | None:
    """Restores the newest readable checkpoint into `data_iterator` and returns the state.

    Returns None when the directory holds no checkpoint. Raises CheckpointMismatchError when the
    checkpoint's config differs in architecture or data stream, and NoUsableCheckpointError
    when checkpoints exist but none can be read.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for step in steps:
      try:
        saved = self.saved_config(step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"step {step}: config unreadable ({type(e).__name__}: {e})")
        log.warning("checkpoint at step %d is unreadable (%s); trying an earlier one", step, e)
        continue
      mismatched = incompatible_fields(saved, config)
      if mismatched:
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {self.directory} was written by an incompatible "
            "config:\n  " + "\n  ".join(mismatched) +
            "\nUse a new --workdir for the new config, or restore the old values.")
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # pylint: disable=broad-except
        mismatch = _cause_of_type(e, IteratorStateMismatchError)
        if mismatch is not None:  # readable, but written on other data: not corruption
          raise CheckpointMismatchError(
              f"the checkpoint at step {step} in {self.directory} was written on another data "
              f"stream ({mismatch}); restore the data it was trained on, or use a new "
              "--workdir for the new data") from None
        failures.append(f"step {step}: {type(e).__name__}: {e}")
        log.warning("checkpoint at step %d is unreadable (%s: %s); falling back to an earlier "
                    "one", step, type(e).__name__, e)
        continue
      if step != steps[0]:
        bad = [s for s in steps if s > step]
        moved = self._quarantine(bad)
        log.warning("resumed from step %d because the newer checkpoint(s) %s could not be read "
                    "(%s); they were moved to %s", step, bad, "; ".join(failures), moved)
      return Restored(step=step, state=restored["state"], config=saved)
    raise NoUsableCheckpointError(
        f"no checkpoint in {self.directory} can be read:\n  " + "\n  ".join(failures) +
        f"\nMove {self.directory} aside to start afresh, or restore it from a backup.")

  def _quarantine(self, steps: list[int]) -> pathlib.Path:
    """Moves unreadable checkpoints out of the way (kept for inspection, never deleted)."""
    target = self.directory.parent / "corrupt_checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      source = self.directory / str(step)
      if source.exists():
        destination = target / str(step)
        suffix = 0
        while destination.exists():
          suffix += 1
          destination = target / f"{step}.{suffix}"
        source.rename(destination)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def param_shapes(params: Any) -> dict[str, tuple]:
  """{parameter path: shape} of a parameter tree (arrays or abstract shapes), to compare the
  layout of a checkpoint with a model's."""
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _cause_of_type(error: BaseException, kind: type) -> BaseException | None:
  """`error` or the first exception in its cause / context chain that is a `kind`."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, kind):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


# ---- parameter-only checkpoints (conversion, pruning, evaluation, init_from) -----------------
PARAMS_ITEM = "params"
MODEL_CONFIG_FILE = "model_config.json"


def save_params(directory: str | pathlib.Path, params: Any, model_config: Mapping[str, Any]) -> None:
  """Writes a parameter-only checkpoint: Orbax `params/` plus `model_config.json`.

  This is the exchange format between tools (Hugging Face import, expert pruning) and the
  trainer (`train.init_from`), which starts a fresh optimiser from it.
  """
  directory = pathlib.Path(directory).absolute()
  if (directory / PARAMS_ITEM).exists():
    raise FileExistsError(f"{directory / PARAMS_ITEM} already exists; choose another output "
                          "folder or remove it")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_ITEM, params)
  checkpointer.wait_until_finished()
  (directory / MODEL_CONFIG_FILE).write_text(json.dumps(dict(model_config), indent=2,
                                                        sort_keys=True))


def load_params(path: str | pathlib.Path, *, step: int | None = None):
  """(params, model config dict) from a parameter-only checkpoint or a training workdir.

  The model config holds the architecture only, also for checkpoints written when it still
  carried the execution settings.

  A training workdir (one with `checkpoints/`) gives the parameters of `step`, or of its newest
  checkpoint. Arrays come back as host NumPy arrays in their stored dtype.
  """
  path = pathlib.Path(path).absolute()
  if (path / PARAMS_ITEM).is_dir() and (path / MODEL_CONFIG_FILE).is_file():
    config = json.loads((path / MODEL_CONFIG_FILE).read_text())
    params = ocp.StandardCheckpointer().restore(path / PARAMS_ITEM)
    return _to_numpy(params), split_model_fields(config)[0]
  checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  manager = ocp.CheckpointManager(
      checkpoints, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                  "config": ocp.JsonCheckpointHandler()})
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(
        f"{path} holds neither a parameter checkpoint ({PARAMS_ITEM}/ + {MODEL_CONFIG_FILE}) nor "
        "training checkpoints; pass a training --workdir or the output of a converter")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {checkpoints}; available: {steps}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           config=ocp.args.JsonRestore()))
  manager.close()
  return (_to_numpy(restored["state"]["params"]),
          split_model_fields(dict(restored["config"])["model"])[0])


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)
