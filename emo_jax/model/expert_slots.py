"""Moving rows between token order and expert order, with gradients that are gathers.

The routed-expert backends (experts.py, expert_parallel.py) copy each token's activation to
the rows of its K experts and bring the outputs back. Autodiff of a gather is a scatter-add,
which serialises on GPU when the K copies of a token land on one row; every index map here is
a permutation or a K-to-1 map whose inverse is known, so each carries a custom VJP that is a
gather in both directions:

* ``take_sorted_copies`` / ``permute_rows``: the sorted (grouped-matmul) layout;
* ``gather_slots`` / ``combine_slots``: slot layouts, where each expert owns a range of slots
  (the capacity backend's [E, C] buffers, or the blocked backend's whole blocks of
  ``block_layout``), empty slots hold zeros and the combine applies the router weights.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_sorted_copies(x_TxD, order_A, inverse_A, top_k: int):
  """``x_TxD[order_A // top_k]``: the K copies of every token, in expert-sorted order.

  ``order_A`` sorts the token-major assignments ``a = t * K + k`` (``inverse_A`` is its inverse
  permutation). Autodiff would scatter-add the K copies back into x; the custom VJP instead
  gathers each assignment's cotangent back to token-major order and sums over K.
  """
  return x_TxD[order_A // top_k]


def _take_sorted_copies_fwd(x_TxD, order_A, inverse_A, top_k):
  return take_sorted_copies(x_TxD, order_A, inverse_A, top_k), inverse_A


def _take_sorted_copies_bwd(top_k, inverse_A, g_AxD):
  num_tokens = inverse_A.shape[0] // top_k
  g_TxKxD = g_AxD[inverse_A].reshape(num_tokens, top_k, -1)
  g_TxD = jnp.sum(g_TxKxD.astype(jnp.float32), axis=1).astype(g_AxD.dtype)
  return g_TxD, None, None


take_sorted_copies.defvjp(_take_sorted_copies_fwd, _take_sorted_copies_bwd)


@jax.custom_vjp
def permute_rows(x_NxD, perm_N, inverse_N):
  """``x_NxD[perm_N]`` for a permutation whose inverse is known; the VJP is ``g[inverse_N]``.

  Autodiff would produce a scatter into zeros; a permutation's transpose is a gather by the
  inverse permutation.
  """
  return x_NxD[perm_N]


def _permute_rows_fwd(x_NxD, perm_N, inverse_N):
  return x_NxD[perm_N], inverse_N


def _permute_rows_bwd(inverse_N, g_NxD):
  return g_NxD[inverse_N], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def inverse_permutation(perm_N):
  """The inverse of a permutation (an int scatter: no gradient flows through indices)."""
  n = perm_N.shape[0]
  return jnp.zeros_like(perm_N).at[perm_N].set(jnp.arange(n, dtype=perm_N.dtype))


class BlockLayout(NamedTuple):
  """Groups of rows padded to whole blocks, so that every block belongs to one expert.

  slot_A: int32, the padded row (slot) of each row; ``S`` (out of range) for invalid rows.
  row_of_slot_S: int32, which row fills each slot; ``A`` (out of range) for padding slots.
  expert_of_block_N: int32, the expert of each block (blocks past the last group: the last
    expert, over zero rows).
  """
  slot_A: jax.Array
  row_of_slot_S: jax.Array
  expert_of_block_N: jax.Array


def num_blocks_needed(num_rows: int, num_groups: int, block: int) -> int:
  """Blocks that always suffice: each group wastes less than one block."""
  return -(-num_rows // block) + num_groups - 1


def block_layout(group_A, rank_A, valid_A, num_groups: int, block: int) -> BlockLayout:
  """Slots of rows given each row's group and its rank among the rows of that group.

  Group g takes ``ceil(n_g / block)`` consecutive blocks; row r of g lands at slot
  ``first_block(g) * block + rank(r)``. Static shapes, no row is ever dropped.
  """
  num_rows = group_A.shape[0]
  num_blocks = num_blocks_needed(num_rows, num_groups, block)
  num_slots = num_blocks * block
  sizes_G = jnp.bincount(jnp.where(valid_A, group_A, num_groups),
                         length=num_groups + 1)[:num_groups].astype(jnp.int32)
  blocks_G = -(-sizes_G // block)
  first_block_G = jnp.cumsum(blocks_G) - blocks_G
  safe_group_A = jnp.minimum(group_A, num_groups - 1)
  slot_A = jnp.where(valid_A, first_block_G[safe_group_A] * block + rank_A, num_slots)
  row_of_slot_S = jnp.full((num_slots,), num_rows, jnp.int32).at[slot_A].set(
      jnp.arange(num_rows, dtype=jnp.int32), mode="drop")
  expert_of_block_N = jnp.minimum(
      jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), blocks_G,
                 total_repeat_length=num_blocks), num_groups - 1)
  return BlockLayout(slot_A.astype(jnp.int32), row_of_slot_S, expert_of_block_N)


def sorted_block_layout(group_sizes_G, num_rows: int, num_groups: int,
                        block: int) -> tuple[BlockLayout, int]:
  """The block layout of rows that already come in consecutive groups, and its block size
  (``block``, or fewer rows when there are fewer rows than that)."""
  block = max(1, min(block, num_rows))
  sizes_G = group_sizes_G.astype(jnp.int32)
  starts_G = jnp.cumsum(sizes_G) - sizes_G
  group_A = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), sizes_G,
                       total_repeat_length=num_rows)
  rank_A = jnp.arange(num_rows, dtype=jnp.int32) - starts_G[group_A]
  return block_layout(group_A, rank_A, jnp.ones((num_rows,), bool), num_groups, block), block


def rank_within_expert(expert_A, num_groups):
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


@jax.custom_vjp
def gather_slots(x_TxD, token_of_slot_S, slot_TxK):
  """``buffers[s] = x[token_of_slot[s]]`` (zeros for empty slots).

  The VJP is a gather too: token t's gradient is the sum of its K slots' gradients (its
  dropped choices read the out-of-range slot, i.e. zero). Autodiff would scatter-add instead.
  """
  return x_TxD.at[token_of_slot_S].get(mode="fill", fill_value=0)


def _gather_slots_fwd(x_TxD, token_of_slot_S, slot_TxK):
  return gather_slots(x_TxD, token_of_slot_S, slot_TxK), slot_TxK


def _gather_slots_bwd(slot_TxK, g_SxD):
  g_TxKxD = g_SxD.at[slot_TxK].get(mode="fill", fill_value=0)
  g_TxD = jnp.sum(g_TxKxD.astype(jnp.float32), axis=1).astype(g_SxD.dtype)
  return g_TxD, None, None


gather_slots.defvjp(_gather_slots_fwd, _gather_slots_bwd)


@jax.custom_vjp
def combine_slots(out_SxD, weights_TxK, slot_TxK, token_of_slot_S, choice_of_slot_S):
  """``y[t] = sum_k weights[t, k] * out[slot[t, k]]`` in float32, in out's dtype.

  The VJP with respect to the slots is a gather (slot s takes its token's output gradient
  times the weight of the choice that filled it), not the scatter autodiff would emit.
  """
  out_TxKxD = out_SxD.at[slot_TxK].get(mode="fill", fill_value=0)
  y_TxD = jnp.einsum("tkd,tk->td", out_TxKxD.astype(jnp.float32), weights_TxK)
  return y_TxD.astype(out_SxD.dtype)


def _combine_slots_fwd(out_SxD, weights_TxK, slot_TxK, token_of_slot_S, choice_of_slot_S):
  y_TxD = combine_slots(out_SxD, weights_TxK, slot_TxK, token_of_slot_S, choice_of_slot_S)
  return y_TxD, (out_SxD, weights_TxK, slot_TxK, token_of_slot_S, choice_of_slot_S)


def _combine_slots_bwd(residuals, g_TxD):
  out_SxD, weights_TxK, slot_TxK, token_of_slot_S, choice_of_slot_S = residuals
  g_TxD = g_TxD.astype(jnp.float32)
  weight_of_slot_S = weights_TxK.at[token_of_slot_S, choice_of_slot_S].get(
      mode="fill", fill_value=0)
  g_rows_SxD = g_TxD.at[token_of_slot_S].get(mode="fill", fill_value=0)
  g_out_SxD = (weight_of_slot_S[:, None] * g_rows_SxD).astype(out_SxD.dtype)
  out_TxKxD = out_SxD.at[slot_TxK].get(mode="fill", fill_value=0)
  g_weights_TxK = jnp.einsum("tkd,td->tk", out_TxKxD.astype(jnp.float32), g_TxD)
  return g_out_SxD, g_weights_TxK.astype(weights_TxK.dtype), None, None, None


combine_slots.defvjp(_combine_slots_fwd, _combine_slots_bwd)
