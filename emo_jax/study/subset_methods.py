"""Ways to choose an expert subset, next to the routing-mass ranking of selective.py.

All return a `selective.Selection` (routed experts kept per layer; the shared expert always
stays), so every method is applied, pruned and evaluated the same way (docs/selective_eval.md);
the calibration batches they read come from `calibration.calibration_batches`:

* `greedy` / `global`: selective.select_experts, the mean routed softmax over the calibration
  tokens, layer by layer with earlier layers restricted, or all layers in one pass;
* `random`: each layer's routed experts drawn uniformly, seeded; no calibration data;
* `easy_ep`: EASY-EP (arXiv 2504.06792), one pass on the full model; expert i of a layer
  scores sum_t g_{i,t} * ||E_i(h_t)|| * s_t over the calibration tokens routed to it, with
  g the routing weight, E_i(h_t) the expert's output on the layer's MoE input h_t and
  s_t = 1 - cos(h_t, h_t + y_t) how much the whole MoE output y_t turns the token.
* `greedy_variable`: the release's greedy_prune_layerwise_variable, greedy's ranking with a
  different K per layer (a schedule such as 128,128,32,...,32; a layer whose K is the whole bank
  is left as it is). It returns a `VariableSelection`, applied as a routing mask like the
  others, or written as a Hugging Face model with a bank of its own size in every layer
  (`write_variable_hf`: the `emo` layout's num_experts_per_layer, loaded by transformers with
  trust_remote_code; a ModelConfig holds one bank size, so it has no emo_jax checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.model import moe as moe_lib
from emo_jax.study import selective

METHODS = ("greedy", "global", "random", "easy_ep", "greedy_variable")
_EASY_EP = "easy_ep_scores"


def random_selection(cfg, keep: int, seed: int) -> selective.Selection:
  """Each layer keeps `keep - shared` routed experts drawn without replacement, seeded."""
  n = selective.routed_to_keep(cfg, keep)
  R = cfg.num_routed_experts
  rng = np.random.default_rng(seed)
  kept = np.stack([np.sort(rng.permutation(R)[:n]) for _ in range(cfg.num_layers)])
  return selective.Selection(keep=keep, kept_routed=kept.astype(np.int64),
                             scores=np.zeros((cfg.num_layers, R)), num_routed=R,
                             num_shared=cfg.num_shared_experts, greedy=False)


# ---- EASY-EP -----------------------------------------------------------------------------------
def _expert_norms_RxT(x_TxD, w_gate_RxDxH, w_up_RxDxH, w_down_RxHxD):
  """||E_i(x_t)|| for every routed expert i and token t, one expert at a time (no [R, T, D])."""
  def one(weights):
    wg, wu, wd = weights
    y = (jax.nn.silu(x_TxD @ wg) * (x_TxD @ wu)) @ wd
    return jnp.linalg.norm(y, axis=-1)
  return jax.lax.map(one, (w_gate_RxDxH, w_up_RxDxH, w_down_RxHxD))


@contextlib.contextmanager
def _scoring_moe_layers():
  """While active, every traced MoE layer also returns aux["easy_ep_scores"] [routed].

  The score needs each layer's MoE input and output, which live inside the scanned layer
  stack; computing it in the layer itself and returning it through the per-layer statistics
  (which the model stacks over layers) keeps the model's code untouched. Only functions traced
  inside this context see it (`_easy_ep_sums`, jitted on its own).
  """
  original = moe_lib.MoE.__call__

  @functools.wraps(original)
  def scoring_call(self, x_BxLxD, segment_ids_BxL, *args, **kwargs):
    y_BxLxD, aux = original(self, x_BxLxD, segment_ids_BxL, *args, **kwargs)
    cfg = self.cfg
    R, D = cfg.num_routed_experts, x_BxLxD.shape[-1]
    x_TxD = x_BxLxD.reshape(-1, D).astype(jnp.float32)
    y_TxD = y_BxLxD.reshape(-1, D).astype(jnp.float32)
    probs_TxR = jax.nn.softmax(jnp.dot(x_TxD, self.router[...][:, :R].astype(jnp.float32),
                                       precision=jax.lax.Precision.HIGHEST), axis=-1)
    weights_TxK, ids_TxK = jax.lax.top_k(probs_TxR, cfg.top_k)  # EMO: no renormalisation
    gate_TxR = jnp.einsum("tk,tkr->tr", weights_TxK, jax.nn.one_hot(ids_TxK, R))
    w = lambda p: p[...][:R].astype(jnp.float32)
    norms_RxT = _expert_norms_RxT(x_TxD, w(self.w_gate), w(self.w_up), w(self.w_down))
    out_TxD = x_TxD + y_TxD
    cos_T = jnp.sum(x_TxD * out_TxD, -1) / jnp.maximum(
        jnp.linalg.norm(x_TxD, axis=-1) * jnp.linalg.norm(out_TxD, axis=-1), 1e-12)
    s_T = jnp.maximum(1.0 - cos_T, 0.0) * (segment_ids_BxL.reshape(-1) > 0)
    aux = dict(aux)
    aux[_EASY_EP] = jnp.einsum("tr,rt,t->r", gate_TxR, norms_RxT, s_T,
                               precision=jax.lax.Precision.HIGHEST)
    return y_BxLxD, aux

  moe_lib.MoE.__call__ = scoring_call
  try:
    yield
  finally:
    moe_lib.MoE.__call__ = original


@functools.partial(jax.jit, static_argnums=(0,))
def _easy_ep_sums(graphdef, params, tokens, segment_ids, positions):
  model = nnx.merge(graphdef, params)
  _, aux = model(tokens, segment_ids, positions, train=False)
  if _EASY_EP not in aux:
    raise RuntimeError("the model's per-layer statistics did not carry the EASY-EP scores")
  return aux[_EASY_EP]  # [layers, routed]


def easy_ep_scores(graphdef, params, batches: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
  """EASY-EP score of every routed expert, summed over the batches: float64 [layers, routed]."""
  total = None
  with _scoring_moe_layers():
    for b in batches:
      s = np.asarray(jax.device_get(_easy_ep_sums(
          graphdef, params, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]),
          jnp.asarray(b["positions"]))), np.float64)
      total = s if total is None else total + s
  if total is None:
    raise ValueError("no calibration batches given")
  return total


def easy_ep_selection(graphdef, params, cfg, batches, keep: int) -> selective.Selection:
  n = selective.routed_to_keep(cfg, keep)
  scores = easy_ep_scores(graphdef, params, batches)
  kept = np.stack([selective.top_experts(s, n) for s in scores])
  return selective.Selection(keep=keep, kept_routed=kept, scores=scores,
                             num_routed=cfg.num_routed_experts,
                             num_shared=cfg.num_shared_experts, greedy=False)


# ---- a different K per layer (the release's greedy_prune_layerwise_variable) ---------------------
@dataclasses.dataclass
class VariableSelection:
  """Experts kept with a K of its own per layer.

  keep_per_layer: experts kept per layer (shared included); a layer with K >= num_experts keeps
  all. kept_routed: per layer, int [K_l - S] original routed ids, increasing. scores: [layers,
  routed] mean routed softmax each pruned layer was ranked by (zeros for untouched layers).
  """
  keep_per_layer: tuple[int, ...]
  kept_routed: list[np.ndarray]
  scores: np.ndarray
  num_routed: int
  num_shared: int
  greedy: bool = True

  @property
  def keep(self) -> int:
    """The smallest layer's K (what the release writes as config.num_experts)."""
    return min(len(k) for k in self.kept_routed) + self.num_shared

  @property
  def total_experts(self) -> int:
    """Experts in all layers together (shared included): the budget the schedule spends."""
    return int(sum(len(k) + self.num_shared for k in self.kept_routed))

  @property
  def mask(self) -> np.ndarray:
    """bool [layers, routed] for `model(..., keep_experts=...)`."""
    return selective.keep_mask(self.kept_routed, self.num_routed)

  def bank_indices(self) -> list[np.ndarray]:
    """Per layer, the original bank rows of its pruned bank (kept routed, then shared)."""
    shared = np.arange(self.num_routed, self.num_routed + self.num_shared)
    return [np.concatenate([k, shared]).astype(np.int64) for k in self.kept_routed]

  def to_json(self) -> dict[str, Any]:
    return {"method": "greedy_variable", "keep_per_layer": list(self.keep_per_layer),
            "num_routed": self.num_routed, "num_shared": self.num_shared,
            "total_experts": self.total_experts,
            "kept_routed": [[int(e) for e in k] for k in self.kept_routed],
            "scores": np.round(self.scores, 6).tolist()}


