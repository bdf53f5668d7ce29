"""Selective expert use: pick a task's experts from a few examples, then mask or prune.

docs/algorithm.md, "Selective expert use": per layer, average the routed softmax over every non-pad
token of the calibration text and keep the K-1 best routed experts plus the shared expert.
Layers are chosen greedily in order: layer l is scored with layers 0..l-1 already restricted
(their restriction changes what reaches layer l). Here the restriction is the model's routing
mask (`keep_experts`), which gives exactly the pruned model's activations, so ranking needs one
compiled forward pass, run once per layer (`greedy=False`: one pass for all layers). The
calibration text reaches the model as `calibration.calibration_batches`; `subset_sizes` says
which subset sizes a sweep over fractions of the bank measures.

A selection is applied in one of two equivalent ways:
* `keep_mask`: bool [layers, routed] for `model(..., keep_experts=mask)` on the full weights
  (quick to sweep many subset sizes: one compiled function for all of them);
* `prune`: slice each layer's expert bank and router columns into a smaller ordinary model
  (`num_experts=K`), which loads, trains (`train.init_from`), generates and exports like any
  other. Each layer keeps its own routed experts, renumbered in increasing original order, and
  the shared expert(s) go last, as in every bank.

Physical pruning sets `top_k = min(top_k, K - shared)` (the reference's min(8, K) counts the
shared expert; ours counts routed experts only). The pool settings are clamped so the new config
validates and fine-tuning keeps EMO's pool training: `pool_max = min(pool_max, K)`,
`pool_min = max(top_k, min(pool_min, pool_max))`; a fixed `eval_pool_size` is clamped to the
kept routed experts, or dropped (None) when it would keep them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.config import ModelConfig
from emo_jax.model.transformer import count_params


# ---- ranking ------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0,))
def _routing_sums(graphdef, params, tokens, segment_ids, positions, keep_experts):
  """Sum over non-pad tokens of every layer's unmasked routed softmax: [layers, routed]."""
  model = nnx.merge(graphdef, params)
  _, aux = model(tokens, segment_ids, positions, train=False, keep_experts=keep_experts,
                 collect_routing=True)
  mask = (segment_ids > 0).astype(jnp.float32)
  probs = aux["routing_probs"].astype(jnp.float32)  # [layers, B, L, routed]
  return jnp.einsum("lbte,bt->le", probs, mask, precision=jax.lax.Precision.HIGHEST)


def routing_scores(graphdef, params, batches: Iterable[Mapping[str, np.ndarray]],
                   keep_experts: np.ndarray) -> np.ndarray:
  """Mean routed softmax over the non-pad tokens of all batches, float64 [layers, routed]."""
  total, count = None, 0
  for b in batches:
    s = np.asarray(jax.device_get(_routing_sums(
        graphdef, params, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]),
        jnp.asarray(b["positions"]), jnp.asarray(keep_experts, bool))), np.float64)
    total = s if total is None else total + s
    count += int(np.sum(np.asarray(b["segment_ids"]) > 0))
  if total is None or count == 0:
    raise ValueError("the calibration batches hold no tokens (all padding)")
  return total / count


def top_experts(scores_E: np.ndarray, n: int) -> np.ndarray:
  """Indices of the n highest scores, sorted increasingly; ties go to the lower index."""
  order = np.argsort(-np.asarray(scores_E), kind="stable")
  return np.sort(order[:n])


@dataclasses.dataclass
class Selection:
  """Which experts a subset keeps.

  keep: total experts kept per layer (K, shared included). kept_routed: int [layers, K - S],
  original routed indices, increasing. scores: [layers, routed] mean routed softmax each layer
  was ranked by. greedy: whether layers were scored with earlier layers restricted.
  """
  keep: int
  kept_routed: np.ndarray
  scores: np.ndarray
  num_routed: int
  num_shared: int
  greedy: bool

  @property
  def mask(self) -> np.ndarray:
    """bool [layers, routed] for `model(..., keep_experts=...)`."""
    return keep_mask(self.kept_routed, self.num_routed)

  def table(self) -> list[dict[str, Any]]:
    """Per layer: kept routed experts (original ids), shared ids, and their new ids."""
    rows = []
    shared = list(range(self.num_routed, self.num_routed + self.num_shared))
    for layer, kept in enumerate(self.kept_routed):
      kept = [int(e) for e in kept]
      rows.append({"layer": layer, "kept_routed": kept, "shared": shared,
                   "score_kept": round(float(self.scores[layer, kept].sum()), 6),
                   "new_index": {str(e): i for i, e in enumerate(kept + shared)}})
    return rows

  def to_json(self) -> dict[str, Any]:
    return {"keep": self.keep, "num_routed": self.num_routed, "num_shared": self.num_shared,
            "greedy": self.greedy, "layers": self.table(),
            "scores": np.round(self.scores, 6).tolist()}


