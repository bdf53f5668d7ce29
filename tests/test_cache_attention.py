"""cache_attention against the reference: write the new keys into the cache, then attend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model.attention import dot_product_attention
from emo_jax.model.cache_attention import cache_attention


def written_then_attended(q, k_cache, v_cache, cached_valid, k_new, v_new, new_valid, index):
  """The new columns written at `index`, then the reference under the decode mask."""
  T, M = q.shape[1], k_cache.shape[1]
  k = jax.lax.dynamic_update_slice(k_cache, k_new, (0, index, 0, 0))
  v = jax.lax.dynamic_update_slice(v_cache, v_new, (0, index, 0, 0))
  valid = jax.lax.dynamic_update_slice(cached_valid, new_valid, (0, index))
  causal_TxM = jnp.arange(M)[None, :] <= (index + jnp.arange(T))[:, None]
  return dot_product_attention(q, k, v, (causal_TxM[None] & valid[:, None, :])[:, None])


@pytest.mark.parametrize("T,heads,kv_heads", [(1, 4, 2), (3, 4, 4), (5, 6, 2)])
def test_cache_attention_equals_writing_the_cache_first(T, heads, kv_heads):
  B, M, K, index = 3, 12, 8, 7
  keys = jax.random.split(jax.random.key(T * 10 + heads), 6)
  q = jax.random.normal(keys[0], (B, T, heads, K))
  k_cache = jax.random.normal(keys[1], (B, M, kv_heads, K))
  v_cache = jax.random.normal(keys[2], (B, M, kv_heads, K))
  k_new = jax.random.normal(keys[3], (B, T, kv_heads, K))
  v_new = jax.random.normal(keys[4], (B, T, kv_heads, K))
  rng = np.random.default_rng(T)
  cached_valid = np.zeros((B, M), bool)
  cached_valid[:, :index] = rng.random((B, index)) < 0.7
  cached_valid[:, index - 1] = True
  new_valid = np.ones((B, T), bool)
  new_valid[1, :T - 1] = False  # a left-padded row: only its last new token is real
  got = cache_attention(q, k_cache, v_cache, jnp.asarray(cached_valid), k_new, v_new,
                        jnp.asarray(new_valid))
  want = written_then_attended(q, k_cache, v_cache, jnp.asarray(cached_valid), k_new, v_new,
                               jnp.asarray(new_valid), index)
  # Left-padding queries are never read; compare the real ones.
  np.testing.assert_allclose(np.asarray(got)[new_valid], np.asarray(want)[new_valid],
                             rtol=1e-5, atol=1e-5)

