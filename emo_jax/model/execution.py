"""ExecutionConfig: how a model runs, as opposed to what it is (config.ModelConfig).

The architecture is saved with every checkpoint and must match on restart; these settings are
per run and free to change between restarts, between training and inference, and between
machines: which expert kernel and transport, which attention kernel, what the backward pass
recomputes, how much room the capacity backend leaves. Every choice is declared once, next to
its implementation (experts.BACKENDS, experts.RAGGED_DOT_IMPLS, expert_parallel.TRANSPORTS,
attention.ATTENTION_IMPLS, remat.REMAT_POLICIES), and each "auto" is resolved by that
implementation's own resolve function. Results are the same whatever is chosen here, up to
rounding, except that the capacity backend drops what its capacity cannot hold (counted in
`dropped_fraction`).

Configs written before the split kept these fields inside the model config;
`split_model_fields` separates them when such a config is read back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from emo_jax.config import ConfigError, ConfigMixin, ModelConfig
from emo_jax.model import expert_parallel, experts
from emo_jax.model.attention import ATTENTION_IMPLS
from emo_jax.model.remat import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ExecutionConfig(ConfigMixin):
  """How the model is computed. Defaults suit training on any platform."""

  # The allowed values of each choice below are the tuple named in its comment (`FIELD_CHOICES`),
  # described one by one in docs/accelerators.md ("The choices").
  # Routed-expert kernel, one of experts.BACKENDS: the capacity backend drops what exceeds
  # `capacity_factor`, the others are dropless.
  expert_backend: str = "capacity"
  # Room per expert of the capacity backend, in multiples of a perfectly balanced load
  # (experts.expert_capacity). The dropless backends do not read it.
  capacity_factor: float = 1.25
  # Grouped-matmul kernel of the ragged backend, one of experts.RAGGED_DOT_IMPLS ("auto" is
  # resolved by experts.resolve_ragged_dot_impl).
  ragged_dot_impl: str = "auto"
  # How tokens reach the experts on other devices under expert parallelism, one of
  # expert_parallel.TRANSPORTS; each backend accepts only some (expert_parallel.check_transport,
  # "auto" resolved by expert_parallel.resolve_transport).
  expert_transport: str = "auto"
  # Attention kernel of attention.segment_attention, one of attention.ATTENTION_IMPLS ("auto"
  # resolved by attention.resolve_attention_impl).
  attention_impl: str = "xla"
  # Rematerialise each block in the backward pass (saves activation memory), keeping what
  # `remat_policy` names: one of remat.REMAT_POLICIES (remat.checkpoint_policy).
  remat: bool = True
  remat_policy: str = "full"
  # Run the decoder blocks as one `jax.lax.scan` (compiled once whatever the depth: the choice
  # for deep models and pods) or unrolled, one copy of the block per layer (longer compiles;
  # on CPU each step then skips the scan's stacked-residual buffers, which it must zero, fill
  # and slice every step: docs/accelerators.md).
  scan_layers: bool = True
  # The training loss's LM head: 0 forms the full [B, L, V] logits; N > 0 runs the head, the
  # cross-entropy and the output z-loss fused over chunks of at most N tokens, gradient computed
  # in the same pass, logits never formed (losses.fused_head_loss; about 256 suits CPU caches,
  # a few thousand an accelerator).
  head_chunk_tokens: int = 0
  # Decoding with a KV cache (Transformer.decode): a call of at most N tokens (a serving step,
  # one token per slot) runs the routed experts as a loop over the experts its tokens chose,
  # each read in place (decode_experts.chosen_experts_loop), instead of `expert_backend`'s
  # whole-bank kernel; 0 always uses `expert_backend`. Inference only (no gradient).
  decode_loop_tokens: int = 64

  def __post_init__(self):
    _validate(self)


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"ExecutionConfig.{field}={value!r} is invalid: {allowed}")


def _validate(c: ExecutionConfig) -> None:
  for field, choices in FIELD_CHOICES.items():
    value = getattr(c, field)
    if field != "expert_transport" and value not in choices:  # transports: check_transport
      hint = ("; remat=False alone also turns rematerialisation off"
              if field == "remat_policy" else "")
      _fail(field, value, f"allowed values are {list(choices)}{hint}")
  problem = expert_parallel.check_transport(c.expert_backend, c.expert_transport)
  if problem:
    raise ConfigError(f"ExecutionConfig.{problem}")
  if (isinstance(c.head_chunk_tokens, bool) or not isinstance(c.head_chunk_tokens, int)
      or c.head_chunk_tokens < 0):
    _fail("head_chunk_tokens", c.head_chunk_tokens,
          "must be an int >= 0 (0: full logits; e.g. 256 on CPU, 4096 on an accelerator)")
  if (isinstance(c.decode_loop_tokens, bool) or not isinstance(c.decode_loop_tokens, int)
      or c.decode_loop_tokens < 0):
    _fail("decode_loop_tokens", c.decode_loop_tokens,
          "must be an int >= 0 (0: decode with expert_backend; e.g. 64: serving steps and "
          "prefills of up to 64 tokens loop over the chosen experts)")
  if not isinstance(c.capacity_factor, (int, float)) or not c.capacity_factor > 0:
    _fail("capacity_factor", c.capacity_factor, "must be > 0")
  if c.expert_backend == "capacity" and c.capacity_factor < 1.0:
    _fail("capacity_factor", c.capacity_factor,
          f"below 1.0 the capacity backend drops at least {1 - c.capacity_factor:.0%} of a "
          "perfectly balanced load; use >= 1.0 (1.25 is usual) or the dropless "
          "expert_backend='ragged'")


# The fields that take one of a fixed set of values, and the tuple that owns each set (declared
# next to its implementation). docs/accelerators.md describes every value (tests/test_config.py
# checks that it lists exactly these).
FIELD_CHOICES = {
    "expert_backend": experts.BACKENDS,
    "ragged_dot_impl": experts.RAGGED_DOT_IMPLS,
    "expert_transport": expert_parallel.TRANSPORTS,
    "attention_impl": ATTENTION_IMPLS,
    "remat_policy": REMAT_POLICIES,
}
EXECUTION_FIELDS = frozenset(f.name for f in dataclasses.fields(ExecutionConfig))


def split_model_fields(values: Mapping[str, Any]) -> tuple[dict, dict]:
  """(architecture fields, execution fields) of a model config mapping.

  Model configs saved before the split also hold the execution fields; they come back as the
  second dict (a record of how that run was executed, never applied to the current one).
  """
  values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
  execution = {k: values.pop(k) for k in list(values) if k in EXECUTION_FIELDS}
  return values, execution


def saved_model_config(values: Mapping[str, Any]) -> ModelConfig:
  """The ModelConfig of a saved model config, whether written before the split or after."""
  return ModelConfig.from_dict(split_model_fields(values)[0])
