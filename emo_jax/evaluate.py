"""Evaluation: perplexity per domain on held-out batches, and the unigram baseline.

Per-domain perplexity is the measure EMO is about (a subset of experts should keep its domain's
perplexity), so the evaluator always splits the loss by the `domain_ids` the pipeline emits.
Evaluation uses the model's inference routing (no pool, or the configured fixed eval pool).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.losses import token_losses


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _domain_sums(graphdef, params, batch, num_domains: int, mesh=None):
  """Summed cross-entropy and token counts per domain for one batch."""
  model = nnx.merge(graphdef, params)
  logits, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"], train=False,
                    mesh=mesh)
  ce, _ = token_losses(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  one_hot = jax.nn.one_hot(batch["domain_ids"], num_domains, dtype=jnp.float32)  # -1 -> zeros
  ce_by_domain = jnp.einsum("bl,bld->d", ce * mask, one_hot)
  tokens_by_domain = jnp.einsum("bl,bld->d", mask, one_hot)
  return ce_by_domain, tokens_by_domain, jnp.sum(ce * mask), jnp.sum(mask)


def perplexity(graphdef, params, batches: Sequence[Mapping[str, np.ndarray]],
               domains: Sequence[str], *, prefix: str = "", mesh=None) -> dict[str, float]:
  """Mean loss and perplexity over the batches, overall and per domain.

  With a `mesh`, batches are this host's rows and are assembled into global arrays.
  """
  num_domains = max(len(domains), 1)
  ce_d = np.zeros(num_domains)
  tok_d = np.zeros(num_domains)
  ce_total = tok_total = 0.0
  for batch in batches:
    if mesh is not None:
      from emo_jax.sharding import global_batch  # only sharded runs need it
      batch = global_batch(batch, mesh)
    c, t, c_all, t_all = jax.device_get(_domain_sums(graphdef, params, batch, num_domains, mesh))
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


def unigram_baseline(corpus, dc, max_segments: int, eval_batches: int,
                     train_batches: int = 64) -> dict[str, float]:
  """Perplexity of a unigram model (token frequencies of the train split, add-one smoothed)
  on the same validation batches the trainer evaluates: the bar a model must clear to have
  learned anything beyond token frequencies."""
  vocab = corpus.tokenizer.vocab_size
  counts = np.ones(vocab, np.float64)
  train = corpus.dataset("train", seq_len=dc.seq_len, batch_size=dc.batch_size,
                         max_segments=max_segments, seed=dc.seed, num_epochs=1)
  for batch in itertools.islice(train, train_batches):
    mask = batch["loss_mask"] > 0
    counts += np.bincount(batch["targets"][mask], minlength=vocab)[:vocab]
  log_p = np.log(counts / counts.sum())
  nll = tokens = 0.0
  for batch in corpus.eval_batches(dc, max_segments, eval_batches):
    mask = batch["loss_mask"] > 0
    nll -= float(log_p[batch["targets"][mask]].sum())
    tokens += float(mask.sum())
  loss = nll / max(tokens, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
