"""Training: the loss, one jitted step, and the loop with evaluation, logging and checkpoints.

The step is a pure function of (state, batch): parameters live in the train state as a plain
nested dict (Flax NNX `merge` turns them into the model inside the step), so the state is an
ordinary pytree for Orbax and for sharding annotations. The pool RNG of step s is
`fold_in(key(seed), s)`: nothing random is carried in the state, and a resumed run draws exactly
the pools the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.model import sharding as sharding_lib
from emo_jax.train import evaluate, metrics as metrics_lib
from emo_jax.model.losses import fused_head_loss, token_losses
from emo_jax.config import ConfigError, ConfigMixin, ModelConfig
from emo_jax.data import corpus as corpus_lib
from emo_jax.data import fingerprint as fingerprint_lib
from emo_jax.model.execution import ExecutionConfig, run_configs
from emo_jax.model.transformer import Transformer, count_params
from emo_jax.train.workdir import WorkdirLock

log = logging.getLogger(__name__)


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
  # decay to 0 (the release's anneal); "constant": warm-up then flat.
  schedule: str = "cosine"
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
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

  def __post_init__(self):
    positive = ("steps", "grad_accum_steps", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints")
    for name in positive:
      if getattr(self, name) < 1:
        raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: must be >= 1")
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ConfigError(f"TrainConfig.schedule={self.schedule!r} is invalid: allowed values are "
                        "['cosine', 'linear', 'constant']")
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
    if not 0 <= self.final_lr_fraction <= 1:
      raise ConfigError(f"TrainConfig.final_lr_fraction={self.final_lr_fraction!r} is invalid: "
                        "must lie in [0, 1]")


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any      # nested dict of float32 master weights
  opt_state: Any


# ---- optimiser ------------------------------------------------------------------------------
def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
  warmup = max(tc.warmup_steps, 0)
  decay_steps = max((tc.schedule_steps or tc.steps) - warmup, 1)
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


def decay_mask(params) -> Any:
  """True for weights that get weight decay: not the embedding, not norm scales."""
  def decays(path, _):
    names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
    return not any(n == "embed" or "norm" in str(n) for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig, params) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                  weight_decay=tc.weight_decay, mask=decay_mask(params)))


# ---- loss and step ---------------------------------------------------------------------------
def loss_fn(params, graphdef, batch, rng, cfg: ModelConfig, mesh=None):
  """Masked cross-entropy + load balancing + router z-loss + output z-loss."""
  model = nnx.merge(graphdef, params)
  chunk_tokens = model.execution.head_chunk_tokens
  out, aux = model(batch["tokens"], batch["segment_ids"], batch["positions"], train=True,
                   rng=rng, mesh=mesh, return_hidden=chunk_tokens > 0)
  mask = batch["loss_mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  if chunk_tokens > 0:
    # The head, cross-entropy and z-loss fused over chunks; out is the final hidden state.
    head_loss, ce_loss, output_z = fused_head_loss(
        out, model.head_matrix(), batch["targets"], mask / n,
        z_loss_weight=cfg.output_z_loss_weight, chunk_tokens=chunk_tokens,
        compute_dtype=cfg.compute_jnp_dtype)
  else:
    ce, lse = token_losses(out, batch["targets"])
    ce_loss = jnp.sum(ce * mask) / n
    output_z = jnp.sum(lse**2 * mask) / n
    head_loss = ce_loss + cfg.output_z_loss_weight * output_z
  total = head_loss + aux["aux_loss"]
  out = {"loss": ce_loss, "total_loss": total, "output_z_loss": output_z, "tokens": n}
  for key in ("lb_loss", "router_z_loss", "expert_load", "dropped_fraction", "pool_size"):
    if key in aux:
      out[key] = aux[key]
  return total, out


def train_step(state: TrainState, batch, *, graphdef, optimizer, cfg: ModelConfig,
               tc: TrainConfig, mesh=None):
  """One optimiser step over `grad_accum_steps` micro-batches."""
  rng = jax.random.fold_in(jax.random.key(tc.seed), state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  A = tc.grad_accum_steps
  if A == 1:
    (_, stats), grads = grad_fn(state.params, graphdef, batch, rng, cfg, mesh)
  else:
    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)

    def accumulate(carry, inputs):
      i, mb = inputs
      (_, s), g = grad_fn(state.params, graphdef, mb, jax.random.fold_in(rng, i), cfg, mesh)
      return jax.tree.map(jnp.add, carry, g), s

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, stats = jax.lax.scan(accumulate, zeros, (jnp.arange(A), micro))
    grads = jax.tree.map(lambda g: g / A, grads)
    tokens = jnp.sum(stats["tokens"])
    stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), stats)
    stats["tokens"] = tokens
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  stats["grad_norm"] = optax.tree.norm(grads)
  # Checked on the host before any save: a state that is not finite is never written.
  stats["state_finite"] = _all_finite((params, opt_state))
  stats["learning_rate"] = learning_rate_schedule(tc)(state.step)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), stats


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def init_state(cfg: ModelConfig, tc: TrainConfig, mesh=None,
               execution: ExecutionConfig | None = None):
  """(graphdef, optimizer, state) for a fresh run, initialised from `tc.seed`.

  The state is created by a jitted function whose outputs are already sharded over `mesh`
  (parameters and optimizer moments FSDP/expert-sharded), so no host or device ever holds the
  whole model unsharded.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: Transformer(cfg, rngs=nnx.Rngs(0), execution=execution)))
  optimizer = make_optimizer(tc, nnx.to_pure_dict(abstract))

  def create():
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=tc.seed))))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  shardings = None
  if mesh is not None:
    shardings = state_shardings_for(jax.eval_shape(create), mesh)
  return graphdef, optimizer, jax.jit(create, out_shardings=shardings)()


