"""Token-level language-model losses shared by training and evaluation.

``token_losses`` takes full logits [B, L, V]. ``fused_head_loss`` takes the final-normed hidden
state and the head matrix instead and never forms them: it walks the sequence axis in chunks,
and for each chunk computes the logits, the loss terms and, in the same pass, the gradient of the
loss with respect to those logits, which it immediately contracts into the gradients of the
hidden state and of the head (the "blockwise cross-entropy" idea of Liger-kernel and levanter,
written here from scratch). Why: the demo's float32 logits [4096, 8192] and their gradient are
134 MB each, and on XLA:CPU writing and re-reading them (page faults included) is a large part of
the head's time; on an accelerator at a real vocabulary (~100k) they are gigabytes of device
memory per micro-batch. A chunk's logits are [B*C, V] with B*C <= chunk_tokens. The training
loss these functions serve (masked cross-entropy + output z-loss) is described in the
training-loss section of docs/architecture.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array):
  """Per-token cross-entropy and log-partition (float32).

  The log-partition is returned too because the output z-loss (docs/algorithm.md, weight 1e-5) is
  its square, and computing both from one logsumexp saves a pass over the vocabulary.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse


# ---- fused LM head + cross-entropy -----------------------------------------------------------
def chunk_length(batch: int, length: int, chunk_tokens: int) -> int:
  """The sequence chunk C: the largest divisor of `length` with batch*C <= chunk_tokens, else 1.

  A divisor, so every chunk has the same shape (one loop body, no padding or masking of a
  ragged tail); at least 1, so chunk_tokens < batch still works (chunks of `batch` tokens).
  """
  limit = max(1, chunk_tokens // max(batch, 1))
  return max(c for c in range(1, min(limit, length) + 1) if length % c == 0)


class _Static(NamedTuple):
  z_loss_weight: float
  chunk: int
  compute_dtype: np.dtype
  h_dtype: np.dtype
  head_dtype: np.dtype
  weights_dtype: np.dtype


def fused_head_loss(h_BxLxD, head_DxV, targets_BxL, weights_BxL, *, z_loss_weight: float,
                    chunk_tokens: int = 4096, compute_dtype=jnp.float32):
  """-> (loss, ce_sum, z_sum): loss = sum(weights * (ce + z_loss_weight * lse**2)),
  ce_sum = sum(weights*ce), z_sum = sum(weights*lse**2) (the last two for logging only).

  The same numbers as ``token_losses(h @ head, targets)`` summed with `weights`, without ever
  forming the [B, L, V] logits (see the module docstring). All three are float32 scalars; divide
  by the token count outside (a scalar cotangent is applied in the backward pass).

  h_BxLxD: final-normed hidden state. head_DxV: the output projection (for a tied embedding
    pass ``embed.T`` inside the differentiated function; the gradient flows back through the
    transpose). targets_BxL: integer token ids; a target outside [0, V) has target logit 0
    (so ce = lse) where ``token_losses`` would give NaN. weights_BxL: per-token weights, e.g. the
    0/1 loss mask (any dtype; used as float32).
  z_loss_weight: the output z-loss weight, a Python float (it is static to the computation).
  chunk_tokens: at most this many tokens (B*C) per chunk, see ``chunk_length``: the chunk is cut
    along the sequence axis only, so the batch axis (what a data-parallel mesh shards) is never
    split or reshaped apart from merging [B, C] into the matmul's row axis.
  compute_dtype: dtype of the matmul operands (h, head and the logits' gradient are cast to it);
    accumulation, the softmax and all loss arithmetic are float32.

  Gradients: a custom VJP. The forward pass (under differentiation) computes the gradient of
  `loss` chunk by chunk, keeping dh [B, L, D] (in h's dtype) and dHead [D, V] (a float32
  accumulator) as residuals; the backward pass scales them by the cotangent of `loss`. ce_sum and
  z_sum are logging outputs and are returned under ``stop_gradient``: differentiating them gives
  zero (their real gradients would need two more residual sets). The weights get their true
  gradient (the per-token loss ce + z_loss_weight * lse**2), if they are floating point; the
  integer targets get none. Without differentiation (evaluation) no gradient is computed.
  Memory: between forward and backward the residuals are dh and dHead (activation- and
  parameter-sized) instead of the logits; the loop's peak is one chunk's [B*C, V] logits and
  their gradient. Only first-order reverse mode (grad / vjp) is supported, as for any custom VJP.
  """
  h_shape, head_shape = tuple(np.shape(h_BxLxD)), tuple(np.shape(head_DxV))
  t_shape, w_shape = tuple(np.shape(targets_BxL)), tuple(np.shape(weights_BxL))
  if (len(h_shape) != 3 or len(head_shape) != 2 or h_shape[2] != head_shape[0]
      or 0 in h_shape + head_shape):
    raise ValueError(f"fused_head_loss: h must be [B, L, D] and head [D, V] with the same D, "
                     f"none empty, got "
                     f"h {h_shape} and head {head_shape}")
  if t_shape != h_shape[:2] or w_shape != h_shape[:2]:
    raise ValueError(f"fused_head_loss: targets {t_shape} and weights {w_shape} must both be "
                     f"[B, L] = {h_shape[:2]} (h {h_shape})")
  if not jnp.issubdtype(targets_BxL.dtype, jnp.integer):
    raise ValueError(f"fused_head_loss: targets must be integer token ids, got "
                     f"{targets_BxL.dtype} {t_shape}")
  if not (jnp.issubdtype(h_BxLxD.dtype, jnp.floating)
          and jnp.issubdtype(head_DxV.dtype, jnp.floating)
          and jnp.issubdtype(compute_dtype, jnp.floating)):
    raise ValueError(f"fused_head_loss: h {h_BxLxD.dtype} {h_shape}, head {head_DxV.dtype} "
                     f"{head_shape} and compute_dtype {compute_dtype} must be floating point")
  if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer)) \
     or chunk_tokens < 1:
    raise ValueError(f"fused_head_loss: chunk_tokens must be a positive int, got {chunk_tokens!r}"
                     f" (h {h_shape})")
  z = float(z_loss_weight)
  if not math.isfinite(z):
    raise ValueError(f"fused_head_loss: z_loss_weight must be finite, got {z_loss_weight!r}")
  B, L, _ = h_shape
  static = _Static(z, chunk_length(B, L, int(chunk_tokens)), jnp.dtype(compute_dtype),
                   jnp.dtype(h_BxLxD.dtype), jnp.dtype(head_DxV.dtype),
                   jnp.dtype(weights_BxL.dtype))
  loss, ce_sum, z_sum = _fused(static, h_BxLxD, head_DxV, targets_BxL, weights_BxL)
  return loss, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(z_sum)


