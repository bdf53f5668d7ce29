"""Rank-classification scoring: log p(continuation | context) for every answer choice.

Each (context, continuation) pair is tokenized as two pieces and concatenated; a pair longer
than the model's window keeps its last `max_len + 1` tokens (the few-shot examples at the
start go first, the continuation is never cut). Pairs are sorted by length and scored in
batches of a fixed size, padded to a power-of-two length bucket, so one compiled function per
bucket serves a whole task. Accuracy takes the choice of highest log-likelihood (`acc`);
`acc_per_char` divides each log-likelihood by its continuation's length in characters first
(OLMES's length normalisation). Tasks with subjects (MMLU) are macro-averaged.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.tasks.data import Instance

MIN_BUCKET = 16
_REPORTED_CUTS: set = set()


@functools.partial(jax.jit, static_argnums=(0,))
def _target_logprobs(graphdef, params, inputs_BxL, targets_BxL, mask_BxL, keep_experts):
  """Sum over the masked positions of log p(target), float32 [B]."""
  model = nnx.merge(graphdef, params)
  valid_BxL = inputs_BxL >= 0
  logits_BxLxV, _ = model(jnp.where(valid_BxL, inputs_BxL, 0), valid_BxL.astype(jnp.int32),
                          None, train=False, keep_experts=keep_experts)
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  # log p(target) = logit(target) - logsumexp(logits): no second [B, L, vocab] array.
  target_BxL = jnp.take_along_axis(logits_BxLxV, jnp.maximum(targets_BxL, 0)[..., None],
                                   axis=-1)[..., 0] - jax.nn.logsumexp(logits_BxLxV, axis=-1)
  return jnp.sum(jnp.where(mask_BxL, target_BxL, 0.0), axis=-1)


def encode_pair(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list, int]:
  """(token ids, continuation tokens scored) of one pair, cut from the left to max_len + 1
  tokens. A continuation longer than the window is scored on its last max_len tokens (as
  lm-evaluation-harness does); `score_pairs` reports how many were."""
  ctx = list(tokenizer.encode(context))
  cont = list(tokenizer.encode(continuation))
  if not cont:
    raise ValueError(f"continuation {continuation!r} encodes to no tokens")
  if not ctx:  # the first continuation token needs something to be predicted from
    ctx = [tokenizer.eos_id]
  return (ctx + cont)[-(max_len + 1):], min(len(cont), max_len)


def bucket(length: int, max_len: int) -> int:
  """The power-of-two input length (at least MIN_BUCKET, at most max_len) holding `length`."""
  b = MIN_BUCKET
  while b < length:
    b *= 2
  return min(b, max_len)


class Progress:
  """A line to stderr at most every `every` seconds: done/total, instances/s and ETA."""

  def __init__(self, total: int, label: str, per_instance: float, every: float = 10.0):
    self.total, self.label, self.per_instance, self.every = total, label, per_instance, every
    self.start = self.last = time.perf_counter()

  def update(self, done: int, force: bool = False):
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    print(f"  {self.label}: {done}/{self.total} requests, {rate / self.per_instance:.1f} "
          f"instances/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


def score_pairs(graphdef, params, tokenizer, pairs: Sequence[tuple[str, str]], *, max_len: int,
                keep_experts=None, batch_size: int = 16, label: str = "scoring",
                choices_per_instance: float = 1.0) -> np.ndarray:
  """log p(continuation | context) of each (context, continuation) pair, float64 [N]."""
  encoded = [encode_pair(tokenizer, c, x, max_len) for c, x in pairs]
  cut = sum(len(tokenizer.encode(x)) > max_len for _, x in pairs)
  if cut and (label, cut, len(encoded)) not in _REPORTED_CUTS:  # once per task, not per subset
    _REPORTED_CUTS.add((label, cut, len(encoded)))
    print(f"  {label}: {cut} of {len(encoded)} continuations are longer than the window of "
          f"{max_len} tokens and are scored on their last {max_len}", file=sys.stderr)
  order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
  keep = None if keep_experts is None else jnp.asarray(keep_experts, bool)
  out = np.zeros(len(encoded), np.float64)
  progress = Progress(len(encoded), label, choices_per_instance)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    L = bucket(max(len(encoded[i][0]) - 1 for i in rows), max_len)
    inputs = np.full((batch_size, L), -1, np.int32)
    targets = np.full((batch_size, L), -1, np.int32)
    mask = np.zeros((batch_size, L), bool)
    for r, i in enumerate(rows):
      ids, n_cont = encoded[i]
      n = len(ids) - 1
      inputs[r, :n] = ids[:-1]  # left-aligned: causal attention makes right padding harmless
      targets[r, :n] = ids[1:]
      mask[r, n - n_cont:n] = True
    ll = np.asarray(jax.device_get(_target_logprobs(
        graphdef, params, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask), keep)))
    out[rows] = ll[:len(rows)]
    progress.update(start + len(rows))
  return out


def task_pairs(instances: Sequence[Instance]) -> list[tuple[str, str]]:
  return [(inst.context, c) for inst in instances for c in inst.continuations]


def accuracy(instances: Sequence[Instance], logliks: np.ndarray, *,
             macro: bool = False) -> dict[str, Any]:
  """acc and acc_per_char of per-pair log-likelihoods (in `task_pairs` order).

  macro: the mean of per-subject accuracies (MMLU); otherwise the mean over instances.
  Also returns each instance's predictions for inspection.
  """
  pos = 0
  hits: dict[str, list[tuple[bool, bool]]] = {}
  predictions = []
  for inst in instances:
    n = len(inst.continuations)
    ll = np.asarray(logliks[pos:pos + n], np.float64)
    chars = np.array([max(len(c), 1) for c in inst.continuations], np.float64)
    pred, pred_char = int(np.argmax(ll)), int(np.argmax(ll / chars))
    hits.setdefault(inst.subject, []).append((pred == inst.gold, pred_char == inst.gold))
    predictions.append({"doc_id": inst.doc_id, "gold": inst.gold, "pred": pred,
                        "pred_per_char": pred_char, "logliks": [float(x) for x in ll]})
    pos += n
  if pos != len(logliks):
    raise ValueError(f"{len(logliks)} log-likelihoods for {pos} continuations")
  if macro:
    per = {s: np.mean(np.asarray(h, float), axis=0) for s, h in hits.items()}
    acc, acc_char = np.mean([v[0] for v in per.values()]), np.mean([v[1] for v in per.values()])
  else:
    flat = np.asarray([h for group in hits.values() for h in group], float)
    acc, acc_char = flat[:, 0].mean(), flat[:, 1].mean()
  return {"acc": float(acc), "acc_per_char": float(acc_char), "instances": len(instances),
          "predictions": predictions}


def evaluate_task(graphdef, params, tokenizer, task, *, max_len: int, keep_experts=None,
                  batch_size: int = 16, label: str = "") -> dict[str, Any]:
  """Scores every instance of `task` (a registry.Task); returns acc, acc_per_char, primary
  (the task's reported metric), instances, seconds and the predictions."""
  start = time.perf_counter()
  pairs = task_pairs(task.instances)
  ll = score_pairs(graphdef, params, tokenizer, pairs, max_len=max_len,
                   keep_experts=keep_experts, batch_size=batch_size, label=label or task.name,
                   choices_per_instance=len(pairs) / len(task.instances))
  result = accuracy(task.instances, ll, macro=task.macro)
  result["primary"] = result[task.primary_metric]
  result["seconds"] = round(time.perf_counter() - start, 2)
  return result
