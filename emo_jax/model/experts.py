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
* ``ragged``: assignments are sorted by expert and the bank runs as a grouped matmul.
  Dropless. ``ragged_dot_impl`` picks the kernel (``grouped_matmul``): "blocked" pads each
  expert's rows to whole blocks and runs one batched matmul over the blocks (the CPU default,
  ``blocked_partial``; padding under one block per expert instead of a capacity), XLA's
  ``jax.lax.ragged_dot`` (exact everywhere, but on H100 XLA expands it to a dense product;
  BENCHMARKS.md, "GPU", has its rate), tokamax's Pallas kernels (GPU and TPU) or Pallas megablox
  (TPU; runs interpreted elsewhere, which is how the tests check it).

Moving rows between token order and expert order is the other half of the cost; the index
maps and their gather-only gradients live in expert_slots.py.

All backends take an optional token mask: padding tokens are not dispatched, take no capacity,
output exactly zero and do not count in the dropped fraction.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emo_jax.model.expert_slots import (BlockLayout, block_layout, combine_slots, gather_slots,
                                  inverse_permutation, permute_rows, rank_within_expert,
                                  sorted_block_layout, take_sorted_copies)
from emo_jax.model.matmul import flat_matmul

BACKENDS = ("dense", "capacity", "ragged")
# Grouped-matmul kernels of the ragged backend; "auto" resolves per platform when traced.
RAGGED_DOT_IMPLS = ("auto", "xla", "blocked", "tokamax", "megablox")
# Rows per block of the "blocked" grouped SwiGLU (``blocked_swiglu``).
GROUP_BLOCK_ROWS = 128


def swiglu(x_TxD, w_gate_DxH, w_up_DxH, w_down_HxD, compute_dtype=jnp.float32):
  """``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` with inputs and weights cast to compute_dtype.

  One function for the shared experts, the dense MLP and every routed expert, so the backends
  below cannot drift from the per-expert definition. The result is in compute_dtype.
  """
  # jnp.asarray, not .astype: NumPy inputs would otherwise do the matmuls in NumPy, which
  # promotes bfloat16 to float32.
  x_TxD = jnp.asarray(x_TxD, compute_dtype)
  gate_TxH = flat_matmul(x_TxD, jnp.asarray(w_gate_DxH, compute_dtype))
  up_TxH = flat_matmul(x_TxD, jnp.asarray(w_up_DxH, compute_dtype))
  return flat_matmul(jax.nn.silu(gate_TxH) * up_TxH, jnp.asarray(w_down_HxD, compute_dtype))


def expert_bank_swiglu(x_ExNxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD,
                       compute_dtype=jnp.float32):
  """Runs expert e's SwiGLU on its own rows ``x_ExNxD[e]``: two batched matmuls.

  The gate and up projections run as one product against the concatenated [E, D, 2H]
  weights: on XLA:CPU batched matmuls cost more per flop than 2-D ones, so fewer and wider
  ones cost less (BENCHMARKS.md, "CPU"). The result equals ``swiglu`` per expert.

  This is the compute step between ``capacity_dispatch`` and ``capacity_combine``; under expert
  parallelism it runs on the local slice of the bank after the ``all_to_all``.
  """
  cast = lambda a: jnp.asarray(a, compute_dtype)
  hidden = w_gate_ExDxH.shape[-1]
  w_gate_up_ExDx2H = jnp.concatenate([cast(w_gate_ExDxH), cast(w_up_ExDxH)], axis=-1)
  gate_up_ExNx2H = jnp.matmul(cast(x_ExNxD), w_gate_up_ExDx2H)
  h_ExNxH = jax.nn.silu(gate_up_ExNx2H[..., :hidden]) * gate_up_ExNx2H[..., hidden:]
  return jnp.matmul(h_ExNxH, cast(w_down_ExHxD))


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