def _chunk_pass(st: _Static, h, head, targets, weights, with_grad: bool):
  """One loop over the sequence chunks: the three sums, the per-token loss, and (with_grad) the
  unscaled gradients dh [B, L, D] and dHead [D, V] of `loss`."""
  B, L, D = h.shape
  V = head.shape[1]
  C, z, cd = st.chunk, st.z_loss_weight, st.compute_dtype
  T = B * C
  f32 = jnp.float32
  w_mat = head.astype(cd)
  weights = weights.astype(f32)

  def body(i, carry):
    start = i * C
    x = jax.lax.dynamic_slice_in_dim(h, start, C, axis=1).reshape(T, D).astype(cd)
    t = jax.lax.dynamic_slice_in_dim(targets, start, C, axis=1).reshape(T)
    wt = jax.lax.dynamic_slice_in_dim(weights, start, C, axis=1).reshape(T)
    logits = jnp.dot(x, w_mat, preferred_element_type=f32)  # [T, V]
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1)
    lse = m[:, 0] + jnp.log(s)
    hit = jax.lax.broadcasted_iota(jnp.int32, (T, V), 1) == t[:, None].astype(jnp.int32)
    target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    ce = lse - target_logit
    lse2 = lse * lse
    tok = ce + z * lse2
    out = dict(carry)
    out["loss"] = carry["loss"] + jnp.sum(wt * tok)
    out["ce"] = carry["ce"] + jnp.sum(wt * ce)
    out["z"] = carry["z"] + jnp.sum(wt * lse2)
    out["tok"] = jax.lax.dynamic_update_slice_in_dim(carry["tok"], tok.reshape(B, C), start, 1)
    if with_grad:
      # d loss / d logits = wt * (softmax * (1 + 2 z lse) - onehot(target)).
      scale = wt * (1.0 + 2.0 * z * lse) / s
      g = (e * scale[:, None] - jnp.where(hit, wt[:, None], 0.0)).astype(cd)
      dx = jax.lax.dot_general(g, w_mat, (((1,), (1,)), ((), ())), preferred_element_type=f32)
      out["dh"] = jax.lax.dynamic_update_slice_in_dim(
          carry["dh"], dx.reshape(B, C, D).astype(st.h_dtype), start, 1)
      out["dhead"] = carry["dhead"] + jax.lax.dot_general(
          x, g, (((0,), (0,)), ((), ())), preferred_element_type=f32)
    return out

  init = {"loss": jnp.zeros((), f32), "ce": jnp.zeros((), f32), "z": jnp.zeros((), f32),
          "tok": jnp.zeros((B, L), f32)}
  if with_grad:
    init["dh"] = jnp.zeros((B, L, D), st.h_dtype)
    init["dhead"] = jnp.zeros((D, V), f32)
  return jax.lax.fori_loop(0, L // C, body, init)


def _fused_primal(st: _Static, h, head, targets, weights):
  r = _chunk_pass(st, h, head, targets, weights, with_grad=False)
  return r["loss"], r["ce"], r["z"]


def _fused_fwd(st: _Static, h, head, targets, weights):
  r = _chunk_pass(st, h, head, targets, weights, with_grad=True)
  return (r["loss"], r["ce"], r["z"]), (r["dh"], r["dhead"], r["tok"])


def _fused_bwd(st: _Static, residuals, cotangents):
  dh, dhead, tok = residuals
  g = cotangents[0].astype(jnp.float32)  # ce_sum and z_sum: logging outputs, ignored
  d_h = (dh.astype(jnp.float32) * g).astype(st.h_dtype)
  d_head = (dhead * g).astype(st.head_dtype)
  d_w = (tok * g).astype(st.weights_dtype) if jnp.issubdtype(st.weights_dtype,
                                                              jnp.inexact) else None
  return d_h, d_head, None, d_w


_fused = jax.custom_vjp(_fused_primal, nondiff_argnums=(0,))
_fused.defvjp(_fused_fwd, _fused_bwd)
