"""The compiled halves of decoding with a KV cache: one prefill and one decode step.

The batch generator (`generate.generate_ids`) and the serving engine's slots (`serve.engine`)
both drive these two functions, so a row decodes and samples the same way in either, and
greedy text from one equals the other's. Each returns the sampled next tokens
(`sampling.Sampled`, drawn with `sampling.sample`) and the cache: one dispatch and one
transfer per token.

Prompts are left-padded to a common length (`left_pad`) so that every row writes the same cache
column at every step (the model's cache has one write column for all rows,
`Transformer.init_cache`); RoPE positions are per row and padding columns are never attended
to, so a padded row produces exactly what it would alone.

`keep_experts` is the model's routing mask: None (every expert), bool [layers, routed] for
every row, or [B, layers, routed] for one subset per row (the engine's rows).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.inference import sampling

__all__ = ["decode_step", "left_pad", "prefill"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
  """(tokens, positions, valid) [B, T] for left-padded prompts, T = `length` or the longest
  prompt. Empty prompts are an error: a row needs a token to continue from."""
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token")
  T = max(len(p) for p in prompts)
  if length is not None:
    if length < T:
      raise ValueError(f"length={length} is shorter than the longest prompt ({T} tokens)")
    T = length
  tokens = np.full((len(prompts), T), pad_id, np.int32)
  positions = np.zeros((len(prompts), T), np.int32)
  valid = np.zeros((len(prompts), T), bool)
  for i, p in enumerate(prompts):
    n = len(p)
    tokens[i, T - n:] = p
    positions[i, T - n:] = np.arange(n)
    valid[i, T - n:] = True
  return tokens, positions, valid


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("cache_len", "top_logprobs"))
def prefill(graphdef, params, tokens_BxT, positions_BxT, valid_BxT, keep_experts,
            rows: sampling.Rows, *, cache_len: int, top_logprobs: int = 0):
  """The prompts through the model at once into a new cache of `cache_len` columns (the
  prompt in the first T, `index` = T), and the first token of every row: (Sampled, cache)."""
  model = nnx.merge(graphdef, params)
  cache = model.init_cache(tokens_BxT.shape[0], cache_len)
  logits, cache = model.decode(tokens_BxT, positions_BxT, valid_BxT, cache,
                               keep_experts=keep_experts)
  return sampling.sample(logits[:, -1], rows, top_logprobs=top_logprobs), cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("top_logprobs",),
                   donate_argnums=(4,))
def decode_step(graphdef, params, token_B, position_B, cache, keep_experts,
                rows: sampling.Rows, *, top_logprobs: int = 0):
  """Every row's last token at the cache's write column, and its next token: (Sampled, cache).

  The cache is donated: the caller holds only the returned one.
  """
  model = nnx.merge(graphdef, params)
  B = token_B.shape[0]
  logits, cache = model.decode(token_B[:, None], position_B[:, None], jnp.ones((B, 1), bool),
                               cache, keep_experts=keep_experts)
  return sampling.sample(logits[:, 0], rows, top_logprobs=top_logprobs), cache
