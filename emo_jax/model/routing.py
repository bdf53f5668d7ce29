"""Routing of the EMO MoE layer: the document pool, softmax top-k, and the auxiliary losses.

EMO differs from a standard MoE in one training-time constraint (docs/algorithm.md, "The
document pool"): all tokens of a document may only route into a pool of P experts, the P with
the highest document score, where the score of an expert is the sum over the document's tokens
of its routed softmax probability and P is drawn uniformly per document and per layer.
Everything else (softmax over the routed experts, top-k *without* renormalisation, shared
expert at weight exactly 1.0) is the plain MoE of the release.

Documents are given as segment ids (1..max_segments, 0 = padding), the same representation the
attention mask uses. Per-document reductions are contractions with a one-hot [B, L, S] matrix,
which keeps every shape static and runs on the MXU / tensor cores rather than as scatters.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


# ---- documents and the pool ---------------------------------------------------------------
def segment_one_hot(segment_ids_BxL: jax.Array, max_segments: int) -> jax.Array:
  """float32 [B, L, S]: column s is 1 where the token belongs to segment id s+1.

  Padding (segment id 0) rows are all zero, so padding never contributes to a document score.
  """
  return jax.nn.one_hot(segment_ids_BxL - 1, max_segments, dtype=jnp.float32)


def draw_pool_sizes(key: jax.Array, shape: Sequence[int], pool_min: int,
                    pool_max: int) -> jax.Array:
  """Pool sizes drawn uniformly from the integers [pool_min, pool_max], int32 of `shape`."""
  return jax.random.randint(key, tuple(shape), pool_min, pool_max + 1, dtype=jnp.int32)


def document_pool_mask(probs_BxLxE: jax.Array, segment_ids_BxL: jax.Array,
                       pool_sizes_BxS: jax.Array, max_segments: int) -> jax.Array:
  """bool [B, L, E]: which routed experts each token may use under its document's pool.

  Steps 2 to 4 of the spec: score = sum over the document's tokens of the (unmasked) routed
  softmax; the P highest-scoring experts of the document stay, the rest are masked for every
  token of it. Ties are broken towards the lower expert index (stable sort). P >= E keeps all.
  No gradient flows through the selection. Padding tokens keep every expert (their outputs are
  ignored, and an all-masked softmax would be NaN).
  """
  one_hot_BxLxS = segment_one_hot(segment_ids_BxL, max_segments)
  probs_BxLxE = jax.lax.stop_gradient(probs_BxLxE).astype(jnp.float32)
  scores_BxSxE = jnp.einsum("bls,ble->bse", one_hot_BxLxS, probs_BxLxE,
                            precision=jax.lax.Precision.HIGHEST)
  order_BxSxE = jnp.argsort(-scores_BxSxE, axis=-1, stable=True)
  rank_BxSxE = jnp.argsort(order_BxSxE, axis=-1, stable=True)
  keep_BxSxE = rank_BxSxE < pool_sizes_BxS[..., None]
  # Gather each token's document row with the same one-hot (exact: entries are 0 or 1).
  keep_BxLxE = jnp.einsum("bls,bse->ble", one_hot_BxLxS, keep_BxSxE.astype(jnp.float32)) > 0.5
  is_pad_BxL = segment_ids_BxL <= 0
  return keep_BxLxE | is_pad_BxL[..., None]


def check_segment_ids(segment_ids, max_segments: int) -> None:
  """Host-side check of a batch's segment ids (call it where the batch is made).

  Inside jit an id above max_segments would silently drop its document from the pool, so the
  data pipeline should call this once per batch shape it produces.
  """
  segment_ids = np.asarray(segment_ids)
  if segment_ids.min(initial=0) < 0 or segment_ids.max(initial=0) > max_segments:
    raise ValueError(
        f"segment ids must lie in [0, max_segments={max_segments}] (0 = padding), got range "
        f"[{segment_ids.min()}, {segment_ids.max()}]; pack fewer documents per row or raise "
        "ModelConfig.max_segments")


# ---- routing --------------------------------------------------------------------------------
def route(routed_logits_TxE: jax.Array, keep_TxE: jax.Array | None, top_k: int):
  """Softmax over the routed experts (masked outside the pool), then top-k, no renormalising.

  Returns (probs_TxE, expert_ids_TxK, expert_weights_TxK). Because the softmax runs after the
  mask, the weights are renormalised *within the pool* (spec step 4).
  """
  logits = routed_logits_TxE.astype(jnp.float32)
  if keep_TxE is not None:
    logits = jnp.where(keep_TxE, logits, NEG_INF)
  probs_TxE = jax.nn.softmax(logits, axis=-1)
  weights_TxK, ids_TxK = jax.lax.top_k(probs_TxE, top_k)
  return probs_TxE, ids_TxK, weights_TxK


def load_balancing_loss(probs_TxE: jax.Array, expert_ids_TxK: jax.Array,
                        token_mask_T: jax.Array, *,
                        data_axes: Sequence[str] = (),
                        num_groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """The release's load-balancing loss over routed experts, and the global expert load.

  loss = (N / K) * sum_e count_e * mean_score_e / n_tokens, where count_e (top-k assignments to
  e) and n_tokens are summed over the named data-parallel axes (global balancing: one psum
  each), while mean_score_e (mean post-mask softmax) stays local. Averaging this loss over
  replicas equals the single-device loss on the whole batch when replicas hold equal tokens.

  num_groups > 1 splits the T tokens into that many equal contiguous groups (groups of whole
  sequences when T is rows x length) and balances each group on its own, the loss averaged over
  groups: the release's scope, where counts are summed over one micro-batch of every
  data-parallel rank and the per-micro-batch losses are averaged (ModelConfig.
  lb_scope_sequences). With data_axes, group g of every replica forms one balancing group.

  Returns (loss, load_E) with load_E = count_e / (n_tokens * K), the fraction of assignments
  over all groups.
  """
  num_experts = probs_TxE.shape[-1]
  T, top_k = expert_ids_TxK.shape
  G = int(num_groups)
  if G < 1 or T % G:
    raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the {T} tokens")
  mask_GxT = token_mask_T.astype(jnp.float32).reshape(G, T // G)
  counts_GxE = jnp.einsum("gt,gtke->ge", mask_GxT,
                          jax.nn.one_hot(expert_ids_TxK.reshape(G, T // G, top_k), num_experts,
                                         dtype=jnp.float32))
  local_tokens_G = jnp.sum(mask_GxT, axis=1)
  mean_score_GxE = (jnp.einsum("gt,gte->ge", mask_GxT, probs_TxE.reshape(G, T // G, num_experts))
                    / jnp.maximum(local_tokens_G, 1.0)[:, None])
  global_tokens_G = local_tokens_G
  if data_axes:
    counts_GxE = jax.lax.psum(counts_GxE, tuple(data_axes))
    global_tokens_G = jax.lax.psum(local_tokens_G, tuple(data_axes))
  counts_GxE = jax.lax.stop_gradient(counts_GxE)
  loss_G = ((num_experts / top_k) * jnp.sum(counts_GxE * mean_score_GxE, axis=1)
            / jnp.maximum(global_tokens_G, 1.0))
  load_E = jnp.sum(counts_GxE, axis=0) / (jnp.maximum(jnp.sum(global_tokens_G), 1.0) * top_k)
  return jnp.mean(loss_G), load_E


def router_z_loss(routed_logits_TxE: jax.Array, token_mask_T: jax.Array,
                  keep_TxE: jax.Array | None = None) -> jax.Array:
  """Mean over (non-padding) tokens of logsumexp(routed logits)^2, over the pool when given.

  `keep_TxE` is the document pool: out-of-pool logits are -inf, as the release masks them in
  place before its z-loss, so only the in-pool experts' router rows get its gradient.
  """
  mask_T = token_mask_T.astype(jnp.float32)
  logits_TxE = routed_logits_TxE.astype(jnp.float32)
  if keep_TxE is not None:
    logits_TxE = jnp.where(keep_TxE, logits_TxE, NEG_INF)
  lse_T = jax.nn.logsumexp(logits_TxE, axis=-1)
  return jnp.sum(mask_T * lse_T**2) / jnp.maximum(jnp.sum(mask_T), 1.0)
