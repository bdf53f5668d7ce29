"""Segment-confined causal attention: the reference and the fast kernels behind one function.

A packed row holds several documents; a token attends to the earlier tokens of its own document
only (segment ids, 0 = padding), or with `document_attention=False` to every earlier
non-padding token of the row (the release's baselines). `segment_attention` computes exactly
that by one of several implementations, all tested against `dot_product_attention` under
`attention_mask`:

* "xla": the reference, batched matmuls under a dense boolean mask (every platform);
* "chunked": the reference over chunks of queries, each against the keys causality lets it
  see (`chunked_attention`; fewer flops than "xla" on every platform);
* "jax_xla": `jax.nn.dot_product_attention` on XLA, a cross-check;
* "cudnn": cuDNN flash attention in its packed-documents layout (Hopper GPUs, bf16/fp16);
* "splash": the Pallas TPU splash kernel with segment ids;
* "auto": the fastest one this platform can run (`resolve_attention_impl`, the one place where
  "auto" is decided).

Which kernel a platform can run is probed here (`_cudnn_problem`, `_splash_problem`) so that an
explicit choice that cannot run is refused with what it needs. See docs/accelerators.md.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import jax
import jax.numpy as jnp

from emo_jax.model.remat import ATTENTION_RESIDUALS
from emo_jax.model.sharding import BATCH_AXES

# The kernels of `segment_attention`; "auto" picks one per platform at trace time.
ATTENTION_IMPLS = ("xla", "auto", "chunked", "jax_xla", "cudnn", "splash")
# Query rows per chunk of the "chunked" implementation (`chunked_attention`).
ATTENTION_CHUNK = 64


def attention_segment_ids(segment_ids_BxL: jax.Array, document_attention: bool) -> jax.Array:
  """The segment ids attention is confined to (ModelConfig.document_attention).

  True: the documents themselves (the EMO launch scripts' intra-document attention). False:
  every non-padding token in one segment, so attention is causal over the whole packed row, as
  in the release's StdMoE and dense runs; padding (0) stays apart either way. Expressing the
  choice as segment ids lets every implementation of `segment_attention` honour it unchanged.
  """
  if document_attention:
    return segment_ids_BxL
  return (segment_ids_BxL > 0).astype(segment_ids_BxL.dtype)


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
  over [B, G] with the R query heads of a group stacked along the rows (on XLA:CPU the
  equivalent einsums' layouts force copies; BENCHMARKS.md, "CPU", has the figures), and the
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


def chunked_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL,
                      chunk: int = ATTENTION_CHUNK):
  """`dot_product_attention` under `attention_mask`, causal work only: queries in chunks.

  The queries of chunk [lo, hi) see keys [0, hi) only, so the products skip the keys that
  causality masks for the whole chunk: with n chunks, (n + 1) / 2n of the full L x L logits
  (62.5 % at 4 chunks). Every key it skips is one the reference weights by exactly zero, so
  the result is the reference's up to rounding. Static shapes: one reference call per chunk.
  """
  L = q_BxLxHxK.shape[1]
  if L <= chunk:
    return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, attention_mask(segment_ids_BxL))
  outs = []
  for lo in range(0, L, chunk):
    hi = min(L, lo + chunk)
    causal_QxM = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]
    same_BxQxM = segment_ids_BxL[:, lo:hi, None] == segment_ids_BxL[:, None, :hi]
    mask_Bx1xQxM = (causal_QxM[None] & same_BxQxM)[:, None]
    outs.append(dot_product_attention(q_BxLxHxK[:, lo:hi], k_BxLxGxK[:, :hi], v_BxLxGxK[:, :hi],
                                      mask_Bx1xQxM))
  return jnp.concatenate(outs, axis=1)


# ---- fast paths: the same attention, per accelerator ---------------------------------------
# cuDNN's packed layout needs cuDNN >= 9.6 (jax's own test of the feature skips below it) and a
# Hopper GPU (jax raises "Packed layout requires a GPU with at least Hopper architecture").
CUDNN_MIN_VERSION = 90600
SPLASH_BLOCKS = (512, 256, 128)

# jax's cuDNN flash attention with per-document offsets lives in a private jax module: the
# public `jax.nn.dot_product_attention(implementation="cudnn")` takes one query and one key
# length per row and no offsets (jax-ml/jax#29731, not merged), so packed documents reach it
# only as a dense mask, which is what the "cudnn" path exists to avoid (see
# `segment_attention`). `_open_jax_cudnn_attention` is the one place emo_jax opens that module
# and this constant the one place that names it.
JAX_CUDNN_ATTENTION_MODULE = ".".join(("jax", "_src", "cudnn", "fused_attention_stablehlo"))
# The jax releases whose private module `jax_cudnn_attention` is written against (setup.py).
JAX_CUDNN_ATTENTION_VERSIONS = "jax >= 0.10.2, < 0.13"


def jax_cudnn_attention() -> ModuleType:
  """jax's private cuDNN attention module, checked for what the "cudnn" path calls.

  Raises RuntimeError naming the jax versions this code is written against when the installed
  jax lacks the module or part of what it calls (`_open_jax_cudnn_attention`).
  """
  module, lacks = _open_jax_cudnn_attention()
  if lacks:
    raise RuntimeError(
        f"attention_impl='cudnn' needs jax's cuDNN packed-document attention as in "
        f"{JAX_CUDNN_ATTENTION_VERSIONS}, but jax {jax.__version__} {lacks}: install a jax in "
        "that range or use attention_impl='xla' or 'auto'")
  return module


def _open_jax_cudnn_attention() -> tuple[ModuleType | None, str | None]:
  """(the module, None), or (None, what the installed jax lacks of it)."""
  try:
    module = importlib.import_module(JAX_CUDNN_ATTENTION_MODULE)
  except ImportError as e:
    return None, f"has no module {JAX_CUDNN_ATTENTION_MODULE} ({e})"
  missing = [name for name in ("dot_product_attention", "MaskType", "check_cudnn_version",
                               "check_compute_capability") if not hasattr(module, name)]
  if not missing:
    parameters = inspect.signature(module.dot_product_attention).parameters
    missing = [f"dot_product_attention({name}=...)" for name in ("q_offsets", "kv_offsets")
               if name not in parameters]
    if not hasattr(module.MaskType, "PADDING_CAUSAL"):
      missing.append("MaskType.PADDING_CAUSAL")
  if missing:
    return None, f"has no {', '.join(missing)} in {JAX_CUDNN_ATTENTION_MODULE}"
  return module, None


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
  first token, seqlens its length, -1 where a row has fewer runs (the convention of the
  `dot_product_attention` of `jax_cudnn_attention()`, which turns them into cuDNN's flat
  element offsets in `_fix_seqlen_offsets`).

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
  cudnn_fa, lacks = _open_jax_cudnn_attention()
  if lacks:
    return (f"jax's cuDNN packed-document attention ({JAX_CUDNN_ATTENTION_VERSIONS})",
            f"jax {jax.__version__} {lacks}")
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
  """The implementation `segment_attention` runs for ExecutionConfig.attention_impl.

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
  elif impl not in ("xla", "chunked", "jax_xla"):
    raise ValueError(f"attention_impl={impl!r} unknown; allowed: {list(ATTENTION_IMPLS)}")
  if problem:
    need, here = problem
    raise ValueError(f"attention_impl={impl!r} needs {need}; use 'xla' or 'auto' ({here})")
  return impl


def segment_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, impl: str = "xla", *,
                      max_runs: int | None = None, mesh=None, interpret: bool = False,
                      document_attention: bool = True):
  """Causal attention confined to each token's segment, by one of several implementations.

  `document_attention=False` joins the documents of a row into one segment first
  (`attention_segment_ids`): causal over the whole packed row, padding still apart. Every
  implementation below then computes that pattern (one run of documents and one of padding
  for "cudnn", well within `max_runs`).

  All equal `dot_product_attention(q, k, v, attention_mask(segment_ids))`, tested on CPU
  (cuDNN through a NumPy model of its packed layout and a lowering for a CUDA target):

  * "xla": that reference; materialises [B, G, R, L, L] float32 logits.
  * "jax_xla": `jax.nn.dot_product_attention(implementation="xla")` with `is_causal` and a
    [B, 1, L, L] same-segment mask. Portable; a cross-check of the reference, not a fast path.
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
    private `fused_attention_stablehlo.dot_product_attention` (`jax_cudnn_attention`; added in
    jax-ml/jax#25812; the public `jax.nn` function has no offsets argument) and needs
    cuDNN >= 9.6, a Hopper GPU, bfloat16/float16, and `max_runs` >= the runs of a row
    (max_segments + 1 for the packer). Padding split into several stretches of one row (never
    written by the packer) attends within each stretch, where the reference joins them.
  * "splash": the Pallas TPU splash kernel with `SegmentIds` and a causal mask, one MQA kernel
    per key/value group, in a shard_map over rows (and heads) on a mesh; `interpret=True` runs
    it on CPU for tests.
  * "auto": see `resolve_attention_impl`.
  """
  B, L, H, K = q_BxLxHxK.shape
  impl = resolve_attention_impl(impl, q_BxLxHxK.dtype, K, L, interpret=interpret)
  segment_ids_BxL = attention_segment_ids(segment_ids_BxL, document_attention)
  if impl == "xla":
    return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, attention_mask(segment_ids_BxL))
  if impl == "chunked":
    return chunked_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  if impl == "jax_xla":
    same_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=same_Bx1xLxL,
                                        is_causal=True, implementation="xla")
  if impl == "cudnn":
    cudnn_fa = jax_cudnn_attention()
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
  # Imported on first use: loading Pallas's TPU kernels is slow, and only TPU runs and the
  # interpret-mode tests call them.
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
  P = jax.sharding.PartitionSpec
  heads = "tensor" if k_BxLxGxK.shape[2] % mesh.shape["tensor"] == 0 else None
  qkv = P(BATCH_AXES, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(BATCH_AXES)),
                       out_specs=qkv, check_vma=False)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                                       segment_ids_BxL)
