"""Meshes and logical-axis rules: where every parameter and the batch live on the devices.

Four mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose replicas also
shard parameters and optimizer state), `expert` (data parallelism outside the MoE layer; inside
it, each device holds a slice of the expert bank and tokens travel to their experts) and
`tensor` (attention heads, dense-MLP hidden units and the vocabulary). The batch is split over
(data, fsdp, expert).

Axis types are `Auto`: parameters and the batch carry NamedShardings and GSPMD propagates them
through attention, norms and the LM head, inserting the FSDP all-gathers and reduce-scatters.
The one place where communication must be spelled out, the token exchange of the MoE layer, is
a `shard_map` over the whole mesh (expert_parallel.py). (`Explicit` axes would demand a
sharding for every intermediate, with no gain here.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
