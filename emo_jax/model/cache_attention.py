"""Attention of a few new tokens over a KV cache, without writing the cache first.

A decode step's new keys and values are a handful of columns beside a cache of hundreds. Had
each layer written its new columns into the cache before attending over it, the cache would be
read, updated and (on XLA:CPU, inside the layer loop) copied whole once per layer and step:
on the serving engine's 8-slot cache that traffic rivalled the expert weights' (BENCHMARKS.md,
"Serving"). `cache_attention` instead takes the cache's columns as they were and the new
tokens' own keys and values apart, and runs one softmax across both: a new token at slot
index + t sees the cached columns that hold real tokens and the new tokens t' <= t that are real,
exactly the keys the full causal forward would give it. `Transformer.decode` then writes all
layers' new columns into the (donated) cache in one update.

The products are einsums over the cache's own [B, M, G, K] layout (on XLA:CPU each layer still
makes one transposed copy of its cache slice for them, BENCHMARKS.md); logits and softmax are
float32, masked columns get -1e30 (exp underflows to 0),
as in `attention.dot_product_attention`, which this equals up to rounding
(tests/test_cache_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cache_attention"]

_MASKED = -1e30


def cache_attention(q_BxTxHxK, k_cache_BxMxGxK, v_cache_BxMxGxK, cached_valid_BxM,
                    k_new_BxTxGxK, v_new_BxTxGxK, new_valid_BxT):
  """Softmax attention of T new queries over the cache's columns and the T new keys.

  cached_valid_BxM marks the cache columns holding real tokens (all of them precede the new
  tokens); new_valid_BxT the new tokens that are real (False: left padding). Among the new
  tokens attention is causal. Returns [B, T, H, K] in the values' dtype.
  """
  B, T, H, K = q_BxTxHxK.shape
  G = k_cache_BxMxGxK.shape[2]
  R = H // G
  f32 = jnp.float32
  q_BxTxGxRxK = (q_BxTxHxK * jnp.asarray(K ** -0.5, q_BxTxHxK.dtype)).reshape(B, T, G, R, K)
  cached_BxGxRxTxM = jnp.einsum("btgrk,bmgk->bgrtm", q_BxTxGxRxK, k_cache_BxMxGxK,
                                preferred_element_type=f32)
  cached_BxGxRxTxM = cached_BxGxRxTxM + jnp.where(cached_valid_BxM, 0.0, _MASKED).astype(
      f32)[:, None, None, None, :]
  new_BxGxRxTxT = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_new_BxTxGxK,
                             preferred_element_type=f32)
  causal_TxT = jnp.tril(jnp.ones((T, T), bool))
  new_mask_BxTxT = causal_TxT[None] & new_valid_BxT[:, None, :].astype(bool)
  new_BxGxRxTxT = new_BxGxRxTxT + jnp.where(new_mask_BxTxT, 0.0, _MASKED).astype(
      f32)[:, None, None]
  shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(cached_BxGxRxTxM, axis=-1, keepdims=True),
                                            jnp.max(new_BxGxRxTxT, axis=-1, keepdims=True)))
  p_cached = jnp.exp(cached_BxGxRxTxM - shift)
  p_new = jnp.exp(new_BxGxRxTxT - shift)
  denominator_BxGxRxTx1 = (jnp.sum(p_cached, axis=-1, keepdims=True)
                           + jnp.sum(p_new, axis=-1, keepdims=True))
  vdt = v_cache_BxMxGxK.dtype
  out_BxGxRxTxK = (
      jnp.einsum("bgrtm,bmgk->bgrtk", p_cached.astype(vdt), v_cache_BxMxGxK,
                 preferred_element_type=f32)
      + jnp.einsum("bgrts,bsgk->bgrtk", p_new.astype(vdt), v_new_BxTxGxK.astype(vdt),
                   preferred_element_type=f32))
  out_BxGxRxTxK = (out_BxGxRxTxK / denominator_BxGxRxTx1).astype(vdt)
  return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