def state_shardings_for(state: Any, mesh) -> Any:
  """NamedShardings of a train state (or its abstract shape) over `mesh`."""
  return sharding_lib.state_shardings(state, sharding_lib.param_shardings(state.params, mesh),
                                      mesh)


def initial_params(path: str, cfg: ModelConfig, like: Any) -> Any:
  """Parameters from a parameter checkpoint or workdir, checked against the model's shapes.

  A new run may change what does not shape the parameters (the pool, loss weights, RoPE base,
  e.g. to fine-tune an EMO as a StdMoE); a shape mismatch is refused, naming the parameters and
  the model fields that differ.
  """
  params, saved_model = ckpt_lib.load_params(path)
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(like)}
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  if want != got:
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    fields = ckpt_lib.incompatible_fields({"model": saved_model}, {"model": cfg.to_dict()})
    raise ckpt_lib.CheckpointMismatchError(
        f"train.init_from={path} holds another architecture: parameters differ from the "
        f"model's at {differ[:8]} (model {[want.get(k) for k in differ[:8]]}, checkpoint "
        f"{[got.get(k) for k in differ[:8]]})" + "".join("\n  " + f for f in fields))
  return jax.tree.map(lambda p, x: jnp.asarray(p, x.dtype), params, like)


# ---- the loop ---------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
  """The loss or the updated train state became NaN or infinite; nothing of it was saved."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains (or resumes) the experiment in `workdir`; returns the last logged metrics.

  The workdir holds `checkpoints/`, `metrics.jsonl` (one JSON object per logged step),
  TensorBoard event files and `config.json`. It belongs to one run at a time: a second trainer
  on a busy workdir is refused (workdir.WorkdirBusyError) before it touches anything.
  """
  workdir = pathlib.Path(workdir)
  cfg, execution = run_configs(config)  # a bad config is refused before the workdir is touched
  tc = TrainConfig.from_dict(config.train)
  dc = corpus_lib.DataConfig.from_dict(config.data)
  created = not workdir.exists()
  lock = WorkdirLock(workdir, jax.process_index())
  try:
    return _train_and_evaluate(config, workdir, cfg, execution, tc, dc)
  except BaseException:
    if created and not (workdir / "config.json").exists():
      _remove_if_only_empty_folders(workdir)  # failed before its first step: leave no trace
    raise
  finally:
    lock.release()


