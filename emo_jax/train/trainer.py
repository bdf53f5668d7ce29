"""Training: the loss, one jitted step, and the loop with evaluation, logging and checkpoints.

The step is a pure function of (state, batch): parameters live in the train state as a plain
nested dict (Flax NNX `merge` turns them into the model inside the step), so the state is an
ordinary pytree for Orbax and for sharding annotations. The pool RNG of step s is
`fold_in(key(seed), s)`: nothing random is carried in the state, and a resumed run draws exactly
the pools the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import signal
from typing import Any, Mapping

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
from emo_jax.config import ConfigError, ModelConfig
from emo_jax.data.training_data import training_data
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.transformer import Transformer, count_params
from emo_jax.train import continuation as continuation_lib
from emo_jax.train.config import WEIGHT_DECAY_EXEMPT, TrainConfig
from emo_jax.train.schedule import Continuation, learning_rate_schedule
from emo_jax.train.experiment import Experiment
from emo_jax.train.workdir import WorkdirLock

log = logging.getLogger(__name__)


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any      # nested dict of float32 master weights
  opt_state: Any


# ---- optimiser ------------------------------------------------------------------------------
def decay_mask(params, exempt: str = "embedding_and_norms") -> Any:
  """True for weights that get weight decay: all but the input embedding, and with
  `exempt="embedding_and_norms"` (TrainConfig.weight_decay_exempt) all but the norm scales."""
  if exempt not in WEIGHT_DECAY_EXEMPT:
    raise ValueError(f"decay_mask(exempt={exempt!r}) is invalid: allowed values are "
                     f"{list(WEIGHT_DECAY_EXEMPT)}")
  skip_norms = exempt == "embedding_and_norms"

  def decays(path, _):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return not any(n == "embed" or (skip_norms and "norm" in n) for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig, params,
                   continuation: Continuation | None = None) -> optax.GradientTransformation:
  """AdamW with clipping; its rate follows learning_rate_schedule(tc, continuation) in the
  optimiser's own step count (which a continued run carries over)."""
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(learning_rate_schedule(tc, continuation), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                  weight_decay=tc.weight_decay,
                  mask=decay_mask(params, tc.weight_decay_exempt)))


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
               tc: TrainConfig, mesh=None, continuation: Continuation | None = None):
  """One optimiser step over `grad_accum_steps` micro-batches (`continuation`: where a continued
  run started, for the logged learning rate)."""
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
  stats["learning_rate"] = learning_rate_schedule(tc, continuation)(state.step)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), stats


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def init_state(cfg: ModelConfig, tc: TrainConfig, mesh=None,
               execution: ExecutionConfig | None = None,
               continuation: Continuation | None = None):
  """(graphdef, optimizer, state) for a fresh run, initialised from `tc.seed`; a continued
  run passes its `continuation` (the optimiser's schedule) and restores the state over it.

  The state is created by a jitted function whose outputs are already sharded over `mesh`
  (parameters and optimizer moments FSDP/expert-sharded), so no host or device ever holds the
  whole model unsharded.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: Transformer(cfg, rngs=nnx.Rngs(0), execution=execution)))
  optimizer = make_optimizer(tc, nnx.to_pure_dict(abstract), continuation)

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
  want, got = ckpt_lib.param_shapes(like), ckpt_lib.param_shapes(params)
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


def train_and_evaluate(experiment: Experiment | ml_collections.ConfigDict | Mapping[str, Any],
                       workdir: str | pathlib.Path) -> dict:
  """Trains (or resumes) the experiment in `workdir`; returns the last logged metrics.

  `experiment` is an Experiment or a config it parses (`Experiment.from_config`: a config
  file's ConfigDict or a mapping of sections); a bad config is refused before the workdir is
  touched. The workdir holds `checkpoints/`, `metrics.jsonl` (one JSON object per logged step),
  TensorBoard event files and `config.json`. It belongs to one run at a time: a second trainer
  on a busy workdir is refused (workdir.WorkdirBusyError) before it touches anything.
  """
  experiment = Experiment.from_config(experiment)
  workdir = pathlib.Path(workdir)
  created = not workdir.exists()
  lock = WorkdirLock(workdir, jax.process_index())
  try:
    return _train_and_evaluate(experiment, workdir)
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


def _train_and_evaluate(experiment: Experiment, workdir: pathlib.Path) -> dict:
  cfg, execution, tc, dc = experiment.model, experiment.execution, experiment.train, experiment.data
  mc = experiment.mesh
  mesh = sharding_lib.make_mesh(mc)
  sharding_lib.check_divisible(cfg.num_experts, dc.batch_size, mesh)

  # Everything the run reads from data/, in one call: the corpus is prepared here (or reused,
  # and the log says which) and only read from then on.
  data = training_data(dc, max_segments=cfg.max_segments, eval_batches=tc.eval_batches)
  if data.tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {data.tokenizer.vocab_size} ids but "
                      f"model.vocab_size={cfg.vocab_size}; raise model.vocab_size to at least "
                      f"{data.tokenizer.vocab_size}")
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=tc.checkpoint_every,
                                       keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
  saved = checkpointer.latest_readable_config()
  tc = _resolve_schedule_steps(tc, saved)
  source = None
  try:
    if tc.continue_from and not checkpointer.all_steps():  # the first start of a continued run
      if pathlib.Path(tc.continue_from).absolute() == workdir.absolute():
        raise ConfigError(f"train.continue_from={tc.continue_from} is this run's own --workdir; "
                          "a continued run writes a new workdir")
      source = continuation_lib.Source(tc.continue_from)
      continuation = source.continuation
    else:
      continuation = continuation_lib.recorded(tc, saved)
    # What config.json and every checkpoint record: the sections and the data stream's identity.
    record = {"model": cfg.to_dict(), "execution": execution.to_dict(), "data": dc.to_dict(),
              "data_stream": data.fingerprint,
              "train": tc.to_dict(), "mesh": mc.to_dict()}
    if continuation is not None:
      record["continuation"] = continuation.to_dict()
    data_iter = data.train_iterator

    graphdef, optimizer, state = init_state(cfg, tc, mesh, execution, continuation)
    shardings = state_shardings_for(state, mesh)
    if source is not None:
      source.check_compatible(cfg, state.params, record, tc)
      state = source.restore(state, data_iter, tc)
      restored = None
    else:
      restored = checkpointer.restore_latest(state, data_iter, record)
  except BaseException:
    checkpointer.close()
    raise
  finally:
    if source is not None:
      source.close()  # the continued run is read: its lock is released
  # A continued run counts its steps on top of the step it continued from.
  end_step = tc.steps + (continuation.step if continuation is not None else 0)
  if restored is not None:
    state = restored.state
    log.info("resumed from step %d in %s", restored.step, checkpointer.directory)
    if restored.step >= end_step:
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
                      json.dumps(record, indent=2, sort_keys=True))

  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, total_steps=end_step)
  step_fn = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, optimizer=optimizer,
                                            cfg=cfg, tc=tc, mesh=mesh,
                                            continuation=continuation),
                    in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                    out_shardings=(shardings, None), donate_argnums=0)
  eval_data = data.eval_batches
  baseline = evaluate.unigram_baseline(data)
  counts = count_params(cfg)
  flops_per_token = metrics_lib.flops_per_token(cfg, counts, dc.seq_len)
  peak = tc.peak_flops or metrics_lib.device_peak_flops()
  progress = metrics_lib.Progress(start_step, end_step)
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
    while step < end_step:
      batch = sharding_lib.global_batch(next(data_iter), mesh)
      state, stats = step_fn(state, batch)
      step += 1
      pending.append((step, stats))
      is_last = step == end_step
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
          row.update(evaluate.perplexity(graphdef, state.params, eval_data, data.domains,
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
        checkpointer.save(step, state, data_iter, record, force=is_last or bool(stop_requested))
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
