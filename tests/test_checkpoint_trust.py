"""Checkpoints that can be trusted: no non-finite state is ever saved, a changed data stream is
refused (not quarantined), a refused restart changes nothing, and extending a run keeps its
learning-rate curve."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train import trainer as train_lib
from emo_jax.config import ConfigError
from emo_jax.data import corpus as corpus_lib, fingerprint as fingerprint_lib
from emo_jax.data.pipeline import IteratorStateMismatchError
from emo_jax.train.workdir import WorkdirLock, WorkdirUnusableError

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402


def tiny_config(**train):
  config = tiny.get_config()
  config.data.synthetic_documents = 400
  settings = dict(log_every=1, eval_every=1000, eval_batches=1, async_checkpoint=False,
                  warmup_steps=2)
  settings.update(train)
  config.train.update(settings)
  return config


def saved_steps(workdir):
  return ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", save_every=1).all_steps()


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]


def all_finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


# ---- never save a poisoned state -----------------------------------------------------------
@pytest.mark.slow
def test_a_non_finite_update_on_a_save_step_is_never_written(tmp_path, monkeypatch):
  """Step 4's update is poisoned (the loss of step 4 is still finite): no checkpoint at 4."""
  original = train_lib.train_step

  def poisoned_at_step_4(state, batch, **kwargs):
    new, stats = original(state, batch, **kwargs)
    poison = jnp.where(new.step == 4, jnp.nan, 0.0)
    return new.replace(params=jax.tree.map(lambda p: p + poison, new.params)), {
        **stats, "state_finite": stats["state_finite"] & (new.step != 4)}

  monkeypatch.setattr(train_lib, "train_step", poisoned_at_step_4)
  with pytest.raises(train_lib.NonFiniteLossError, match=r"update of step 4 .*The last "
                     r"checkpoint, step 2, holds a finite state"):
    train_lib.train_and_evaluate(tiny_config(steps=8, checkpoint_every=2), tmp_path)
  assert saved_steps(tmp_path) == [2]
  params, _ = ckpt_lib.load_params(tmp_path)
  assert all_finite(params)


@pytest.mark.slow
def test_an_overflowing_learning_rate_stops_at_step_1_without_a_checkpoint(tmp_path):
  # 1e39 is a finite Python float but overflows float32: every update is infinite.
  with pytest.raises(train_lib.NonFiniteLossError, match=r"step 1 .*No checkpoint was written"):
    train_lib.train_and_evaluate(tiny_config(steps=4, checkpoint_every=1, learning_rate=1e39),
                                 tmp_path)
  assert saved_steps(tmp_path) == []


def test_state_finiteness_is_checked_on_the_updated_parameters():
  state = train_lib.TrainState(step=jnp.int32(0), params={"w": jnp.ones(3)},
                               opt_state=({"m": jnp.zeros(3)},))
  assert bool(train_lib._all_finite((state.params, state.opt_state)))
  bad = state.replace(opt_state=({"m": jnp.array([0.0, jnp.inf, 0.0])},))
  assert not bool(train_lib._all_finite((bad.params, bad.opt_state)))
  assert train_lib._first_non_finite(bad) == "['opt_state'][0]['m']"


# ---- the data stream is part of what a checkpoint is ----------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step tiny run with checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained")
  train_lib.train_and_evaluate(tiny_config(steps=4, checkpoint_every=2), workdir)
  return workdir


@pytest.mark.slow
def test_a_changed_synthetic_corpus_is_refused_and_nothing_moves(trained):
  config_json = (trained / "config.json").read_bytes()
  changed = tiny_config(steps=6, checkpoint_every=2)
  changed.data.synthetic_documents = 600
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"data\.synthetic_documents"):
    train_lib.train_and_evaluate(changed, trained)
  assert not (trained / "corrupt_checkpoints").exists()
  assert (trained / "config.json").read_bytes() == config_json
  assert saved_steps(trained) == [2, 4]


def test_fingerprint_names_what_changed_in_the_documents():
  dc = corpus_lib.DataConfig(corpus="synthetic", tokenizer="bytes", synthetic_documents=200)
  corpus = corpus_lib.load_corpus(dc)
  before = fingerprint_lib.data_stream_fingerprint(corpus)
  corpus.splits["train"][len(corpus.splits["train"]) // 2 + 1]["text"] += " edited"
  after = fingerprint_lib.data_stream_fingerprint(corpus)
  changed = fingerprint_lib.changed_fields(before, after)
  assert len(changed) == 1 and changed[0].startswith("data_stream.train_sample_digest")
  assert fingerprint_lib.changed_fields(before, before) == []


def _prepared(tmp_path, name, docs):
  corpus = tmp_path / f"{name}.jsonl"
  corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
  out = tmp_path / f"{name}_data"
  corpus_lib.build_corpus(str(corpus), out, tokenizer="bytes")
  return corpus, out


@pytest.mark.slow
def test_another_data_dir_or_an_edited_split_is_refused_naming_it(tmp_path):
  docs = [{"text": f"document {i} " + "word " * (20 + i % 7), "domain": "ab"[i % 2]}
          for i in range(300)]
  corpus, data_dir = _prepared(tmp_path, "mine", docs)
  _, other_dir = _prepared(tmp_path, "mine_again", docs)
  config = tiny_config(steps=2, checkpoint_every=2)
  config.data.update(corpus=str(corpus), data_dir=str(data_dir), tokenizer="bytes")
  workdir = tmp_path / "run"
  train_lib.train_and_evaluate(config, workdir)
  config_json = (workdir / "config.json").read_bytes()

  moved = tiny_config(steps=4, checkpoint_every=2)
  moved.data.update(corpus=str(corpus), data_dir=str(other_dir), tokenizer="bytes")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"data\.data_dir"):
    train_lib.train_and_evaluate(moved, workdir)

  train_split = data_dir / "train.jsonl"
  original = train_split.read_text()
  lines = original.splitlines(keepends=True)
  train_split.write_text("".join(lines[:-1]))  # one training document fewer
  longer = tiny_config(steps=4, checkpoint_every=2)
  longer.data.update(corpus=str(corpus), data_dir=str(data_dir), tokenizer="bytes")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"data_stream\.train_documents"):
    train_lib.train_and_evaluate(longer, workdir)
  assert not (workdir / "corrupt_checkpoints").exists()
  assert (workdir / "config.json").read_bytes() == config_json

  train_split.write_text(original)  # the original data: the same command resumes
  train_lib.train_and_evaluate(longer, workdir)
  assert saved_steps(workdir)[-1] == 4
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]


def test_an_iterator_mismatch_is_found_behind_the_restore_machinery():
  """The data iterator's mismatch error, however wrapped, decides refusal over quarantine."""
  inner = IteratorStateMismatchError("offset 471 lies past the end")
  try:
    try:
      raise inner
    except IteratorStateMismatchError as e:
      raise RuntimeError("restore failed") from e
  except RuntimeError as outer:
    assert ckpt_lib._cause_of_type(outer, IteratorStateMismatchError) is inner
  assert ckpt_lib._cause_of_type(ValueError("other"), IteratorStateMismatchError) is None


# ---- a refused restart and a failed start change nothing -------------------------------------
@pytest.mark.slow
def test_a_refused_architecture_change_leaves_config_json_byte_identical(trained):
  config_json = (trained / "config.json").read_bytes()
  changed = tiny_config(steps=6, checkpoint_every=2)
  changed.model.d_model = 32
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"model\.d_model"):
    train_lib.train_and_evaluate(changed, trained)
  assert (trained / "config.json").read_bytes() == config_json


def test_a_run_that_fails_before_its_first_step_leaves_no_workdir(tmp_path):
  small_vocab = tiny_config(steps=2)
  small_vocab.model.vocab_size = 100
  with pytest.raises(ConfigError, match="vocab_size"):
    train_lib.train_and_evaluate(small_vocab, tmp_path / "new")
  assert not (tmp_path / "new").exists()
  too_long = tiny_config(steps=2)
  too_long.data.seq_len = 256
  with pytest.raises(ConfigError, match=r"data\.seq_len=256 exceeds model\.max_seq_len=128"):
    train_lib.train_and_evaluate(too_long, tmp_path / "new")
  assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_a_bad_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(WorkdirUnusableError, match=r"--workdir .* cannot be used"):
    WorkdirLock(blocker)  # a file, not a folder
  result = subprocess.run(  # under a file, through the command line
      [sys.executable, "-m", "experiments.train", "--config", "configs/tiny.py",
       "--workdir", str(blocker / "run"), "--config.train.steps=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --workdir") and "cannot be used" in last, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


# ---- extending a run keeps its past --------------------------------------------------------
@pytest.mark.slow
def test_extending_a_run_continues_its_schedule_exactly(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "short")  # a finished 4-step run, extended to 8
  train_lib.train_and_evaluate(tiny_config(steps=8, checkpoint_every=2), tmp_path / "short")
  train_lib.train_and_evaluate(tiny_config(steps=8, checkpoint_every=2, schedule_steps=4),
                               tmp_path / "straight")
  extended, straight = read_metrics(tmp_path / "short"), read_metrics(tmp_path / "straight")
  assert [r["step"] for r in extended] == list(range(1, 9))
  for a, b in zip(extended, straight):
    assert a["learning_rate"] == b["learning_rate"] and a["loss"] == b["loss"], a["step"]
  saved = json.loads((tmp_path / "short" / "config.json").read_text())
  assert saved["train"]["schedule_steps"] == 4
  # Asking for another schedule length on resume would rewrite the curve: refused.
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"train\.schedule_steps"):
    train_lib.train_and_evaluate(tiny_config(steps=10, schedule_steps=10), tmp_path / "short")
