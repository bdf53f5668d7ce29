"""Evaluation: perplexity per domain on held-out batches, and the unigram baseline.

Per-domain perplexity is the measure EMO is about (a subset of experts should keep its domain's
perplexity), so the evaluator always splits the loss by the `domain_ids` the pipeline emits.
Evaluation uses the model's inference routing (no pool, or the configured fixed eval pool), and
takes an optional expert subset (`keep_experts`, a routing mask equal to the physically pruned
model). Benchmarks (multiple choice by log-likelihood) are scored in emo_jax/tasks/.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.model.losses import token_losses
from emo_jax.model.sharding import global_batch


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _domain_sums(graphdef, params, batch, num_domains: int, mesh=None, keep_experts=None):
  """Summed cross-entropy and token counts per domain for one batch.

  keep_experts: optional bool [layers, routed] routing mask (a subset of the experts).
  """
  model = nnx.merge(graphdef, params)
  logits, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"], train=False,
                    mesh=mesh, keep_experts=keep_experts)
  ce, _ = token_losses(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  one_hot = jax.nn.one_hot(batch["domain_ids"], num_domains, dtype=jnp.float32)  # -1 -> zeros
  ce_by_domain = jnp.einsum("bl,bld->d", ce * mask, one_hot)
  tokens_by_domain = jnp.einsum("bl,bld->d", mask, one_hot)
  return ce_by_domain, tokens_by_domain, jnp.sum(ce * mask), jnp.sum(mask)


def perplexity(graphdef, params, batches: Sequence[Mapping[str, np.ndarray]],
               domains: Sequence[str], *, prefix: str = "", mesh=None,
               keep_experts=None) -> dict[str, float]:
  """Mean loss and perplexity over the batches, overall and per domain.

  With a `mesh`, batches are this host's rows and are assembled into global arrays.
  keep_experts: optional bool [layers, routed experts]: evaluate with only those experts
  (a routing mask on the full weights; equal to the physically pruned model).
  """
  keep = None if keep_experts is None else jnp.asarray(keep_experts, bool)
  num_domains = max(len(domains), 1)
  ce_d = np.zeros(num_domains)
  tok_d = np.zeros(num_domains)
  ce_total = tok_total = 0.0
  for batch in batches:
    if mesh is not None:
      batch = global_batch(batch, mesh)
    c, t, c_all, t_all = jax.device_get(_domain_sums(graphdef, params, batch, num_domains, mesh,
                                                     keep))
    ce_d += c
    tok_d += t
    ce_total += float(c_all)
    tok_total += float(t_all)
  loss = ce_total / max(tok_total, 1.0)
  out = {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 50.0))}
  for i, name in enumerate(domains):
    if tok_d[i] > 0:
      out[f"{prefix}perplexity/{name}"] = math.exp(min(ce_d[i] / tok_d[i], 50.0))
  return out


def unigram_baseline(data, train_batches: int = 64) -> dict[str, float]:
  """Perplexity of a unigram model (token frequencies of the train split, add-one smoothed)
  on the same validation batches the trainer evaluates: the bar a model must clear to have
  learned anything beyond token frequencies. `data`: the run's data.training_data.TrainingData."""
  vocab = data.tokenizer.vocab_size
  counts = np.ones(vocab, np.float64)
  for batch in itertools.islice(data.train_pass(), train_batches):
    mask = batch["loss_mask"] > 0
    counts += np.bincount(batch["targets"][mask], minlength=vocab)[:vocab]
  log_p = np.log(counts / counts.sum())
  num_domains = len(data.domains)
  nll_d, tokens_d = np.zeros(num_domains + 1), np.zeros(num_domains + 1)  # last: no domain
  for batch in data.eval_batches:
    mask = batch["loss_mask"] > 0
    domain = np.where(batch["domain_ids"] >= 0, batch["domain_ids"], num_domains)[mask]
    nll_d -= np.bincount(domain, log_p[batch["targets"][mask]], minlength=num_domains + 1)
    tokens_d += np.bincount(domain, minlength=num_domains + 1)
  loss = float(nll_d.sum()) / max(float(tokens_d.sum()), 1.0)
  out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
  for i, name in enumerate(data.domains):  # the same keys as `perplexity` writes
    if tokens_d[i] > 0:
      out[f"perplexity/{name}"] = math.exp(min(nll_d[i] / tokens_d[i], 50.0))
  return out