# ---- grouped matmul kernels ----------------------------------------------------------------
def resolve_ragged_dot_impl(impl: str) -> str:
  """"auto" -> the best kernel this platform has: tokamax on GPU/TPU when installed, megablox
  on TPU otherwise, "blocked" on CPU (XLA:CPU expands ``ragged_dot`` to every expert on every
  row), XLA elsewhere. Explicit choices are returned unchanged."""
  if impl not in RAGGED_DOT_IMPLS:
    raise ValueError(f"Unknown ragged_dot_impl {impl!r}; allowed values are "
                     f"{list(RAGGED_DOT_IMPLS)}.")
  if impl != "auto":
    return impl
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm", "tpu"):
    try:
      import tokamax  # noqa: F401  (optional dependency)
      return "tokamax"
    except ImportError:
      pass
  if platform == "tpu":
    return "megablox"
  if platform == "cpu":
    return "blocked"
  _warn_slow_ragged_dot(platform)
  return "xla"


@functools.lru_cache(maxsize=None)
def _warn_slow_ragged_dot(platform: str) -> None:
  """Once per process: XLA's ragged_dot on a GPU is a dense expansion (out of memory at EMO
  shapes, and far below the grouped kernels: BENCHMARKS.md, "GPU"), so falling back to it
  silently would hide the slowest expert path there is."""
  logging.getLogger(__name__).warning(
      "expert_backend='ragged' on %s without tokamax falls back to jax.lax.ragged_dot, which "
      "XLA expands to a dense product (slow, memory-hungry at EMO shapes): pip install tokamax "
      "(jax >= 0.11.1) or use expert_backend='capacity'.", platform)


def _megablox_tile(dim: int) -> int:
  """Largest of 128, 64, ..., 8 dividing dim (the kernel needs tiles that divide k and n)."""
  for tile in (128, 64, 32, 16, 8):
    if dim % tile == 0:
      return tile
  return dim


