"""The MoE layer (router, document pool, top-k, expert bank) and the dense MLP of the baseline.

Routing (routing.py) decides which experts each token uses; the experts run single-device
(experts.py) or over a mesh (expert_parallel.py) with the kernels the ExecutionConfig names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.model import decode_experts, expert_parallel, experts
from emo_jax.config import ModelConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.layers import init_normal
from emo_jax.model.matmul import flat_matmul
from emo_jax.model.routing import (document_pool_mask, draw_pool_sizes, load_balancing_loss, route,
                             router_z_loss, segment_one_hot)


class MLP(nnx.Module):
  """Dense SwiGLU MLP (the dense baseline's feed-forward)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init, D, H, dt = init_normal(cfg), cfg.d_model, cfg.mlp_hidden, cfg.param_jnp_dtype
    self.w_gate = nnx.Param(init(rngs.params(), (D, H), dt))
    self.w_up = nnx.Param(init(rngs.params(), (D, H), dt))
    self.w_down = nnx.Param(init(rngs.params(), (H, D), dt))

  def __call__(self, x_BxLxD, segment_ids_BxL, *, pool_rng=None, train=False, data_axes=(),
               keep_experts_E=None, collect_routing=False, mesh=None, decoding=False):
    del keep_experts_E, collect_routing, mesh, decoding  # a dense MLP has no experts
    y = experts.swiglu(x_BxLxD, self.w_gate[...], self.w_up[...], self.w_down[...],
                       compute_dtype=self.cfg.compute_jnp_dtype)
    return y, {}


class MoE(nnx.Module):
  """Router + document pool + top-k + expert bank (routed experts first, shared last)."""

  def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.execution = execution
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

  def lb_groups(self, batch: int, train: bool, data_axes=()) -> int:
    """How many load-balancing groups this call's `batch` rows form (ModelConfig.
    lb_scope_sequences). Inside shard_map (data_axes) `batch` is a replica's rows, and group g
    of every replica is one group of the global batch. Outside training a batch that does not
    split into whole groups balances as one (the loss there only reports)."""
    scope = self.cfg.lb_scope_sequences
    if not scope:
      return 1
    replicas = 1
    for axis in data_axes:
      replicas *= jax.lax.axis_size(axis)
    total = batch * replicas
    if total % scope or batch % (total // scope):
      if train:
        raise ValueError(
            f"a training batch of {total} sequences does not split into load-balancing groups "
            f"of ModelConfig.lb_scope_sequences={scope}: make the batch (per micro-batch) a "
            f"multiple of it, or set lb_scope_sequences=0 to balance over the whole batch")
      return 1
    return total // scope

  def __call__(self, x_BxLxD, segment_ids_BxL, *, pool_rng=None, train=False, data_axes=(),
               keep_experts_E=None, collect_routing=False, mesh=None, decoding=None):
    """MoE forward.

    mesh: a device mesh (sharding.make_mesh) with more than one device: the routed experts run
      on the mesh (expert_parallel.py; tokens travel to the devices holding their experts when
      the expert axis is larger than 1). Routing, the pool and the losses stay global
      computations, and the backend's numbers hold on every mesh, so results equal the
      single-device ones (up to rounding; for the capacity backend, up to which assignments
      each device's capacity drops).

    keep_experts_E: optional bool [routed experts]; experts marked False are never routed to
      (a subset of the experts applied as a routing mask, as when deploying EMO selectively).
      [B, routed experts] gives each row its own subset.
    collect_routing: also return aux["routing_probs"] [B, L, routed experts], the unmasked
      routed softmax (what expert selection and the clustering analysis read), and what this
      call routed: aux["routing_ids"] / aux["routing_weights"] [B, L, top_k] (after the pool
      and the subset mask) and aux["router_logits"] [B, L, routed experts] (the routing
      explorer, inference/serve/explore.py, reads them).
    decoding: (w_gate, w_up, w_down stacked over layers, this layer's index) in a KV-cache
      decode call (Transformer.decode): with at most execution.decode_loop_tokens tokens the
      experts run as a loop over the chosen ones, read in place from the stacked banks
      (decode_experts.py; no gradient).
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
    # The router z-loss reads the document pool only, not a deployment's expert subset.
    pool_keep_TxE = keep_BxLxE

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
    run = self.execution
    single_device = mesh is None or mesh.size == 1
    looped = decoding is not None and B * L <= run.decode_loop_tokens and single_device
    if looped:  # the shared experts run inside the loop too
      *stacked, layer = decoding
      y_TxD = decode_experts.chosen_experts_loop(
          x_TxD, ids_TxK, weights_TxK, *stacked, layer, num_shared=cfg.num_shared_experts,
          token_mask_T=token_mask_T, compute_dtype=cfg.compute_jnp_dtype)
      dropped = jnp.zeros((), jnp.float32)
    elif not single_device:
      y_TxD, dropped = expert_parallel.routed_experts_on_mesh(
          x_TxD, ids_TxK, weights_TxK, token_mask_T, self.w_gate[...], self.w_up[...],
          self.w_down[...], mesh=mesh, num_routed=R, backend=run.expert_backend,
          transport=run.expert_transport, capacity_factor=run.capacity_factor,
          compute_dtype=cfg.compute_jnp_dtype, ragged_dot_impl=run.ragged_dot_impl)
    else:
      y_TxD, dropped = experts.routed_experts(
          x_TxD, ids_TxK, weights_TxK, self.w_gate[...][:R], self.w_up[...][:R],
          self.w_down[...][:R], backend=run.expert_backend, token_mask_T=token_mask_T,
          capacity_factor=run.capacity_factor, compute_dtype=cfg.compute_jnp_dtype,
          ragged_dot_impl=run.ragged_dot_impl)
    for e in range(R, R if looped else cfg.num_experts):
      y_TxD = y_TxD + experts.swiglu(x_TxD, self.w_gate[...][e], self.w_up[...][e],
                                     self.w_down[...][e], compute_dtype=cfg.compute_jnp_dtype)

    lb_loss, load_E = load_balancing_loss(probs_TxE, ids_TxK, token_mask_T, data_axes=data_axes,
                                          num_groups=self.lb_groups(B, train, data_axes))
    aux = {
        "lb_loss": lb_loss,
        "router_z_loss": router_z_loss(logits_TxE, token_mask_T, pool_keep_TxE),
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
      aux["routing_ids"] = ids_TxK.reshape(B, L, -1)
      aux["routing_weights"] = weights_TxK.reshape(B, L, -1)
      aux["router_logits"] = logits_BxLxE
    return y_TxD.reshape(B, L, D).astype(x_BxLxD.dtype), aux
