"""Experiment: the one typed description of a run (model, execution, data, train, mesh).

A config file (configs/*.py) returns an `ml_collections.ConfigDict` of plain sections so that
every field can be overridden on the command line (`--config.model.top_k=4`). That dict is
parsed exactly once, by `Experiment.from_config` (experiments/cli.py for the entry points,
`train_and_evaluate` for library callers that pass a dict); from there on every component gets
the typed section it needs and nothing re-parses a dict. What a workdir's `config.json` holds is
`Experiment.to_dict()` plus the data stream's fingerprint, and `from_config` reads it back,
including configs saved before the execution fields left the model section
(docs/architecture.md, "Configs").

Every problem, in a section or between sections, is one `ConfigError` naming the field and the
fix, raised before a workdir is touched or a model compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import ml_collections

from emo_jax.config import ConfigError, ModelConfig
from emo_jax.data.corpus import DataConfig
from emo_jax.model.execution import ExecutionConfig, split_model_fields
from emo_jax.model.sharding import MeshConfig
from emo_jax.train.config import TrainConfig

SECTIONS = {"model": ModelConfig, "execution": ExecutionConfig, "data": DataConfig,
            "train": TrainConfig, "mesh": MeshConfig}
REQUIRED = ("model", "data", "train")
# Keys a saved config.json holds beside the sections (checkpoint.py compares them itself).
SAVED_ONLY = ("data_stream",)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What to train, how to run it, on which data, for how long, on which devices."""

  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  execution: ExecutionConfig = ExecutionConfig()
  mesh: MeshConfig = MeshConfig()
  name: str = ""

  def __post_init__(self):
    for section, kind in SECTIONS.items():
      value = getattr(self, section)
      if not isinstance(value, kind):
        raise ConfigError(f"Experiment.{section} must be a {kind.__name__}, got "
                          f"{type(value).__name__}; build it with {kind.__name__}(...) or "
                          "parse a config with Experiment.from_config")
    _check_sections_agree(self)

  @classmethod
  def from_config(cls, config: Any) -> "Experiment":
    """The Experiment of a config: an Experiment (returned as it is), an ml_collections
    ConfigDict (a config file's `get_config()`, overrides applied) or a mapping (e.g. a
    workdir's config.json)."""
    if isinstance(config, Experiment):
      return config
    values = _plain(config)
    if not isinstance(values, Mapping):
      raise ConfigError(f"an experiment config must be a mapping of sections, got "
                        f"{type(config).__name__}")
    unknown = sorted(set(values) - set(SECTIONS) - {"name"} - set(SAVED_ONLY))
    if unknown:
      close = difflib.get_close_matches(unknown[0], list(SECTIONS), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown config section {unknown[0]!r}{hint}; an experiment has "
                        f"{sorted(SECTIONS)} and a name")
    missing = [s for s in REQUIRED if s not in values]
    if missing:
      raise ConfigError(f"the config has no {missing[0]!r} section; an experiment needs "
                        f"{list(REQUIRED)} (execution and mesh default to one device)")
    model, misplaced = split_model_fields(values["model"])
    if misplaced:
      names = sorted(misplaced)
      raise ConfigError(f"model.{names[0]} is a run setting, not architecture: set it as "
                        f"execution.{names[0]} (e.g. --config.execution.{names[0]}=...); "
                        f"misplaced: {['model.' + n for n in names]}")
    sections = {"model": ModelConfig.from_dict(model)}
    for name in ("execution", "data", "train", "mesh"):
      sections[name] = SECTIONS[name].from_dict(values.get(name) or {})
    return cls(name=str(values.get("name") or ""), **sections)

  def replace(self, **changes: Any) -> "Experiment":
    """A copy with whole sections (or the name) replaced, checked again."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """Plain sections, as config.json stores them and `from_config` reads them."""
    out = {name: getattr(self, name).to_dict() for name in SECTIONS}
    out["name"] = self.name
    return out

  def to_config_dict(self) -> ml_collections.ConfigDict:
    """The ConfigDict a config file returns, so that the command line can override any field."""
    return ml_collections.ConfigDict(self.to_dict())


def _plain(config: Any) -> Any:
  return config.to_dict() if hasattr(config, "to_dict") else config


def _check_sections_agree(e: Experiment) -> None:
  """What no single section can check."""
  if e.data.batch_size % e.train.grad_accum_steps:
    raise ConfigError(f"data.batch_size={e.data.batch_size} must be a multiple of "
                      f"train.grad_accum_steps={e.train.grad_accum_steps}")
  scope = e.model.lb_scope_sequences
  micro = e.data.batch_size // e.train.grad_accum_steps
  if scope and micro % scope:
    accum = (f" / train.grad_accum_steps={e.train.grad_accum_steps} = {micro} sequences per "
             "micro-batch" if e.train.grad_accum_steps > 1 else "")
    raise ConfigError(f"data.batch_size={e.data.batch_size}{accum} is not a multiple of "
                      f"model.lb_scope_sequences={scope} (the load-balancing group): make "
                      f"data.batch_size a multiple of {scope * e.train.grad_accum_steps}, or "
                      f"set model.lb_scope_sequences to a divisor of {micro} (0 balances over "
                      "the whole batch)")
  if e.data.seq_len > e.model.max_seq_len:
    raise ConfigError(f"data.seq_len={e.data.seq_len} exceeds model.max_seq_len="
                      f"{e.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len "
                      f"to {e.data.seq_len}")