def parse_keep_per_layer(spec: str | Sequence[int], cfg) -> tuple[int, ...]:
  """A schedule "128,128,32,..." (one K per layer, shared included; "all" = the whole bank)."""
  values = spec.split(",") if isinstance(spec, str) else list(spec)
  out = []
  for v in values:
    v = str(v).strip().lower()
    if v == "all":
      out.append(cfg.num_experts)
    elif v.isdigit():
      out.append(int(v))
    else:
      raise ValueError(f"keep-per-layer value {v!r} must be an integer or 'all'")
  if len(out) != cfg.num_layers:
    raise ValueError(f"the keep-per-layer schedule has {len(out)} entries, the model "
                     f"{cfg.num_layers} layers: give one K per layer")
  for k in out:
    if k < cfg.num_experts:
      selective.routed_to_keep(cfg, k)  # the range check
  return tuple(min(k, cfg.num_experts) for k in out)


def greedy_variable_selection(graphdef, params, cfg, batches,
                              keep_per_layer: str | Sequence[int]) -> VariableSelection:
  """Greedy layer by layer (layer l scored with layers 0..l-1 already restricted), layer l
  keeping its own K_l - S best routed experts by mean routed softmax; a layer whose K is the
  whole bank is neither scored nor restricted, as in the release."""
  schedule = parse_keep_per_layer(keep_per_layer, cfg)
  R, S = cfg.num_routed_experts, cfg.num_shared_experts
  batches = list(batches)
  mask = np.ones((cfg.num_layers, R), bool)
  scores = np.zeros((cfg.num_layers, R))
  kept = []
  for layer, k in enumerate(schedule):
    if k >= cfg.num_experts:
      kept.append(np.arange(R, dtype=np.int64))
      continue
    scores[layer] = selective.routing_scores(graphdef, params, batches, mask)[layer]
    kept.append(selective.top_experts(scores[layer], k - S).astype(np.int64))
    mask[layer] = False
    mask[layer, kept[-1]] = True
  return VariableSelection(keep_per_layer=schedule, kept_routed=kept, scores=scores,
                           num_routed=R, num_shared=S)


