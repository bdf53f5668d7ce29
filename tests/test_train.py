"""The trainer: loss pieces, optimiser recipe, and a run that survives kills and bad states."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.train import trainer as train_lib
from emo_jax.config import ConfigError, ModelConfig
from emo_jax.model.execution import ExecutionConfig, split_model_fields
from emo_jax.model.losses import token_losses
from emo_jax.model.transformer import Transformer
from emo_jax.convert import loading

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402  (the config the acceptance command uses)


def tiny_config(**train):
  config = tiny.get_config()
  config.data.synthetic_documents = 400
  settings = dict(log_every=1, eval_every=1000, eval_batches=2, async_checkpoint=False)
  settings.update(train)
  config.train.update(settings)
  return config


def read_metrics(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


# ---- pieces ---------------------------------------------------------------------------------
def test_token_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 3))
  ce, lse = token_losses(jnp.asarray(logits), jnp.asarray(targets))
  ref_lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  ref_ce = ref_lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(ce), ref_ce, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5)


def test_schedule_warms_up_then_decays_to_ten_percent():
  tc = train_lib.TrainConfig(steps=1000, learning_rate=4e-3, warmup_steps=100)
  lr = train_lib.learning_rate_schedule(tc)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(50)), 2e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 4e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(1000)), 4e-4, rtol=1e-5)
  anneal = train_lib.learning_rate_schedule(tc.__class__(steps=1000, warmup_steps=0,
                                                         schedule="linear"))
  np.testing.assert_allclose(float(anneal(500)), 2e-3, rtol=1e-6)
  assert float(anneal(1000)) == 0.0


@pytest.mark.parametrize("exempt", ["embedding_and_norms", "embedding"])
def test_weight_decay_mask_exempts_what_train_config_names(exempt):
  """The default skips the embedding and every norm scale; "embedding" (the release, and
  configs/_release.py) decays the norms too. Every other weight decays either way."""
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict()).replace(qk_norm=True)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract))
  mask = train_lib.decay_mask(params, exempt)
  norms = [mask["final_norm"]["weight"], mask["blocks"]["attn_norm"]["weight"],
           mask["blocks"]["mlp_norm"]["weight"], mask["blocks"]["attn"]["q_norm"]["weight"],
           mask["blocks"]["attn"]["k_norm"]["weight"]]
  assert norms == [exempt == "embedding"] * 5
  assert mask["embed"] is False
  names = [(jax.tree_util.keystr(path), m) for path, m in jax.tree_util.tree_leaves_with_path(mask)]
  others = [m for name, m in names if "norm" not in name and "embed" not in name]
  assert others and all(m is True for m in others)
  assert mask["lm_head"] is True and mask["blocks"]["mlp"]["router"] is True
  assert train_lib.TrainConfig().weight_decay_exempt == "embedding_and_norms"


def test_release_configs_decay_norms_and_bad_exempt_is_refused():
  sys.path.insert(0, str(ROOT))
  from configs import emo_1b14b, stdmoe_1b14b
  for config in (emo_1b14b.get_config(), stdmoe_1b14b.get_config()):
    assert train_lib.TrainConfig.from_dict(config.train).weight_decay_exempt == "embedding"
  with pytest.raises(ConfigError, match=r"TrainConfig\.weight_decay_exempt='norms' is invalid: "
                     r"allowed values are \['embedding', 'embedding_and_norms'\]"):
    train_lib.TrainConfig(weight_decay_exempt="norms")


def random_rows(rng, B, L, loss_mask=None):
  """A batch of B one-document rows of L random tokens of the tiny vocabulary."""
  return {"tokens": rng.integers(1, 258, (B, L)).astype(np.int32),
          "targets": rng.integers(1, 258, (B, L)).astype(np.int32),
          "segment_ids": np.ones((B, L), np.int32),
          "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
          "loss_mask": np.ones((B, L), np.float32) if loss_mask is None else loss_mask}


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict()).replace(
      pool=False, lb_loss_weight=0.0, router_z_loss_weight=0.0)
  tc = train_lib.TrainConfig(steps=10, warmup_steps=0)
  batch = random_rows(np.random.default_rng(1), 4, 16)
  results = []
  for accum in (1, 2):
    graphdef, optimizer, state = train_lib.init_state(
        cfg, tc, execution=ExecutionConfig(expert_backend="dense"))
    step = jax.jit(lambda s, b: train_lib.train_step(
        s, b, graphdef=graphdef, optimizer=optimizer, cfg=cfg,
        tc=tc.__class__(steps=10, warmup_steps=0, grad_accum_steps=accum)))
    new_state, stats = step(state, batch)
    results.append((new_state.params, stats))
  np.testing.assert_allclose(float(results[0][1]["grad_norm"]), float(results[1][1]["grad_norm"]),
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    # One Adam step moves each weight by about lr * sign(grad): compare at a fraction of lr.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.slow
def test_fused_head_loss_equals_full_logits_in_the_training_loss(tie):
  """train.loss_fn with the LM head fused over chunks (execution.head_chunk_tokens) gives the
  full-logits path's loss, logged terms and gradients, with a partly masked batch, the output
  z-loss weighted up so it shows, and a tied or untied head."""
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict()).replace(
      tie_embeddings=tie, output_z_loss_weight=0.1)
  rng = np.random.default_rng(5)
  batch = random_rows(rng, 2, 16, loss_mask=(rng.random((2, 16)) < 0.7).astype(np.float32))
  results = []
  for chunk_tokens in (0, 8):
    run = ExecutionConfig(expert_backend="dense", head_chunk_tokens=chunk_tokens)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), execution=run))
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p: train_lib.loss_fn(p, graphdef, batch, jax.random.key(3), cfg), has_aux=True))
    results.append(grad_fn(params))
  ((total0, stats0), grads0), ((total1, stats1), grads1) = results
  np.testing.assert_allclose(float(total1), float(total0), rtol=1e-5)
  for key in ("loss", "output_z_loss", "tokens"):
    np.testing.assert_allclose(float(stats1[key]), float(stats0[key]), rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ---- whole runs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_run_learns_and_logs(tmp_path):
  config = tiny_config(steps=120, eval_every=120, eval_batches=4, log_every=20)
  last = train_lib.train_and_evaluate(config, tmp_path)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
  assert all("loss" in r and "tokens_per_s" in r and "layer0/load_entropy" in r for r in rows)
  # Visibly learns: held-out perplexity well below the unigram (token frequency) baseline.
  assert last["val_perplexity"] < 0.75 * last["unigram_val_perplexity"], last
  assert any(k.startswith("val_perplexity/") for k in last)  # per-domain perplexity
  assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
  assert 120 in ckpt_lib.Checkpointer(tmp_path / "checkpoints", save_every=1).all_steps()


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  train_lib.train_and_evaluate(tiny_config(steps=20, checkpoint_every=10), tmp_path)
  first = {r["step"]: r["loss"] for r in read_metrics(tmp_path)}
  # Damage every array file of the newest checkpoint (a torn write or bit rot).
  newest = tmp_path / "checkpoints" / "20"
  damaged = 0
  for f in newest.rglob("*"):
    if f.is_file() and "state" in f.parts and f.stat().st_size > 0 and f.suffix != ".json":
      f.write_bytes(b"\x00garbage" + f.read_bytes()[:7])
      damaged += 1
  assert damaged
  with caplog.at_level("WARNING"):
    train_lib.train_and_evaluate(tiny_config(steps=20, checkpoint_every=10), tmp_path)
  assert "falling back" in caplog.text or "could not be read" in caplog.text
  again = {r["step"]: r["loss"] for r in read_metrics(tmp_path)}
  # Resumed at step 10 and recomputed steps 11..20 exactly.
  assert sorted(again) == list(range(1, 21))
  for s in range(11, 21):
    assert again[s] == first[s]


@pytest.mark.slow
def test_incompatible_restart_names_fields_and_compatible_one_continues(tmp_path):
  train_lib.train_and_evaluate(tiny_config(steps=10, checkpoint_every=10), tmp_path)
  changed = tiny_config(steps=20, checkpoint_every=10)
  changed.model.d_model = 96
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"model\.d_model"):
    train_lib.train_and_evaluate(changed, tmp_path)
  more = tiny_config(steps=20, checkpoint_every=10, eval_every=5)  # more steps, new eval cadence
  more.execution.update(expert_backend="ragged", remat=False)  # and another execution
  train_lib.train_and_evaluate(more, tmp_path)
  assert [r["step"] for r in read_metrics(tmp_path)][-1] == 20


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
  train_lib.train_and_evaluate(tiny_config(steps=10, checkpoint_every=10), tmp_path)
  exploding = tiny_config(steps=60, checkpoint_every=10, learning_rate=1e30, warmup_steps=0,
                          grad_clip=1e30)
  with pytest.raises(train_lib.NonFiniteLossError, match=r"step \d+"):
    train_lib.train_and_evaluate(exploding, tmp_path)
  steps = ckpt_lib.Checkpointer(tmp_path / "checkpoints", save_every=1).all_steps()
  assert steps and max(steps) < 60
  # The next start can proceed from what is left (with a sane learning rate).
  train_lib.train_and_evaluate(tiny_config(steps=max(steps) + 2, checkpoint_every=10), tmp_path)


def _train_command(workdir, steps):
  return [sys.executable, "-m", "experiments.train", "--config", "configs/tiny.py",
          "--workdir", str(workdir), f"--config.train.steps={steps}",
          "--config.train.checkpoint_every=5", "--config.train.log_every=1",
          "--config.train.eval_every=100000", "--config.data.synthetic_documents=400"]


@pytest.mark.slow
def test_sigkill_then_restart_reproduces_the_uninterrupted_losses(tmp_path, reap):
  steps = 60
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  reference = tmp_path / "reference"
  subprocess.run(_train_command(reference, steps), cwd=ROOT, env=env, check=True,
                 capture_output=True)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_command(killed, steps), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  reap(proc)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    ckpts = killed / "checkpoints"
    if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 10 for p in ckpts.iterdir()):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  logged_before = len(read_metrics(killed))
  assert logged_before < steps
  subprocess.run(_train_command(killed, steps), cwd=ROOT, env=env, check=True,
                 capture_output=True)
  want = {r["step"]: r["loss"] for r in read_metrics(reference)}
  got = {r["step"]: r["loss"] for r in read_metrics(killed)}
  assert sorted(got) == list(range(1, steps + 1))
  assert got == want


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(tmp_path, reap):
  """Also: a second trainer on the busy workdir is refused in one line naming the holder, and
  the first one's checkpoints and metrics go on undisturbed."""
  proc = subprocess.Popen(_train_command(tmp_path, 100000), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  reap(proc)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    ckpts = tmp_path / "checkpoints"
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
      second = subprocess.run(_train_command(tmp_path, 100000), cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
      assert proc.poll() is None, "the first trainer stopped"
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  assert proc.wait(timeout=120) == 0
  assert second.returncode != 0 and "Traceback" not in second.stderr
  assert second.stderr.strip().splitlines()[-1] == (
      f"error: workdir {tmp_path} is in use by another trainer (pid {proc.pid}); wait for it "
      "to finish or stop it, or pass another --workdir")
  steps = ckpt_lib.Checkpointer(tmp_path / "checkpoints", save_every=1).all_steps()
  logged = [r["step"] for r in read_metrics(tmp_path)]
  assert logged == list(range(1, logged[-1] + 1))  # each step once, none lost
  assert max(steps) == logged[-1]  # saved where it stopped
  assert all(s % 5 == 0 for s in steps[:-1])  # the first trainer's own saves, nothing else


def test_a_killed_trainer_leaves_no_lock_behind(tmp_path, reap):
  """The lock dies with its process: after kill -9 the next trainer takes the workdir."""
  from emo_jax.train.workdir import WorkdirBusyError, WorkdirLock
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, "
                             f"{str(ROOT)!r}); from emo_jax.train.workdir import WorkdirLock; "
                             f"lock = WorkdirLock({str(tmp_path)!r}); print('held', flush=True); "
                             "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
  reap(holder)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirBusyError, match=rf"\(pid {holder.pid}\)"):
    WorkdirLock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  WorkdirLock(tmp_path).release()  # taken at once, no stale lock to remove


@pytest.mark.parametrize("changes, message", [
    (dict(grad_clip=-1.0), r"TrainConfig\.grad_clip=-1\.0 is invalid: .*> 0"),
    (dict(b2=1.5), r"TrainConfig\.b2=1\.5 is invalid: .*\[0, 1\)"),
    (dict(b1=-0.1), r"TrainConfig\.b1=-0\.1 is invalid"),
    (dict(eval_batches=0), r"TrainConfig\.eval_batches=0 is invalid: .*eval_batches >= 1"),
    (dict(learning_rate=float("nan")), r"TrainConfig\.learning_rate=nan is invalid: .*finite"),
    (dict(learning_rate=float("inf")), r"TrainConfig\.learning_rate=inf is invalid"),
])
def test_training_settings_that_make_no_sense_are_refused(changes, message):
  with pytest.raises(ConfigError, match=message):
    train_lib.TrainConfig(**changes)


LEGACY = ROOT / "tests" / "data" / "legacy_checkpoint"


@pytest.mark.slow
def test_checkpoints_written_before_the_execution_split_still_restore(tmp_path):
  """tests/data/legacy_checkpoint was written while the model config still held the execution
  fields (expert backend 'ragged', transport 'all_to_all', remat policy 'dots', ...): a two-step
  training workdir of a 1-layer tiny model and its parameter export. Both load, and the
  training run resumes from its step 2 under the new split."""
  saved = json.loads((LEGACY / "workdir" / "config.json").read_text())
  assert "expert_backend" in saved["model"]  # really an old one
  params, model = ckpt_lib.load_params(LEGACY / "params")
  cfg, graphdef, loaded, _, _ = loading.load_checkpoint(LEGACY / "params", tokenizer="none")
  assert cfg == ModelConfig.from_dict(split_model_fields(saved["model"])[0])
  workdir_params, _ = ckpt_lib.load_params(LEGACY / "workdir")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(workdir_params)):
    np.testing.assert_array_equal(a, b)
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  logits, _ = nnx.merge(graphdef, loaded)(jnp.asarray(tokens))
  assert np.isfinite(np.asarray(logits)).all()

  import shutil
  workdir = tmp_path / "workdir"
  shutil.copytree(LEGACY / "workdir", workdir)
  config = tiny.get_config()
  config.model = split_model_fields(saved["model"])[0]
  config.data.update(saved["data"])
  config.train.update(dict(saved["train"], steps=3))
  train_lib.train_and_evaluate(config, workdir)
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3]  # resumed after step 2, not restarted
  assert 3 in ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=1).all_steps()
