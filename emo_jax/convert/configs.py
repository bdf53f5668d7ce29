"""What every layout's config.json shares, both ways; the families' own keys are in layouts.py.

Export starts from the keys every family writes alike (sizes, RoPE, norms, token ids); import
reads the matching fields, refuses what no emo_jax model computes (non-SwiGLU activations,
RoPE scaling), and finishes the ModelConfig from the family's fields, the document pool choice,
a `base` ModelConfig dict for what Hugging Face configs do not carry, and overrides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from emo_jax.config import ConfigError, ModelConfig

# dolma2 (the release's tokenizer) has 100,278 ids; the release pads the embedding to 100,352.
DOLMA2_ROWS = (100_278, 100_352)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
POOL_FIELDS = ("pool", "pool_min", "pool_max")
_OUR_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


class ConversionError(ValueError):
  """The input cannot be converted; the message names the tensor or config key and the fix."""


def get(config: Mapping[str, Any], key: str, default: Any = KeyError) -> Any:
  """config[key], or `default` when it is absent or null; no default: a ConversionError."""
  if key in config and config[key] is not None:
    return config[key]
  if default is KeyError:
    raise ConversionError(f"config.json has no {key!r}, which a {config.get('model_type')} "
                          "model needs")
  return default


def require(config: Mapping[str, Any], key: str, allowed: tuple, why: str) -> None:
  """Refuses a config whose `key` is not one of `allowed` (absent reads as None)."""
  value = config.get(key)
  if value not in allowed:
    raise ConversionError(f"config.json has {key}={value!r}: {why}")


def common_hf_keys(cfg: ModelConfig, *, dtype: str,
                   token_ids: Mapping[str, int | None] | None) -> dict[str, Any]:
  """The config.json keys every layout writes the same way, in the order they are written."""
  ids = {key: None for key in TOKEN_ID_KEYS} | dict(token_ids or {})
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
  return common


def common_model_fields(config: Mapping[str, Any], *, vocab_rows: int | None,
                        default_rope_theta: float) -> dict[str, Any]:
  """ModelConfig fields every layout reads the same way (attention, norms, RoPE, vocabulary).

  `vocab_rows` (the embedding's rows) wins over config.vocab_size when both are dolma2's
  100,278 / 100,352: the release ships both.
  """
  D, H = get(config, "hidden_size"), get(config, "num_attention_heads")
  if get(config, "hidden_act", "silu") != "silu":
    raise ConversionError(f"config.json has hidden_act={config['hidden_act']!r}; emo_jax experts "
                          "are SwiGLU (silu)")
  rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ConversionError(f"config.json has RoPE scaling {rope!r}; only plain RoPE converts")
  theta = config.get("rope_theta") or rope.get("rope_theta") or default_rope_theta
  vocab = get(config, "vocab_size")
  if vocab_rows is not None and vocab_rows != vocab:
    if not (vocab_rows in DOLMA2_ROWS and vocab in DOLMA2_ROWS):
      raise ConversionError(f"config.json has vocab_size={vocab} but tensor "
                            f"'model.embed_tokens.weight' has {vocab_rows} rows")
    vocab = vocab_rows
  return dict(
      vocab_size=vocab, d_model=D, num_layers=get(config, "num_hidden_layers"), num_heads=H,
      num_kv_heads=get(config, "num_key_value_heads", H),
      head_dim=get(config, "head_dim", D // H), norm_eps=float(get(config, "rms_norm_eps")),
      rope_theta=float(theta), max_seq_len=get(config, "max_position_embeddings", 4096),
      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
      init_std=float(get(config, "initializer_range", 0.02)), qk_norm=False)


def finish_model_config(values: Mapping[str, Any], *, document_pool: bool,
                        base: Mapping[str, Any] | None,
                        overrides: Mapping[str, Any] | None) -> ModelConfig:
  """The ModelConfig of the fields read from config.json (`values`).

  A MoE gets the document pool when `document_pool` (EMO and StdMoE checkpoints cannot be told
  apart, so EMO is assumed); `base` (e.g. emo_jax_config.json of our own export) supplies the
  fields Hugging Face configs do not carry, including its pool choice; `overrides` come last.
  """
  values = dict(values)
  if values.get("num_experts", 0) > 0:
    routed = values["num_experts"] - values["num_shared_experts"]
    values.update(pool=document_pool, pool_max=values["num_experts"],
                  pool_min=max(values["top_k"], min(8, routed)))
  merged = {k: v for k, v in (base or {}).items() if k in _OUR_FIELDS}
  for key, value in values.items():
    if not (key in POOL_FIELDS and key in merged):
      merged[key] = value
  merged.update(overrides or {})
  try:
    return ModelConfig.from_dict(merged)
  except ConfigError as e:
    raise ConversionError(f"config.json describes a model emo_jax cannot build: {e}") from e
