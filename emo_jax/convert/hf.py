"""Hugging Face <-> emo_jax conversion, both ways, streamed one tensor (layer slice) at a time.

Two export layouts (EMO_SPEC.md, "Hugging Face format of the release"):

* `emo`: the release's `EmoForCausalLM` names and config keys, with this project's own
  `configuration_emo.py` / `modeling_emo.py` copied beside the weights (trust_remote_code);
* `qwen2_moe`: transformers' built-in `Qwen2MoeForCausalLM` (also native in vLLM and llama.cpp),
  which expresses EMO inference exactly: the routed experts with norm_topk_prob=False, the
  shared expert(s) as Qwen's shared expert (several are concatenated along the hidden axis,
  since SwiGLU sums over hidden units) behind a sigmoid gate of zero weights (sigmoid(0) = 1/2)
  with down_proj scaled by 2, and zero q/k/v biases. Both factors are powers of two, so the
  mapping is exact in floating point and reverses bit for bit.

Imports read the `emo` layout (released checkpoints with 100,352 or 100,278 vocabulary rows),
the `qwen2_moe` layout written here, and OLMoE (`OlmoeForCausalLM`: QK-norm, no shared expert),
with per-expert or fused (transformers 5) expert tensors.

Everything goes through one table, `tensor_groups`: each group ties one of our parameters
(or one `[layer]` slice of a stacked block parameter) to the Hugging Face tensors made from it,
with the function each way. Groups come array-major (all layers of `wq`, then of `wk`, ...), so
a reader holds at most one stored chunk of one array and a writer one layer slice: peak host
memory grows with a layer, not with the model. Output goes to a temporary folder beside `out`
that is renamed when complete, so a failed conversion leaves nothing at `out`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import resource
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from emo_jax.config import ConfigError, ModelConfig
from emo_jax.convert import orbax_io, safetensors_io, tokenizer_hf
from emo_jax.convert.orbax_io import Path

log = logging.getLogger(__name__)

LAYOUTS = ("emo", "qwen2_moe")
IMPORT_LAYOUTS = ("emo", "qwen2_moe", "olmoe")
# model_type values of the emo layout: the release's, and names its history used (the
# reference's migration script renames flex_olmo_noqknorm_prenorm -> emo_noqknorm_prenorm).
EMO_MODEL_TYPES = ("emo", "emo_noqknorm_prenorm", "flex_olmo_noqknorm_prenorm")
MODEL_TYPES = {**{t: "emo" for t in EMO_MODEL_TYPES}, "qwen2_moe": "qwen2_moe", "olmoe": "olmoe"}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# dolma2 (the release's tokenizer) has 100,278 ids; the release pads the embedding to 100,352.
DOLMA2_ROWS = (100_278, 100_352)
REMOTE_CODE = ("configuration_emo.py", "modeling_emo.py")
EMO_JAX_CONFIG = "emo_jax_config.json"   # our full ModelConfig, beside an export
HF_CONFIG_COPY = "hf_config.json"        # the source config.json, beside an import
TOKENIZER_DIR = "tokenizer"              # tokenizer files, beside an import
# Keys of the reference's experimental code paths, with the value that means "off".
EMO_OFF_KEYS = {"always_active_experts": None, "always_active_experts_per_layer": None,
                "ghost_extend_eval": False, "dense_mlp_bias": False}


class ConversionError(ValueError):
  """The input cannot be converted; the message names the tensor or config key and the fix."""


# ---- the tensor table ------------------------------------------------------------------------
@dataclasses.dataclass
class Group:
  """Hugging Face tensors `names` (of `shapes`) made from our parameter `path` at `layer`.

  `to_hf(x)` yields the tensors, in order, from the parameter (or layer slice) `x`; `from_hf`
  builds the parameter from them (float32 arrays). `path=None` marks tensors that are
  constant in this layout (Qwen's zero biases and gate): exported as zeros, checked on import.
  """
  path: Path | None
  layer: int | None
  names: list[str]
  shapes: list[tuple[int, ...]]
  to_hf: Callable[[np.ndarray | None], Iterator[np.ndarray]]
  from_hf: Callable[[list[np.ndarray]], np.ndarray | None]


def _one(name, shape, to, back):
  return [name], [tuple(shape)], (lambda x: iter([to(x)])), (lambda hs: back(hs[0]))


def _zeros_group(names: list[str], shapes: list[tuple[int, ...]]) -> Group:
  def check(hs):
    for name, h in zip(names, hs):
      if np.any(h != 0):
        raise ConversionError(
            f"tensor {name!r} is not all zeros (max |x| = {float(np.max(np.abs(h))):.3g}); "
            "emo_jax has no attention biases and adds shared experts with a fixed weight, so a "
            "Qwen2-MoE model with learned biases or a learned shared_expert_gate cannot be "
            "imported")
  return Group(None, None, names, shapes,
               lambda _: (np.zeros(s, np.float32) for s in shapes), check)


def _experts(prefix: str, proj: str, our_ids: range, shape_hf, to, back_stack):
  names = [f"{prefix}.experts.{j}.{proj}.weight" for j in our_ids]
  return names, [shape_hf] * len(names), to, back_stack


def tensor_groups(cfg: ModelConfig, layout: str, *, fused_experts: bool = False) -> list[Group]:
  """The Hugging Face tensors of a model in `layout`, grouped by the parameter they come from.

  Args:
    cfg: the architecture.
    layout: "emo", "qwen2_moe" or "olmoe" (import only).
    fused_experts: experts stored as transformers 5 fused tensors (`mlp.experts.gate_up_proj`
      [E, 2X, D], `mlp.experts.down_proj` [E, D, X]); import only.
  """
  V, D, L = cfg.vocab_size, cfg.d_model, cfg.num_layers
  H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  E, S, X = cfg.num_experts, cfg.num_shared_experts, cfg.expert_hidden
  R = E - S
  norm1, norm2 = (("pre_attention_layernorm", "pre_feedforward_layernorm") if layout == "emo"
                  else ("input_layernorm", "post_attention_layernorm"))
  ident = lambda x: x  # noqa: E731
  f32 = lambda h: np.asarray(h, np.float32)  # noqa: E731

  # (our path, per-layer name suffix, make(l) -> (names, shapes, to_hf, from_hf))
  rows: list[tuple[Path, Callable[[str], tuple]]] = [
      (("blocks", "attn_norm", "weight"), lambda p: _one(f"{p}.{norm1}.weight", (D,), ident, f32)),
      (("blocks", "attn", "wq"), lambda p: _one(
          f"{p}.self_attn.q_proj.weight", (H * K, D), lambda x: x.reshape(D, H * K).T,
          lambda h: f32(h).T.reshape(D, H, K))),
      (("blocks", "attn", "wk"), lambda p: _one(
          f"{p}.self_attn.k_proj.weight", (G * K, D), lambda x: x.reshape(D, G * K).T,
          lambda h: f32(h).T.reshape(D, G, K))),
      (("blocks", "attn", "wv"), lambda p: _one(
          f"{p}.self_attn.v_proj.weight", (G * K, D), lambda x: x.reshape(D, G * K).T,
          lambda h: f32(h).T.reshape(D, G, K))),
      (("blocks", "attn", "wo"), lambda p: _one(
          f"{p}.self_attn.o_proj.weight", (D, H * K), lambda x: x.reshape(H * K, D).T,
          lambda h: f32(h).T.reshape(H, K, D))),
  ]
  if cfg.qk_norm:
    rows += [(("blocks", "attn", "q_norm", "weight"),
              lambda p: _one(f"{p}.self_attn.q_norm.weight", (H * K,), ident, f32)),
             (("blocks", "attn", "k_norm", "weight"),
              lambda p: _one(f"{p}.self_attn.k_norm.weight", (G * K,), ident, f32))]
  rows.append((("blocks", "mlp_norm", "weight"),
               lambda p: _one(f"{p}.{norm2}.weight", (D,), ident, f32)))

  if not cfg.is_moe:
    M = cfg.mlp_hidden
    for w, proj, shape in (("w_gate", "gate_proj", (M, D)), ("w_up", "up_proj", (M, D)),
                           ("w_down", "down_proj", (D, M))):
      rows.append((("blocks", "mlp", w), lambda p, proj=proj, shape=shape: _one(
          f"{p}.mlp.{proj}.weight", shape, lambda x: x.T, lambda h: f32(h).T)))
  elif layout == "qwen2_moe":
    rows += _qwen_moe_rows(D, R, S, X, fused_experts)
  else:
    rows.append((("blocks", "mlp", "router"), lambda p: _one(
        f"{p}.mlp.gate.weight", (E, D), lambda x: x.T, lambda h: f32(h).T)))
    if fused_experts:
      rows += _fused_rows(D, E, X, shared=None)
    else:
      for w, proj, shape in (("w_gate", "gate_proj", (X, D)), ("w_up", "up_proj", (X, D)),
                             ("w_down", "down_proj", (D, X))):
        rows.append((("blocks", "mlp", w), lambda p, proj=proj, shape=shape: _experts(
            f"{p}.mlp", proj, range(E), shape, lambda x: (x[j].T for j in range(E)),
            lambda hs: np.stack([f32(h).T for h in hs]))))

  groups = [Group(("embed",), None, *_one("model.embed_tokens.weight", (V, D), ident, f32))]
  for path, make in rows:
    for layer in range(L):
      groups.append(Group(path, layer, *make(f"model.layers.{layer}")))
  groups.append(Group(("final_norm", "weight"), None, *_one("model.norm.weight", (D,), ident, f32)))
  if not cfg.tie_embeddings:
    groups.append(Group(("lm_head",), None,
                        *_one("lm_head.weight", (V, D), lambda x: x.T, lambda h: f32(h).T)))
  if layout == "qwen2_moe":
    for layer in range(L):
      p = f"model.layers.{layer}"
      names = [f"{p}.self_attn.{n}_proj.bias" for n in "qkv"]
      shapes = [(H * K,), (G * K,), (G * K,)]
      if cfg.is_moe:
        names.append(f"{p}.mlp.shared_expert_gate.weight")
        shapes.append((1, D))
      groups.append(_zeros_group(names, shapes))
  return groups


def _qwen_moe_rows(D, R, S, X, fused):
  """Qwen2-MoE: router rows of the routed experts, routed experts, one concatenated shared."""
  f32 = lambda h: np.asarray(h, np.float32)  # noqa: E731

  def router(p):
    return _one(f"{p}.mlp.gate.weight", (R, D), lambda x: x[:, :R].T,
                # The shared experts' router columns are never used; they come back as zeros.
                lambda h: np.concatenate([f32(h).T, np.zeros((D, S), np.float32)], axis=1))

  rows = [(("blocks", "mlp", "router"), router)]
  if fused:
    return rows + _fused_rows(D, R, X, shared=S)

  def gate_up(proj):
    def make(p):
      names = [f"{p}.mlp.experts.{j}.{proj}.weight" for j in range(R)]
      names.append(f"{p}.mlp.shared_expert.{proj}.weight")
      to = lambda x: iter([*(x[j].T for j in range(R)),  # noqa: E731
                           x[R:].transpose(0, 2, 1).reshape(S * X, D)])
      back = lambda hs: np.concatenate([np.stack([f32(h).T for h in hs[:-1]]),  # noqa: E731
                                        f32(hs[-1]).reshape(S, X, D).transpose(0, 2, 1)])
      return names, [(X, D)] * R + [(S * X, D)], to, back
    return make

  def down(p):
    names = [f"{p}.mlp.experts.{j}.down_proj.weight" for j in range(R)]
    names.append(f"{p}.mlp.shared_expert.down_proj.weight")
    # x2 undoes the sigmoid(0) = 1/2 of the zero shared_expert_gate; exact in floating point.
    to = lambda x: iter([*(x[j].T for j in range(R)), 2 * x[R:].reshape(S * X, D).T])  # noqa: E731
    back = lambda hs: np.concatenate([np.stack([f32(h).T for h in hs[:-1]]),  # noqa: E731
                                      (f32(hs[-1]) / 2).T.reshape(S, X, D)])
    return names, [(D, X)] * R + [(D, S * X)], to, back

  return rows + [(("blocks", "mlp", "w_gate"), gate_up("gate_proj")),
                 (("blocks", "mlp", "w_up"), gate_up("up_proj")),
                 (("blocks", "mlp", "w_down"), down)]


def _fused_rows(D, R, X, shared):
  """Import-only rows for transformers 5 fused expert tensors (+ Qwen's unfused shared)."""
  f32 = lambda h: np.asarray(h, np.float32)  # noqa: E731

  def no_export(_):
    raise ConversionError("fused expert tensors are an import format only")

  def make(w):
    def rows(p):
      name = f"{p}.mlp.experts.{'down_proj' if w == 'w_down' else 'gate_up_proj'}"
      names = [name]
      shapes = [(R, D, X) if w == "w_down" else (R, 2 * X, D)]
      if shared:
        proj = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[w]
        names.append(f"{p}.mlp.shared_expert.{proj}.weight")
        shapes.append((D, shared * X) if w == "w_down" else (shared * X, D))

      def back(hs):
        h = f32(hs[0])
        routed = (h.transpose(0, 2, 1) if w == "w_down" else
                  h[:, :X].transpose(0, 2, 1) if w == "w_gate" else h[:, X:].transpose(0, 2, 1))
        if not shared:
          return routed
        sh = f32(hs[1])
        sh = ((sh / 2).T.reshape(shared, X, D) if w == "w_down"
              else sh.reshape(shared, X, D).transpose(0, 2, 1))
        return np.concatenate([routed, sh])
      return names, shapes, no_export, back
    return rows

  return [(("blocks", "mlp", w), make(w)) for w in ("w_gate", "w_up", "w_down")]


def param_specs(cfg: ModelConfig) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """Every parameter path of the model with its (shape, dtype), from shapes only."""
  from emo_jax.model import describe  # pylint: disable=import-outside-toplevel
  out = {}
  for name, info in describe(cfg)["params"].items():
    dtype = DTYPES.get(info["dtype"]) or np.dtype(info["dtype"])
    out[tuple(name.split("."))] = (tuple(info["shape"]), dtype)
  return out


# ---- configs -----------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, layout: str, *, dtype: str = "float32",
              token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
  """config.json of `cfg` in `layout` (the release's keys for "emo")."""
  _check_exportable(cfg, layout)
  ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
  common = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_seq_len,
      "hidden_act": "silu", "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": cfg.init_std, "use_cache": True, "attention_dropout": 0.0,
      "torch_dtype": dtype, **ids}
  if cfg.head_dim * cfg.num_heads != cfg.d_model:
    common["head_dim"] = cfg.head_dim
  S = cfg.num_shared_experts if cfg.is_moe else 0
  if layout == "emo":
    config = {
        "architectures": ["EmoForCausalLM"], "model_type": "emo",
        "auto_map": {"AutoConfig": "configuration_emo.EmoConfig",
                     "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"},
        **common, "attention_bias": False,
        "intermediate_size": cfg.expert_hidden if cfg.is_moe else cfg.mlp_hidden,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k + S if cfg.is_moe else 0,
        "num_shared_experts": S, "norm_topk_prob": False, "router_aux_loss_coef": 0.01,
        "output_router_logits": False}
    if not cfg.is_moe:
      config["dense_intermediate_size"] = cfg.mlp_hidden
    if cfg.qk_norm:
      config["qk_norm"] = True
    return config
  moe = {"num_experts": cfg.num_routed_experts, "num_experts_per_tok": cfg.top_k,
         "moe_intermediate_size": cfg.expert_hidden,
         "shared_expert_intermediate_size": S * cfg.expert_hidden,
         "intermediate_size": cfg.expert_hidden} if cfg.is_moe else {
             "num_experts": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 1,
             "shared_expert_intermediate_size": 0, "intermediate_size": cfg.mlp_hidden}
  return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **common, **moe,
          "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
          "qkv_bias": True, "use_sliding_window": False, "sliding_window": None,
          "max_window_layers": cfg.num_layers, "router_aux_loss_coef": 0.001,
          "output_router_logits": False}