def _remove_if_only_empty_folders(workdir: pathlib.Path) -> None:
  entries = [p for p in workdir.rglob("*") if not p.name.startswith(".lock.process_")]
  if all(p.is_dir() and not any(q.is_file() for q in p.rglob("*")) for p in entries):
    shutil.rmtree(workdir, ignore_errors=True)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        cfg: ModelConfig, execution: ExecutionConfig, tc: TrainConfig,
                        dc: corpus_lib.DataConfig) -> dict:
  if dc.batch_size % tc.grad_accum_steps:
    raise ConfigError(f"data.batch_size={dc.batch_size} must be a multiple of "
                      f"train.grad_accum_steps={tc.grad_accum_steps}")
  if dc.seq_len > cfg.max_seq_len:
    raise ConfigError(f"data.seq_len={dc.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}; "
                      f"lower data.seq_len or raise model.max_seq_len to {dc.seq_len}")
  mc = sharding_lib.MeshConfig.from_dict(config.get("mesh", {}))
  mesh = sharding_lib.make_mesh(mc)
  sharding_lib.check_divisible(cfg.num_experts, dc.batch_size, mesh)

  corpus = corpus_lib.load_corpus(dc)
  if corpus.tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {corpus.tokenizer.vocab_size} ids but "
                      f"model.vocab_size={cfg.vocab_size}; raise model.vocab_size to at least "
                      f"{corpus.tokenizer.vocab_size}")
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=tc.checkpoint_every,
                                       keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
  tc = _resolve_schedule_steps(tc, checkpointer.latest_readable_config())
  experiment = {"model": cfg.to_dict(), "execution": execution.to_dict(), "data": dc.to_dict(),
                "data_stream": fingerprint_lib.data_stream_fingerprint(
                    corpus, corpus_lib.resolved_data_dir(dc)),
                "train": tc.to_dict(), "mesh": mc.to_dict()}
  train_data = corpus.dataset("train", seq_len=dc.seq_len, batch_size=dc.batch_size,
                              max_segments=cfg.max_segments, seed=dc.seed, num_epochs=None,
                              num_workers=dc.num_workers)
  data_iter = iter(train_data)

  graphdef, optimizer, state = init_state(cfg, tc, mesh, execution)
  shardings = state_shardings_for(state, mesh)
  try:
    restored = checkpointer.restore_latest(state, data_iter, experiment)
  except Exception:
    checkpointer.close()
    raise
  if restored is not None:
    state = restored.state
    log.info("resumed from step %d in %s", restored.step, checkpointer.directory)
    if restored.step >= tc.steps:
      log.warning("train.steps=%d is not past the restored step %d: nothing to train (raise "
                  "train.steps to continue this run)", tc.steps, restored.step)
  elif tc.init_from:
    params = initial_params(tc.init_from, cfg, state.params)
    state = jax.jit(lambda p: state.replace(params=p, opt_state=optimizer.init(p)),
                    out_shardings=shardings)(params)
    log.info("initialised the parameters from %s", tc.init_from)
  start_step = int(state.step)
  # Only a run whose checks all passed describes the workdir (atomically: never half a file).
  if jax.process_index() == 0:
    _write_atomically(workdir / "config.json",
                      json.dumps(experiment, indent=2, sort_keys=True))

  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, total_steps=tc.steps)
  step_fn = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, optimizer=optimizer,
                                            cfg=cfg, tc=tc, mesh=mesh),
                    in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                    out_shardings=(shardings, None), donate_argnums=0)
  eval_data = corpus.eval_batches(dc, cfg.max_segments, tc.eval_batches)
  baseline = evaluate.unigram_baseline(corpus, dc, cfg.max_segments, tc.eval_batches)
  counts = count_params(cfg)
  flops_per_token = metrics_lib.flops_per_token(cfg, counts, dc.seq_len)
  peak = tc.peak_flops or metrics_lib.device_peak_flops()
  progress = metrics_lib.Progress(start_step, tc.steps)
  log.info("model: %.3g params (%.3g active); %d-token rows x %d; unigram baseline ppl %.1f",
           counts["total_params"], counts["active_params"], dc.seq_len, dc.batch_size,
           baseline["perplexity"])

  # A preemption notice (SIGTERM) only sets a flag: the loop saves and stops between steps, never
  # in the middle of a save or of the data iterator.
  stop_requested = []
  previous = {sig: signal.signal(sig, lambda signum, _: stop_requested.append(signum))
              for sig in (signal.SIGTERM,)}
  pending = []  # device stats since the last host check: checked together (keeps dispatch async)
  checked = []  # host stats since the last log line
  last = {}
  step = start_step
  try:
    while step < tc.steps:
      batch = sharding_lib.global_batch(next(data_iter), mesh)
      state, stats = step_fn(state, batch)
      step += 1
      pending.append((step, stats))
      is_last = step == tc.steps
      wants_save = is_last or step % tc.checkpoint_every == 0
      wants_eval = is_last or step % tc.eval_every == 0
      wants_log = wants_eval or step % tc.log_every == 0
      if wants_log or wants_save:  # nothing non-finite may reach a checkpoint
        checked += _check_finite(pending, state, checkpointer)
        pending = []
      if wants_log:
        tokens = float(np.sum([s["tokens"] for _, s in checked]))
        row = metrics_lib.summarize(checked[-1][1], cfg, window=checked)
        checked = []
        row.update(progress.update(step, tokens))
        if flops_per_token and peak:
          row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
        if wants_eval:
          row.update(evaluate.perplexity(graphdef, state.params, eval_data, corpus.domains,
                                         prefix="val_", mesh=mesh))
          row.update(metrics_lib.baseline_fields(baseline))
        writer.write(step, row)
        last = row
      if stop_requested:
        checked += _check_finite(pending, state, checkpointer)
        pending = []
        log.warning("received %s at step %d: saving a checkpoint and stopping",
                    signal.Signals(stop_requested[0]).name, step)
      if wants_save or stop_requested:
        checkpointer.save(step, state, data_iter, experiment, force=is_last or bool(stop_requested))
      if stop_requested:
        break
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    checkpointer.close()
    writer.close()
  return last