def keep_mask(kept_routed: np.ndarray, num_routed: int) -> np.ndarray:
  mask = np.zeros((len(kept_routed), num_routed), bool)
  for layer, kept in enumerate(kept_routed):
    mask[layer, np.asarray(kept, int)] = True
  return mask


def routed_to_keep(cfg: ModelConfig, keep: int) -> int:
  """Routed experts kept when `keep` experts in all (shared included) stay; checks the range."""
  if not cfg.is_moe:
    raise ValueError("a dense model (num_experts=0) has no experts to select")
  low, high = cfg.num_shared_experts + 1, cfg.num_experts
  if not low <= keep <= high:
    raise ValueError(f"keep={keep} must be in [{low}, {high}]: at least one routed expert plus "
                     f"the {cfg.num_shared_experts} shared, at most all {cfg.num_experts}")
  return keep - cfg.num_shared_experts


# Fractions of the bank the paper keeps: 128, 64, 32, 16 and 8 of its 128 experts.
PAPER_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625)


def active_experts(cfg: ModelConfig) -> int:
  """Experts every token uses: top_k routed plus the shared ones."""
  return cfg.top_k + cfg.num_shared_experts


def subset_sizes(cfg: ModelConfig, fractions: Sequence[float] = PAPER_FRACTIONS, *,
                 allow_below_active: bool = False) -> list[int]:
  """Experts kept (shared included) at each fraction of the bank, round(f * num_experts),
  deduplicated, largest first; the whole bank is always the first.

  A subset with fewer experts than every token uses (top_k routed + the shared ones) forces
  top-k onto fewer experts than the model was trained with, a different question from the
  paper's (whose smallest subset, 8 of 128, is exactly the active count), so such a fraction is
  refused. allow_below_active=True keeps those sizes and raises a fraction that keeps no routed
  expert to one routed expert plus the shared ones: experiments/selective_eval.py's `paper`
  preset on a bank too small for it, where each token then routes to the experts it still has
  (as the pruned model does, its top_k lowered to fit: `pruned_config`).
  """
  if not cfg.is_moe:
    raise ValueError("subsets need a mixture-of-experts model (num_experts > 0)")
  active = active_experts(cfg)
  smallest = cfg.num_shared_experts + 1
  sizes = {cfg.num_experts}
  for f in fractions:
    f = float(f)
    if not 0 < f <= 1:
      raise ValueError(f"fraction {f} must be in (0, 1]: the share of the experts kept")
    keep = int(round(f * cfg.num_experts))
    if allow_below_active:
      keep = max(keep, smallest)
    elif keep < active:
      raise ValueError(
          f"fraction {f} keeps {keep} of {cfg.num_experts} experts, fewer than the {active} "
          f"every token uses (top_k={cfg.top_k} + {cfg.num_shared_experts} shared); drop it or "
          "use a config with more experts (configs/repro.py)")
    sizes.add(keep)
  return sorted(sizes, reverse=True)


def select_experts(graphdef, params, cfg: ModelConfig,
                   batches: Sequence[Mapping[str, np.ndarray]], keep: int, *,
                   greedy: bool = True) -> Selection:
  """Ranks each layer's routed experts on the calibration batches and keeps the best.

  greedy: layer l is scored with layers 0..l-1 restricted to their kept experts (the spec's
    procedure; one forward pass per layer); False scores every layer on the full model in one
    pass. Deterministic: no randomness, ties go to the lower expert index.
  """
  n = routed_to_keep(cfg, keep)
  R, layers = cfg.num_routed_experts, cfg.num_layers
  batches = list(batches)
  mask = np.ones((layers, R), bool)
  kept = np.zeros((layers, n), np.int64)
  scores = np.zeros((layers, R))
  if not greedy:
    scores = routing_scores(graphdef, params, batches, mask)
    for layer in range(layers):
      kept[layer] = top_experts(scores[layer], n)
  else:
    for layer in range(layers):
      layer_scores = routing_scores(graphdef, params, batches, mask)[layer]
      scores[layer] = layer_scores
      kept[layer] = top_experts(layer_scores, n)
      mask[layer] = False
      mask[layer, kept[layer]] = True
  return Selection(keep=keep, kept_routed=kept, scores=scores, num_routed=R,
                   num_shared=cfg.num_shared_experts, greedy=greedy)