def _check_exportable(cfg: ModelConfig, layout: str) -> None:
  if layout not in LAYOUTS:
    raise ConversionError(f"layout {layout!r} is not one of {LAYOUTS}")
  if layout == "qwen2_moe":
    if cfg.qk_norm:
      raise ConversionError("Qwen2MoeForCausalLM has no QK-norm, so a qk_norm=True model cannot "
                            "be written as qwen2_moe; use --layout=emo")
    if cfg.is_moe and cfg.num_shared_experts == 0:
      raise ConversionError("the qwen2_moe layout needs a shared expert (num_shared_experts >= 1) "
                            "and this model has none; use --layout=emo")


def _get(config: Mapping[str, Any], key: str, default: Any = KeyError) -> Any:
  if key in config and config[key] is not None:
    return config[key]
  if default is KeyError:
    raise ConversionError(f"config.json has no {key!r}, which a {config.get('model_type')} "
                          "model needs")
  return default


def _require(config, key, allowed, why):
  value = config.get(key)
  if value not in allowed:
    raise ConversionError(f"config.json has {key}={value!r}: {why}")


def model_config_from_hf(config: Mapping[str, Any], *, vocab_rows: int | None = None,
                         base: Mapping[str, Any] | None = None,
                         overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, str]:
  """(ModelConfig, layout) of a Hugging Face config.json.

  Args:
    config: the config.json contents.
    vocab_rows: rows of the checkpoint's embedding, which win over config.vocab_size when they
      are dolma2's 100,278 / 100,352 (the release ships both).
    base: a ModelConfig dict (e.g. emo_jax_config.json of our own export) for the fields that
      Hugging Face configs do not carry (pool, losses, backends); architecture fields always
      come from `config`.
    overrides: ModelConfig fields to set last (e.g. {"pool": False}).
  """
  model_type = config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConversionError(f"unknown model_type {model_type!r} in config.json; supported: "
                          f"{sorted(MODEL_TYPES)} (EMO, the qwen2_moe layout, OLMoE)")
  layout = MODEL_TYPES[model_type]
  D, H = _get(config, "hidden_size"), _get(config, "num_attention_heads")
  if _get(config, "hidden_act", "silu") != "silu":
    raise ConversionError(f"config.json has hidden_act={config['hidden_act']!r}; emo_jax experts "
                          "are SwiGLU (silu)")
  rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ConversionError(f"config.json has RoPE scaling {rope!r}; only plain RoPE converts")
  theta = config.get("rope_theta") or rope.get("rope_theta") or (
      500_000.0 if layout == "emo" else 10_000.0)
  vocab = _get(config, "vocab_size")
  if vocab_rows is not None and vocab_rows != vocab:
    if not (vocab_rows in DOLMA2_ROWS and vocab in DOLMA2_ROWS):
      raise ConversionError(f"config.json has vocab_size={vocab} but tensor "
                            f"'model.embed_tokens.weight' has {vocab_rows} rows")
    vocab = vocab_rows
  values = dict(
      vocab_size=vocab, d_model=D, num_layers=_get(config, "num_hidden_layers"), num_heads=H,
      num_kv_heads=_get(config, "num_key_value_heads", H),
      head_dim=_get(config, "head_dim", D // H), norm_eps=float(_get(config, "rms_norm_eps")),
      rope_theta=float(theta), max_seq_len=_get(config, "max_position_embeddings", 4096),
      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
      init_std=float(_get(config, "initializer_range", 0.02)), qk_norm=False)
  if layout in ("emo", "olmoe"):
    _require(config, "attention_bias", (None, False), "emo_jax attention has no biases")
  if layout == "emo":
    for key, off in EMO_OFF_KEYS.items():
      if config.get(key, off) not in (off, None, False, []):
        raise ConversionError(f"config.json has {key}={config[key]!r}, a reference-only "
                              "experiment that emo_jax does not implement")
    E = _get(config, "num_experts")
    per_layer = config.get("num_experts_per_layer")
    if per_layer:
      if len(set(per_layer)) != 1:
        raise ConversionError(f"config.json has num_experts_per_layer={per_layer}: a different "
                              "expert count per layer (variable pruning) cannot be represented "
                              "by one ModelConfig")
      E = per_layer[0]
    S = min(_get(config, "num_shared_experts", 0), E)
    if config.get("num_shared_experts_per_layer") and len(
        set(config["num_shared_experts_per_layer"])) != 1:
      raise ConversionError("config.json has a different num_shared_experts_per_layer per layer")
    if E:
      _require(config, "norm_topk_prob", (None, False),
               "EMO does not renormalise the top-k weights; emo_jax cannot represent that")
      values.update(num_experts=E, num_shared_experts=S,
                    top_k=_get(config, "num_experts_per_tok") - S,
                    expert_hidden=_get(config, "intermediate_size"))
    else:
      values.update(num_experts=0, mlp_hidden=_get(config, "dense_intermediate_size",
                                                   _get(config, "intermediate_size")))
    values["qk_norm"] = bool(config.get("qk_norm", False))
  elif layout == "qwen2_moe":
    _require(config, "norm_topk_prob", (None, False),
             "EMO does not renormalise the top-k weights")
    _require(config, "use_sliding_window", (None, False), "emo_jax attention is full causal")
    _require(config, "decoder_sparse_step", (None, 1), "every layer must be a MoE layer")
    if config.get("mlp_only_layers"):
      raise ConversionError(f"config.json has mlp_only_layers={config['mlp_only_layers']}: "
                            "mixed dense / MoE layers are not supported")
    R = _get(config, "num_experts")
    if R:
      X = _get(config, "moe_intermediate_size")
      shared = _get(config, "shared_expert_intermediate_size")
      if shared <= 0 or shared % X:
        raise ConversionError(f"config.json has shared_expert_intermediate_size={shared}, not a "
                              f"positive multiple of moe_intermediate_size={X}: the shared expert "
                              "cannot be split into emo_jax shared experts")
      values.update(num_experts=R + shared // X, num_shared_experts=shared // X,
                    top_k=_get(config, "num_experts_per_tok"), expert_hidden=X)
    else:
      values.update(num_experts=0, mlp_hidden=_get(config, "intermediate_size"))
  else:  # olmoe
    _require(config, "norm_topk_prob", (None, False),
             "emo_jax does not renormalise the top-k weights")
    _require(config, "clip_qkv", (None,), "emo_jax does not clip q/k/v")
    values.update(num_experts=_get(config, "num_experts"), num_shared_experts=0,
                  top_k=_get(config, "num_experts_per_tok"),
                  expert_hidden=_get(config, "intermediate_size"), qk_norm=True)
    if values["head_dim"] * H != D:
      raise ConversionError("OLMoE's q_norm spans hidden_size, so head_dim must be "
                            "hidden_size / num_attention_heads")
  if values.get("num_experts", 0) > 0:
    routed = values["num_experts"] - values["num_shared_experts"]
    pool = layout != "olmoe"  # OLMoE is a standard MoE; EMO / StdMoE cannot be told apart
    values.update(pool=pool, pool_max=values["num_experts"],
                  pool_min=max(values["top_k"], min(8, routed)))
  # Fields Hugging Face configs do not carry come from `base`; so does its pool choice.
  merged = {k: v for k, v in (base or {}).items() if k in _OUR_FIELDS}
  for key, value in values.items():
    if not (key in ("pool", "pool_min", "pool_max") and key in merged):
      merged[key] = value
  merged.update(overrides or {})
  try:
    return ModelConfig.from_dict(merged), layout
  except ConfigError as e:
    raise ConversionError(f"config.json describes a model emo_jax cannot build: {e}") from e


_OUR_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


# ---- files -------------------------------------------------------------------------------------
def _prepare_out(out: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(final path, temporary folder beside it); refuses an existing non-empty `out`."""
  out = pathlib.Path(out).absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"--out {out} already exists and is not empty; choose a new folder")
  out.parent.mkdir(parents=True, exist_ok=True)
  return out, pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _commit(tmp: pathlib.Path, out: pathlib.Path) -> None:
  if out.exists():
    out.rmdir()  # empty (checked in _prepare_out)
  os.replace(tmp, out)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_tokenizer(source: orbax_io.ParamSource) -> str | None:
  """The tokenizer a checkpoint was trained with: "bytes", a file path, or None if unknown."""
  if (source.directory / TOKENIZER_DIR / "tokenizer.json").is_file():
    return str(source.directory / TOKENIZER_DIR)
  data = source.data_config
  if not data:
    return None
  tok = data.get("tokenizer", "")
  if tok == "bytes" or (data.get("corpus") == "synthetic" and not tok):
    return "bytes"
  if tok:
    return tok
  from emo_jax.data import corpus  # pylint: disable=import-outside-toplevel
  dc = corpus.DataConfig.from_dict(data)
  data_dir = pathlib.Path(dc.data_dir) if dc.data_dir else corpus.default_data_dir(dc)
  try:
    prepared = json.loads((data_dir / corpus.RESULT_FILE).read_text())
  except (OSError, ValueError):
    return None
  return prepared.get("tokenizer")


def _validation_texts(source: orbax_io.ParamSource, limit: int = 200) -> list[str]:
  """Up to `limit` validation documents of the run, to check a converted tokenizer on."""
  data = source.data_config or {}
  if data.get("corpus") in (None, "synthetic"):
    return []
  from emo_jax.data import corpus, sources  # pylint: disable=import-outside-toplevel
  dc = corpus.DataConfig.from_dict(data)
  path = (pathlib.Path(dc.data_dir) if dc.data_dir else corpus.default_data_dir(dc))
  path = path / "validation.jsonl"
  if not path.is_file():
    return []
  texts = []
  for doc in sources.read_jsonl(path):
    texts.append(doc["text"])
    if len(texts) >= limit:
      break
  return texts


# ---- export ------------------------------------------------------------------------------------
def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, layout: str = "emo",
              dtype: str = "float32", step: int | None = None, tokenizer: str | None = None,
              max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
  """Writes a Hugging Face checkpoint of a training workdir or parameter checkpoint.

  Args:
    checkpoint: a training workdir (its newest checkpoint, or `step`) or a parameter checkpoint
      (`params/` + `model_config.json`, e.g. written by `import_hf` or by expert pruning).
    out: the folder to create; written completely or not at all.
    layout: "emo" (release names, trust_remote_code) or "qwen2_moe" (built-in transformers).
    dtype: "float32" or "bfloat16" for the weights.
    step: training step to export (training workdirs only).
    tokenizer: "bytes", a SentencePiece .model, a tokenizer.json (or a folder with one), or
      "none"; default: the one the run was trained with (or that an import stored).
    max_shard_bytes: size bound of one safetensors shard.

  Returns:
    A summary: out, layout, dtype, tensors, bytes, shards, tokenizer, seconds, peak_rss_mb.
  """
  start = time.time()
  if dtype not in DTYPES:
    raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
  out_dtype = DTYPES[dtype]
  source = orbax_io.ParamSource(checkpoint, step=step)
  cfg = ModelConfig.from_dict(source.model_config)
  _check_exportable(cfg, layout)
  specs = param_specs(cfg)
  for path, (shape, _) in specs.items():
    if path not in source.paths:
      raise ConversionError(f"parameter {'.'.join(path)} is missing from {source.directory}")
    if source.shape(path) != shape:
      raise ConversionError(f"parameter {'.'.join(path)} has shape {source.shape(path)} in "
                            f"{source.directory}, but its model config implies {shape}")
  if tokenizer is None:
    tokenizer = resolve_tokenizer(source)
    if tokenizer is None:
      raise ConversionError(f"cannot tell which tokenizer {source.directory} uses; pass "
                            "--tokenizer=PATH (a .model or tokenizer.json), or --tokenizer=none "
                            "to export the weights without one")
  groups = tensor_groups(cfg, layout)
  out, tmp = _prepare_out(out)
  try:
    token_info = None
    if tokenizer != "none":
      token_info = tokenizer_hf.write_tokenizer(tokenizer, tmp, model_max_length=cfg.max_seq_len,
                                                check_texts=_validation_texts(source))
      token_ids = {k: token_info[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:
      token_ids = _stored_token_ids(source.directory)
    plan = [(n, s, out_dtype) for g in groups for n, s in zip(g.names, g.shapes)]
    writer = safetensors_io.ShardedWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
    for g in groups:
      x = source.read(g.path, g.layer) if g.path is not None else None
      for name, tensor in zip(g.names, g.to_hf(x)):
        writer.write(name, np.asarray(tensor).astype(out_dtype))
      del x
    writer.close()
    source.close()
    config = hf_config(cfg, layout, dtype=dtype, token_ids=token_ids)
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", {
        "_from_model_config": True, **token_ids})
    _write_json(tmp / EMO_JAX_CONFIG, cfg.to_dict())
    if layout == "emo":
      for name in REMOTE_CODE:
        shutil.copyfile(pathlib.Path(__file__).parent / "remote_code" / name, tmp / name)
    _commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shards = len({f for f in json.loads((out / safetensors_io.INDEX_FILE).read_text())
                ["weight_map"].values()})
  return {"out": str(out), "layout": layout, "dtype": dtype, "step": source.step,
          "tensors": len(plan), "bytes": writer.total_bytes, "shards": shards,
          "tokenizer": token_info, "seconds": round(time.time() - start, 2),
          "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _stored_token_ids(directory: pathlib.Path) -> dict[str, int | None]:
  try:
    config = json.loads((directory / HF_CONFIG_COPY).read_text())
  except (OSError, ValueError):
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _write_json(path: pathlib.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2) + "\n")


# ---- import ------------------------------------------------------------------------------------
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(hf_dir: str | os.PathLike,
                   overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, str, bool]:
  """(ModelConfig, layout, fused_experts) of a Hugging Face checkpoint folder, headers only."""
  hf_dir = pathlib.Path(hf_dir)
  try:
    config = json.loads((hf_dir / "config.json").read_text())
  except OSError as e:
    raise ConversionError(f"{hf_dir} has no readable config.json ({e})") from e
  reader = safetensors_io.ShardedReader(hf_dir)
  return _config_for(config, reader, hf_dir, overrides)


def _config_for(config, reader, hf_dir, overrides):
  rows = reader.shape("model.embed_tokens.weight")[0] if (
      "model.embed_tokens.weight" in reader) else None
  fused = "model.layers.0.mlp.experts.gate_up_proj" in reader
  base = None
  if (hf_dir / EMO_JAX_CONFIG).is_file():
    base = json.loads((hf_dir / EMO_JAX_CONFIG).read_text())
  cfg, layout = model_config_from_hf(config, vocab_rows=rows, base=base, overrides=overrides)
  return cfg, layout, fused


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *,
              overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes a parameter checkpoint (for `train.init_from` and evaluation) from a HF checkpoint.

  Args:
    hf_dir: a folder with config.json and safetensors weights in the emo layout, the qwen2_moe
      layout written by `export_hf`, or OLMoE.
    out: the folder to create (`params/`, `model_config.json`, and `tokenizer/` + a copy of the
      source config.json when present); written completely or not at all.
    overrides: ModelConfig fields to set on the imported config, e.g. {"pool": False}.

  Returns:
    A summary: out, layout, model_type, config, tensors, seconds, peak_rss_mb.
  """
  start = time.time()
  hf_dir = pathlib.Path(hf_dir)
  try:
    config = json.loads((hf_dir / "config.json").read_text())
  except OSError as e:
    raise ConversionError(f"{hf_dir} has no readable config.json ({e})") from e
  reader = safetensors_io.ShardedReader(hf_dir)
  cfg, layout, fused = _config_for(config, reader, hf_dir, overrides)
  groups = tensor_groups(cfg, layout, fused_experts=fused)
  used = set()
  for g in groups:  # every shape is checked before anything is written
    for name, shape in zip(g.names, g.shapes):
      if name not in reader:
        raise safetensors_io.SafetensorsError(
            f"tensor {name!r} is missing from the checkpoint in {hf_dir} (config.json: "
            f"model_type={config.get('model_type')}, {cfg.num_layers} layers, "
            f"{cfg.num_experts} experts)")
      if reader.shape(name) != shape:
        raise ConversionError(f"tensor {name!r} has shape {reader.shape(name)}, but config.json "
                              f"implies {shape}")
      used.add(name)
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unused = sorted(n for n in reader.keys() if n not in used and n not in ignorable
                  and not n.endswith(IGNORED_SUFFIXES))
  if unused:
    raise ConversionError(f"config.json disagrees with the weights: {len(unused)} tensors are not "
                          f"part of the model it describes, e.g. {unused[:4]} (config: "
                          f"{cfg.num_layers} layers, {cfg.num_experts} experts)")
  specs = param_specs(cfg)
  out, tmp = _prepare_out(out)
  try:
    writer = orbax_io.ParamWriter(tmp, specs)
    for g in groups:
      value = g.from_hf([reader.get(n) for n in g.names])
      if g.path is not None:
        writer.write(g.path, value, g.layer)
      del value
    writer.close(cfg.to_dict())
    shutil.copyfile(hf_dir / "config.json", tmp / HF_CONFIG_COPY)
    if (hf_dir / "tokenizer.json").is_file():
      (tmp / TOKENIZER_DIR).mkdir()
      for name in tokenizer_hf.TOKENIZER_FILES:
        if (hf_dir / name).is_file():
          shutil.copyfile(hf_dir / name, tmp / TOKENIZER_DIR / name)
    _commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"out": str(out), "layout": layout, "model_type": config.get("model_type"),
          "fused_experts": fused, "tensors": len(used), "config": cfg.to_dict(),
          "tokenizer": str(out / TOKENIZER_DIR) if (out / TOKENIZER_DIR).is_dir() else None,
          "seconds": round(time.time() - start, 2), "peak_rss_mb": round(_peak_rss_mb(), 1)}


# ---- in memory (tests, notebooks, small models) -------------------------------------------------
def to_hf_tensors(params: Mapping[str, Any], cfg: ModelConfig, layout: str,
                  dtype: str = "float32") -> dict[str, np.ndarray]:
  """The Hugging Face tensors of a nested parameter dict (`nnx.to_pure_dict` form)."""
  out = {}
  for g in tensor_groups(cfg, layout):
    x = None
    if g.path is not None:
      x = _lookup(params, g.path)
      x = np.asarray(x if g.layer is None else x[g.layer], np.float32)
    for name, tensor in zip(g.names, g.to_hf(x)):
      out[name] = np.asarray(tensor).astype(DTYPES[dtype])
  return out


def from_hf_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, layout: str, *,
                    fused_experts: bool = False) -> dict[str, Any]:
  """A nested parameter dict from Hugging Face tensors (inverse of `to_hf_tensors`)."""
  specs = param_specs(cfg)
  params: dict[Path, np.ndarray] = {p: np.zeros(s, d) for p, (s, d) in specs.items()}
  for g in tensor_groups(cfg, layout, fused_experts=fused_experts):
    value = g.from_hf([np.asarray(tensors[n]) for n in g.names])
    if g.path is not None:
      target = params[g.path]
      if g.layer is None:
        params[g.path] = value.astype(target.dtype)
      else:
        target[g.layer] = value
  nested: dict[str, Any] = {}
  for path, value in params.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested


def _lookup(tree: Mapping[str, Any], path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree
