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

from emo_jax.model import expert_parallel, experts
from emo_jax.model.attention import ATTENTION_IMPLS
from emo_jax.config import ConfigError, ConfigMixin, ModelConfig
from emo_jax.model.remat import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ExecutionConfig(ConfigMixin):
  """How the model is computed. Defaults suit training on any platform."""

  # Routed-expert kernel (experts.py): "capacity" (padded per-expert buffers, drops past
  # `capacity_factor`), "ragged" (sort + grouped matmul, dropless) or "dense" (reference).
  expert_backend: str = "capacity"
  # Room per expert of the capacity backend, in multiples of a perfectly balanced load
  # (experts.expert_capacity). The dropless backends do not read it.
  capacity_factor: float = 1.25
  # Grouped-matmul kernel of the ragged backend: "auto" (tokamax on GPU/TPU when installed,
  # megablox on TPU, XLA elsewhere), "xla", "tokamax" or "megablox" (experts.grouped_matmul).
  ragged_dot_impl: str = "auto"
  # How tokens reach the experts on other devices under expert parallelism
  # (expert_parallel.py): "auto", "all_to_all" (capacity), "ragged_all_to_all" (ragged,
  # GPU/TPU) or "all_gather" (ragged, every platform).
  expert_transport: str = "auto"
  # Attention kernel (attention.segment_attention): "xla" (the reference, every platform),
  # "jax_xla", "cudnn" (Hopper GPU, bf16/fp16), "splash" (TPU) or "auto".
  attention_impl: str = "xla"
  # Rematerialise each block in the backward pass (saves activation memory), keeping what
  # `remat_policy` names (remat.checkpoint_policy).
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

  def __post_init__(self):
    _validate(self)


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"ExecutionConfig.{field}={value!r} is invalid: {allowed}")


def _validate(c: ExecutionConfig) -> None:
  if c.expert_backend not in experts.BACKENDS:
    _fail("expert_backend", c.expert_backend, f"allowed values are {list(experts.BACKENDS)}")
  if c.ragged_dot_impl not in experts.RAGGED_DOT_IMPLS:
    _fail("ragged_dot_impl", c.ragged_dot_impl,
          f"allowed values are {list(experts.RAGGED_DOT_IMPLS)}")
  problem = expert_parallel.check_transport(c.expert_backend, c.expert_transport)
  if problem:
    raise ConfigError(f"ExecutionConfig.{problem}")
  if c.attention_impl not in ATTENTION_IMPLS:
    _fail("attention_impl", c.attention_impl, f"allowed values are {list(ATTENTION_IMPLS)}")
  if c.remat_policy not in REMAT_POLICIES:
    _fail("remat_policy", c.remat_policy,
          f"allowed values are {list(REMAT_POLICIES)}; remat=False alone also turns "
          "rematerialisation off")
  if (isinstance(c.head_chunk_tokens, bool) or not isinstance(c.head_chunk_tokens, int)
      or c.head_chunk_tokens < 0):
    _fail("head_chunk_tokens", c.head_chunk_tokens,
          "must be an int >= 0 (0: full logits; e.g. 256 on CPU, 4096 on an accelerator)")
  if not isinstance(c.capacity_factor, (int, float)) or not c.capacity_factor > 0:
    _fail("capacity_factor", c.capacity_factor, "must be > 0")
  if c.expert_backend == "capacity" and c.capacity_factor < 1.0:
    _fail("capacity_factor", c.capacity_factor,
          f"below 1.0 the capacity backend drops at least {1 - c.capacity_factor:.0%} of a "
          "perfectly balanced load; use >= 1.0 (1.25 is usual) or the dropless "
          "expert_backend='ragged'")


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


def run_configs(config: Any) -> tuple[ModelConfig, ExecutionConfig]:
  """(ModelConfig, ExecutionConfig) of an experiment config (`.model`, optional `.execution`).

  An execution field inside `.model` (a config file written before the split) is refused with
  where it belongs now, rather than being silently used or dropped.
  """
  model, misplaced = split_model_fields(config.model)
  if misplaced:
    names = sorted(misplaced)
    raise ConfigError(f"model.{names[0]} is a run setting, not architecture: set it as "
                      f"execution.{names[0]} (e.g. --config.execution.{names[0]}=...); "
                      f"misplaced: {['model.' + n for n in names]}")
  execution = config.get("execution", None) if hasattr(config, "get") else None
  return ModelConfig.from_dict(model), ExecutionConfig.from_dict(execution or {})
