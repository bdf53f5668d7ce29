"""The EMO / StdMoE / dense decoder: embedding, pre-norm blocks, final norm, LM head.

`h = x + attn(norm1(x)); y = h + mlp(norm2(h))` (docs/architecture.md). Attention is causal *and*
confined to the token's own segment (document) of a packed row, with RoPE on per-token positions
that restart at each document, so a packed row behaves like its documents run separately;
`ModelConfig.document_attention=False` makes it causal over the whole row (the release's
baselines) while the document pool still reads the segments.

The blocks' parameters are stacked along a leading layer axis and run with `jax.lax.scan`: one
block is compiled once whatever the depth (compile time on CPU, and at 16 layers on a pod), and
the stacked layout shards and converts layer-major without loops. How the model runs (the
attention kernel, attention.py; the expert kernels, experts.py and expert_parallel.py; what each
scanned block rematerialises, remat.py) comes from an ExecutionConfig beside the architecture.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from emo_jax.model.attention import segment_attention
from emo_jax.model.cache_attention import cache_attention
from emo_jax.config import ModelConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.layers import RMSNorm, init_normal
from emo_jax.model.matmul import flat_matmul
from emo_jax.model.moe import MLP, MoE
from emo_jax.model.remat import ATTENTION_OUT, MOE_INPUT, checkpoint_policy
from emo_jax.model.sharding import BATCH_AXES


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, "rotate half" (NeoX) layout, computed in float32."""
  K = x_BxLxHxK.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BxLxK2)[:, :, None, :]
  sin = jnp.sin(angles_BxLxK2)[:, :, None, :]
  x32 = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x32[..., : K // 2], x32[..., K // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
  """Multi-head (optionally grouped-query) attention, no biases, optional QK-norm."""

  def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.execution = execution
    init, D, H, G, K = init_normal(cfg), cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.param_jnp_dtype
    self.wq = nnx.Param(init(rngs.params(), (D, H, K), dt))
    self.wk = nnx.Param(init(rngs.params(), (D, G, K), dt))
    self.wv = nnx.Param(init(rngs.params(), (D, G, K), dt))
    self.wo = nnx.Param(init(rngs.params(), (H, K, D), dt))
    if cfg.qk_norm:
      # OLMoE layout: one norm over the whole projected query (H*K) and key (G*K) vectors.
      self.q_norm = RMSNorm(H * K, cfg.norm_eps, dt)
      self.k_norm = RMSNorm(G * K, cfg.norm_eps, dt)

  def _project(self, x_BxLxD, positions_BxL):
    """Queries, keys and values of the tokens: projections, optional QK-norm, RoPE."""
    cfg = self.cfg
    cdt = cfg.compute_jnp_dtype
    x = x_BxLxD.astype(cdt)
    q = flat_matmul(x, self.wq[...].astype(cdt))
    k = flat_matmul(x, self.wk[...].astype(cdt))
    v = flat_matmul(x, self.wv[...].astype(cdt))
    if cfg.qk_norm:
      q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
      k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    return rope(q, positions_BxL, cfg.rope_theta), rope(k, positions_BxL, cfg.rope_theta), v

  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, mesh=None):
    cfg = self.cfg
    q, k, v = self._project(x_BxLxD, positions_BxL)
    # A packed row holds at most max_segments documents and one stretch of padding.
    out = segment_attention(q, k, v, segment_ids_BxL, self.execution.attention_impl,
                            max_runs=cfg.max_segments + 1, mesh=mesh,
                            document_attention=cfg.document_attention)
    out = checkpoint_name(out, ATTENTION_OUT)
    return flat_matmul(out, self.wo[...].astype(cfg.compute_jnp_dtype), contract=2)

  def decode(self, x_BxTxD, positions_BxT, k_BxMxGxK, v_BxMxGxK, cached_valid_BxM,
             new_valid_BxT):
    """Attention of T new tokens over the cached keys and themselves (`cache_attention`).

    The cache is only read: returns (out_BxTxD, k_new_BxTxGxK, v_new_BxTxGxK), the new
    tokens' keys and values, which `Transformer.decode` writes into the cache for all layers
    at once. A new token sees the cached columns holding real tokens (`cached_valid_BxM`) and
    the real new tokens up to itself: the keys the full causal forward would give it.
    """
    cdt = self.cfg.compute_jnp_dtype
    q, k, v = self._project(x_BxTxD, positions_BxT)
    k, v = k.astype(k_BxMxGxK.dtype), v.astype(v_BxMxGxK.dtype)
    out = cache_attention(q, k_BxMxGxK.astype(cdt), v_BxMxGxK.astype(cdt), cached_valid_BxM,
                          k.astype(cdt), v.astype(cdt), new_valid_BxT)
    return flat_matmul(out, self.wo[...].astype(cdt), contract=2), k, v


