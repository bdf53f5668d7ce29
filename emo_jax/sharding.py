"""Meshes, logical-axis rules, and expert parallelism with `jax.shard_map`.

Four mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose replicas also
shard parameters and optimizer state), `expert` (data parallelism outside the MoE layer; inside
it, each device holds a slice of the expert bank and tokens travel to their experts with
all_to_all) and `tensor` (attention heads, dense-MLP hidden units and the vocabulary). The batch
is split over (data, fsdp, expert).

Axis types are `Auto`: parameters and the batch carry NamedShardings and GSPMD propagates them
through attention, norms and the LM head, inserting the FSDP all-gathers and reduce-scatters.
The one place where communication must be spelled out, the token exchange of the MoE layer, is
a `shard_map` over the whole mesh. (`Explicit` axes would demand a sharding for every
intermediate, with no gain here.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emo_jax import experts
from emo_jax.config import ConfigError, ConfigMixin

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig(ConfigMixin):
  """Devices per mesh axis; one axis may be -1 to take the remaining devices."""
  data: int = 1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = [getattr(self, a) for a in AXES]
    if any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"MeshConfig axes must be >= 1 or -1, got {dict(zip(AXES, sizes))}")
    if sizes.count(-1) > 1:
      raise ConfigError("at most one MeshConfig axis may be -1 (the remaining devices)")

  def resolve(self, num_devices: int) -> dict[str, int]:
    sizes = {a: getattr(self, a) for a in AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
      if size == -1:
        if num_devices % known:
          raise ConfigError(f"cannot fill mesh axis {axis!r}: {num_devices} devices are not a "
                            f"multiple of the other axes' product {known}")
        sizes[axis] = num_devices // known
    return sizes


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-host run (call before anything touches a device).

  With no arguments JAX reads the cluster from the environment (TPU pod slices, SLURM, Open
  MPI); give all three for a hand-made cluster, e.g. processes on one machine. CPU collectives
  go through gloo so the same code runs on CPU-only hosts.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(mc: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `mc` over all devices (or the first one when every axis is 1)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mc.resolve(len(devices))
  total = math.prod(sizes.values())
  if total == 1:
    devices = devices[:1]
  elif total != len(devices):
    raise ConfigError(f"the mesh {sizes} needs {total} devices but {len(devices)} are present; "
                      "change the axis sizes or set one of them to -1")
  shape = tuple(sizes[a] for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


# ---- logical axes of every parameter ----------------------------------------------------------
# Parameter name (last path component, with its parent for the expert bank) -> logical axes of
# the unstacked parameter; blocks get a leading "layers" axis.
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "wq": ("embed", "heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "weight": ("norm",),
    "router": ("embed", None),
    "moe.w_gate": ("experts", "embed", "expert_hidden"),
    "moe.w_up": ("experts", "embed", "expert_hidden"),
    "moe.w_down": ("experts", "expert_hidden", "embed"),
    "mlp.w_gate": ("embed", "mlp"),
    "mlp.w_up": ("embed", "mlp"),
    "mlp.w_down": ("mlp", "embed"),
}
# Logical axis -> mesh axis.
RULES = {
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
    "mlp": "tensor", "experts": "expert", "expert_hidden": "tensor", "head_dim": None,
    "norm": None, "layers": None, None: None,
}


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def logical_axes(path, ndim: int) -> tuple:
  """Logical axes of the parameter at `path` (a pytree key path of the params dict)."""
  names = [n for n in _names(path) if n != "value"]
  leaf = names[-1]
  if leaf.startswith("w_") and len(names) >= 2 and names[-2] == "mlp":
    key = ("moe." if ndim - ("blocks" in names) == 3 else "mlp.") + leaf
  else:
    key = leaf
  if key not in PARAM_AXES:
    raise KeyError(f"no sharding rule for parameter {'.'.join(names)}; add it to "
                   "sharding.PARAM_AXES")
  axes = PARAM_AXES[key]
  if "blocks" in names:
    axes = ("layers",) + axes
  if len(axes) != ndim:
    raise ValueError(f"parameter {'.'.join(names)} has {ndim} dims but rule {key} names {axes}")
  return axes


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for logical axes, replicating any dimension the mesh axis does not divide."""
  spec = []
  for axis, size in zip(axes, shape):
    mesh_axis = RULES[axis]
    if mesh_axis is None or mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]:
      spec.append(None)
    else:
      spec.append(mesh_axis)
  return P(*spec)