def grouped_matmul(lhs_AxD, rhs_GxDxH, group_sizes_G, *, impl: str = "xla",
                   preferred_element_type=None):
  """``out[a] = lhs[a] @ rhs[g(a)]`` where rows come in consecutive groups of ``group_sizes``.

  Every row must belong to a group (``sum(group_sizes) == A``): kernels leave rows past the
  last group uninitialised (megablox returns NaN there), so callers assign padding rows to a
  group and zero their outputs afterwards.
  """
  impl = resolve_ragged_dot_impl(impl)
  out_dtype = preferred_element_type or lhs_AxD.dtype
  if impl == "xla":
    return jax.lax.ragged_dot(lhs_AxD, rhs_GxDxH, group_sizes_G,
                              preferred_element_type=out_dtype)
  if impl == "tokamax":
    try:
      import tokamax
    except ImportError as e:
      # tokamax 0.0.17 also imports xprof at import time; a two-file stub is enough
      # (docs/accelerators.md), so name the module that failed.
      raise ImportError(f"ragged_dot_impl='tokamax' could not import tokamax ({e}); pip "
                        "install tokamax (it needs jax >= 0.11.1), or use 'auto' to fall back "
                        "to XLA when it is missing.") from e
    # implementation=None: tokamax picks its Mosaic/Triton kernel for the device and shape.
    return tokamax.ragged_dot(lhs_AxD, rhs_GxDxH, group_sizes_G,
                              preferred_element_type=out_dtype)
  if impl == "blocked":
    layout, block = sorted_block_layout(group_sizes_G, lhs_AxD.shape[0], rhs_GxDxH.shape[0],
                                        GROUP_BLOCK_ROWS)
    lhs_SxD = gather_slots(lhs_AxD, layout.row_of_slot_S, layout.slot_A[:, None])
    lhs_NxBxD = lhs_SxD.reshape(-1, block, lhs_AxD.shape[1])
    out_NxBxH = jnp.matmul(lhs_NxBxD, rhs_GxDxH[layout.expert_of_block_N],
                           preferred_element_type=out_dtype)
    return gather_slots(out_NxBxH.reshape(-1, rhs_GxDxH.shape[-1]), layout.slot_A,
                        layout.row_of_slot_S[:, None])
  # Imported on first use: loading Pallas's TPU kernels is slow, and only TPU runs and the
  # interpret-mode tests call them.
  from jax.experimental.pallas.ops.tpu.megablox import gmm
  num_rows, d_in = lhs_AxD.shape
  tile_m = min(128, -(-num_rows // 8) * 8)
  padded_rows = -(-num_rows // tile_m) * tile_m
  if padded_rows != num_rows:
    # Extra zero rows join the last group, so every row still belongs to one.
    lhs_AxD = jnp.pad(lhs_AxD, ((0, padded_rows - num_rows), (0, 0)))
    group_sizes_G = group_sizes_G.at[-1].add(padded_rows - num_rows)
  tiling = (tile_m, _megablox_tile(d_in), _megablox_tile(rhs_GxDxH.shape[-1]))
  out = gmm(lhs_AxD, rhs_GxDxH, group_sizes_G.astype(jnp.int32),
            preferred_element_type=out_dtype, tiling=tiling,
            interpret=jax.default_backend() != "tpu")
  return out[:num_rows]


def blocked_bank_swiglu(x_SxD, layout: BlockLayout, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, *,
                        block: int, compute_dtype):
  """Each block's rows through its expert's SwiGLU: one batched matmul per projection."""
  num_slots, d_model = x_SxD.shape
  e_N = layout.expert_of_block_N
  out_NxBxD = expert_bank_swiglu(x_SxD.reshape(num_slots // block, block, d_model),
                                 w_gate_ExDxH[e_N], w_up_ExDxH[e_N], w_down_ExHxD[e_N],
                                 compute_dtype)
  return out_NxBxD.reshape(num_slots, d_model)


def blocked_swiglu(x_sorted_AxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, group_sizes_E, *,
                   compute_dtype, block: int | None = None):
  """The bank's SwiGLU on expert-sorted rows (consecutive groups), dropless, via blocks.

  ``ragged_partial`` does not come here on one device: it places tokens in their blocks
  directly (``blocked_partial``); this entry serves callers that hold expert-sorted rows.
  """
  layout, block = sorted_block_layout(group_sizes_E, x_sorted_AxD.shape[0],
                                      w_gate_ExDxH.shape[0], block or GROUP_BLOCK_ROWS)
  x_SxD = gather_slots(jnp.asarray(x_sorted_AxD, compute_dtype), layout.row_of_slot_S,
                       layout.slot_A[:, None])
  out_SxD = blocked_bank_swiglu(x_SxD, layout, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD,
                                block=block, compute_dtype=compute_dtype)
  return gather_slots(out_SxD, layout.slot_A, layout.row_of_slot_S[:, None])


def blocked_partial(x_TxD, local_A, valid_A, expert_weights_TxK, w_gate, w_up, w_down, *,
                    compute_dtype, block: int | None = None):
  """float32 [T, D]: ``ragged_partial`` by blocks, tokens gathered straight into their slots.

  The same slot gathers and weighted combine as the capacity backend (custom VJPs that are
  gathers both ways), but with a slot map that pads each expert's rows to whole blocks instead
  of cutting them at a capacity: dropless, and the bank's batched matmul runs over at most
  ``A + E * block`` rows.
  """
  num_tokens, top_k = expert_weights_TxK.shape
  bank_size = w_gate.shape[0]
  num_rows = num_tokens * top_k
  block = max(1, min(block or GROUP_BLOCK_ROWS, num_rows))
  expert_A = jnp.where(valid_A, local_A, bank_size)
  rank_A = rank_within_expert(expert_A, bank_size + 1)
  layout = block_layout(expert_A, rank_A, valid_A, bank_size, block)
  token_of_slot_S = jnp.where(layout.row_of_slot_S < num_rows,
                              layout.row_of_slot_S // top_k, num_tokens)
  choice_of_slot_S = layout.row_of_slot_S % top_k
  slot_TxK = layout.slot_A.reshape(num_tokens, top_k)
  x_SxD = gather_slots(jnp.asarray(x_TxD, compute_dtype), token_of_slot_S, slot_TxK)
  out_SxD = blocked_bank_swiglu(x_SxD, layout, w_gate, w_up, w_down, block=block,
                                compute_dtype=compute_dtype)
  weights_TxK = jnp.where(valid_A.reshape(num_tokens, top_k),
                          expert_weights_TxK.astype(jnp.float32), 0.0)
  y_TxD = combine_slots(out_SxD.astype(jnp.float32), weights_TxK, slot_TxK, token_of_slot_S,
                        choice_of_slot_S)
  return y_TxD


def grouped_swiglu(x_sorted_AxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, group_sizes_E, *,
                   impl: str, compute_dtype):
  """The bank's SwiGLU on expert-sorted rows: three grouped matmuls (or ``blocked_swiglu``)."""
  if resolve_ragged_dot_impl(impl) == "blocked":
    return blocked_swiglu(x_sorted_AxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, group_sizes_E,
                          compute_dtype=compute_dtype)
  cast = lambda w: jnp.asarray(w, compute_dtype)
  x = jnp.asarray(x_sorted_AxD, compute_dtype)
  gate_AxH = grouped_matmul(x, cast(w_gate_ExDxH), group_sizes_E, impl=impl)
  up_AxH = grouped_matmul(x, cast(w_up_ExDxH), group_sizes_E, impl=impl)
  return grouped_matmul(jax.nn.silu(gate_AxH) * up_AxH, cast(w_down_ExHxD), group_sizes_E,
                        impl=impl)


class DispatchInfo(NamedTuple):
  """What ``capacity_combine`` needs to bring the expert outputs back to their tokens.

  A NamedTuple so it is a pytree: it can cross ``jit`` and ``shard_map`` boundaries. Slot
  indices address the flattened [E * C] buffer in the layout ``capacity_dispatch`` produced,
  which is the layout the expert outputs must come back in.

  slot_TxK: int32, flat slot ``e * C + c`` of assignment (t, k); ``E * C`` (out of range) when
    the assignment was dropped or its token is masked.
  token_of_slot_ExC: int32, which token fills each slot; ``T`` (out of range) for empty slots.
  choice_of_slot_ExC: int32, which of its token's K choices fills each slot (0 when empty).
  keep_TxK: bool, assignment got a slot.
  dropped_fraction: float32 scalar, dropped / dispatched (unmasked) assignments.
  """
  slot_TxK: jax.Array
  token_of_slot_ExC: jax.Array
  choice_of_slot_ExC: jax.Array
  keep_TxK: jax.Array
  dropped_fraction: jax.Array


def capacity_dispatch(x_TxD, expert_ids_TxK, num_experts: int, capacity: int,
                      token_mask_T=None):
  """Copies each token into its experts' padded buffers: returns (buffers_ExCxD, DispatchInfo).

  Priority is GShard's: every token's first choice (k=0) is placed before any second choice,
  and within one k tokens go in order, so overflow drops low-ranked choices of late tokens
  first. Masked tokens get the sentinel expert E and never take a slot. Empty slots hold zeros.
  The buffers are built by a gather (slot -> token) whose gradient is a gather as well.
  """
  x_TxD, expert_ids_TxK = jnp.asarray(x_TxD), jnp.asarray(expert_ids_TxK)
  num_tokens, d_model = x_TxD.shape
  top_k = expert_ids_TxK.shape[1]
  if token_mask_T is None:
    token_mask_T = jnp.ones((num_tokens,), bool)
  # k-major flattening puts assignments in priority order: a = k * T + t.
  expert_A = expert_ids_TxK.T.reshape(-1).astype(jnp.int32)
  token_A = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
  choice_A = jnp.repeat(jnp.arange(top_k, dtype=jnp.int32), num_tokens)
  valid_A = jnp.tile(token_mask_T.astype(bool), top_k)
  expert_A = jnp.where(valid_A, expert_A, num_experts)

  pos_A = rank_within_expert(expert_A, num_experts + 1)
  keep_A = valid_A & (pos_A < capacity)
  num_slots = num_experts * capacity
  slot_A = jnp.where(keep_A, expert_A * capacity + pos_A, num_slots)
  # Out-of-range slots (dropped, masked) are discarded by mode="drop".
  token_of_slot_S = jnp.full((num_slots,), num_tokens, jnp.int32)
  token_of_slot_S = token_of_slot_S.at[slot_A].set(token_A, mode="drop")
  choice_of_slot_S = jnp.zeros((num_slots,), jnp.int32).at[slot_A].set(choice_A, mode="drop")
  slot_TxK = slot_A.reshape(top_k, num_tokens).T
  # Empty slots point at token T, which does not exist: filled with zeros.
  buffers_SxD = gather_slots(x_TxD, token_of_slot_S, slot_TxK)

  num_valid = jnp.sum(valid_A).astype(jnp.float32)
  num_dropped = jnp.sum(valid_A & ~keep_A).astype(jnp.float32)
  info = DispatchInfo(
      slot_TxK=slot_TxK,
      token_of_slot_ExC=token_of_slot_S.reshape(num_experts, capacity),
      choice_of_slot_ExC=choice_of_slot_S.reshape(num_experts, capacity),
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
  weights_TxK = jnp.where(info.keep_TxK, expert_weights_TxK.astype(jnp.float32), 0.0)
  return combine_slots(out_SxD, weights_TxK, info.slot_TxK, info.token_of_slot_ExC.reshape(-1),
                       info.choice_of_slot_ExC.reshape(-1))


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
  # Cast before dispatching: the [E, C, D] buffers then move in the compute dtype (half the
  # bytes in bfloat16), and the cast's gradient brings the result back to x's dtype.
  buffers_ExCxD, info = capacity_dispatch(jnp.asarray(x_TxD, compute_dtype), expert_ids_TxK,
                                          num_experts, capacity, token_mask_T)
  out_ExCxD = expert_bank_swiglu(buffers_ExCxD, w_gate, w_up, w_down, compute_dtype)
  return capacity_combine(out_ExCxD, info, expert_weights_TxK), info.dropped_fraction


class ExpertOrder(NamedTuple):
  """Assignments sorted by expert, as the grouped matmuls want them.

  order_A sorts the assignments (``inverse_A`` undoes it); group_sizes_G counts the rows of
  each expert in sorted order, with the sentinel rows (expert id G: masked or another
  device's) counted in the last group, since kernels leave rows outside every group
  uninitialised; valid_sorted_A marks the real rows in sorted order.
  """
  order_A: jax.Array
  inverse_A: jax.Array
  group_sizes_G: jax.Array
  valid_sorted_A: jax.Array


def sort_by_expert(expert_A, num_groups: int) -> ExpertOrder:
  """Sorts assignments by expert id in [0, num_groups]; id num_groups is the sentinel.

  The stable sort puts the sentinel rows after every real group, where they join the last
  group (their inputs must be zeroed and their outputs discarded: see ``ExpertOrder``).
  """
  expert_A = expert_A.astype(jnp.int32)
  order_A = jnp.argsort(expert_A, stable=True)
  counts = jnp.bincount(expert_A, length=num_groups + 1).astype(jnp.int32)
  group_sizes_G = counts[:num_groups].at[-1].add(counts[num_groups])
  valid_sorted_A = (expert_A < num_groups)[order_A][:, None]
  return ExpertOrder(order_A, inverse_permutation(order_A), group_sizes_G, valid_sorted_A)


def sorted_swiglu(x_sorted_AxD, order: ExpertOrder, w_gate, w_up, w_down, *, impl: str,
                  compute_dtype):
  """The bank's SwiGLU on expert-sorted rows; sentinel rows go in as zeros and come out as
  exact zeros (replaced with ``where``, never multiplied, so no NaN leaks through)."""
  x_sorted_AxD = jnp.where(order.valid_sorted_A, x_sorted_AxD, 0)
  out_AxD = grouped_swiglu(x_sorted_AxD, w_gate, w_up, w_down, order.group_sizes_G, impl=impl,
                           compute_dtype=compute_dtype)
  return jnp.where(order.valid_sorted_A, out_AxD, 0)


def combine_choices(out_TxKxD, expert_weights_TxK, valid_TxK):
  """``y[t] = sum_k w[t, k] * out[t, k]`` in float32 over the valid choices only."""
  weights_TxK = jnp.where(valid_TxK, expert_weights_TxK.astype(jnp.float32), 0.0)
  return jnp.einsum("tkd,tk->td", out_TxKxD.astype(jnp.float32), weights_TxK)


def ragged_partial(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate, w_up, w_down,
                   token_mask_T, *, first_expert=0, compute_dtype, ragged_dot_impl="xla"):
  """float32 [T, D]: the part of ``y`` that the bank's experts contribute, dropless.

  The bank holds the experts ``first_expert .. first_expert + E_bank - 1`` of the router (all
  of them on one device, one device's slice under expert parallelism, where the partial sums
  of the devices add up to ``y``). Assignments to experts outside the bank and of masked
  tokens get the sentinel id and compute nothing. Sort by expert, grouped SwiGLU, unsort,
  weight.
  """
  num_tokens, top_k = expert_ids_TxK.shape
  bank_size = w_gate.shape[0]
  # Token-major flattening: a = t * K + k. Order within a group does not matter when dropless.
  local_A = expert_ids_TxK.reshape(-1).astype(jnp.int32) - first_expert
  valid_A = (local_A >= 0) & (local_A < bank_size)
  if token_mask_T is not None:
    valid_A &= jnp.repeat(token_mask_T.astype(bool), top_k)
  if resolve_ragged_dot_impl(ragged_dot_impl) == "blocked":
    return blocked_partial(x_TxD, local_A, valid_A, expert_weights_TxK, w_gate, w_up, w_down,
                           compute_dtype=compute_dtype)
  order = sort_by_expert(jnp.where(valid_A, local_A, bank_size), bank_size)
  x_sorted_AxD = take_sorted_copies(jnp.asarray(x_TxD, compute_dtype), order.order_A,
                                    order.inverse_A, top_k)
  out_sorted_AxD = sorted_swiglu(x_sorted_AxD, order, w_gate, w_up, w_down,
                                 impl=ragged_dot_impl, compute_dtype=compute_dtype)
  out_TxKxD = permute_rows(out_sorted_AxD, order.inverse_A, order.order_A).reshape(
      num_tokens, top_k, -1)
  return combine_choices(out_TxKxD, expert_weights_TxK, valid_A.reshape(num_tokens, top_k))


def _ragged(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate, w_up, w_down, token_mask_T,
            compute_dtype, ragged_dot_impl="xla"):
  """The whole bank on one device (``ragged_partial`` from expert 0). Dropless."""
  y_TxD = ragged_partial(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate, w_up, w_down,
                         token_mask_T, compute_dtype=compute_dtype,
                         ragged_dot_impl=ragged_dot_impl)
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
                   capacity_factor: float = 1.25, compute_dtype=jnp.float32,
                   ragged_dot_impl: str = "xla"):
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
    ragged_dot_impl: ``ragged`` backend only: the grouped-matmul kernel, one of
      ``RAGGED_DOT_IMPLS`` (see ``grouped_matmul``).

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
    y_TxD, dropped = _ragged(*args, compute_dtype, ragged_dot_impl)
  if token_mask_T is not None:
    # Exact zeros even if padding rows hold inf/NaN (0 * inf would not be 0).
    y_TxD = jnp.where(token_mask_T[:, None], y_TxD, jnp.zeros((), y_TxD.dtype))
  return y_TxD, dropped
