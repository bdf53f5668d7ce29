"""ModelConfig: the architecture of EMO, its baselines, and tiny test models.

One frozen dataclass describes what a checkpoint *is*, so that checkpoints, conversion and
analysis never have to guess which variant they hold. It is saved with every checkpoint and a
restart must match it field for field. How the model *runs* (kernels, transport, remat,
capacity) is execution.ExecutionConfig, free to change between runs.

* EMO:      ``num_experts=128, num_shared_experts=1, top_k=7, pool=True``
* StdMoE:   the same with ``pool=False``
* 32-expert MoE: ``num_experts=32`` (31 routed + 1 shared)
* dense:    ``num_experts=0`` (a plain SwiGLU MLP of width ``mlp_hidden``)
* imported checkpoints, e.g. OLMoE: ``num_shared_experts=0, top_k=8, qk_norm=True``

``__post_init__`` validates the combination and every error names the field, the value it
got, what is allowed and how to fix it, because a wrong config usually surfaces only
after a long compile otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, Mapping

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """A config field has a value that cannot work; the message names the field."""


class ConfigMixin:
  """Dict round trips shared by the frozen config dataclasses (model, data, train)."""

  def replace(self, **changes: Any):
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]):
    """Builds a config from a mapping (an ml_collections ConfigDict or saved JSON).

    Unknown keys are an error rather than silently dropped, so a typo such as `topk`
    does not quietly fall back to a default.
    """
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      close = difflib.get_close_matches(unknown[0], known, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}{hint}; known fields are "
                        f"{sorted(known)}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigMixin):
  """Architecture of one model. Defaults are the released EMO 1b14b (docs/algorithm.md)."""

  # Vocabulary: dolma2 has 100,278 tokens; the embedding is padded to 100,352 rows.
  vocab_size: int = 100_352
  d_model: int = 2048
  num_layers: int = 16
  num_heads: int = 16
  # Key/value heads (GQA when smaller than num_heads). The release has no GQA.
  num_kv_heads: int = 16
  head_dim: int = 128

  # Experts: a bank of `num_experts` SwiGLU experts; the last `num_shared_experts` of the bank
  # are shared (every token, weight 1.0); the others are routed (softmax, top_k).
  # num_experts=0 makes a dense model whose MLP has width `mlp_hidden`.
  num_experts: int = 128
  num_shared_experts: int = 1
  top_k: int = 7
  expert_hidden: int = 1024
  mlp_hidden: int = 8192

  # Document pool (training only): each document of each layer draws P uniformly from
  # [pool_min, pool_max] and may route only into its P highest-scoring routed experts.
  pool: bool = True
  pool_min: int = 8
  pool_max: int = 128
  # Pool used outside training: None = no pool (the released inference), or a fixed size
  # (the reference's in-loop evaluation uses 32).
  eval_pool_size: int | None = None
  # Static bound on documents (segments) per packed row; segment ids run 1..max_segments and
  # 0 marks padding. The packer must respect it.
  max_segments: int = 64

  # Attention confined to each document of a packed row (True, the EMO launch scripts'
  # generate_doc_lengths=true) or causal over the whole row (False, the release's StdMoE and
  # dense scripts). Padding is never attended either way; the document pool reads the segment
  # ids regardless.
  document_attention: bool = True

  norm_eps: float = 1e-6
  rope_theta: float = 500_000.0
  max_seq_len: int = 4096
  # OLMoE-style QK-norm: RMSNorm over the whole projected query / key vector.
  qk_norm: bool = False
  tie_embeddings: bool = False
  init_std: float = 0.02

  # Parameters are stored in `param_dtype` (float32 master weights) and cast to
  # `compute_dtype` for matmuls. The router, the norms, RoPE and the logits stay float32.
  # The numerics are part of what a model is: its evaluations and its conversion to Hugging
  # Face are made in them.
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"

  # Auxiliary losses (each per-layer loss is averaged over layers before weighting).
  lb_loss_weight: float = 0.1
  # Load-balancing scope in training: 0 balances over the whole batch (the micro-batch under
  # gradient accumulation); S > 0 balances each group of S consecutive sequences on its own
  # (expert counts summed over the group) and averages the loss over groups, as the release,
  # whose counts are summed over one micro-batch of every data-parallel rank (4 sequences x
  # 128 GPUs = 512 in the 1T runs, 256 for the 130B EMO run).
  lb_scope_sequences: int = 0
  router_z_loss_weight: float = 0.001
  output_z_loss_weight: float = 1e-5

  def __post_init__(self):
    _validate(self)

  # ---- derived quantities -------------------------------------------------------------
  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def num_routed_experts(self) -> int:
    return self.num_experts - self.num_shared_experts

  @property
  def param_jnp_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def compute_jnp_dtype(self):
    return DTYPES[self.compute_dtype]


def _fail(field: str, value: Any, allowed: str, fix: str = "") -> None:
  message = f"ModelConfig.{field}={value!r} is invalid: {allowed}"
  if fix:
    message += f"; {fix}"
  raise ConfigError(message)


def _validate(c: ModelConfig) -> None:
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "max_seq_len", "max_segments"):
    value = getattr(c, name)
    if not isinstance(value, int) or value < 1:
      _fail(name, value, "must be a positive integer")
  if c.max_segments < 2:
    _fail("max_segments", c.max_segments,
          "a row closes once it holds max_segments documents, so 1 packs one document per row "
          "and pads the rest", "use >= 2 (the release packs up to 64)")
  if c.num_heads % c.num_kv_heads:
    _fail("num_kv_heads", c.num_kv_heads,
          f"must divide num_heads={c.num_heads} (each key/value head serves a group of "
          "query heads)")
  if c.param_dtype not in DTYPES:
    _fail("param_dtype", c.param_dtype, f"allowed values are {sorted(DTYPES)}")
  if c.compute_dtype not in DTYPES:
    _fail("compute_dtype", c.compute_dtype, f"allowed values are {sorted(DTYPES)}")
  if not isinstance(c.document_attention, bool):
    _fail("document_attention", c.document_attention, "must be True or False")
  if not c.norm_eps > 0:
    _fail("norm_eps", c.norm_eps, "must be > 0")
  if not c.rope_theta > 0:
    _fail("rope_theta", c.rope_theta, "must be > 0")
  if c.head_dim % 2:
    _fail("head_dim", c.head_dim, "must be even (RoPE rotates pairs of dimensions)")
  if not c.init_std > 0:
    _fail("init_std", c.init_std, "must be > 0")
  if (not isinstance(c.lb_scope_sequences, int) or isinstance(c.lb_scope_sequences, bool)
      or c.lb_scope_sequences < 0):
    _fail("lb_scope_sequences", c.lb_scope_sequences,
          "must be an integer >= 0 (0 balances over the whole batch)")
  for name in ("lb_loss_weight", "router_z_loss_weight", "output_z_loss_weight"):
    if getattr(c, name) < 0:
      _fail(name, getattr(c, name), "must be >= 0")

  if c.num_experts < 0:
    _fail("num_experts", c.num_experts, "must be >= 0 (0 means a dense MLP)")
  if c.num_experts == 0:
    if c.mlp_hidden < 1:
      _fail("mlp_hidden", c.mlp_hidden, "a dense model (num_experts=0) needs mlp_hidden >= 1")
    return

  if c.expert_hidden < 1:
    _fail("expert_hidden", c.expert_hidden, "must be a positive integer")
  if not 0 <= c.num_shared_experts < c.num_experts:
    _fail("num_shared_experts", c.num_shared_experts,
          f"must be in [0, num_experts-1] = [0, {c.num_experts - 1}] so that at least one "
          "expert is routed")
  routed = c.num_routed_experts
  if not 1 <= c.top_k <= routed:
    _fail("top_k", c.top_k,
          f"must be in [1, {routed}] (the number of routed experts = num_experts - "
          "num_shared_experts)")
  if c.pool:
    if c.pool_min < c.top_k:
      _fail("pool_min", c.pool_min,
            f"must be >= top_k={c.top_k}, otherwise top-k would pick experts outside the pool",
            "the release uses pool_min=8 with top_k=7")
    if c.pool_max < c.pool_min:
      _fail("pool_max", c.pool_max, f"must be >= pool_min={c.pool_min}")
  if c.eval_pool_size is not None and not c.top_k <= c.eval_pool_size:
    _fail("eval_pool_size", c.eval_pool_size,
          f"must be None (no pool) or >= top_k={c.top_k}")