class Block(nnx.Module):
  """Pre-norm decoder block: attention then MoE (or dense MLP), each with a residual."""

  def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_jnp_dtype)
    self.attn = Attention(cfg, execution, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_jnp_dtype)
    self.mlp = MoE(cfg, execution, rngs=rngs) if cfg.is_moe else MLP(cfg, rngs=rngs)

  def __call__(self, x, segment_ids, positions, *, pool_rng=None, train=False, data_axes=(),
               keep_experts_E=None, collect_routing=False, mesh=None):
    h = x + self.attn(self.attn_norm(x), segment_ids, positions, mesh=mesh)
    moe_input = checkpoint_name(self.mlp_norm(h), MOE_INPUT)
    y, aux = self.mlp(moe_input, segment_ids, pool_rng=pool_rng, train=train,
                      data_axes=data_axes, keep_experts_E=keep_experts_E,
                      collect_routing=collect_routing, mesh=mesh)
    return h + y, aux

  def decode(self, x, positions, valid, k_cache, v_cache, *, keep_experts_E=None,
             stacked_experts=None):
    """One block on new tokens with a KV cache (inference routing, no pool): (x, k_new, v_new).

    stacked_experts: (w_gate, w_up, w_down over all layers, this layer's index), which the MoE
    reads in place when it loops over the chosen experts (MoE.__call__'s `decoding`)."""
    a, k_new, v_new = self.attn.decode(self.attn_norm(x), positions, k_cache, v_cache,
                                       valid["cached"], valid["tokens"])
    h = x + a
    y, _ = self.mlp(self.mlp_norm(h), valid["tokens"].astype(jnp.int32), train=False,
                    keep_experts_E=keep_experts_E, decoding=stacked_experts)
    return h + y, k_new, v_new


def layer_major_keep(keep_experts, cfg: ModelConfig, batch: int) -> jax.Array:
  """The routing mask as the layer scan reads it: [layers, routed] or [layers, B, routed].

  `keep_experts` is None (a placeholder [layers] is scanned over and ignored), one subset for
  every row [layers, routed], or one subset per row [B, layers, routed].
  """
  if keep_experts is None:
    return jnp.zeros((cfg.num_layers,), bool)
  L, R = cfg.num_layers, cfg.num_routed_experts
  if keep_experts.shape == (L, R):
    return keep_experts
  if keep_experts.shape == (batch, L, R):
    return jnp.swapaxes(keep_experts, 0, 1)
  raise ValueError(f"keep_experts must be bool [num_layers, routed experts] = {(L, R)} or "
                   f"[batch, num_layers, routed experts] = {(batch, L, R)}, got "
                   f"{keep_experts.shape}")


def run_layers(body, carry, stacked_xs, scan: bool):
  """`jax.lax.scan(body, carry, stacked_xs)`, or the same layers unrolled when `scan` is False.

  Unrolled, each layer reads its slice of the stacked parameters with a static index and the
  per-layer outputs are stacked at the end, so results and output layout are the scan's.
  """
  if scan:
    return jax.lax.scan(body, carry, stacked_xs)
  length = jax.tree.leaves(stacked_xs)[0].shape[0]
  outputs = []
  for i in range(length):
    carry, out = body(carry, jax.tree.map(lambda a: a[i], stacked_xs))
    outputs.append(out)
  return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)