def _resolve_schedule_steps(tc: TrainConfig, saved: dict | None) -> TrainConfig:
  """`tc` with schedule_steps fixed: the saved run's on resume, else `steps` on a first start.

  An explicit value that differs from the saved one is left for the restart check to refuse.
  """
  saved_length = ((saved or {}).get("train") or {}).get("schedule_steps")
  if tc.schedule_steps:
    return tc
  if saved_length:
    if tc.steps > saved_length:
      log.warning("train.steps=%d extends a run whose learning-rate schedule ends at step %d: "
                  "the rate stays at its final value from there (a longer schedule needs a new "
                  "run with train.schedule_steps=%d)", tc.steps, saved_length, tc.steps)
    return tc.replace(schedule_steps=saved_length)
  return tc.replace(schedule_steps=tc.steps)


def _write_atomically(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _first_non_finite(state) -> str:
  """The name of the first parameter or optimizer tensor holding NaN or inf."""
  for path, x in jax.tree_util.tree_leaves_with_path({"params": state.params,
                                                      "opt_state": state.opt_state}):
    if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x))):
      return jax.tree_util.keystr(path)
  return "none found in the newest state"


def _check_finite(pending, state, checkpointer):
  """Fetches pending step stats; raises at the first step whose loss or new state is not finite.

  Runs before every save, so every checkpoint on disk holds a finite state.
  """
  host = [(s, jax.device_get(stats)) for s, stats in pending]
  for s, stats in host:
    loss_ok = np.isfinite(stats["loss"]) and np.isfinite(stats["total_loss"])
    if loss_ok and bool(stats["state_finite"]):
      continue
    what = (f"loss became {float(stats['total_loss'])} at step {s}" if not loss_ok else
            f"the update of step {s} left non-finite values in the train state (grad norm "
            f"{float(stats['grad_norm'])}; first tensor: {_first_non_finite(state)})")
    checkpointer.wait()
    saved = checkpointer.all_steps()
    kept = (f"The last checkpoint, step {saved[-1]}, holds a finite state: lower "
            "train.learning_rate or check the data, then restart to resume from it."
            if saved else "No checkpoint was written before it: lower train.learning_rate or "
            "check the data, and start again.")
    raise NonFiniteLossError(f"{what}; stopping without saving it. {kept}")
  return host
