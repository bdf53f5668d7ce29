"""Routed experts on a device mesh: the MoE layer's only hand-written communication.

Everything else in a sharded run is left to GSPMD (see sharding.py); the expert computation is
a `jax.shard_map` over the whole mesh because its data movement (tokens to the devices that
hold their experts) is not something the partitioner can infer. Tokens are split over the batch
axes; the bank is split over the `expert` axis. The expert backend decides the numbers (dropless
or capacity-limited, see experts.py); the transport only decides how rows travel, and every
transport honours its backend:

* expert axis of size 1 (plain data parallelism, FSDP, tensor parallelism): no token moves.
  Each device runs `experts.routed_experts` with the configured backend on its own rows, so a
  dropless backend stays dropless and results equal one device's up to rounding.
* "all_to_all" (backend "capacity"): each device dispatches its tokens into fixed-capacity
  buffers for every expert ([E, C, D]); an all_to_all hands each device the rows for its E / n
  experts from every peer; the local slice of the bank runs as one batched matmul; a second
  all_to_all returns the rows. Static shapes on every platform; overflow is dropped, counted.
* "ragged_all_to_all" (backend "ragged", GPU and TPU): tokens sorted by expert travel as ragged
  slices (only real rows move), the local experts run as grouped matmuls and the rows travel
  back. Dropless. XLA:CPU does not implement the collective.
* "all_gather" (backend "ragged", every platform): each device gathers the tokens of its
  expert group, computes the contribution of its own experts to every one of them (the same
  sort / grouped matmul / combine as one device, `experts.ragged_partial`) and a reduce-scatter
  sums the contributions and returns each device its rows. Dropless; moves n times the tokens
  of the ragged exchange, so it is the portable choice rather than the fast one.

"auto" picks all_to_all for capacity, ragged_all_to_all for ragged on GPU/TPU and all_gather
elsewhere (`resolve_transport`, the one place where it is decided).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from emo_jax.model import expert_slots, experts
from emo_jax.model.sharding import BATCH_AXES

TRANSPORTS = ("auto", "all_to_all", "ragged_all_to_all", "all_gather")
# Which transports carry each backend's numbers unchanged across devices.
BACKEND_TRANSPORTS = {
    "capacity": ("all_to_all",),
    "ragged": ("ragged_all_to_all", "all_gather"),
    "dense": (),
}


def check_transport(backend: str, transport: str) -> str | None:
  """Why `transport` cannot carry `backend` under expert parallelism, or None when it can."""
  if transport not in TRANSPORTS:
    return f"expert_transport={transport!r} unknown; allowed values are {list(TRANSPORTS)}"
  allowed = BACKEND_TRANSPORTS[backend]
  if transport == "auto" or transport in allowed:
    return None
  if not allowed:
    return (f"expert_backend={backend!r} is the single-device reference and has no expert-"
            "parallel transport; use expert_backend='ragged' or 'capacity' on a mesh with "
            "expert > 1")
  return (f"expert_transport={transport!r} cannot carry expert_backend={backend!r} (it would "
          f"{'drop' if backend == 'ragged' else 'not drop'} assignments the backend "
          f"{'keeps' if backend == 'ragged' else 'drops'}); use one of "
          f"{['auto', *allowed]}")


def resolve_transport(backend: str, transport: str, platform: str | None = None) -> str:
  """The transport that runs for (backend, transport) on `platform` (default: JAX's)."""
  problem = check_transport(backend, transport)
  if problem is None and not BACKEND_TRANSPORTS[backend]:
    problem = check_transport(backend, "all_to_all")  # says why no transport carries it
  if problem:
    raise ValueError(problem)
  platform = platform or jax.default_backend()
  native_ragged = platform in ("gpu", "cuda", "rocm", "tpu")
  if transport == "auto":
    if backend == "capacity":
      return "all_to_all"
    return "ragged_all_to_all" if native_ragged else "all_gather"
  if transport == "ragged_all_to_all" and not native_ragged:
    raise ValueError(f"expert_transport='ragged_all_to_all' needs a GPU or TPU (XLA on "
                     f"{platform!r} does not implement the collective); use 'all_gather' or "
                     "'auto'")
  return transport


def routed_experts_on_mesh(x_TxD, ids_TxK, weights_TxK, token_mask_T, w_gate, w_up, w_down, *,
                           mesh: Mesh, num_routed: int, backend: str, transport: str = "auto",
                           capacity_factor: float, compute_dtype, ragged_dot_impl: str = "xla",
                           exchange=None):
  """`experts.routed_experts` with tokens split over the mesh's batch axes.

  The bank passed in is the whole bank (shared experts included, which receive no tokens) so
  that it splits evenly over `expert`; `num_routed` experts are routed. `exchange` replaces
  `jax.lax.ragged_all_to_all` (tests run the ragged exchange on CPU with a stand-in).

  Returns (y_TxD, dropped_fraction).
  """
  n = mesh.shape["expert"]
  tokens, bank = P(BATCH_AXES), P("expert")

  if n == 1:
    def local(x, ids, weights, mask, wg, wu, wd):
      y, dropped = experts.routed_experts(
          x, ids, weights, wg[:num_routed], wu[:num_routed], wd[:num_routed], backend=backend,
          token_mask_T=mask, capacity_factor=capacity_factor, compute_dtype=compute_dtype,
          ragged_dot_impl=ragged_dot_impl)
      return y, jax.lax.pmean(dropped, BATCH_AXES)
  else:
    chosen = resolve_transport(backend, transport) if exchange is None else transport
    if chosen == "all_to_all":
      local = lambda *a: _capacity_all_to_all(*a, n=n, capacity_factor=capacity_factor,
                                              compute_dtype=compute_dtype)
    elif chosen == "ragged_all_to_all":
      local = lambda *a: _ragged_all_to_all(
          *a, n=n, compute_dtype=compute_dtype, ragged_dot_impl=ragged_dot_impl,
          exchange=exchange or jax.lax.ragged_all_to_all)
    else:
      local = lambda *a: _ragged_all_gather(*a, compute_dtype=compute_dtype,
                                            ragged_dot_impl=ragged_dot_impl)

  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(tokens, tokens, tokens, tokens, bank, bank, bank),
                     out_specs=(tokens, P()), check_vma=False)
  return fn(x_TxD, ids_TxK, weights_TxK, token_mask_T, w_gate, w_up, w_down)


