"""The EMO / StdMoE / dense decoder: embedding, pre-norm blocks, final norm, LM head.

`h = x + attn(norm1(x)); y = h + mlp(norm2(h))` (EMO_SPEC.md). Attention is causal *and*
confined to the token's own segment (document) of a packed row, with RoPE on per-token positions
that restart at each document, so a packed row behaves like its documents run separately.

The blocks' parameters are stacked along a leading layer axis and run with `jax.lax.scan`: one
block is compiled once whatever the depth (compile time on CPU, and at 16 layers on a pod), and
the stacked layout shards and converts layer-major without loops. Each scanned block is
rematerialised under a `remat_policy` (`checkpoint_policy`), and attention runs through one of
several kernels (`segment_attention`: XLA reference, cuDNN packed documents, TPU splash), all
numerically equal to the reference.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from emo_jax.config import ModelConfig
from emo_jax.matmul import flat_matmul
from emo_jax.moe import MLP, MoE, init_normal


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (weight initialised to 1), cast back to the input dtype."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


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


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """bool [B, 1, L, L]: query i sees key j iff j <= i and both lie in the same segment.

  Padding (segment 0) attends to earlier padding only, so no row is fully masked.
  """
  L = segment_ids_BxL.shape[-1]
  causal_LxL = jnp.tril(jnp.ones((L, L), bool))
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL[None] & same_BxLxL)[:, None]


def dot_product_attention(q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, mask_Bx1xLxM):
  """The reference: softmax attention under a dense boolean mask, grouped key/value heads.

  Logits and softmax in float32. Every fast path of `segment_attention` is tested against it,
  and KV-cache decoding uses it directly (its [B, 1, T, M] cache mask is no segment pattern).
  Heads are moved in front of the sequence axes so both products are plain batched matmuls
  over [B, G] with the R query heads of a group stacked along the rows (on XLA:CPU ~30 %
  faster forward+backward than the equivalent einsums, whose layouts force copies), and the
  mask enters as an additive bias (-1e30: exp underflows to exactly 0; no row is ever fully
  masked, see `attention_mask`).
  """
  B, L, H, K = q_BxLxHxK.shape
  M, G = k_BxMxGxK.shape[1], k_BxMxGxK.shape[2]
  R = H // G
  q_BxGxRLxK = (q_BxLxHxK * jnp.asarray(K ** -0.5, q_BxLxHxK.dtype)).reshape(
      B, L, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B, G, R * L, K)
  k_BxGxKxM = k_BxMxGxK.transpose(0, 2, 3, 1)
  v_BxGxMxK = v_BxMxGxK.transpose(0, 2, 1, 3)
  logits = jnp.matmul(q_BxGxRLxK, k_BxGxKxM, preferred_element_type=jnp.float32)
  bias_Bx1x1xLxM = jnp.where(mask_Bx1xLxM, 0.0, -1e30).astype(jnp.float32)[:, :, None]
  logits_BxGxRxLxM = logits.reshape(B, G, R, L, M) + bias_Bx1x1xLxM
  # Softmax with the normalisation applied after the value product ([.., L, K] divides
  # instead of [.., L, M]): the same result, one pass less over the L x M probabilities.
  shift = jax.lax.stop_gradient(jnp.max(logits_BxGxRxLxM, axis=-1, keepdims=True))
  unnormalised = jnp.exp(logits_BxGxRxLxM - shift)
  denominator_BxGxRxLx1 = jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = jnp.matmul(unnormalised.astype(v_BxMxGxK.dtype).reshape(B, G, R * L, M), v_BxGxMxK,
                   preferred_element_type=jnp.float32).reshape(B, G, R, L, K)
  out = (out / denominator_BxGxRxLx1).astype(v_BxMxGxK.dtype)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


# ---- fast paths: the same segment-confined causal attention, per accelerator ------------------
# cuDNN's packed layout needs cuDNN >= 9.6 (jax's own test of the feature skips below it) and a
# Hopper GPU (jax raises "Packed layout requires a GPU with at least Hopper architecture").
CUDNN_MIN_VERSION = 90600
SPLASH_BLOCKS = (512, 256, 128)


def segment_runs(segment_ids_BxL: jax.Array, max_runs: int) -> tuple[jax.Array, jax.Array]:
  """Start and length of each run of one segment id along a row: int32 [B, max_runs] each.

  A run is a document or a stretch of padding; unused slots hold -1. Every token belongs to a
  run, so packed kernels that only see runs still write every output. The runs equal the
  segments of `attention_mask` when each id occupies one contiguous stretch, as the packer
  writes them (documents 1..n, then padding). A row with more than `max_runs` runs folds the
  surplus into its last run: finite, but not confined to documents any more.
  """
  B, L = segment_ids_BxL.shape
  starts_here_BxL = jnp.concatenate(
      [jnp.ones((B, 1), bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  starts_BxM = jax.vmap(lambda row: jnp.nonzero(row, size=max_runs, fill_value=-1)[0])(
      starts_here_BxL).astype(jnp.int32)
  ends_BxM = jnp.concatenate([starts_BxM[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
  ends_BxM = jnp.where(ends_BxM < 0, L, ends_BxM)
  lengths_BxM = jnp.where(starts_BxM >= 0, ends_BxM - starts_BxM, -1)
  return starts_BxM, lengths_BxM


def cudnn_packed_arguments(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, max_runs: int):
  """(q, k, v, seqlens_BxM, offsets_Bx(M+1)) for cuDNN's packed (THD) layout.

  Each run of `segment_runs` becomes one sequence of cuDNN's ragged batch: offsets are its
  first token, seqlens its length, -1 where a row has fewer runs (the convention of
  `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, which turns them into
  cuDNN's flat element offsets in `_fix_seqlen_offsets`).

  Grouped keys are repeated to one per query head: jax <= 0.10 scales the key offsets by the
  query's per-token stride (N * H instead of N_kv * H), so GQA would read the wrong tokens
  without an error (fixed upstream by jax-ml/jax PR #39521). EMO has no GQA: no cost there.
  """
  H, G = q_BxLxHxK.shape[2], k_BxLxGxK.shape[2]
  if G != H:
    k_BxLxGxK = jnp.repeat(k_BxLxGxK, H // G, axis=2)  # head h reads group h // (H // G)
    v_BxLxGxK = jnp.repeat(v_BxLxGxK, H // G, axis=2)
  starts_BxM, lengths_BxM = segment_runs(segment_ids_BxL, max_runs)
  B = starts_BxM.shape[0]
  offsets_BxM1 = jnp.concatenate([starts_BxM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
  return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, lengths_BxM, offsets_BxM1


def _cudnn_problem(dtype, head_dim: int) -> tuple[str, str] | None:
  """(what the cuDNN packed-document kernel needs, what is here) when it cannot run, or None."""
  backend = jax.default_backend()
  if backend != "gpu":
    return "an NVIDIA GPU with cuDNN", f"this backend is {backend!r}"
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # GPU-only import path
  try:
    version = cudnn_fa.check_cudnn_version()
  except RuntimeError:
    return "an NVIDIA GPU with cuDNN", "cuDNN was not found"
  if version < CUDNN_MIN_VERSION:
    return "cuDNN >= 9.6 for packed documents", f"found {version}"
  if not cudnn_fa.check_compute_capability("9.0"):
    return "a Hopper (sm90) or newer NVIDIA GPU for packed documents", "an older GPU is here"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "compute_dtype bfloat16 or float16", f"got {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 256:
    return "head_dim a multiple of 8 and at most 256", f"got {head_dim}"
  return None


def _splash_problem(seq_len: int, interpret: bool) -> tuple[str, str] | None:
  """(what the TPU splash kernel needs, what is here) when it cannot run, or None."""
  if not interpret and jax.default_backend() != "tpu":
    return "a TPU", f"this backend is {jax.default_backend()!r}"
  if seq_len % SPLASH_BLOCKS[-1]:
    return "a sequence length that is a multiple of 128", f"got {seq_len}"
  return None


def resolve_attention_impl(impl: str, dtype, head_dim: int, seq_len: int, *,
                           interpret: bool = False) -> str:
  """The implementation `segment_attention` runs for ModelConfig.attention_impl.

  "auto" picks, at trace time, cuDNN on a GPU that can run it, splash on a TPU, and the XLA
  reference elsewhere (CPU, float32 on GPU, an older GPU). An explicit fast path that cannot
  run raises instead of quietly falling back, so a benchmark never measures the wrong kernel.
  """
  if impl == "auto":
    backend = jax.default_backend()
    if backend == "gpu" and _cudnn_problem(dtype, head_dim) is None:
      return "cudnn"
    if backend == "tpu" and _splash_problem(seq_len, False) is None:
      return "splash"
    return "xla"
  problem = None
  if impl == "cudnn":
    problem = _cudnn_problem(dtype, head_dim)
  elif impl == "splash":
    problem = _splash_problem(seq_len, interpret)
  elif impl not in ("xla", "jax_xla"):
    raise ValueError(f"attention_impl={impl!r} unknown; allowed: auto, xla, jax_xla, cudnn, "
                     "splash")
  if problem:
    need, here = problem
    raise ValueError(f"attention_impl={impl!r} needs {need}; use 'xla' or 'auto' ({here})")
  return impl


def segment_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, impl: str = "xla", *,
                      max_runs: int | None = None, mesh=None, interpret: bool = False):
  """Causal attention confined to each token's segment, by one of several implementations.

  All equal `dot_product_attention(q, k, v, attention_mask(segment_ids))`, tested on CPU
  (cuDNN through a NumPy model of its packed layout and a lowering for a CUDA target):

  * "xla": that reference; materialises [B, G, R, L, L] float32 logits.
  * "jax_xla": `jax.nn.dot_product_attention(implementation="xla")` with `is_causal` and a
    [B, 1, L, L] same-segment mask. Portable; no faster than the reference, a cross-check.
  * "cudnn": cuDNN flash attention in its packed (THD) layout: every run of one segment id
    (`segment_runs`) is its own sequence, under a padding-causal mask. Why not a mask: jax
    turns a dense boolean `mask` (with or without `is_causal=True`) into an additive bf16 bias
    [B, 1, L, L] in HBM (`combine_bias_and_mask`) that the kernel reads for every head in the
    forward and the backward; jax 0.10 also asks for its gradient (`should_export_dbias` is
    always True: a [B, 1, L, L] write per layer, and a case older jax refused, "cuDNN only
    supports bias gradient when the batch size is 1", jax-ml/jax#30593); and no tile between
    documents is skipped. The packed layout reads no mask and skips the work between
    documents (cost follows the sum of squared document lengths, not L^2); it keeps softmax
    statistics of float32 [B * max_runs, H, L] for the backward. It is reached through jax's
    private `fused_attention_stablehlo.dot_product_attention` (added in jax-ml/jax#25812; the
    public `jax.nn` function has no offsets argument, jax-ml/jax#29731 is not merged) and
    needs cuDNN >= 9.6, a Hopper GPU, bfloat16/float16, and `max_runs` >= the runs of a row
    (max_segments + 1 for the packer). Padding split into several stretches of one row (never
    written by the packer) attends within each stretch, where the reference joins them.
  * "splash": the Pallas TPU splash kernel with `SegmentIds` and a causal mask, one MQA kernel
    per key/value group, in a shard_map over rows (and heads) on a mesh; `interpret=True` runs
    it on CPU for tests.
  * "auto": see `resolve_attention_impl`.
  """
  B, L, H, K = q_BxLxHxK.shape
  impl = resolve_attention_impl(impl, q_BxLxHxK.dtype, K, L, interpret=interpret)
  if impl == "xla":
    return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, attention_mask(segment_ids_BxL))
  if impl == "jax_xla":
    same_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=same_Bx1xLxL,
                                        is_causal=True, implementation="xla")
  if impl == "cudnn":
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    q, k, v, seqlens_BxM, offsets_BxM1 = cudnn_packed_arguments(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, max_runs or L)
    return cudnn_fa.dot_product_attention(
        q, k, v, q_seqlen=seqlens_BxM, kv_seqlen=seqlens_BxM, q_offsets=offsets_BxM1,
        kv_offsets=offsets_BxM1, scale=K ** -0.5, mask_type=cudnn_fa.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH")
  return _splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, mesh=mesh,
                           interpret=interpret)


def _splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, *, mesh, interpret):
  """The splash kernel over rows and key/value groups (inside a shard_map on a mesh)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  def local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL):
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    R = H // G
    block = next(b for b in SPLASH_BLOCKS if L % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([splash.CausalMask((L, L))] * R), block_sizes=sizes,
        residual_checkpoint_name=ATTENTION_RESIDUALS, interpret=interpret)

    def one_row(q_GxRxLxK, k_GxLxK, v_GxLxK, segment_ids_L):
      ids = splash.SegmentIds(q=segment_ids_L, kv=segment_ids_L)
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GxRxLxK, k_GxLxK,
                                                                          v_GxLxK)

    # The kernel does not scale the logits.
    q_BxGxRxLxK = (q_BxLxHxK * K ** -0.5).reshape(B, L, G, R, K).transpose(0, 2, 3, 1, 4)
    out_BxGxRxLxK = jax.vmap(one_row)(q_BxGxRxLxK, k_BxLxGxK.transpose(0, 2, 1, 3),
                                      v_BxLxGxK.transpose(0, 2, 1, 3), segment_ids_BxL)
    return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)

  if mesh is None or mesh.size == 1:
    return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  # A Mosaic kernel is opaque to GSPMD: run it per device on its rows (and heads).
  from emo_jax.sharding import BATCH_AXES  # only sharded runs need it
  P = jax.sharding.PartitionSpec
  heads = "tensor" if k_BxLxGxK.shape[2] % mesh.shape["tensor"] == 0 else None
  qkv = P(BATCH_AXES, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(BATCH_AXES)),
                       out_specs=qkv, check_vma=False)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                                       segment_ids_BxL)


# ---- rematerialisation ---------------------------------------------------------------------
# The jax.checkpoint_name tags of the tensors that the named remat policies keep.
ATTENTION_OUT = "attention_out"  # attention result [B, L, H, K], before the output projection
ATTENTION_RESIDUALS = "attention_residuals"  # splash's output and softmax statistics
MOE_INPUT = "moe_input"  # normalised input of the MoE (or dense MLP) [B, L, D]
# The primitive whose outputs (result and softmax statistics) jax's cuDNN attention keeps for
# its backward pass; saving them is what spares re-running the kernel under remat.
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def _cudnn_attention_forward(prim, *_, **__) -> bool:
  return prim.name == CUDNN_ATTENTION_FORWARD


_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_RESIDUALS, MOE_INPUT),
    _cudnn_attention_forward)
# Module-level so that every trace sees the same policy objects (they are static arguments).
CHECKPOINT_POLICIES = {
    "full": None,
    "dots": _DOTS,
    "save_attention_and_moe_input": _ATTENTION,
    "dots_and_attention": jax.checkpoint_policies.save_from_both_policies(_DOTS, _ATTENTION),
}


def checkpoint_policy(cfg: ModelConfig):
  """(rematerialise?, jax.checkpoint policy) for cfg.remat and cfg.remat_policy.

  * "full": keep only each block's input; the backward recomputes the whole block.
  * "dots": also keep matmul outputs without batch dimensions (the q/k/v/output projections,
    the router, dense-MLP matmuls); attention and the batched expert matmuls are recomputed.
  * "save_attention_and_moe_input": keep the attention result with the kernel's softmax
    statistics (cuDNN, splash) so that the backward does not run attention a second time, and
    the MoE input. (With the "xla" reference the probabilities are still recomputed: keeping
    [B, H, L, L] would cost more memory than remat saves.)
  * "dots_and_attention": the union of the two above.
  * "none" (or remat=False): keep everything, recompute nothing.
  """
  if not cfg.remat or cfg.remat_policy == "none":
    return False, None
  if cfg.remat_policy not in CHECKPOINT_POLICIES:
    raise ValueError(f"remat_policy={cfg.remat_policy!r} unknown; allowed: "
                     f"{list(CHECKPOINT_POLICIES) + ['none']}")
  return True, CHECKPOINT_POLICIES[cfg.remat_policy]


class Attention(nnx.Module):
  """Multi-head (optionally grouped-query) attention, no biases, optional QK-norm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
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
    out = segment_attention(q, k, v, segment_ids_BxL, cfg.attention_impl,
                            max_runs=cfg.max_segments + 1, mesh=mesh)
    out = checkpoint_name(out, ATTENTION_OUT)
    return flat_matmul(out, self.wo[...].astype(cfg.compute_jnp_dtype), contract=2)

  def decode(self, x_BxTxD, positions_BxT, k_BxMxGxK, v_BxMxGxK, index, valid_BxM):
    """Attention of T new tokens at cache slots index..index+T-1 over the cached keys.

    Writes the new keys and values into the cache and returns (out_BxTxD, k_cache, v_cache).
    A query at slot s sees the slots <= s that hold real tokens (`valid_BxM`, which must
    already include the new ones): the same keys the full causal forward would see.
    """
    cfg = self.cfg
    cdt = cfg.compute_jnp_dtype
    T = x_BxTxD.shape[1]
    M = k_BxMxGxK.shape[1]
    q, k, v = self._project(x_BxTxD, positions_BxT)
    k_cache = jax.lax.dynamic_update_slice(k_BxMxGxK, k.astype(k_BxMxGxK.dtype), (0, index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_BxMxGxK, v.astype(v_BxMxGxK.dtype), (0, index, 0, 0))
    query_slot_T = index + jnp.arange(T)
    causal_TxM = jnp.arange(M)[None, :] <= query_slot_T[:, None]
    mask_Bx1xTxM = (causal_TxM[None] & valid_BxM[:, None, :])[:, None]
    out = dot_product_attention(q, k_cache.astype(cdt), v_cache.astype(cdt), mask_Bx1xTxM)
    return flat_matmul(out, self.wo[...].astype(cdt), contract=2), k_cache, v_cache


class Block(nnx.Module):
  """Pre-norm decoder block: attention then MoE (or dense MLP), each with a residual."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_jnp_dtype)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_jnp_dtype)
    self.mlp = MoE(cfg, rngs=rngs) if cfg.is_moe else MLP(cfg, rngs=rngs)

  def __call__(self, x, segment_ids, positions, *, pool_rng=None, train=False, data_axes=(),
               keep_experts_E=None, collect_routing=False, mesh=None):
    h = x + self.attn(self.attn_norm(x), segment_ids, positions, mesh=mesh)
    moe_input = checkpoint_name(self.mlp_norm(h), MOE_INPUT)
    y, aux = self.mlp(moe_input, segment_ids, pool_rng=pool_rng, train=train,
                      data_axes=data_axes, keep_experts_E=keep_experts_E,
                      collect_routing=collect_routing, mesh=mesh)
    return h + y, aux

  def decode(self, x, positions, valid, k_cache, v_cache, index, *, keep_experts_E=None):
    """One block on new tokens with a KV cache (inference routing, no pool)."""
    a, k_cache, v_cache = self.attn.decode(self.attn_norm(x), positions, k_cache, v_cache, index,
                                           valid["keys"])
    h = x + a
    y, _ = self.mlp(self.mlp_norm(h), valid["tokens"].astype(jnp.int32), train=False,
                    keep_experts_E=keep_experts_E)
    return h + y, k_cache, v_cache


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


class Transformer(nnx.Module):
  """The whole decoder. Call: `logits_BxLxV, aux = model(tokens_BxL, segment_ids, positions)`.

  `aux` holds per-layer routing statistics stacked over layers ([L] or [L, E]) and
  `aux_loss`, the weighted sum of load-balancing and router z-losses (zero for dense models).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = cfg.param_jnp_dtype
    init = init_normal(cfg)
    self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), dt))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size), dt))

  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None, *, train: bool = False,
               rng: jax.Array | None = None, data_axes: Sequence[str] = (),
               keep_experts: jax.Array | None = None, collect_routing: bool = False,
               mesh=None):
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
    x = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(cfg.compute_jnp_dtype)
    constrain = lambda y: y
    if mesh is not None and mesh.size > 1:
      from emo_jax.sharding import BATCH_AXES  # only sharded runs need it
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

    remat, policy = checkpoint_policy(cfg)
    if remat:
      one_block = jax.checkpoint(one_block, prevent_cse=False, policy=policy)
    x, aux = jax.lax.scan(one_block, x, (block_state, layer_keys, keep))

    x = self.final_norm(x)
    head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    logits = flat_matmul(x, head.astype(cfg.compute_jnp_dtype),
                         preferred_element_type=jnp.float32)
    aux = dict(aux)
    if cfg.is_moe:
      aux["aux_loss"] = (cfg.lb_loss_weight * jnp.mean(aux["lb_loss"])
                         + cfg.router_z_loss_weight * jnp.mean(aux["router_z_loss"]))
    else:
      aux["aux_loss"] = jnp.zeros((), jnp.float32)
    return logits, aux

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
    valid = {"keys": valid_keys, "tokens": valid_BxT}
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(cfg.compute_jnp_dtype)
    graphdef, block_state = nnx.split(self.blocks)

    def one_block(x, layer):
      state, k_cache, v_cache, keep_E = layer
      block = nnx.merge(graphdef, state)
      x, k_cache, v_cache = block.decode(
          x, positions_BxT, valid, k_cache, v_cache, index,
          keep_experts_E=None if keep_experts is None else keep_E)
      return x, (k_cache, v_cache)

    x, (k, v) = jax.lax.scan(one_block, x, (block_state, cache["k"], cache["v"], keep))
    x = self.final_norm(x)
    head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    logits = flat_matmul(x, head.astype(cfg.compute_jnp_dtype),
                         preferred_element_type=jnp.float32)
    new_cache = {"k": k, "v": v, "valid": valid_keys,
                 "index": index + tokens_BxT.shape[1]}
    return logits, new_cache


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Total and per-token active parameters, from shapes only (`nnx.eval_shape`).

  Active counts both embedding matrices, attention, norms, the router, the shared experts and
  top_k routed experts of every layer (EMO_SPEC.md: about 1.5 B of 13.6 B for 1b14b).
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