def param_shardings(params: Any, mesh: Mesh) -> Any:
  """NamedShardings for a params pytree (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(logical_axes(path, len(x.shape)), x.shape,
                                                   mesh)), params)


def state_shardings(state: Any, params_sharding: Any, mesh: Mesh) -> Any:
  """Shardings for a whole train state: optimizer moments follow their parameters.

  A leaf of the optimizer state whose key path ends with a parameter's path and has its shape
  gets that parameter's sharding (FSDP of the moments); everything else is replicated.
  """
  by_path = {}
  for path, sharding in jax.tree_util.tree_leaves_with_path(params_sharding):
    by_path[tuple(n for n in _names(path) if n != "value")] = sharding
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = tuple(n for n in _names(path) if n != "value")
    for start in range(len(names)):
      sharding = by_path.get(names[start:])
      if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's rows of the batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def check_divisible(num_experts: int, batch_size: int, mesh: Mesh) -> None:
  """Clear errors for shapes a mesh cannot split."""
  batch_devices = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % batch_devices:
    raise ConfigError(f"data.batch_size={batch_size} must be a multiple of the batch-parallel "
                      f"devices data*fsdp*expert = {batch_devices}")
  if mesh.shape["expert"] > 1 and num_experts % mesh.shape["expert"]:
    raise ConfigError(f"model.num_experts={num_experts} must be a multiple of mesh.expert="
                      f"{mesh.shape['expert']} (each device holds an equal slice of the bank)")


# ---- expert parallelism ---------------------------------------------------------------------------
TRANSPORTS = ("all_to_all", "ragged_all_to_all")


def expert_parallel_ffn(x_TxD, ids_TxK, weights_TxK, token_mask_T, w_gate, w_up, w_down, *,
                        mesh: Mesh, capacity_factor: float, compute_dtype,
                        transport: str = "all_to_all", exchange=None,
                        ragged_dot_impl: str = "xla"):
  """Routed experts over a mesh: tokens go to the devices holding their experts and back.

  Runs as a shard_map over the whole mesh; the bank passed in is the whole bank (shared experts
  included, which receive no tokens) so that it splits evenly over `expert`. Two transports:

  * "all_to_all": each device dispatches its tokens into fixed-capacity buffers for every
    expert ([E, C, D]); an all_to_all hands each device the rows for its E / n experts from
    every peer; the local slice of the bank runs as one batched matmul; a second all_to_all
    returns the rows. Static shapes everywhere (CPU, GPU, TPU); overflow is dropped and counted.
  * "ragged_all_to_all": tokens sorted by expert travel as ragged slices (only real rows move),
    the local experts run as grouped matmuls (`experts.grouped_matmul` with
    `ragged_dot_impl`), and the rows travel back.
    Dropless. GPU and TPU only: XLA:CPU does not implement ragged_all_to_all. `exchange`
    replaces the collective (tests pass `emulated_ragged_all_to_all` to run it on CPU).

  Returns (y_TxD, dropped_fraction).
  """
  if transport not in TRANSPORTS:
    raise ValueError(f"expert transport {transport!r} unknown; allowed: {list(TRANSPORTS)}")
  E = w_gate.shape[0]
  n = mesh.shape["expert"]
  tokens = P(BATCH_AXES)
  bank = P("expert")

  def local(x, ids, weights, mask, wg, wu, wd):
    if transport == "ragged_all_to_all":
      y = _ragged_local(x, ids, weights, mask, wg, wu, wd, n=n, compute_dtype=compute_dtype,
                        exchange=exchange or jax.lax.ragged_all_to_all,
                        ragged_dot_impl=ragged_dot_impl)
      return y, jnp.zeros((), jnp.float32)
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
    y = experts.capacity_combine(returned, info, weights)
    y = jnp.where(mask[:, None], y, jnp.zeros_like(y))
    dropped = jax.lax.pmean(info.dropped_fraction, BATCH_AXES)
    return y, dropped

  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(tokens, tokens, tokens, tokens, bank, bank, bank),
                     out_specs=(tokens, P()), check_vma=False)
  return fn(x_TxD, ids_TxK, weights_TxK, token_mask_T, w_gate, w_up, w_down)


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def _ragged_local(x_TxD, ids_TxK, weights_TxK, mask_T, wg, wu, wd, *, n, compute_dtype,
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
  order_A = jnp.argsort(expert_A, stable=True)
  inverse_A = experts.inverse_permutation(order_A)
  x_sorted_AxD = experts.take_sorted_copies(x_TxD.astype(compute_dtype), order_A, inverse_A, K)
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
  valid_R = rows_R < recv_sizes_N.sum()
  expert_R = jnp.where(valid_R, segment_R % E_local, E_local)
  order_R = jnp.argsort(expert_R, stable=True)
  inverse_R = experts.inverse_permutation(order_R)
  # Unused rows join the last group with zero inputs: kernels leave rows outside every group
  # uninitialised.
  counts = jnp.bincount(expert_R, length=E_local + 1).astype(jnp.int32)
  group_sizes = counts[:E_local].at[-1].add(counts[E_local])
  valid_sorted_R = valid_R[order_R][:, None]
  h = jnp.where(valid_sorted_R, experts.permute_rows(received_RxD, order_R, inverse_R), 0)
  out = experts.grouped_swiglu(h, wg, wu, wd, group_sizes, impl=ragged_dot_impl,
                               compute_dtype=compute_dtype)
  out = jnp.where(valid_sorted_R, out, 0)
  out_RxD = experts.permute_rows(out, inverse_R, order_R)

  # Send every row back to where it came from, into this device's sorted order.
  back_offsets_N = jax.lax.all_to_all(send_offsets_N, "expert", 0, 0, tiled=True)
  returned_AxD = exchange(out_RxD, jnp.zeros((A, D), compute_dtype), recv_offsets_N,
                          recv_sizes_N, back_offsets_N, send_sizes_N, axis_name="expert")
  out_TxKxD = experts.permute_rows(returned_AxD, inverse_A, order_A).reshape(T, K, D)
  weights = jnp.where(valid_A.reshape(T, K), weights_TxK.astype(jnp.float32), 0.0)
  y = jnp.einsum("tkd,tk->td", out_TxKxD.astype(jnp.float32), weights)
  return y.astype(compute_dtype)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` built from all_gather, for backends without it (XLA:CPU).

  Same contract (one slice per peer): peer i's slice for me, operand_i[input_offsets_i[me] :
  + send_sizes_i[me]], is written to output[output_offsets_i[me] :]. Gathers every operand, so
  it is a test double, not a transport.
  """
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)
  offsets = jax.lax.all_gather(input_offsets, axis_name)
  sizes = jax.lax.all_gather(send_sizes, axis_name)
  targets = jax.lax.all_gather(output_offsets, axis_name)
  rows = jnp.arange(operand.shape[0])
  for source in range(operands.shape[0]):
    start, size, target = offsets[source, me], sizes[source, me], targets[source, me]
    values = operands[source][jnp.clip(start + rows, 0, operand.shape[0] - 1)]
    where = jnp.where(rows < size, target + rows, output.shape[0])
    output = output.at[where].set(values, mode="drop")
  return output
