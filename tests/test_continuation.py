"""Continuing a run on top of its checkpoint (train.continue_from): the release's anneal.

The continued run must carry over parameters, Adam moments, the step count and the data
position, start at the rate the checkpoint's last step used and fall linearly to 0, resume from
its own checkpoints without the source, and refuse what cannot carry over."""

import json
import pathlib
import shutil
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from emo_jax.config import ConfigError
from emo_jax.train import TrainConfig
from emo_jax.train import trainer as train_lib
from emo_jax.train.schedule import Continuation, last_learning_rate, learning_rate_schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402


def tiny_config(pool=False, **train):
  config = tiny.get_config()
  config.model.pool = pool
  config.data.synthetic_documents = 400
  config.execution.expert_backend = "dense"
  settings = dict(log_every=1, eval_every=1000, eval_batches=1, async_checkpoint=False,
                  warmup_steps=2)
  settings.update(train)
  config.train.update(settings)
  return config


def continued(source, pool=True, **train):
  settings = dict(continue_from=str(source), schedule="linear_from_checkpoint", warmup_steps=0)
  settings.update(train)
  return tiny_config(pool=pool, **settings)


def rows(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines)}


def saved_state(workdir, step):
  restored = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints").restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]


# ---- the schedule ------------------------------------------------------------------------------
def test_schedule_from_a_checkpoint_falls_linearly_from_its_rate_to_zero():
  tc = TrainConfig(steps=8, schedule="linear_from_checkpoint", warmup_steps=0,
                   continue_from="/w")
  lr = learning_rate_schedule(tc, Continuation("/w", step=100, learning_rate=2e-3))
  got = [float(lr(c)) for c in (100, 102, 104, 107, 108)]
  np.testing.assert_allclose(got, [2e-3, 1.5e-3, 1e-3, 2.5e-4, 0.0], rtol=1e-6, atol=1e-12)
  with pytest.raises(ConfigError, match="set train.continue_from"):
    learning_rate_schedule(tc)
  with pytest.raises(ConfigError, match="cannot continue a checkpoint"):
    learning_rate_schedule(TrainConfig(), Continuation("/w", 1, 1e-3))


def test_last_learning_rate_is_the_rate_of_the_checkpoints_last_step():
  tc = TrainConfig(steps=50, learning_rate=4e-3, warmup_steps=10, schedule_steps=50)
  record = {"train": tc.to_dict()}
  assert last_learning_rate(record, 30) == pytest.approx(float(learning_rate_schedule(tc)(29)))
  # A continuation of a continuation starts where the first one was at its last step.
  second = TrainConfig(steps=10, schedule_steps=10, schedule="linear_from_checkpoint",
                       warmup_steps=0, continue_from="/w")
  chained = {"train": second.to_dict(),
             "continuation": {"workdir": "/w", "step": 50, "learning_rate": 1e-3}}
  assert last_learning_rate(chained, 55) == pytest.approx(1e-3 * (1 - 4 / 10))
  with pytest.raises(ConfigError, match="has taken no step"):
    last_learning_rate(record, 0)


@pytest.mark.parametrize("fields, message", [
    (dict(continue_from="/w"), "set both train.continue_from=WORKDIR and train.schedule"),
    (dict(schedule="linear_from_checkpoint", warmup_steps=0), "or neither"),
    (dict(continue_from="/w", schedule="linear_from_checkpoint"), "set warmup_steps=0"),
    (dict(continue_from="/w", schedule="linear_from_checkpoint", warmup_steps=0,
          init_from="/p"), "set one of them"),
])
def test_continuation_settings_that_cannot_work_are_refused(fields, message):
  with pytest.raises(ConfigError, match=message):
    TrainConfig(**fields)


