"""Fine-tuning a pruned expert subset on its task, and merging it back into the full model.

The second stage of selective use (docs/selective_eval.md): after a task's experts are chosen
and the model pruned to them (selective.prune), the small model is trained briefly on the
task's calibration pool (defaults: 1 epoch, AdamW at 5e-5 with 10 % linear warm-up then linear
decay, gradient clipping at 1.0, batch 16). Loss is the next-token cross-entropy on the answer
(the tokens after the prompt's last "Answer:"; every token for tasks without that delimiter,
such as HellaSwag), plus the router losses. Training runs with `train=True`, so an EMO model
keeps drawing its document pools (clamped to the subset, see selective.pruned_config).

Two protocols (`FinetuneConfig.protocol` names which one ran):
* "emo_jax" (the defaults above): the router losses at the model's pretraining weights and the
  document pool kept;
* "release" (`release_config()`), as the release's scripts/selective_hf + hf_training/
  finetune.py: batch 32, 5e-5 with 10 % warm-up and linear decay, weight decay 0, one epoch, every
  parameter trained, no document pool (its Hugging Face model has none), no router z-loss, and
  the load-balancing loss at 0.01 (the pruned model's config.json sets output_router_logits,
  so transformers adds router_aux_loss_coef=0.01 x the balancing loss, averaged over layers).
  The release balances over the answer tokens only; here over every token of the rows. Its
  launcher saves one checkpoint at the end besides checkpoint-0, so "several checkpoints each
  scored" is the subset before (the selection's own row) and after fine-tuning.

`merge_back` writes the tuned experts into their original rows of the full bank, so one
checkpoint can carry several tasks' tuned experts; pruning the merged model with the same
selection gives back the tuned subset.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from emo_jax.model.transformer import Transformer
from emo_jax.study import selective
from emo_jax.tasks.data import Instance
from emo_jax.tasks.scoring import bucket, encode_pair

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
DELIMITER = "Answer:"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """steps: optimizer steps (None: one epoch over the pool). trainable: "all" parameters (as
  the release does) or only the "experts" bank (routed and shared)."""
  steps: int | None = None
  learning_rate: float = 5e-5
  warmup_ratio: float = 0.1
  batch_size: int = 16
  max_grad_norm: float = 1.0
  weight_decay: float = 0.0
  trainable: str = "all"
  seed: int = 0
  # Train with the model's document pool (EMO; "emo_jax") or with none ("release").
  document_pool: bool = True
  # Router losses added to the answer loss: "model" (load balancing and router z-loss at the
  # model's pretraining weights), "release" (load balancing only, at RELEASE_LB_WEIGHT) or "none".
  router_losses: str = "model"
  protocol: str = "emo_jax"

  def __post_init__(self):
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"steps={self.steps} must be >= 1 (or None for one epoch)")
    if self.router_losses not in ("model", "release", "none"):
      raise ValueError(f"router_losses={self.router_losses!r} must be 'model', 'release' or "
                       "'none'")
    if self.trainable not in ("all", "experts"):
      raise ValueError(f"trainable={self.trainable!r} must be 'all' or 'experts'")
    if self.batch_size < 1 or self.learning_rate <= 0:
      raise ValueError("batch_size must be >= 1 and learning_rate > 0")


# transformers' router_aux_loss_coef in the release's config.json: the weight of the balancing
# loss while fine-tuning a pruned model (its pruning scripts set output_router_logits=True).
RELEASE_LB_WEIGHT = 0.01
PROTOCOLS = ("emo_jax", "release")


def release_config(**changes) -> FinetuneConfig:
  """The release's fine-tuning (module docstring): batch 32, lr 5e-5, 10 % warm-up then linear
  decay, weight decay 0, one epoch, all parameters, no pool, balancing at 0.01, no z-loss."""
  values = dict(steps=None, learning_rate=5e-5, warmup_ratio=0.1, batch_size=32,
                max_grad_norm=1.0, weight_decay=0.0, trainable="all", document_pool=False,
                router_losses="release", protocol="release")
  return FinetuneConfig(**{**values, **changes})


def protocol_config(protocol: str, **changes) -> FinetuneConfig:
  """FinetuneConfig of a named protocol ("emo_jax": the dataclass defaults; "release")."""
  if protocol == "release":
    return release_config(**changes)
  if protocol == "emo_jax":
    return FinetuneConfig(**changes)
  raise ValueError(f"fine-tuning protocol {protocol!r} must be one of {list(PROTOCOLS)}")


def training_rows(instances: Sequence[Instance], tokenizer, max_len: int):
  """(inputs, targets, loss mask) [N, L] int32/int32/bool: prompt + right answer per row."""
  encoded = []
  for inst in instances:
    ids, n_cont = encode_pair(tokenizer, inst.context, inst.continuations[inst.gold], max_len)
    answer_only = DELIMITER in inst.context
    encoded.append((ids, n_cont if answer_only else len(ids) - 1))
  L = bucket(max(len(ids) - 1 for ids, _ in encoded), max_len)
  inputs = np.full((len(encoded), L), -1, np.int32)
  targets = np.full((len(encoded), L), -1, np.int32)
  mask = np.zeros((len(encoded), L), bool)
  for r, (ids, n_loss) in enumerate(encoded):
    n = len(ids) - 1
    inputs[r, :n], targets[r, :n] = ids[:-1], ids[1:]
    mask[r, n - n_loss:n] = True
  return inputs, targets, mask


def _labels(params, trainable: str):
  def label(path, _):
    keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    is_bank = "mlp" in keys and keys[-1] in EXPERT_WEIGHTS
    return "train" if trainable == "all" or is_bank else "freeze"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(params, fc: FinetuneConfig, total_steps: int):
  warmup = int(round(fc.warmup_ratio * total_steps))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, fc.learning_rate, max(warmup, 1)),
       optax.linear_schedule(fc.learning_rate, 0.0, max(total_steps - warmup, 1))], [warmup])
  opt = optax.chain(optax.clip_by_global_norm(fc.max_grad_norm),
                    optax.adamw(schedule, weight_decay=fc.weight_decay))
  return optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()},
                               _labels(params, fc.trainable))


def _loss(graphdef, params, inputs, targets, mask, rng, router_losses: str = "model"):
  model = nnx.merge(graphdef, params)
  valid = inputs >= 0
  logits, aux = model(jnp.where(valid, inputs, 0), valid.astype(jnp.int32), None, train=True,
                      rng=rng)
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
      logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  ce = jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
  if router_losses == "none" or "lb_loss" not in aux:
    return ce, ce
  if router_losses == "release":
    return ce + RELEASE_LB_WEIGHT * jnp.mean(aux["lb_loss"]), ce
  return ce + aux["aux_loss"], ce


def without_pool(graphdef, params):
  """The graphdef of the same model with no document pool, in training or out (the release
  fine-tunes its Hugging Face model, which has none); the parameters are unchanged."""
  model = nnx.merge(graphdef, params)
  cfg = model.cfg.replace(pool=False, eval_pool_size=None)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0),
                                                execution=model.execution))
  return nnx.split(abstract)[0]


def finetune(graphdef, params, tokenizer, instances: Sequence[Instance], *, max_len: int,
             config: FinetuneConfig = FinetuneConfig(), log_every: float = 10.0):
  """Trains `params` (a pruned model's) on the instances' prompt + answer; returns
  (tuned params, {"steps", "loss_first", "loss_last", "seconds", "protocol", ...})."""
  if not instances:
    raise ValueError("no fine-tuning examples given")
  inputs, targets, mask = training_rows(instances, tokenizer, max_len)
  if not config.document_pool:
    graphdef = without_pool(graphdef, params)
  N, B = len(inputs), min(config.batch_size, len(inputs))
  steps = config.steps or math.ceil(N / B)
  optimizer = make_optimizer(params, config, steps)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (_, ce), grads = jax.value_and_grad(
        lambda p: _loss(graphdef, p, *batch, rng, config.router_losses), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce

  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  order, cursor, losses = rng.permutation(N), 0, []
  start = last = time.perf_counter()
  for i in range(steps):
    if cursor + B > N:
      order, cursor = rng.permutation(N), 0
    rows = order[cursor:cursor + B]
    cursor += B
    key, sub = jax.random.split(key)
    batch = tuple(jnp.asarray(a[rows]) for a in (inputs, targets, mask))
    params, opt_state, ce = step(params, opt_state, batch, sub)
    losses.append(float(ce))
    now = time.perf_counter()
    if now - last > log_every or i == steps - 1:
      last = now
      rate = (i + 1) / (now - start)
      print(f"  fine-tune: step {i + 1}/{steps}, answer loss {losses[-1]:.3f}, "
            f"{rate:.2f} steps/s, ETA {(steps - i - 1) / rate:.0f} s", file=sys.stderr,
            flush=True)
  return params, {"steps": steps, "examples": N, "loss_first": losses[0],
                  "loss_last": losses[-1], "seconds": round(time.perf_counter() - start, 2),
                  "protocol": config.protocol, "batch_size": B,
                  "learning_rate": config.learning_rate, "document_pool": config.document_pool,
                  "router_losses": config.router_losses}


def merge_back(full_params: Mapping[str, Any], tuned_params: Mapping[str, Any],
               selection: selective.Selection, *, shared: bool = False, router: bool = False,
               non_moe: bool = False) -> dict:
  """A copy of the full model's parameters with the tuned subset's routed experts written into
  their original bank rows.

  shared / router / non_moe also copy the shared expert(s), the kept router columns and every
  parameter outside the expert layers (attention, norms, embeddings). Without them those stay
  the full model's, so experts tuned for different tasks can live in one bank.
  """
  idx_LxK = selective.bank_indices(selection)
  R = selection.num_routed
  out = jax.tree.map(lambda x: np.array(x, copy=True), dict(full_params))
  tuned = jax.tree.map(np.asarray, dict(tuned_params))
  mlp, tuned_mlp = out["blocks"]["mlp"], tuned["blocks"]["mlp"]
  for layer, rows in enumerate(idx_LxK):
    for new, orig in enumerate(rows):
      if orig >= R and not shared:
        continue
      for name in EXPERT_WEIGHTS:
        mlp[name][layer, orig] = tuned_mlp[name][layer, new]
      if router:
        mlp["router"][layer, :, orig] = tuned_mlp["router"][layer, :, new]
  if non_moe:
    def copy(path, full, small):
      keys = [getattr(k, "key", str(k)) for k in path]
      if "mlp" in keys:
        return full
      if full.shape != small.shape:
        raise ValueError(f"{'/'.join(map(str, keys))}: tuned shape {small.shape} differs from "
                         f"the full model's {full.shape}")
      return np.array(small, copy=True)
    out = jax.tree_util.tree_map_with_path(copy, out, tuned)
  return out
