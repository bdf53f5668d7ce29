"""One layout object per Hugging Face model family, registered once in `LAYOUTS`.

A layout owns everything that differs between families: its config.json both ways
(`to_hf_config`, `from_hf_config`), its tensor table (`tensor_groups`), what it cannot express
(`check_exportable`), its norm names, whether its MoE models route within a document pool, and
the remote code an export ships. Supporting another family is one `Layout` subclass added to
`LAYOUTS`; the converter, the command line's --layout choices and the error messages read the
registry. The families (docs/algorithm.md, "Hugging Face layouts"):

* `emo`: the release's `EmoForCausalLM` names and config keys, with trust_remote_code files.
* `qwen2_moe`: transformers' built-in `Qwen2MoeForCausalLM`, expressing EMO inference exactly.
* `olmoe` (import only): OLMoE, with QK-norm and no shared expert.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from emo_jax.config import ModelConfig
from emo_jax.convert import tensors
from emo_jax.convert.configs import (ConversionError, common_hf_keys, common_model_fields,
                                     finish_model_config, get, require)
from emo_jax.convert.tensors import Group, Row, f32


class Layout:
  """A Hugging Face model family; subclasses set the attributes and the family's own keys."""
  name: str = ""
  # One line for --layout's help.
  summary: str = ""
  # config.json model_type values that import as this layout.
  model_types: tuple[str, ...] = ()
  exportable: bool = True
  # Files of remote_code/ copied beside an export (trust_remote_code).
  remote_code: tuple[str, ...] = ()
  # HF names of the norm before attention and the norm before the MLP.
  norm_names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
  # RoPE base when config.json names none.
  default_rope_theta: float = 10_000.0
  # Whether an imported MoE routes within a document pool (EMO) or over all experts (StdMoE).
  document_pool: bool = True

  def __repr__(self) -> str:
    return f"{type(self).__name__}()"

  # ---- config.json ----
  def check_exportable(self, cfg: ModelConfig) -> None:
    """Raises ConversionError when `cfg` cannot be written in this layout."""
    if not self.exportable:
      raise ConversionError(f"the {self.name} layout is import only; export with --layout set "
                            f"to one of {', '.join(EXPORT_LAYOUTS)}")

  def to_hf_config(self, cfg: ModelConfig, *, dtype: str = "float32",
                   token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """config.json of `cfg` in this layout, with `dtype` weights and the tokenizer's ids."""
    self.check_exportable(cfg)
    return self.family_config(cfg, common_hf_keys(cfg, dtype=dtype, token_ids=token_ids))

  def family_config(self, cfg: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    """The whole config.json, given the keys every family writes alike (`common`)."""
    raise NotImplementedError(f"the {self.name} layout writes no config.json")

  def from_hf_config(self, config: Mapping[str, Any], *, vocab_rows: int | None = None,
                     base: Mapping[str, Any] | None = None,
                     overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of a config.json of this family (see `model_config_from_hf`)."""
    values = common_model_fields(config, vocab_rows=vocab_rows,
                                 default_rope_theta=self.default_rope_theta)
    values.update(self.family_fields(config, values))
    return finish_model_config(values, document_pool=self.document_pool, base=base,
                               overrides=overrides)

  def family_fields(self, config: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """The family's ModelConfig fields (experts, QK-norm), given the common ones (`values`)."""
    raise NotImplementedError(f"the {self.name} layout reads no config.json")

  # ---- tensors ----
  def tensor_groups(self, cfg: ModelConfig, *, fused_experts: bool = False) -> list[Group]:
    """The Hugging Face tensors of a model, grouped by the parameter they come from.

    `fused_experts`: experts stored as transformers 5 fused tensors (import only).
    """
    rows = tensors.attention_rows(cfg, self.norm_names)
    rows += self.moe_rows(cfg, fused_experts) if cfg.is_moe else tensors.dense_mlp_rows(cfg)
    return tensors.table(cfg, rows) + self.constant_groups(cfg)

  def moe_rows(self, cfg: ModelConfig, fused_experts: bool) -> list[Row]:
    """Router and experts: a router row for every expert, every expert under its own index."""
    D, E, X = cfg.d_model, cfg.num_experts, cfg.expert_hidden
    experts = (tensors.fused_expert_rows(D, E, X, shared=None) if fused_experts
               else tensors.expert_rows(D, E, X))
    return [tensors.full_router_row(D, E), *experts]

  def constant_groups(self, cfg: ModelConfig) -> list[Group]:
    """Tensors the family has and emo_jax holds fixed (written after the parameters)."""
    return []


class EmoLayout(Layout):
  """The release's `EmoForCausalLM`: per-expert `gate/up/down_proj`, the router as
  `mlp.gate.weight` with a row for every expert (the shared experts' rows unused)."""
  name = "emo"
  summary = "the release's EmoForCausalLM names + trust_remote_code files"
  # The release's model_type and the names its history used (the reference's migration script
  # renames flex_olmo_noqknorm_prenorm -> emo_noqknorm_prenorm).
  model_types = ("emo", "emo_noqknorm_prenorm", "flex_olmo_noqknorm_prenorm")
  remote_code = ("configuration_emo.py", "modeling_emo.py")
  norm_names = ("pre_attention_layernorm", "pre_feedforward_layernorm")
  default_rope_theta = 500_000.0
  # Keys of the reference's experimental code paths, with the value that means "off".
  off_keys = {"always_active_experts": None, "always_active_experts_per_layer": None,
              "ghost_extend_eval": False, "dense_mlp_bias": False}

  def family_config(self, cfg, common):
    S = cfg.num_shared_experts if cfg.is_moe else 0
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

  def family_fields(self, config, values):
    require(config, "attention_bias", (None, False), "emo_jax attention has no biases")
    for key, off in self.off_keys.items():
      if config.get(key, off) not in (off, None, False, []):
        raise ConversionError(f"config.json has {key}={config[key]!r}, a reference-only "
                              "experiment that emo_jax does not implement")
    E = get(config, "num_experts")
    per_layer = config.get("num_experts_per_layer")
    if per_layer:
      if len(set(per_layer)) != 1:
        raise ConversionError(f"config.json has num_experts_per_layer={per_layer}: a different "
                              "expert count per layer (variable pruning) cannot be represented "
                              "by one ModelConfig")
      E = per_layer[0]
    S = min(get(config, "num_shared_experts", 0), E)
    if config.get("num_shared_experts_per_layer") and len(
        set(config["num_shared_experts_per_layer"])) != 1:
      raise ConversionError("config.json has a different num_shared_experts_per_layer per layer")
    if E:
      require(config, "norm_topk_prob", (None, False),
              "EMO does not renormalise the top-k weights; emo_jax cannot represent that")
      fields = dict(num_experts=E, num_shared_experts=S,
                    top_k=get(config, "num_experts_per_tok") - S,
                    expert_hidden=get(config, "intermediate_size"))
    else:
      fields = dict(num_experts=0, mlp_hidden=get(config, "dense_intermediate_size",
                                                   get(config, "intermediate_size")))
    return {**fields, "qk_norm": bool(config.get("qk_norm", False))}


# Every weight of the exported shared_expert_gate. llama.cpp's qwen2moe graph computes the gate
# as silu(z) / z (0 / 0 = NaN at z = 0); 2^-24 (a float16 subnormal, so it survives every output
# dtype) keeps z = 2^-24 * sum(x) far below float32's resolution around 1/2 for hidden states of
# ordinary size: sigmoid(z) is 1/2 up to a few ulp, as with the gate of exactly 0 before.
SHARED_GATE = 2.0 ** -24


class Qwen2MoeLayout(Layout):
  """transformers' `Qwen2MoeForCausalLM` (native in vLLM and llama.cpp), no remote code.

  The router covers the routed experts only; the shared expert(s) become Qwen's single shared
  expert (several are concatenated along the hidden axis, since SwiGLU sums over hidden units)
  whose sigmoid gate has every weight SHARED_GATE (2^-24), so it is scaled by sigmoid(z) with
  |z| = |2^-24 * sum(x)|, which is 1/2 to float32 rounding (off by a few ulp at most), undone
  by a down_proj scaled by 2; q/k/v biases are zero. Both factors are powers of two, so the
  weights reverse bit for bit. The gate is not exactly 0 because llama.cpp evaluates the
  shared-expert gate as silu(z) / z, which is NaN at z = 0 (experiments/llama_cpp_check.py);
  an export whose gate is all zeros (written before) still imports. No QK-norm, and a MoE
  needs a shared expert.
  """
  name = "qwen2_moe"
  summary = "transformers' built-in Qwen2MoeForCausalLM (no remote code)"
  model_types = ("qwen2_moe",)
  constant_why = ("emo_jax has no attention biases and adds shared experts with a fixed weight, "
                  "so a Qwen2-MoE model with learned biases or a learned shared_expert_gate "
                  "cannot be imported")

  def check_exportable(self, cfg):
    super().check_exportable(cfg)
    if cfg.qk_norm:
      raise ConversionError("Qwen2MoeForCausalLM has no QK-norm, so a qk_norm=True model cannot "
                            "be written as qwen2_moe; use --layout=emo")
    if cfg.is_moe and cfg.num_shared_experts == 0:
      raise ConversionError("the qwen2_moe layout needs a shared expert (num_shared_experts >= 1) "
                            "and this model has none; use --layout=emo")

  def family_config(self, cfg, common):
    S = cfg.num_shared_experts if cfg.is_moe else 0
    moe = {"num_experts": cfg.num_routed_experts, "num_experts_per_tok": cfg.top_k,
           "moe_intermediate_size": cfg.expert_hidden,
           "shared_expert_intermediate_size": S * cfg.expert_hidden,
           "intermediate_size": cfg.expert_hidden} if cfg.is_moe else {
               "num_experts": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 1,
               "shared_expert_intermediate_size": 0, "intermediate_size": cfg.mlp_hidden}
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **common,
            **moe, "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "qkv_bias": True, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.num_layers, "router_aux_loss_coef": 0.001,
            "output_router_logits": False}

  def family_fields(self, config, values):
    require(config, "norm_topk_prob", (None, False), "EMO does not renormalise the top-k weights")
    require(config, "use_sliding_window", (None, False), "emo_jax attention is full causal")
    require(config, "decoder_sparse_step", (None, 1), "every layer must be a MoE layer")
    if config.get("mlp_only_layers"):
      raise ConversionError(f"config.json has mlp_only_layers={config['mlp_only_layers']}: "
                            "mixed dense / MoE layers are not supported")
    R = get(config, "num_experts")
    if not R:
      return dict(num_experts=0, mlp_hidden=get(config, "intermediate_size"))
    X = get(config, "moe_intermediate_size")
    shared = get(config, "shared_expert_intermediate_size")
    if shared <= 0 or shared % X:
      raise ConversionError(f"config.json has shared_expert_intermediate_size={shared}, not a "
                            f"positive multiple of moe_intermediate_size={X}: the shared expert "
                            "cannot be split into emo_jax shared experts")
    return dict(num_experts=R + shared // X, num_shared_experts=shared // X,
                top_k=get(config, "num_experts_per_tok"), expert_hidden=X)

  def moe_rows(self, cfg, fused_experts):
    """Router rows of the routed experts, routed experts, one concatenated shared expert."""
    D, S, X = cfg.d_model, cfg.num_shared_experts, cfg.expert_hidden
    R = cfg.num_experts - S

    def router(p):
      def back(h):  # the shared experts' router columns are never used; they come back as 0
        return np.concatenate([f32(h).T, np.zeros((D, S), np.float32)], axis=1)
      return tensors.one(f"{p}.mlp.gate.weight", (R, D), lambda x: x[:, :R].T, back)

    rows = [(("blocks", "mlp", "router"), router)]
    if fused_experts:
      return rows + tensors.fused_expert_rows(D, R, X, shared=S)

    def gate_up(proj):
      def make(p):
        names = [f"{p}.mlp.experts.{j}.{proj}.weight" for j in range(R)]
        names.append(f"{p}.mlp.shared_expert.{proj}.weight")
        to = lambda x: iter([*(x[j].T for j in range(R)),  # noqa: E731
                             x[R:].transpose(0, 2, 1).reshape(S * X, D)])

        def back(get_tensor):
          out = np.empty((R + S, D, X), np.float32)
          for j in range(R):
            out[j] = get_tensor(j).T
          out[R:] = f32(get_tensor(R)).reshape(S, X, D).transpose(0, 2, 1)
          return out
        return names, [(X, D)] * R + [(S * X, D)], to, back
      return make

    def down(p):
      names = [f"{p}.mlp.experts.{j}.down_proj.weight" for j in range(R)]
      names.append(f"{p}.mlp.shared_expert.down_proj.weight")
      # x2 undoes the sigmoid(z) = 1/2 of the near-zero shared_expert_gate (SHARED_GATE).
      to = lambda x: iter([*(x[j].T for j in range(R)),  # noqa: E731
                           2 * x[R:].reshape(S * X, D).T])

      def back(get_tensor):
        out = np.empty((R + S, X, D), np.float32)
        for j in range(R):
          out[j] = get_tensor(j).T
        out[R:] = (f32(get_tensor(R)) / 2).T.reshape(S, X, D)
        return out
      return names, [(D, X)] * R + [(D, S * X)], to, back

    return rows + [(("blocks", "mlp", "w_gate"), gate_up("gate_proj")),
                   (("blocks", "mlp", "w_up"), gate_up("up_proj")),
                   (("blocks", "mlp", "w_down"), down)]

  def constant_groups(self, cfg):
    """Per layer: zero q/k/v biases and, in a MoE, the constant shared_expert_gate."""
    H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    groups = []
    for layer in range(cfg.num_layers):
      p = f"model.layers.{layer}"
      names = [f"{p}.self_attn.{n}_proj.bias" for n in "qkv"]
      shapes = [(H * K,), (G * K,), (G * K,)]
      groups.append(tensors.zeros_group(names, shapes, self.constant_why))
      if cfg.is_moe:  # exports before the gate was SHARED_GATE hold zeros: accepted too
        groups.append(tensors.constant_group(
            [f"{p}.mlp.shared_expert_gate.weight"], [(1, cfg.d_model)], SHARED_GATE,
            (SHARED_GATE, 0.0), self.constant_why))
    return groups


class OlmoeLayout(Layout):
  """AllenAI's OLMoE (import only): QK-norm over all heads, no shared expert, no pool."""
  name = "olmoe"
  summary = "AllenAI's OlmoeForCausalLM (import only)"
  model_types = ("olmoe",)
  exportable = False
  document_pool = False  # a standard MoE: every token may pick any expert

  def family_fields(self, config, values):
    require(config, "attention_bias", (None, False), "emo_jax attention has no biases")
    require(config, "norm_topk_prob", (None, False),
            "emo_jax does not renormalise the top-k weights")
    require(config, "clip_qkv", (None,), "emo_jax does not clip q/k/v")
    fields = dict(num_experts=get(config, "num_experts"), num_shared_experts=0,
                  top_k=get(config, "num_experts_per_tok"),
                  expert_hidden=get(config, "intermediate_size"), qk_norm=True)
    if values["head_dim"] * values["num_heads"] != values["d_model"]:
      raise ConversionError("OLMoE's q_norm spans hidden_size, so head_dim must be "
                            "hidden_size / num_attention_heads")
    return fields


LAYOUTS: dict[str, Layout] = {layout.name: layout
                              for layout in (EmoLayout(), Qwen2MoeLayout(), OlmoeLayout())}
EXPORT_LAYOUTS = tuple(name for name, layout in LAYOUTS.items() if layout.exportable)
MODEL_TYPES = {t: layout for layout in LAYOUTS.values() for t in layout.model_types}


def get_layout(layout: str | Layout) -> Layout:
  """The registered layout called `layout` (a Layout passes through)."""
  if isinstance(layout, Layout):
    return layout
  if layout not in LAYOUTS:
    raise ConversionError(f"unknown layout {layout!r}; the registered layouts are "
                          f"{', '.join(LAYOUTS)} (export: {', '.join(EXPORT_LAYOUTS)})")
  return LAYOUTS[layout]


def layout_of(config: Mapping[str, Any]) -> Layout:
  """The layout of a config.json, from its model_type."""
  model_type = config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConversionError(f"unknown model_type {model_type!r} in config.json; supported: "
                          f"{sorted(MODEL_TYPES)} (layouts: {', '.join(LAYOUTS)})")
  return MODEL_TYPES[model_type]


# ---- by layout name: what the converter and its callers use -------------------------------------
def check_exportable(cfg: ModelConfig, layout: str | Layout) -> None:
  """Raises ConversionError when `cfg` cannot be written in `layout`."""
  get_layout(layout).check_exportable(cfg)


def hf_config(cfg: ModelConfig, layout: str | Layout, *, dtype: str = "float32",
              token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
  """config.json of `cfg` in `layout` (the release's keys for "emo")."""
  return get_layout(layout).to_hf_config(cfg, dtype=dtype, token_ids=token_ids)


def model_config_from_hf(config: Mapping[str, Any], *, vocab_rows: int | None = None,
                         base: Mapping[str, Any] | None = None,
                         overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, str]:
  """(ModelConfig, layout name) of a Hugging Face config.json.

  Import accepts the release's configs (legacy top-level `rope_theta`, per-layer expert counts
  of pruned models when they are uniform), our qwen2_moe exports and OLMoE, and refuses, naming
  the key, anything emo_jax cannot compute exactly (renormalised top-k, RoPE scaling, attention
  biases, q/k/v clipping, the reference's experimental switches).

  Args:
    config: the config.json contents.
    vocab_rows: rows of the checkpoint's embedding, which win over config.vocab_size when they
      are dolma2's 100,278 / 100,352 (the release ships both).
    base: a ModelConfig dict (e.g. emo_jax_config.json of our own export) for the fields that
      Hugging Face configs do not carry (pool, losses, backends); architecture fields always
      come from `config`.
    overrides: ModelConfig fields to set last (e.g. {"pool": False}).
  """
  layout = layout_of(config)
  cfg = layout.from_hf_config(config, vocab_rows=vocab_rows, base=base, overrides=overrides)
  return cfg, layout.name


def tensor_groups(cfg: ModelConfig, layout: str | Layout, *,
                  fused_experts: bool = False) -> list[Group]:
  """The Hugging Face tensors of a model in `layout`, grouped by the parameter they come from.

  Args:
    cfg: the architecture.
    layout: a name in LAYOUTS ("emo", "qwen2_moe", "olmoe") or a Layout.
    fused_experts: experts stored as transformers 5 fused tensors (`mlp.experts.gate_up_proj`
      [E, 2X, D], `mlp.experts.down_proj` [E, D, X]); import only.
  """
  return get_layout(layout).tensor_groups(cfg, fused_experts=fused_experts)
