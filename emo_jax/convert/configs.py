"""Hugging Face config.json <-> ModelConfig, for the emo, qwen2_moe and OLMoE layouts.

Export writes the release's keys for `emo` (docs/algorithm.md) and what transformers' Qwen2MoeConfig
reads for `qwen2_moe`; import accepts the release's configs (legacy top-level `rope_theta`,
per-layer expert counts of pruned models when they are uniform), our qwen2_moe exports and
OLMoE, and refuses, naming the key, anything emo_jax cannot compute exactly (renormalised
top-k, RoPE scaling, attention biases, q/k/v clipping, the reference's experimental switches).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from emo_jax.config import ConfigError, ModelConfig
from emo_jax.convert.layouts import ConversionError

LAYOUTS = ("emo", "qwen2_moe")
# model_type values of the emo layout: the release's, and names its history used (the
# reference's migration script renames flex_olmo_noqknorm_prenorm -> emo_noqknorm_prenorm).
EMO_MODEL_TYPES = ("emo", "emo_noqknorm_prenorm", "flex_olmo_noqknorm_prenorm")
MODEL_TYPES = {**{t: "emo" for t in EMO_MODEL_TYPES}, "qwen2_moe": "qwen2_moe", "olmoe": "olmoe"}
# dolma2 (the release's tokenizer) has 100,278 ids; the release pads the embedding to 100,352.
DOLMA2_ROWS = (100_278, 100_352)
# Keys of the reference's experimental code paths, with the value that means "off".
EMO_OFF_KEYS = {"always_active_experts": None, "always_active_experts_per_layer": None,
                "ghost_extend_eval": False, "dense_mlp_bias": False}


def hf_config(cfg: ModelConfig, layout: str, *, dtype: str = "float32",
              token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
  """config.json of `cfg` in `layout` (the release's keys for "emo")."""
  check_exportable(cfg, layout)
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


def check_exportable(cfg: ModelConfig, layout: str) -> None:
  """Raises ConversionError when `cfg` cannot be written in `layout`."""
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