def _zero_padding(y_TxD, mask_T):
  return jnp.where(mask_T[:, None], y_TxD, jnp.zeros((), y_TxD.dtype))


def _capacity_all_to_all(x, ids, weights, mask, wg, wu, wd, *, n, capacity_factor,
                         compute_dtype):
  """One device's side of the fixed-capacity exchange (inside the shard_map)."""
  E = wg.shape[0] * n
  T = x.shape[0]
  capacity = experts.expert_capacity(T, ids.shape[-1], E, capacity_factor)
  # Dispatch in the compute dtype: the buffers are what crosses the network.
  buffers_ExCxD, info = experts.capacity_dispatch(x.astype(compute_dtype), ids, E, capacity,
                                                  mask)
  C, D = buffers_ExCxD.shape[1:]
  # Rows j*E/n..(j+1)*E/n go to expert shard j; afterwards row block j holds peer j's tokens.
  received = jax.lax.all_to_all(buffers_ExCxD, "expert", 0, 0, tiled=True)
  per_expert = received.reshape(n, E // n, C, D).transpose(1, 0, 2, 3).reshape(E // n, n * C, D)
  out = experts.expert_bank_swiglu(per_expert, wg, wu, wd, compute_dtype=compute_dtype)
  out = out.reshape(E // n, n, C, D).transpose(1, 0, 2, 3).reshape(E, C, D)
  returned = jax.lax.all_to_all(out, "expert", 0, 0, tiled=True)
  y = _zero_padding(experts.capacity_combine(returned, info, weights), mask)
  return y, jax.lax.pmean(info.dropped_fraction, BATCH_AXES)


def _ragged_all_gather(x, ids, weights, mask, wg, wu, wd, *, compute_dtype, ragged_dot_impl):
  """One device's side of the gather / compute-own-experts / reduce-scatter exchange."""
  gather = lambda a: jax.lax.all_gather(a, "expert", axis=0, tiled=True)
  first_expert = jax.lax.axis_index("expert") * wg.shape[0]
  partial_NTxD = experts.ragged_partial(
      gather(x.astype(compute_dtype)), gather(ids), gather(weights), wg, wu, wd, gather(mask),
      first_expert=first_expert, compute_dtype=compute_dtype, ragged_dot_impl=ragged_dot_impl)
  # The sum over devices of the partial outputs, each device keeping its own rows (float32).
  y = jax.lax.psum_scatter(partial_NTxD, "expert", scatter_dimension=0, tiled=True)
  return _zero_padding(y.astype(compute_dtype), mask), jnp.zeros((), jnp.float32)


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def _ragged_all_to_all(x_TxD, ids_TxK, weights_TxK, mask_T, wg, wu, wd, *, n, compute_dtype,
                       exchange, ragged_dot_impl="xla"):
  """One device's side of the dropless ragged exchange (inside the shard_map)."""
  T, K = ids_TxK.shape
  D = x_TxD.shape[1]
  E_local = wg.shape[0]
  E = E_local * n
  A = T * K
  # Sort this device's assignments by expert: destinations (expert // E_local) become
  # contiguous and ascending. Padding tokens get the sentinel E and sort to the end, unsent.
  valid_A = jnp.repeat(mask_T.astype(bool), K)
  expert_A = jnp.where(valid_A, ids_TxK.reshape(-1), E).astype(jnp.int32)
  sent = experts.sort_by_expert(expert_A, E)
  x_sorted_AxD = expert_slots.take_sorted_copies(x_TxD.astype(compute_dtype), sent.order_A,
                                            sent.inverse_A, K)
  counts_NxEl = jnp.bincount(expert_A, length=E + 1)[:E].reshape(n, E_local).astype(jnp.int32)
  send_sizes_N = counts_NxEl.sum(1)
  send_offsets_N = _exclusive_cumsum(send_sizes_N)
  # Row i of recv_counts: how many rows peer i sends me for each of my experts.
  recv_counts_NxEl = jax.lax.all_to_all(counts_NxEl, "expert", 0, 0, tiled=True)
  recv_sizes_N = recv_counts_NxEl.sum(1)
  recv_offsets_N = _exclusive_cumsum(recv_sizes_N)
  # Where my rows land on each peer = the offset that peer reserved for me.
  remote_offsets_N = jax.lax.all_to_all(recv_offsets_N, "expert", 0, 0, tiled=True)
  R = A * n  # static bound: every peer sends me all of its rows
  received_RxD = exchange(x_sorted_AxD, jnp.zeros((R, D), compute_dtype), send_offsets_N,
                          send_sizes_N, remote_offsets_N, recv_sizes_N, axis_name="expert")

  # Received rows are ordered by (source, local expert); regroup them by local expert.
  starts = (recv_offsets_N[:, None] + jax.vmap(_exclusive_cumsum)(recv_counts_NxEl)).reshape(-1)
  rows_R = jnp.arange(R, dtype=jnp.int32)
  segment_R = jnp.cumsum(jnp.zeros(R + 1, jnp.int32).at[starts].add(1))[:R] - 1
  expert_R = jnp.where(rows_R < recv_sizes_N.sum(), segment_R % E_local, E_local)
  group = experts.sort_by_expert(expert_R, E_local)
  h = expert_slots.permute_rows(received_RxD, group.order_A, group.inverse_A)
  out = experts.sorted_swiglu(h, group, wg, wu, wd, impl=ragged_dot_impl,
                              compute_dtype=compute_dtype)
  out_RxD = expert_slots.permute_rows(out, group.inverse_A, group.order_A)

  # Send every row back to where it came from, into this device's sorted order.
  back_offsets_N = jax.lax.all_to_all(send_offsets_N, "expert", 0, 0, tiled=True)
  returned_AxD = exchange(out_RxD, jnp.zeros((A, D), compute_dtype), recv_offsets_N,
                          recv_sizes_N, back_offsets_N, send_sizes_N, axis_name="expert")
  out_TxKxD = expert_slots.permute_rows(returned_AxD, sent.inverse_A, sent.order_A).reshape(T, K, D)
  y = experts.combine_choices(out_TxKxD, weights_TxK, valid_A.reshape(T, K))
  return y.astype(compute_dtype), jnp.zeros((), jnp.float32)