class Transformer(nnx.Module):
  """The whole decoder. Call: `logits_BxLxV, aux = model(tokens_BxL, segment_ids, positions)`.

  `aux` holds per-layer routing statistics stacked over layers ([L] or [L, E]) and
  `aux_loss`, the weighted sum of load-balancing and router z-losses (zero for dense models).
  `execution` says how it runs (default: ExecutionConfig()); it holds no parameters, so a
  model's weights load into any execution.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               execution: ExecutionConfig | None = None):
    execution = ExecutionConfig() if execution is None else execution
    self.cfg = cfg
    self.execution = execution
    dt = cfg.param_jnp_dtype
    init = init_normal(cfg)
    self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), dt))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs):
      return Block(cfg, execution, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size), dt))

  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None, *, train: bool = False,
               rng: jax.Array | None = None, data_axes: Sequence[str] = (),
               keep_experts: jax.Array | None = None, collect_routing: bool = False,
               mesh=None, return_hidden: bool = False):
    """Forward pass.

    Args:
      tokens_BxL: int token ids.
      segment_ids_BxL: document of each token (1..max_segments, 0 = padding); default one
        document per row.
      positions_BxL: position of each token within its document; default 0..L-1.
      train: draw document pools (EMO) instead of the evaluation setting.
      rng: key for the pool sizes (needed when training a pooled model).
      data_axes: named mesh axes over which load-balancing counts are summed (inside
        shard_map); empty for a single replica.
      keep_experts: optional bool [layers, routed experts]: route only into the experts marked
        True in each layer (selective use of a subset without pruning the weights).
        [batch, layers, routed experts] gives every row its own subset.
      collect_routing: also return aux["routing_probs"] [layers, B, L, routed experts], the
        unmasked routed softmax of every layer.
      mesh: the device mesh of a sharded run (sharding.make_mesh): activations are kept
        batch-sharded and the experts run expert-parallel.
      return_hidden: return the final-normed hidden state [B, L, D] instead of the logits (for
        a loss that applies `head_matrix()` itself, losses.fused_head_loss).
    """
    cfg = self.cfg
    if tokens_BxL.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens_BxL.shape}")
    B, L = tokens_BxL.shape
    for name, value in (("segment_ids", segment_ids_BxL), ("positions", positions_BxL)):
      if value is not None and value.shape != (B, L):
        raise ValueError(f"{name} must have the tokens' shape {(B, L)}, got {value.shape}")
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((B, L), jnp.int32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if not cfg.document_attention:
      # Attention runs over the whole row, so RoPE counts positions over the row's tokens too
      # (the release's baselines); left padding keeps a row's first token at position 0.
      positions_BxL = jnp.maximum(jnp.cumsum(segment_ids_BxL > 0, axis=1) - 1, 0).astype(jnp.int32)
    x = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(cfg.compute_jnp_dtype)
    constrain = lambda y: y
    if mesh is not None and mesh.size > 1:
      activation = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
      constrain = lambda y: jax.lax.with_sharding_constraint(y, activation)
    x = constrain(x)

    layer_keys = (jax.random.split(rng, cfg.num_layers) if rng is not None
                  else jnp.zeros((cfg.num_layers,), jnp.uint32))
    graphdef, block_state = nnx.split(self.blocks)

    keep = layer_major_keep(keep_experts, cfg, B)

    def one_block(x, layer):
      state, key, keep_E = layer
      block = nnx.merge(graphdef, state)
      x, aux = block(x, segment_ids_BxL, positions_BxL, pool_rng=None if rng is None else key,
                     train=train, data_axes=data_axes,
                     keep_experts_E=None if keep_experts is None else keep_E,
                     collect_routing=collect_routing, mesh=mesh)
      return constrain(x), aux

    remat, policy = checkpoint_policy(self.execution.remat, self.execution.remat_policy)
    if remat:
      one_block = jax.checkpoint(one_block, prevent_cse=False, policy=policy)
    x, aux = run_layers(one_block, x, (block_state, layer_keys, keep), self.execution.scan_layers)

    x = self.final_norm(x)
    aux = dict(aux)
    if cfg.is_moe:
      aux["aux_loss"] = (cfg.lb_loss_weight * jnp.mean(aux["lb_loss"])
                         + cfg.router_z_loss_weight * jnp.mean(aux["router_z_loss"]))
    else:
      aux["aux_loss"] = jnp.zeros((), jnp.float32)
    if return_hidden:
      return x, aux
    logits = flat_matmul(x, self.head_matrix().astype(cfg.compute_jnp_dtype),
                         preferred_element_type=jnp.float32)
    return logits, aux

  def head_matrix(self) -> jax.Array:
    """The output projection [D, V]: the transposed embedding when tied."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  # ---- decoding with a KV cache (generate.py) ----------------------------------------------
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch` rows of up to `max_len` tokens.

    k, v: [layers, B, max_len, kv heads, head_dim]; valid: bool [B, max_len] (slot holds a real
    token); index: int32 scalar, the next slot to write (shared by all rows: prompts are
    left-padded so every row writes the same slot).
    """
    cfg = self.cfg
    dtype = dtype or cfg.compute_jnp_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}

  def decode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, valid_BxT: jax.Array,
             cache: dict, *, keep_experts: jax.Array | None = None):
    """Runs T new tokens through the model with a KV cache: (logits_BxTxV, new cache).

    Inference routing only (no document pool; with `eval_pool_size` set the pool would see only
    the new tokens, so results match the full forward only without it). `valid_BxT` marks real
    tokens (False for the left padding of shorter prompts: those slots are never attended to).
    `keep_experts` is the routing mask of `__call__`.
    """
    cfg = self.cfg
    keep = layer_major_keep(keep_experts, cfg, tokens_BxT.shape[0])
    index = cache["index"]
    valid_keys = jax.lax.dynamic_update_slice(cache["valid"], valid_BxT.astype(bool), (0, index))
    valid = {"cached": cache["valid"], "tokens": valid_BxT}
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(cfg.compute_jnp_dtype)
    graphdef, block_state = nnx.split(self.blocks)
    # The expert banks stacked over layers, for the decode loop to read in place (a layer's
    # slice of them, which the loop then leaves unused, is removed by the compiler).
    stacked = (tuple(getattr(self.blocks.mlp, name)[...] for name in ("w_gate", "w_up", "w_down"))
               if cfg.is_moe else None)

    def one_block(x, layer):
      state, k_cache, v_cache, keep_E, layer_index = layer
      block = nnx.merge(graphdef, state)
      x, k_new, v_new = block.decode(
          x, positions_BxT, valid, k_cache, v_cache,
          keep_experts_E=None if keep_experts is None else keep_E,
          stacked_experts=None if stacked is None else (*stacked, layer_index))
      return x, (k_new, v_new)

    layers = jnp.arange(cfg.num_layers)
    x, (k_new, v_new) = run_layers(one_block, x,
                                   (block_state, cache["k"], cache["v"], keep, layers),
                                   self.execution.scan_layers)
    # Every layer's new columns at the write column, in one update of the (donated) cache.
    k = jax.lax.dynamic_update_slice(cache["k"], k_new, (0, 0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cache["v"], v_new, (0, 0, index, 0, 0))
    x = self.final_norm(x)
    logits = flat_matmul(x, self.head_matrix().astype(cfg.compute_jnp_dtype),
                         preferred_element_type=jnp.float32)
    new_cache = {"k": k, "v": v, "valid": valid_keys,
                 "index": index + tokens_BxT.shape[1]}
    return logits, new_cache


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Total and per-token active parameters, from shapes only (`nnx.eval_shape`).

  Active counts both embedding matrices, attention, norms, the router, the shared experts and
  top_k routed experts of every layer (docs/algorithm.md: about 1.5 B of 13.6 B for 1b14b).
  """
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  total = sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  inactive = 0
  if cfg.is_moe:
    per_expert = 3 * cfg.d_model * cfg.expert_hidden
    inactive = cfg.num_layers * (cfg.num_routed_experts - cfg.top_k) * per_expert
  return {"total_params": total, "active_params": total - inactive}


def describe(cfg: ModelConfig) -> dict:
  """Parameter counts and every parameter's shape and dtype, from shapes only.

  Block parameters carry a leading layer axis (the blocks are scanned).
  """
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  shapes = {}
  for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    value = getattr(leaf, "value", leaf)
    shapes[".".join(str(p) for p in path)] = {"shape": list(value.shape),
                                              "dtype": str(value.dtype)}
  return {**count_params(cfg), "config": cfg.to_dict(), "params": shapes}