def variable_hf_tensors(params: Mapping[str, Any], cfg, selection: VariableSelection,
                        dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(tensors, config.json) of the model pruned to `selection` in the release's `emo` layout:
  layer l's router rows and experts are its kept bank rows, renumbered 0..K_l-1 (shared last),
  and config.json lists num_experts_per_layer, as the release's pruning script writes it."""
  from emo_jax.convert import hf, layouts  # pylint: disable=import-outside-toplevel
  if len(selection.kept_routed) != cfg.num_layers or selection.num_routed != cfg.num_routed_experts:
    raise ValueError("the selection does not match the model's layers and routed experts")
  full = hf.to_hf_tensors(params, cfg, "emo", dtype)
  out = {k: v for k, v in full.items() if ".mlp." not in k}
  for layer, rows in enumerate(selection.bank_indices()):
    prefix = f"model.layers.{layer}.mlp."
    out[prefix + "gate.weight"] = full[prefix + "gate.weight"][rows]
    for new, old in enumerate(rows):
      for proj in ("gate_proj", "up_proj", "down_proj"):
        out[f"{prefix}experts.{new}.{proj}.weight"] = full[f"{prefix}experts.{old}.{proj}.weight"]
  config = layouts.hf_config(cfg, "emo", dtype=dtype)
  sizes = [len(rows) for rows in selection.bank_indices()]
  config.update(num_experts=min(sizes), num_experts_per_layer=sizes,
                num_shared_experts_per_layer=[selection.num_shared] * cfg.num_layers,
                # top-k cannot exceed the smallest layer's routed experts (the release: min K)
                num_experts_per_tok=min(cfg.top_k, min(sizes) - selection.num_shared)
                + selection.num_shared)
  return out, config


def write_variable_hf(params: Mapping[str, Any], cfg, selection: VariableSelection,
                      out: str | pathlib.Path, *, dtype: str = "float32",
                      tokenizer: str | None = None) -> dict[str, Any]:
  """Writes the variable-size pruned model as a Hugging Face folder (`emo` layout, remote code
  beside it, loaded with trust_remote_code=True) with the selection as kept_experts.json."""
  from emo_jax.convert import hf, safetensors_io, tokenizer_hf  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; choose another folder")
  out.mkdir(parents=True, exist_ok=True)
  tensors, config = variable_hf_tensors(params, cfg, selection, dtype)
  if tokenizer:
    info = tokenizer_hf.write_tokenizer(tokenizer, out, model_max_length=cfg.max_seq_len)
    config.update({k: info[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
  writer = safetensors_io.ShardedWriter(out, [(k, v.shape, v.dtype) for k, v in tensors.items()])
  for k, v in tensors.items():
    writer.write(k, v)
  writer.close()
  (out / "config.json").write_text(json.dumps(config, indent=1))
  (out / "kept_experts.json").write_text(json.dumps(selection.to_json(), indent=1))
  for name in ("configuration_emo.py", "modeling_emo.py"):
    shutil.copyfile(hf.REMOTE_CODE_DIR / name, out / name)
  return {"out": str(out), "num_experts_per_layer": config["num_experts_per_layer"],
          "tensors": len(tensors), "total_experts": selection.total_experts}


def select(method: str, graphdef, params, cfg, batches, keep, *,
           seed: int = 0):
  """The subset of `keep` experts per layer (shared included) chosen by `method`;
  `greedy_variable` takes a schedule, one K per layer ("128,128,32,..." or a sequence)."""
  if method == "greedy_variable":
    return greedy_variable_selection(graphdef, params, cfg, batches, keep)
  if isinstance(keep, str) or not np.isscalar(keep):
    raise ValueError(f"method {method!r} keeps one K in every layer, got {keep!r}; a schedule "
                     "per layer is method greedy_variable")
  if method in ("greedy", "global"):
    return selective.select_experts(graphdef, params, cfg, batches, keep,
                                    greedy=method == "greedy")
  if method == "random":
    return random_selection(cfg, keep, seed)
  if method == "easy_ep":
    return easy_ep_selection(graphdef, params, cfg, batches, keep)
  raise ValueError(f"unknown selection method {method!r}; choose from {list(METHODS)}")
