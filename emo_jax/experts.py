"""Routed-expert compute: one function, three interchangeable backends.

The MoE layer decides *which* experts each token uses (router, document pool, top-k); this
module only evaluates ``y[t] = sum_k w[t, k] * swiglu_{ids[t, k]}(x[t])`` for a bank of SwiGLU
experts. How to evaluate it fast depends on the hardware, so the computation sits behind one
function with backends that agree with each other (tests compare them to ``dense``):

* ``dense``: every expert on every token, combined with a dense [T, E] weight matrix. E times
  the useful flops; it is the obviously-correct reference and is meant for tests only.
* ``capacity``: assignments are sorted by expert into padded [E, C, D] buffers and the bank runs
  as one batched matmul. Static shapes, portable (CPU/GPU/TPU) and fast on GPU; assignments past
  an expert's capacity C are dropped and counted. It is split into ``capacity_dispatch``,
  ``expert_bank_swiglu`` and ``capacity_combine`` because expert parallelism sends the [E, C, D]
  buffers across devices with ``all_to_all`` between dispatch and combine.
* ``ragged``: assignments are sorted by expert and the bank runs as a grouped matmul
  (``jax.lax.ragged_dot``). Dropless. Exact everywhere, but on H100 XLA expands ragged_dot to a
  dense product (~5 TFLOP/s, see GPU_NOTES.md); a real grouped kernel (tokamax, megablox) is
  what makes this path fast.

All backends take an optional token mask: padding tokens are not dispatched, take no capacity,
output exactly zero and do not count in the dropped fraction.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

BACKENDS = ("dense", "capacity", "ragged")


def swiglu(x_TxD, w_gate_DxH, w_up_DxH, w_down_HxD, compute_dtype=jnp.float32):
  """``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` with inputs and weights cast to compute_dtype.

  One function for the shared experts, the dense MLP and every routed expert, so the backends
  below cannot drift from the per-expert definition. The result is in compute_dtype.
  """
  # jnp.asarray, not .astype: NumPy inputs would otherwise do the matmuls in NumPy, which
  # promotes bfloat16 to float32.
  x_TxD = jnp.asarray(x_TxD, compute_dtype)
  gate_TxH = x_TxD @ jnp.asarray(w_gate_DxH, compute_dtype)
  up_TxH = x_TxD @ jnp.asarray(w_up_DxH, compute_dtype)
  return (jax.nn.silu(gate_TxH) * up_TxH) @ jnp.asarray(w_down_HxD, compute_dtype)


def expert_bank_swiglu(x_ExNxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD,
                       compute_dtype=jnp.float32):
  """Runs expert e's SwiGLU on its own rows ``x_ExNxD[e]``: one batched matmul per projection.

  This is the compute step between ``capacity_dispatch`` and ``capacity_combine``; under expert
  parallelism it runs on the local slice of the bank after the ``all_to_all``.
  """
  bank = jax.vmap(functools.partial(swiglu, compute_dtype=compute_dtype))
  return bank(x_ExNxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int,
                    capacity_factor: float) -> int:
  """Slots per expert: ``min(T, ceil(capacity_factor * T * K / E))``.

  T * K / E is the load of a perfectly balanced router; the factor is the headroom. No expert
  can receive more than T assignments (top-k never picks one expert twice for a token), so
  capping at T keeps the buffers no larger than needed and makes ``capacity_factor >= E / K``
  dropless.
  """
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}; 1.25 is usual and "
                     f"E / K ({num_experts} / {top_k}) never drops.")
  return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


class DispatchInfo(NamedTuple):
  """What ``capacity_combine`` needs to bring the expert outputs back to their tokens.

  A NamedTuple so it is a pytree: it can cross ``jit`` and ``shard_map`` boundaries. Slot
  indices address the flattened [E * C] buffer in the layout ``capacity_dispatch`` produced,
  which is the layout the expert outputs must come back in.

  slot_TxK: int32, flat slot ``e * C + c`` of assignment (t, k); ``E * C`` (out of range) when
    the assignment was dropped or its token is masked.
  token_of_slot_ExC: int32, which token fills each slot; ``T`` (out of range) for empty slots.
  keep_TxK: bool, assignment got a slot.
  dropped_fraction: float32 scalar, dropped / dispatched (unmasked) assignments.
  """
  slot_TxK: jax.Array
  token_of_slot_ExC: jax.Array
  keep_TxK: jax.Array
  dropped_fraction: jax.Array


def _rank_within_expert(expert_A, num_groups):
  """Position of each assignment among the assignments to the same expert, in array order.

  A stable sort by expert keeps array order inside each expert, so the rank is the sorted
  index minus where the expert's run starts. O(A log A) and no [A, E] one-hot.
  """
  num_assignments = expert_A.shape[0]
  order_A = jnp.argsort(expert_A, stable=True)
  counts_G = jnp.bincount(expert_A, length=num_groups)
  start_G = jnp.cumsum(counts_G) - counts_G
  rank_sorted_A = jnp.arange(num_assignments, dtype=jnp.int32) - start_G[expert_A[order_A]]
  return jnp.zeros(num_assignments, jnp.int32).at[order_A].set(rank_sorted_A.astype(jnp.int32))


def capacity_dispatch(x_TxD, expert_ids_TxK, num_experts: int, capacity: int,
                      token_mask_T=None):
  """Copies each token into its experts' padded buffers: returns (buffers_ExCxD, DispatchInfo).

  Priority is GShard's: every token's first choice (k=0) is placed before any second choice,
  and within one k tokens go in order, so overflow drops low-ranked choices of late tokens
  first. Masked tokens get the sentinel expert E and never take a slot. Empty slots hold zeros.
  The buffers are built by a gather (slot -> token) so the backward pass is a scatter-add into
  x, which handles a token appearing in K slots.
  """
  x_TxD, expert_ids_TxK = jnp.asarray(x_TxD), jnp.asarray(expert_ids_TxK)
  num_tokens, d_model = x_TxD.shape
  top_k = expert_ids_TxK.shape[1]
  if token_mask_T is None:
    token_mask_T = jnp.ones((num_tokens,), bool)
  # k-major flattening puts assignments in priority order: a = k * T + t.
  expert_A = expert_ids_TxK.T.reshape(-1).astype(jnp.int32)
  token_A = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
  valid_A = jnp.tile(token_mask_T.astype(bool), top_k)
  expert_A = jnp.where(valid_A, expert_A, num_experts)

  pos_A = _rank_within_expert(expert_A, num_experts + 1)
  keep_A = valid_A & (pos_A < capacity)
  slot_A = jnp.where(keep_A, expert_A * capacity + pos_A, num_experts * capacity)
  # Out-of-range slots (dropped, masked) are discarded by mode="drop".
  token_of_slot_S = jnp.full((num_experts * capacity,), num_tokens, jnp.int32)
  token_of_slot_S = token_of_slot_S.at[slot_A].set(token_A, mode="drop")
  # Empty slots point at token T, which does not exist: filled with zeros.
  buffers_SxD = x_TxD.at[token_of_slot_S].get(mode="fill", fill_value=0)

  num_valid = jnp.sum(valid_A).astype(jnp.float32)
  num_dropped = jnp.sum(valid_A & ~keep_A).astype(jnp.float32)
  info = DispatchInfo(
      slot_TxK=slot_A.reshape(top_k, num_tokens).T,
      token_of_slot_ExC=token_of_slot_S.reshape(num_experts, capacity),
      keep_TxK=keep_A.reshape(top_k, num_tokens).T,
      dropped_fraction=num_dropped / jnp.maximum(num_valid, 1.0),
  )
  return buffers_SxD.reshape(num_experts, capacity, d_model), info


def capacity_combine(expert_out_ExCxD, info: DispatchInfo, expert_weights_TxK):
  """Gathers each kept assignment's output from its slot and sums them weighted over K.

  Dropped and masked assignments read the out-of-range slot and contribute exactly zero. The
  weighting is done in float32 (combine weights are probabilities); the result keeps the
  expert outputs' dtype.
  """
  expert_out_ExCxD = jnp.asarray(expert_out_ExCxD)
  num_experts, capacity, d_model = expert_out_ExCxD.shape
  out_SxD = expert_out_ExCxD.reshape(num_experts * capacity, d_model)
  out_TxKxD = out_SxD.at[info.slot_TxK].get(mode="fill", fill_value=0)
  weights_TxK = jnp.where(info.keep_TxK, expert_weights_TxK.astype(jnp.float32), 0.0)
  y_TxD = jnp.einsum("tkd,tk->td", out_TxKxD.astype(jnp.float32), weights_TxK)
  return y_TxD.astype(expert_out_ExCxD.dtype)


def _dense(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate, w_up, w_down, token_mask_T,
           compute_dtype):
  """Reference: all E experts on all T tokens, then a [T, E] combine."""
  num_tokens = x_TxD.shape[0]
  num_experts = w_gate.shape[0]
  weights_TxK = expert_weights_TxK.astype(jnp.float32)
  if token_mask_T is not None:
    weights_TxK = jnp.where(token_mask_T[:, None], weights_TxK, 0.0)
  rows_Tx1 = jnp.arange(num_tokens)[:, None]
  combine_TxE = jnp.zeros((num_tokens, num_experts), jnp.float32)
  combine_TxE = combine_TxE.at[rows_Tx1, expert_ids_TxK].add(weights_TxK)
  x_ExTxD = jnp.broadcast_to(x_TxD, (num_experts,) + x_TxD.shape)
  out_ExTxD = expert_bank_swiglu(x_ExTxD, w_gate, w_up, w_down, compute_dtype)
  y_TxD = jnp.einsum("etd,te->td", out_ExTxD.astype(jnp.float32), combine_TxE)
  return y_TxD.astype(compute_dtype), jnp.zeros((), jnp.float32)


def _capacity(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate, w_up, w_down, token_mask_T,
              capacity_factor, compute_dtype):
  """Dispatch into [E, C, D], batched SwiGLU, combine. Drops overflow."""
  num_tokens, top_k = expert_ids_TxK.shape
  num_experts = w_gate.shape[0]
  capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
  buffers_ExCxD, info = capacity_dispatch(x_TxD, expert_ids_TxK, num_experts, capacity,
                                          token_mask_T)
  out_ExCxD = expert_bank_swiglu(buffers_ExCxD, w_gate, w_up, w_down, compute_dtype)
  return capacity_combine(out_ExCxD, info, expert_weights_TxK), info.dropped_fraction


def _ragged(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate, w_up, w_down, token_mask_T,
            compute_dtype):
  """Sort by expert, grouped matmuls with ``jax.lax.ragged_dot``, unsort, weight. Dropless.

  Masked assignments get the sentinel expert E, so the stable sort puts them after every real
  group and ``group_sizes`` (E entries) leaves them out. ragged_dot's rows past
  ``sum(group_sizes)`` belong to no group (XLA:CPU returns zeros; other backends need not), so
  their outputs are replaced by zeros with ``where`` rather than trusted or multiplied, which
  would let a NaN through.
  """
  num_tokens, top_k = expert_ids_TxK.shape
  num_experts = w_gate.shape[0]
  # Token-major flattening: a = t * K + k. Order within a group does not matter when dropless.
  expert_A = expert_ids_TxK.reshape(-1).astype(jnp.int32)
  token_A = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
  if token_mask_T is None:
    valid_A = jnp.ones_like(expert_A, bool)
  else:
    valid_A = jnp.repeat(token_mask_T.astype(bool), top_k)
  expert_A = jnp.where(valid_A, expert_A, num_experts)

  order_A = jnp.argsort(expert_A, stable=True)
  group_sizes_E = jnp.bincount(expert_A, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  x_sorted_AxD = x_TxD[token_A[order_A]].astype(compute_dtype)
  gate_AxH = jax.lax.ragged_dot(x_sorted_AxD, w_gate.astype(compute_dtype), group_sizes_E)
  up_AxH = jax.lax.ragged_dot(x_sorted_AxD, w_up.astype(compute_dtype), group_sizes_E)
  h_AxH = jax.nn.silu(gate_AxH) * up_AxH
  out_sorted_AxD = jax.lax.ragged_dot(h_AxH, w_down.astype(compute_dtype), group_sizes_E)
  out_sorted_AxD = jnp.where(valid_A[order_A][:, None], out_sorted_AxD, 0)

  # Unsort by gathering with the inverse permutation (its backward is a plain scatter).
  inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0],
                                                                 dtype=order_A.dtype))
  out_TxKxD = out_sorted_AxD[inverse_A].reshape(num_tokens, top_k, -1)
  weights_TxK = jnp.where(valid_A.reshape(num_tokens, top_k),
                          expert_weights_TxK.astype(jnp.float32), 0.0)
  y_TxD = jnp.einsum("tkd,tk->td", out_TxKxD.astype(jnp.float32), weights_TxK)
  return y_TxD.astype(compute_dtype), jnp.zeros((), jnp.float32)


def _check_shapes(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate_ExDxH, w_up_ExDxH,
                  w_down_ExHxD, token_mask_T):
  """Shape errors here name the argument; inside the einsums they would be cryptic."""
  if x_TxD.ndim != 2:
    raise ValueError(f"x_TxD must be [tokens, d_model], got shape {x_TxD.shape}; flatten the "
                     "batch and sequence axes first.")
  num_tokens, d_model = x_TxD.shape
  if expert_ids_TxK.ndim != 2 or expert_ids_TxK.shape[0] != num_tokens:
    raise ValueError(f"expert_ids_TxK must be [{num_tokens}, top_k] to match x_TxD "
                     f"{x_TxD.shape}, got {expert_ids_TxK.shape}.")
  if expert_weights_TxK.shape != expert_ids_TxK.shape:
    raise ValueError(f"expert_weights_TxK shape {expert_weights_TxK.shape} must equal "
                     f"expert_ids_TxK shape {expert_ids_TxK.shape}.")
  if w_gate_ExDxH.ndim != 3 or w_gate_ExDxH.shape[1] != d_model:
    raise ValueError(f"w_gate_ExDxH must be [experts, {d_model}, hidden], "
                     f"got {w_gate_ExDxH.shape}.")
  num_experts, _, hidden = w_gate_ExDxH.shape
  if w_up_ExDxH.shape != w_gate_ExDxH.shape:
    raise ValueError(f"w_up_ExDxH shape {w_up_ExDxH.shape} must equal w_gate_ExDxH shape "
                     f"{w_gate_ExDxH.shape}.")
  if w_down_ExHxD.shape != (num_experts, hidden, d_model):
    raise ValueError(f"w_down_ExHxD must be {(num_experts, hidden, d_model)} to match "
                     f"w_gate_ExDxH {w_gate_ExDxH.shape}, got {w_down_ExHxD.shape}.")
  if token_mask_T is not None and token_mask_T.shape != (num_tokens,):
    raise ValueError(f"token_mask_T must be [{num_tokens}], got {token_mask_T.shape}.")


def routed_experts(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate_ExDxH, w_up_ExDxH,
                   w_down_ExHxD, *, backend: str, token_mask_T=None,
                   capacity_factor: float = 1.25, compute_dtype=jnp.float32):
  """``y[t] = sum_k w[t, k] * swiglu_{ids[t, k]}(x[t])`` over a bank of E routed experts.

  Args:
    x_TxD: token activations.
    expert_ids_TxK: int, expert of each of a token's K choices, in [0, E), distinct per token
      (top-k). Values outside [0, E) are not checked (they are traced) and give wrong results.
    expert_weights_TxK: combine weight of each choice; applied in float32.
    w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD: the expert bank.
    backend: one of ``BACKENDS``; see the module docstring.
    token_mask_T: optional bool; False marks padding: not dispatched, takes no capacity,
      outputs exactly 0, not counted in ``dropped_fraction``.
    capacity_factor: ``capacity`` backend only; see ``expert_capacity``.
    compute_dtype: dtype of the matmuls and of the result.

  Returns:
    (y_TxD in compute_dtype, dropped_fraction): the float32 fraction of unmasked assignments
    that found no capacity; always 0 for ``dense`` and ``ragged``.
  """
  if backend not in BACKENDS:
    raise ValueError(f"Unknown expert backend {backend!r}; allowed values are "
                     f"{list(BACKENDS)}.")
  args = (x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD,
          token_mask_T)
  # Accept NumPy inputs: the backends use jax-only indexing (.at[...]).
  args = tuple(None if a is None else jnp.asarray(a) for a in args)
  _check_shapes(*args)
  token_mask_T = args[-1]
  if backend == "dense":
    y_TxD, dropped = _dense(*args, compute_dtype)
  elif backend == "capacity":
    y_TxD, dropped = _capacity(*args, capacity_factor, compute_dtype)
  else:
    y_TxD, dropped = _ragged(*args, compute_dtype)
  if token_mask_T is not None:
    # Exact zeros even if padding rows hold inf/NaN (0 * inf would not be 0).
    y_TxD = jnp.where(token_mask_T[:, None], y_TxD, jnp.zeros((), y_TxD.dtype))
  return y_TxD, dropped
