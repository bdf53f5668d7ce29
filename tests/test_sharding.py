"""Meshes, parameter shardings and sharded training on 8 fake CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from flax import nnx

from emo_jax.model import sharding
from emo_jax.train import trainer as train_lib
from emo_jax.config import ConfigError
from emo_jax.data import corpus as corpus_lib
from emo_jax.train.experiment import Experiment
from emo_jax.model.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import emo_1b14b, tiny  # noqa: E402

MESHES = [dict(expert=8), dict(data=2, expert=4), dict(fsdp=2, expert=2, data=2)]
pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


def mesh_of(**axes):
  return sharding.make_mesh(sharding.MeshConfig(**axes))


def tiny_model_config():
  return Experiment.from_config(tiny.get_config()).model


def test_mesh_config_resolves_and_explains():
  assert sharding.MeshConfig(data=2, expert=-1).resolve(8) == dict(data=2, fsdp=1, expert=4,
                                                                   tensor=1)
  with pytest.raises(ConfigError, match="needs 6 devices"):
    mesh_of(data=2, expert=3)
  with pytest.raises(ConfigError, match="at most one"):
    sharding.MeshConfig(data=-1, expert=-1)
  with pytest.raises(ConfigError, match="num_experts=9"):
    sharding.check_divisible(9, 8, mesh_of(expert=8))
  with pytest.raises(ConfigError, match="batch_size=6"):
    sharding.check_divisible(8, 6, mesh_of(data=2, expert=4))


def test_release_model_shards_experts_and_fsdp():
  cfg = Experiment.from_config(emo_1b14b.get_config()).model
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(cfg,
                                                                        rngs=nnx.Rngs(0)))))
  shardings = sharding.param_shardings(params, mesh_of(fsdp=2, expert=4))
  assert shardings["blocks"]["mlp"]["w_gate"].spec == jax.sharding.PartitionSpec(
      None, "expert", "fsdp", None)
  assert shardings["embed"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert shardings["blocks"]["attn_norm"]["weight"].spec == jax.sharding.PartitionSpec(None, None)


def _batches(n, batch_size=8):
  dc = corpus_lib.DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=32,
                             batch_size=batch_size, synthetic_documents=300)
  corpus = corpus_lib.load_corpus(dc)
  it = iter(corpus.dataset("train", seq_len=32, batch_size=batch_size, max_segments=8))
  return [next(it) for _ in range(n)]


def _losses(mesh, batches, steps=3):
  experiment = Experiment.from_config(tiny.get_config())
  cfg, execution = experiment.model, experiment.execution
  tc = train_lib.TrainConfig(steps=10, warmup_steps=0, learning_rate=3e-3)
  graphdef, optimizer, state = train_lib.init_state(cfg, tc, mesh, execution)
  shardings = train_lib.state_shardings_for(state, mesh)
  step = jax.jit(lambda s, b: train_lib.train_step(s, b, graphdef=graphdef, optimizer=optimizer,
                                                   cfg=cfg, tc=tc, mesh=mesh),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, None))
  losses = []
  for batch in batches[:steps]:
    state, stats = step(state, sharding.global_batch(batch, mesh))
    losses.append(float(stats["total_loss"]))
  return losses


@pytest.mark.slow
def test_train_steps_on_every_mesh_equal_one_device():
  batches = _batches(3)
  reference = _losses(mesh_of(), batches)
  for axes in MESHES:
    np.testing.assert_allclose(_losses(mesh_of(**axes), batches), reference, rtol=1e-5,
                               err_msg=str(axes))


def tiny_run_config(steps, **mesh):
  config = tiny.get_config()
  config.data.synthetic_documents = 300
  config.train.update(dict(steps=steps, log_every=1, eval_every=1000, eval_batches=1,
                           checkpoint_every=3, async_checkpoint=False))
  config.mesh.update(mesh)
  return config


def _metrics(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads,
                                            (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_checkpoint_written_under_one_mesh_resumes_under_another(tmp_path):
  train_lib.train_and_evaluate(tiny_run_config(8), tmp_path / "reference")
  moved = tmp_path / "moved"
  train_lib.train_and_evaluate(tiny_run_config(6, data=2, expert=4), moved)
  train_lib.train_and_evaluate(tiny_run_config(8, fsdp=2, expert=2, data=2), moved)
  want, got = _metrics(tmp_path / "reference"), _metrics(moved)
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_two_processes_reach_the_single_process_losses(tmp_path, reap):
  """jax.distributed over gloo on localhost: each host feeds its own data shard."""
  steps, port = 3, portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = [sys.executable, "-m", "experiments.train", "--config", "configs/tiny.py",
             "--workdir", str(tmp_path / "w"), f"--config.train.steps={steps}",
             "--config.train.log_every=1", "--config.train.eval_every=1000",
             "--config.data.synthetic_documents=300", "--config.mesh.data=2",
             "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"]
  procs = [subprocess.Popen(command + ["--process_id", str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for proc in procs:
    reap(proc)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  got = _metrics(tmp_path / "w")

  # One process with the same global batch: host 0's rows, then host 1's.
  config = tiny.get_config()
  experiment = Experiment.from_config(config)
  cfg, execution = experiment.model, experiment.execution
  dc = corpus_lib.DataConfig.from_dict(config.data).replace(synthetic_documents=300)
  corpus = corpus_lib.load_corpus(dc)
  shards = [iter(corpus_lib.pipeline.make_dataset(
      corpus.splits["train"], corpus.tokenizer, seq_len=dc.seq_len,
      batch_size=dc.batch_size // 2, max_segments=cfg.max_segments, domains=corpus.domains,
      seed=dc.seed, num_epochs=None, shard_index=i, shard_count=2)) for i in range(2)]
  tc = train_lib.TrainConfig.from_dict(config.train)
  graphdef, optimizer, state = train_lib.init_state(cfg, tc, execution=execution)
  step = jax.jit(lambda s, b: train_lib.train_step(s, b, graphdef=graphdef, optimizer=optimizer,
                                                   cfg=cfg, tc=tc))
  for s in range(1, steps + 1):
    parts = [next(it) for it in shards]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, stats = step(state, batch)
    np.testing.assert_allclose(got[s], float(stats["loss"]), rtol=1e-5, err_msg=f"step {s}")
