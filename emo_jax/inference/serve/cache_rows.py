"""The engine's KV cache, row by row: a prefilled prompt into a slot's row, and every row
shifted left when the write column reaches the end (serve/engine.py drives both).

The cache is {"k", "v": [layers, slots, columns, kv heads, head dim], "valid": [slots, columns],
"index": the write column}; both functions donate it, so a step updates it in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, donate_argnums=(0,))
def insert_prompt(cache, k_Lx1xTxGxK, v_Lx1xTxGxK, valid_1xT, row):
  """A prefilled prompt's keys and values into `row`, ending just before the write column."""
  T = k_Lx1xTxGxK.shape[2]
  M = cache["valid"].shape[1]
  start = cache["index"] - T

  def clean_row(x, new):
    """The row's every column zeroed (nothing of an earlier request, not even a masked NaN,
    reaches this one: a masked column still multiplies its value by 0), then the prompt's."""
    empty = jnp.zeros((x.shape[0], 1) + x.shape[2:], x.dtype)
    x = jax.lax.dynamic_update_slice(x, empty, (0, row, 0, 0, 0))
    return jax.lax.dynamic_update_slice(x, new.astype(x.dtype), (0, row, start, 0, 0))
  k = clean_row(cache["k"], k_Lx1xTxGxK)
  v = clean_row(cache["v"], v_Lx1xTxGxK)
  valid_row = jax.lax.dynamic_update_slice(jnp.zeros((1, M), bool), valid_1xT, (0, start))
  valid = jax.lax.dynamic_update_slice(cache["valid"], valid_row, (row, 0))
  return {"k": k, "v": v, "valid": valid, "index": cache["index"]}


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(0,))
def shift_left(cache, amount: int):
  """Every row's columns `amount` to the left (the oldest drop out), the write column too."""
  def left(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, amount)
    return jnp.pad(jax.lax.slice_in_dim(x, amount, x.shape[axis], axis=axis), pad)
  return {"k": left(cache["k"], 2), "v": left(cache["v"], 2), "valid": left(cache["valid"], 1),
          "index": cache["index"] - amount}


def length_buckets(context: int, smallest: int = 16) -> list[int]:
  """Prefill lengths: powers of two from `smallest` up to the context (which is always one)."""
  out, n = [], smallest
  while n < context:
    out.append(n)
    n *= 2
  return out + [context]