# ---- runs ------------------------------------------------------------------------------------------
def test_what_cannot_carry_over_is_refused_before_a_step(tmp_path):
  source = tmp_path / "stdmoe"
  train_lib.train_and_evaluate(tiny_config(steps=2, checkpoint_every=2), source)
  wider = continued(source, steps=2)
  wider.model.expert_hidden = 48
  with pytest.raises(ConfigError, match=r"another parameter layout(.|\n)*model\.expert_hidden"):
    train_lib.train_and_evaluate(wider, tmp_path / "a")
  other_data = continued(source, steps=2)
  other_data.data.seed = 7
  with pytest.raises(ConfigError, match=r"another data stream(.|\n)*data\.seed(.|\n)*"
                     r"continue_data_position=False"):
    train_lib.train_and_evaluate(other_data, tmp_path / "b")
  with pytest.raises(ConfigError, match="holds no training checkpoints"):
    train_lib.train_and_evaluate(continued(tmp_path / "nothing", steps=2), tmp_path / "c")
  with pytest.raises(ConfigError, match="this run's own --workdir"):
    train_lib.train_and_evaluate(continued(tmp_path / "d", steps=2), tmp_path / "d")
  # A refused start leaves no workdir behind, and the source is untouched.
  assert not any((tmp_path / n).exists() for n in "abc")
  assert sorted(rows(source)) == [1, 2]
  # A workdir that already trained without a continuation cannot become one.
  with pytest.raises(Exception, match="continue_from"):
    train_lib.train_and_evaluate(continued(tmp_path / "x", steps=4), source)


@pytest.mark.slow
def test_continuing_carries_moments_step_and_data_and_resumes_without_the_source(tmp_path):
  """The continued run's first step sees exactly the parameters, Adam moments and batch the
  source's uninterrupted run would have had at that step: its loss and new moments equal that
  run's (the moments do not depend on the rate), only the update's size differs."""
  source, straight, annealed = tmp_path / "w", tmp_path / "straight", tmp_path / "anneal"
  base = dict(steps=6, schedule_steps=12, checkpoint_every=6)
  train_lib.train_and_evaluate(tiny_config(**base), source)
  train_lib.train_and_evaluate(tiny_config(**{**base, "steps": 7}), straight)
  w_rate = rows(source)[6]["learning_rate"]

  # The StdMoE continued without the pool (so its step 7 matches the straight run's), 2 of 4
  # annealing steps, then the source moved away and the run resumed to the end.
  train_lib.train_and_evaluate(continued(source, pool=False, steps=2, schedule_steps=4,
                                         checkpoint_every=1), annealed)
  first = rows(annealed)
  assert sorted(first) == [7, 8]
  assert first[7]["loss"] == pytest.approx(rows(straight)[7]["loss"], rel=1e-6)
  ours, theirs = saved_state(annealed, 7), saved_state(straight, 7)
  adam_ours, adam_theirs = ours["opt_state"][1][0], theirs["opt_state"][1][0]
  assert int(adam_ours["count"]) == int(adam_theirs["count"]) == 7
  for a, b in zip(*(jax_leaves(x) for x in (adam_ours["mu"], adam_theirs["mu"]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  for a, b in zip(*(jax_leaves(x) for x in (adam_ours["nu"], adam_theirs["nu"]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)
  record = json.loads((annealed / "config.json").read_text())["continuation"]
  assert record == {"workdir": str(source.absolute()), "step": 6,
                    "learning_rate": pytest.approx(w_rate, rel=1e-6)}

  shutil.move(source, tmp_path / "moved")
  train_lib.train_and_evaluate(continued(source, pool=False, steps=4, schedule_steps=4,
                                         checkpoint_every=1), annealed)
  rates = [rows(annealed)[s]["learning_rate"] for s in (7, 8, 9, 10)]
  np.testing.assert_allclose(rates, [w_rate, 0.75 * w_rate, 0.5 * w_rate, 0.25 * w_rate],
                             rtol=1e-5)

  # A StdMoE continued with the document pool on: same shapes, so it carries over and trains.
  pooled = train_lib.train_and_evaluate(
      continued(tmp_path / "moved", pool=True, steps=2), tmp_path / "emo")
  assert np.isfinite(pooled["loss"]) and sorted(rows(tmp_path / "emo")) == [7, 8]


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
