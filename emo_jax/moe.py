"""The EMO mixture-of-experts layer: router, document pool, top-k, auxiliary losses.

EMO differs from a standard MoE in one training-time constraint (EMO_SPEC.md, "The
document-pool constraint"): all tokens of a document may only route into a pool of P experts,
the P with the highest document score, where the score of an expert is the sum over the
document's tokens of its routed softmax probability and P is drawn uniformly per document and
per layer. Everything else (softmax over the routed experts, top-k *without* renormalisation,
shared expert at weight exactly 1.0) is the plain MoE of the release.

Documents are given as segment ids (1..max_segments, 0 = padding), the same representation the
attention mask uses. Per-document reductions are contractions with a one-hot [B, L, S] matrix,
which keeps every shape static and runs on the MXU / tensor cores rather than as scatters.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax import experts
from emo_jax.config import ModelConfig
from emo_jax.matmul import flat_matmul

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
  import numpy as np
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
                        data_axes: Sequence[str] = ()) -> tuple[jax.Array, jax.Array]:
  """The release's load-balancing loss over routed experts, and the global expert load.

  loss = (N / K) * sum_e count_e * mean_score_e / n_tokens, where count_e (top-k assignments to
  e) and n_tokens are summed over the named data-parallel axes (global balancing: one psum
  each), while mean_score_e (mean post-mask softmax) stays local. Averaging this loss over
  replicas equals the single-device loss on the whole batch when replicas hold equal tokens.

  Returns (loss, load_E) with load_E = count_e / (n_tokens * K), the fraction of assignments.
  """
  num_experts = probs_TxE.shape[-1]
  top_k = expert_ids_TxK.shape[-1]
  mask_T = token_mask_T.astype(jnp.float32)
  counts_E = jnp.einsum("t,tke->e", mask_T,
                        jax.nn.one_hot(expert_ids_TxK, num_experts, dtype=jnp.float32))
  local_tokens = jnp.sum(mask_T)
  mean_score_E = jnp.einsum("t,te->e", mask_T, probs_TxE) / jnp.maximum(local_tokens, 1.0)
  global_tokens = local_tokens
  if data_axes:
    counts_E = jax.lax.psum(counts_E, tuple(data_axes))
    global_tokens = jax.lax.psum(local_tokens, tuple(data_axes))
  global_tokens = jnp.maximum(global_tokens, 1.0)
  counts_E = jax.lax.stop_gradient(counts_E)
  loss = (num_experts / top_k) * jnp.sum(counts_E * mean_score_E) / global_tokens
  load_E = counts_E / (global_tokens * top_k)
  return loss, load_E


def router_z_loss(routed_logits_TxE: jax.Array, token_mask_T: jax.Array) -> jax.Array:
  """Mean over (non-padding) tokens of logsumexp(routed logits)^2."""
  mask_T = token_mask_T.astype(jnp.float32)
  lse_T = jax.nn.logsumexp(routed_logits_TxE.astype(jnp.float32), axis=-1)
  return jnp.sum(mask_T * lse_T**2) / jnp.maximum(jnp.sum(mask_T), 1.0)


# ---- modules --------------------------------------------------------------------------------
def init_normal(cfg: ModelConfig):
  return nnx.initializers.truncated_normal(stddev=cfg.init_std)


class MLP(nnx.Module):
  """Dense SwiGLU MLP (the dense baseline's feed-forward)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init, D, H, dt = init_normal(cfg), cfg.d_model, cfg.mlp_hidden, cfg.param_jnp_dtype
    self.w_gate = nnx.Param(init(rngs.params(), (D, H), dt))
    self.w_up = nnx.Param(init(rngs.params(), (D, H), dt))
    self.w_down = nnx.Param(init(rngs.params(), (H, D), dt))

  def __call__(self, x_BxLxD, segment_ids_BxL, *, pool_rng=None, train=False, data_axes=(),
               keep_experts_E=None, collect_routing=False, mesh=None):
    del keep_experts_E, collect_routing, mesh  # a dense MLP has no experts
    y = experts.swiglu(x_BxLxD, self.w_gate[...], self.w_up[...], self.w_down[...],
                       compute_dtype=self.cfg.compute_jnp_dtype)
    return y, {}


class MoE(nnx.Module):
  """Router + document pool + top-k + expert bank (routed experts first, shared last)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init, D, H, E = init_normal(cfg), cfg.d_model, cfg.expert_hidden, cfg.num_experts
    dt = cfg.param_jnp_dtype
    # The router has a row for every expert of the bank, as in the release (the shared
    # expert's row is never used), so checkpoints convert without reshaping. Always float32.
    self.router = nnx.Param(init(rngs.params(), (D, E), jnp.float32))
    self.w_gate = nnx.Param(init(rngs.params(), (E, D, H), dt))
    self.w_up = nnx.Param(init(rngs.params(), (E, D, H), dt))
    self.w_down = nnx.Param(init(rngs.params(), (E, H, D), dt))

  def pool_sizes(self, batch: int, *, pool_rng, train: bool):
    """[B, S] pool sizes for this call, or None when no pool applies."""
    cfg = self.cfg
    shape = (batch, cfg.max_segments)
    if train and cfg.pool:
      if pool_rng is None:
        raise ValueError("training an EMO model (pool=True) needs a pool_rng key for the "
                         "per-document pool sizes; pass rng=... to the model")
      return draw_pool_sizes(pool_rng, shape, cfg.pool_min, cfg.pool_max)
    if not train and cfg.eval_pool_size is not None:
      return jnp.full(shape, cfg.eval_pool_size, jnp.int32)
    return None

  def __call__(self, x_BxLxD, segment_ids_BxL, *, pool_rng=None, train=False, data_axes=(),
               keep_experts_E=None, collect_routing=False, mesh=None):
    """MoE forward.

    mesh: a device mesh (sharding.make_mesh) with more than one device: the routed experts run
      expert-parallel (tokens travel to the devices holding their experts). Routing, the pool
      and the losses stay global computations, so results equal the single-device ones.

    keep_experts_E: optional bool [routed experts]; experts marked False are never routed to
      (a subset of the experts applied as a routing mask, as when deploying EMO selectively).
      [B, routed experts] gives each row its own subset.
    collect_routing: also return aux["routing_probs"] [B, L, routed experts], the unmasked
      routed softmax (what expert selection and the clustering analysis read).
    """
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    R = cfg.num_routed_experts
    logits_BxLxE = flat_matmul(x_BxLxD.astype(jnp.float32), self.router[...][:, :R],
                               precision=jax.lax.Precision.HIGHEST)
    pool_sizes_BxS = self.pool_sizes(B, pool_rng=pool_rng, train=train)
    keep_BxLxE = None
    if pool_sizes_BxS is not None:
      keep_BxLxE = document_pool_mask(jax.nn.softmax(logits_BxLxE, axis=-1), segment_ids_BxL,
                                      pool_sizes_BxS, cfg.max_segments)
      keep_BxLxE = keep_BxLxE.reshape(B * L, R)

    if keep_experts_E is not None:
      keep = keep_experts_E.astype(bool)  # [R], or [B, R]: one subset per row
      if keep.ndim == 2:
        keep = keep[:, None, :]
      subset_TxE = jnp.broadcast_to(keep, (B, L, R)).reshape(B * L, R)
      keep_BxLxE = subset_TxE if keep_BxLxE is None else keep_BxLxE & subset_TxE

    token_mask_T = (segment_ids_BxL > 0).reshape(B * L)
    logits_TxE = logits_BxLxE.reshape(B * L, R)
    probs_TxE, ids_TxK, weights_TxK = route(logits_TxE, keep_BxLxE, cfg.top_k)

    x_TxD = x_BxLxD.reshape(B * L, D)
    if mesh is not None and mesh.size > 1:
      from emo_jax import sharding  # here: sharding imports the expert kernels this module uses
      y_TxD, dropped = sharding.expert_parallel_ffn(
          x_TxD, ids_TxK, weights_TxK, token_mask_T, self.w_gate[...], self.w_up[...],
          self.w_down[...], mesh=mesh, capacity_factor=cfg.capacity_factor,
          compute_dtype=cfg.compute_jnp_dtype, transport=cfg.expert_transport,
          ragged_dot_impl=cfg.ragged_dot_impl)
    else:
      y_TxD, dropped = experts.routed_experts(
          x_TxD, ids_TxK, weights_TxK, self.w_gate[...][:R], self.w_up[...][:R],
          self.w_down[...][:R], backend=cfg.expert_backend, token_mask_T=token_mask_T,
          capacity_factor=cfg.capacity_factor, compute_dtype=cfg.compute_jnp_dtype,
          ragged_dot_impl=cfg.ragged_dot_impl)
    for e in range(R, cfg.num_experts):
      y_TxD = y_TxD + experts.swiglu(x_TxD, self.w_gate[...][e], self.w_up[...][e],
                                     self.w_down[...][e], compute_dtype=cfg.compute_jnp_dtype)

    lb_loss, load_E = load_balancing_loss(probs_TxE, ids_TxK, token_mask_T, data_axes=data_axes)
    aux = {
        "lb_loss": lb_loss,
        "router_z_loss": router_z_loss(logits_TxE, token_mask_T),
        "expert_load": load_E,
        "dropped_fraction": dropped,
    }
    if pool_sizes_BxS is not None:
      # Mean pool size over the documents actually present (clipped to the routed count).
      present_BxS = jnp.sum(segment_one_hot(segment_ids_BxL, cfg.max_segments), axis=1) > 0
      sizes = jnp.minimum(pool_sizes_BxS, R).astype(jnp.float32)
      aux["pool_size"] = jnp.sum(sizes * present_BxS) / jnp.maximum(jnp.sum(present_BxS), 1)
    else:
      aux["pool_size"] = jnp.asarray(R, jnp.float32)
    if collect_routing:
      aux["routing_probs"] = jax.nn.softmax(logits_BxLxE, axis=-1)
    return y_TxD.reshape(B, L, D).astype(x_BxLxD.dtype), aux