# ---- physical pruning ------------------------------------------------------------------------------
def pruned_config(cfg: ModelConfig, keep: int) -> ModelConfig:
  """The ModelConfig of `cfg` pruned to `keep` experts per layer (see the module docstring)."""
  n = routed_to_keep(cfg, keep)
  top_k = min(cfg.top_k, n)
  pool_max = min(cfg.pool_max, keep)
  pool_min = max(top_k, min(cfg.pool_min, pool_max))
  eval_pool = cfg.eval_pool_size
  if eval_pool is not None:
    eval_pool = None if eval_pool >= n else max(top_k, eval_pool)
  return cfg.replace(num_experts=keep, top_k=top_k, pool_min=pool_min,
                     pool_max=max(pool_max, pool_min), eval_pool_size=eval_pool)


def bank_indices(selection: Selection) -> np.ndarray:
  """int [layers, K]: original bank rows of the pruned bank (kept routed, then shared)."""
  shared = np.arange(selection.num_routed, selection.num_routed + selection.num_shared)
  return np.stack([np.concatenate([k, shared]) for k in selection.kept_routed]).astype(np.int64)


def prune_params(params: Mapping[str, Any], selection: Selection) -> dict:
  """A copy of the parameter tree with each layer's bank rows and router columns sliced."""
  idx_LxK = bank_indices(selection)
  out = jax.tree.map(np.asarray, dict(params))  # copies the structure; arrays are shared
  mlp = dict(out["blocks"]["mlp"])
  for name in ("w_gate", "w_up", "w_down"):
    w = np.asarray(mlp[name])
    mlp[name] = np.take_along_axis(w, idx_LxK.reshape(idx_LxK.shape + (1,) * (w.ndim - 2)), 1)
  router = np.asarray(mlp["router"])  # [layers, D, E]
  mlp["router"] = np.take_along_axis(router, idx_LxK[:, None, :], 2)
  blocks = dict(out["blocks"])
  blocks["mlp"] = mlp
  out["blocks"] = blocks
  return out


def prune(params: Mapping[str, Any], cfg: ModelConfig, selection: Selection):
  """(pruned params, pruned ModelConfig)."""
  if selection.num_routed != cfg.num_routed_experts or len(selection.kept_routed) != cfg.num_layers:
    raise ValueError(f"the selection is for {len(selection.kept_routed)} layers x "
                     f"{selection.num_routed} routed experts, the model has {cfg.num_layers} x "
                     f"{cfg.num_routed_experts}")
  return prune_params(params, selection), pruned_config(cfg, selection.keep)


def param_bytes(params: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))


def param_count(params: Any) -> int:
  return int(sum(np.asarray(x).size for x in jax.tree.leaves(params)))


def pruned_param_count(cfg: ModelConfig, keep: int) -> int:
  """Parameters after pruning, by formula: every removed expert takes its three matrices
  (3 * d_model * expert_hidden) and its router column (d_model) in every layer."""
  removed = cfg.num_experts - keep
  per_expert = 3 * cfg.d_model * cfg.expert_hidden + cfg.d_model
  return count_params(cfg)["total_params"] - cfg.num_layers * removed * per_expert


def format_table(selection: Selection) -> str:
  """A text table of the kept experts per layer."""
  lines = [f"kept {selection.keep} experts per layer ({selection.keep - selection.num_shared} "
           f"routed of {selection.num_routed} + {selection.num_shared} shared; "
           f"{'greedy' if selection.greedy else 'one-pass'} ranking)",
           "layer | kept routed experts (original ids) | score mass kept"]
  for row in selection.table():
    lines.append(f"{row['layer']:5d} | {' '.join(str(e) for e in row['kept_routed'])} | "
                 f"{row['score_kept']:.3f}")
  return "\n".join(lines)


def write_selection(selection: Selection, out_dir: str | pathlib.Path) -> dict[str, str]:
  """Writes kept_experts.json and kept_experts.txt; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  j, t = out_dir / "kept_experts.json", out_dir / "kept_experts.txt"
  j.write_text(json.dumps(selection.to_json(), indent=1))
  t.write_text(format_table(selection) + "\n")
  return {"table_json": str(j), "table_txt": str(t)}
