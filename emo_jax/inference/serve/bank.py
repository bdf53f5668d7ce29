"""The resident expert bank of a server: the union of its subsets, loaded and freed by expert.

An EMO checkpoint is mostly experts, and a task needs few of them. The server therefore never
holds the whole bank: it reads every non-expert parameter (embeddings, attention, norms, the
router of every expert: D x E floats per layer) and the shared experts once, and of the routed
experts only those some registered subset uses. They sit in a compact bank

  w_gate, w_up: [layers, C + S, D, H], w_down: [layers, C + S, H, D], router: [layers, D, C + S]

where each layer's first C slots hold its resident routed experts in increasing original id
(padded with zero experts up to C, the widest layer's count) and the last S slots the shared
experts, exactly the layout `selective.prune` writes. The compact bank with its config
(`selective.pruned_config(cfg, C + S)`) is an ordinary model, and a subset is a routing mask
over its slots. Because a pruned model keeps the same experts in the same order and both route
by a softmax over the kept experts followed by top-k, a request on a subset routes exactly as
the physically pruned checkpoint of that subset does (a masked expert has probability 0, so
any extra top-k picks of the wider bank carry weight 0).

Registering a subset reads only its experts that are not resident yet (one layer slice of the
checkpoint at a time, keeping just those rows) and re-lays the bank on the device from the
resident rows plus the new ones; deleting one drops the experts no other subset uses. Nothing
resident is read from disk again.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import ModelConfig
from emo_jax.convert import orbax_io
from emo_jax.convert import loading
from emo_jax.study import calibration, selective

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
ALL = "all"


class SubsetError(ValueError):
  """A subset request that cannot be honoured (unknown name, bad expert list, in use)."""


@dataclasses.dataclass(frozen=True)
class Subset:
  """A named set of routed experts per layer (the shared experts always come along).

  kept_routed: per layer, the original routed expert ids, increasing. source: how it was made
  ("calibration ...", "explicit", "all").
  """
  name: str
  kept_routed: tuple[tuple[int, ...], ...]
  source: str

  def __post_init__(self):
    # A layer with no routed expert would be an all-False routing mask row: its softmax over
    # no expert is NaN, which poisons the row's KV cache. Refused here, at registration.
    empty = [layer for layer, kept in enumerate(self.kept_routed) if not kept]
    if empty:
      raise SubsetError(f"subset {self.name!r} keeps no routed expert in layer {empty[0]}; "
                        "every layer needs at least one")

  def mask(self, num_routed: int) -> np.ndarray:
    """bool [layers, routed]: the subset as a routing mask over the original experts."""
    return selective.keep_mask([np.asarray(k, int) for k in self.kept_routed], num_routed)

  def expert_count(self, num_shared: int) -> int:
    """Experts the subset needs over all layers, shared included."""
    return sum(len(k) + num_shared for k in self.kept_routed)


def check_expert_lists(experts: Any, cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
  """Validates an explicit per-layer list of routed expert ids; returns it sorted."""
  L, R = cfg.num_layers, cfg.num_routed_experts
  if not isinstance(experts, (list, tuple)) or len(experts) != L:
    raise SubsetError(f"experts must be a list of {L} per-layer lists of routed expert ids "
                      f"(0..{R - 1})")
  out = []
  for layer, ids in enumerate(experts):
    if (not isinstance(ids, (list, tuple)) or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
      raise SubsetError(f"experts[{layer}] must be a non-empty list of integer expert ids")
    if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= R:
      raise SubsetError(f"experts[{layer}] = {list(ids)} must hold distinct routed expert ids "
                        f"in [0, {R - 1}]")
    out.append(tuple(sorted(int(i) for i in ids)))
  return tuple(out)


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


@dataclasses.dataclass
class Layout:
  """A planned bank: per-layer resident routed ids and the rows to read for it."""
  slots: list[list[int]]
  loaded: dict[str, dict[tuple[int, int], np.ndarray]]  # weight -> (layer, expert) -> row


class ExpertBank:
  """The server's parameters: everything but the routed experts, plus the resident ones.

  Not thread-safe by itself: `prepare` reads the checkpoint (any thread, under `io_lock`),
  `commit` swaps the device arrays (the engine thread, between decode steps).
  """

  def __init__(self, checkpoint: str | pathlib.Path):
    self.checkpoint = str(checkpoint)
    self._source = orbax_io.ParamSource(checkpoint)
    self.cfg = ModelConfig.from_dict(self._source.model_config)
    if not self.cfg.is_moe:
      raise ValueError(f"{checkpoint} holds a dense model (num_experts=0); serving expert "
                       "subsets needs a mixture-of-experts checkpoint")
    self.io_lock = threading.Lock()
    cfg = self.cfg
    L, R, S = cfg.num_layers, cfg.num_routed_experts, cfg.num_shared_experts
    base = {}
    for path in self._source.paths:
      if path[:2] == ("blocks", "mlp") and path[2] in EXPERT_WEIGHTS:
        continue
      base[path] = self._source.read(path)
    self.router_LxDxE = np.asarray(base.pop(("blocks", "mlp", "router")), np.float32)
    self._base = _nest({p: jnp.asarray(v) for p, v in base.items()})
    self.base_bytes = int(sum(np.asarray(v).nbytes for v in base.values())
                          + self.router_LxDxE.nbytes)
    self.weight_shapes = {}
    self.expert_bytes = 0  # one expert of one layer, all three matrices
    shared = {}
    for name in EXPERT_WEIGHTS:
      shape = self._source.shape(("blocks", "mlp", name))
      rows = [self._source.read(("blocks", "mlp", name), layer)[R:] for layer in range(L)]
      shared[name] = np.stack(rows)  # [L, S, ...]
      self.weight_shapes[name] = tuple(shape[2:])
      self.expert_bytes += int(np.prod(shape[2:])) * shared[name].dtype.itemsize
    self.dtypes = {name: shared[name].dtype for name in EXPERT_WEIGHTS}
    self.slots: list[list[int]] = [[] for _ in range(L)]
    self.bank = {name: jnp.asarray(shared[name]) for name in EXPERT_WEIGHTS}  # no routed yet
    self.subsets: dict[str, Subset] = {}
    self.version = 0  # bumped at every commit: compiled functions and masks follow it
    self._num_shared = S

  # ---- sizes ------------------------------------------------------------------------------
  @property
  def width(self) -> int:
    """C: routed slots per layer (the widest layer's resident count)."""
    return max(len(s) for s in self.slots)

  def resident_expert_bytes(self) -> int:
    """Bytes of the resident experts (routed in some subset, plus shared), all layers."""
    return sum(len(s) + self._num_shared for s in self.slots) * self.expert_bytes

  def bank_bytes(self) -> int:
    """Bytes the device bank arrays take (resident experts plus the padding to width C)."""
    return int(sum(x.nbytes for x in self.bank.values()))

  def full_expert_bytes(self) -> int:
    """Bytes of every expert of the checkpoint (what a server of the whole model holds)."""
    return self.cfg.num_layers * self.cfg.num_experts * self.expert_bytes

  def subset_bytes(self, name: str) -> int:
    return self.subsets[name].expert_count(self._num_shared) * self.expert_bytes

  def memory(self) -> dict[str, int]:
    return {"resident_expert_bytes": self.resident_expert_bytes(),
            "bank_bytes": self.bank_bytes(), "full_expert_bytes": self.full_expert_bytes(),
            "non_expert_bytes": self.base_bytes,
            "resident_experts": sum(len(s) for s in self.slots),
            "routed_experts": self.cfg.num_layers * self.cfg.num_routed_experts}

  # ---- planning and loading ----------------------------------------------------------------
  def union(self, subsets: Mapping[str, Subset]) -> list[list[int]]:
    slots = [set() for _ in range(self.cfg.num_layers)]
    for subset in subsets.values():
      for layer, kept in enumerate(subset.kept_routed):
        slots[layer].update(kept)
    return [sorted(s) for s in slots]

  def prepare(self, subsets: Mapping[str, Subset]) -> Layout:
    """Plans the bank for `subsets` and reads the experts it lacks from the checkpoint."""
    if not subsets:
      raise SubsetError("at least one subset must stay registered (the server routes every "
                        "request into one)")
    slots = self.union(subsets)
    loaded: dict[str, dict[tuple[int, int], np.ndarray]] = {n: {} for n in EXPERT_WEIGHTS}
    with self.io_lock:
      for layer, ids in enumerate(slots):
        missing = sorted(set(ids) - set(self.slots[layer]))
        if not missing:
          continue
        for name in EXPERT_WEIGHTS:
          rows = self._source.read(("blocks", "mlp", name), layer)  # one layer slice
          for e in missing:
            loaded[name][(layer, e)] = np.array(rows[e])
          del rows
    return Layout(slots=slots, loaded=loaded)

  def commit(self, layout: Layout, subsets: Mapping[str, Subset]) -> None:
    """Re-lays the device bank for `layout` (resident rows gathered, loaded rows added)."""
    L, S = self.cfg.num_layers, self._num_shared
    old_width = self.width
    new_width = max(len(s) for s in layout.slots)
    for name in EXPERT_WEIGHTS:
      old = self.bank[name]  # [L, old_width + S, ...]
      new_rows = max([sum(1 for (l, _) in layout.loaded[name] if l == layer)
                      for layer in range(L)] + [0])
      extra = np.zeros((L, new_rows + 1) + self.weight_shapes[name], self.dtypes[name])
      index = np.zeros((L, new_width + S), np.int32)
      zero_row = old_width + S + new_rows  # the last row of `extra`: all zeros
      for layer in range(L):
        position = {e: c for c, e in enumerate(self.slots[layer])}
        fresh = 0
        for c in range(new_width):
          if c >= len(layout.slots[layer]):
            index[layer, c] = zero_row
            continue
          e = layout.slots[layer][c]
          if e in position:
            index[layer, c] = position[e]
          else:
            extra[layer, fresh] = layout.loaded[name][(layer, e)]
            index[layer, c] = old_width + S + fresh
            fresh += 1
        index[layer, new_width:] = old_width + np.arange(S)
      stacked = jnp.concatenate([old, jnp.asarray(extra)], axis=1)
      gather = jnp.asarray(index).reshape(index.shape + (1,) * (stacked.ndim - 2))
      self.bank[name] = jnp.take_along_axis(stacked, gather, axis=1)
      del old, stacked
    self.slots = [list(s) for s in layout.slots]
    self.subsets = dict(subsets)
    self.version += 1

  # ---- the compact model -------------------------------------------------------------------
  def compact_config(self) -> ModelConfig:
    """The architecture of the compact bank: the checkpoint's, pruned to C + S experts."""
    return selective.pruned_config(self.cfg, self.width + self._num_shared)

  def compact_params(self) -> dict:
    """The parameter tree of the compact model (the bank as an ordinary pruned model)."""
    L, R = self.cfg.num_layers, self.cfg.num_routed_experts
    C, S = self.width, self._num_shared
    router = np.zeros((L, self.cfg.d_model, C + S), np.float32)
    for layer, ids in enumerate(self.slots):
      router[layer, :, :len(ids)] = self.router_LxDxE[layer][:, ids]
      router[layer, :, C:] = self.router_LxDxE[layer][:, R:]
    params = jax.tree.map(lambda x: x, self._base)  # a new tree sharing the arrays
    params["blocks"]["mlp"] = {"router": jnp.asarray(router, self.router_LxDxE.dtype),
                               **{n: self.bank[n] for n in EXPERT_WEIGHTS}}
    return params

  def slot_mask(self, mask_LxR: np.ndarray) -> np.ndarray:
    """bool [layers, C]: a routing mask over original experts, moved onto the bank's slots."""
    out = np.zeros((self.cfg.num_layers, self.width), bool)
    for layer, ids in enumerate(self.slots):
      out[layer, :len(ids)] = mask_LxR[layer, ids]
    return out

  def covers(self, mask_LxR: np.ndarray) -> bool:
    """Whether every expert the mask routes to is resident."""
    resident = np.zeros_like(mask_LxR, bool)
    for layer, ids in enumerate(self.slots):
      resident[layer, ids] = True
    return bool(np.all(resident | ~mask_LxR)) and bool(np.all(mask_LxR.any(axis=1)))

  def holds_everything(self) -> bool:
    R = self.cfg.num_routed_experts
    return all(len(s) == R for s in self.slots)


def all_experts(cfg: ModelConfig) -> Subset:
  R = cfg.num_routed_experts
  return Subset(ALL, tuple(tuple(range(R)) for _ in range(cfg.num_layers)), "all")


def select_from_texts(bank: ExpertBank, texts: Sequence[str], keep: int, tokenizer, *,
                      name: str, source: str) -> Subset:
  """The subset `experiments.select_experts` keeps for these calibration texts.

  The same calibration batch (one row per text, truncated to max_seq_len) and the same greedy
  layer-by-layer ranking on the full model; when the bank holds every expert that model is the
  bank itself, otherwise the checkpoint is read whole for the ranking and released after it.
  """
  selective.routed_to_keep(bank.cfg, keep)  # range check first, before any work
  if not texts:
    raise SubsetError("the calibration holds no documents")
  batches = calibration.calibration_batches(list(texts), tokenizer, seq_len=bank.cfg.max_seq_len)
  if bank.holds_everything():
    graphdef, params = loading.build_model(bank.compact_config(), bank.compact_params())
  else:
    with bank.io_lock:
      _, graphdef, params, _, _ = loading.load_checkpoint(bank.checkpoint, tokenizer="none")
  selection = selective.select_experts(graphdef, params, bank.cfg, batches, keep, greedy=True)
  del params
  return Subset(name, tuple(tuple(int(e) for e in k) for k in selection.kept_routed), source)
