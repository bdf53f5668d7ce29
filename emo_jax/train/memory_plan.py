"""Per-device memory of a training run on a mesh, computed from shapes only.

Before asking for 64 chips one wants to know whether the model, its AdamW state, its gradients
and the activations of one micro-batch fit each chip. Parameter, gradient and optimizer bytes
come exactly from the abstract train state (`jax.eval_shape`) and the sharding rules of
sharding.py over an abstract mesh (no device is needed). Activation bytes are an estimate for the
scanned, rematerialised model: the residual stream saved at every layer boundary, the working set
of the one layer being recomputed (attention probabilities, the MoE dispatch buffers, the MLP
hidden units) and the float32 logits of the loss. It assumes `remat_policy="full"` and the
"xla" attention: the flash kernels ("cudnn", "splash") hold no [L, L] probabilities, and the
saving policies ("dots", "save_attention_and_moe_input", ...) keep more of every layer.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from emo_jax.model import sharding
from emo_jax.config import ModelConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.transformer import Transformer

GiB = 1024**3
# Accelerator memory per chip, bytes.
CHIPS = {
    "tpu-v4": 32 * GiB,
    "tpu-v5e": 16 * GiB,
    "tpu-v5p": 95 * GiB,
    "tpu-v6e": 32 * GiB,
    "h100-80gb": 80 * 10**9,
    "h200": 141 * 10**9,
}


def _sharded_bytes(shape, dtype, spec, axis_sizes: Mapping[str, int]) -> float:
  size = math.prod(shape) * np.dtype(dtype).itemsize
  for entry in spec:
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None:
        size /= axis_sizes[axis]
  return size


def plan(cfg: ModelConfig, axis_sizes: Mapping[str, int], *, micro_batch: int, seq_len: int,
         chip: str | None = None, execution: ExecutionConfig | None = None) -> dict:
  """Bytes per device; `micro_batch` is sequences per device in one forward/backward pass.

  The expert buffers follow `execution` (default ExecutionConfig()): the capacity backend's
  slots per expert, or one slot per assignment for the dropless backends.
  """
  execution = ExecutionConfig() if execution is None else execution
  mesh = jax.sharding.AbstractMesh(tuple(axis_sizes[a] for a in sharding.AXES), sharding.AXES)
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(cfg,
                                                                        rngs=nnx.Rngs(0)))))
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(params, mesh))
  param_bytes = sum(_sharded_bytes(p.shape, p.dtype, s, axis_sizes)
                    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs)))
  # AdamW keeps two float32 moments per parameter, sharded like it; gradients are float32.
  f32_bytes = sum(_sharded_bytes(p.shape, np.float32, s, axis_sizes)
                  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs)))
  act_bytes = np.dtype(cfg.compute_jnp_dtype).itemsize
  tokens = micro_batch * seq_len
  tensor = axis_sizes["tensor"]
  residual = cfg.num_layers * tokens * cfg.d_model * act_bytes
  attention = micro_batch * (cfg.num_heads / tensor) * seq_len**2 * 4 * 2  # logits + probs, f32
  if cfg.is_moe:
    room = execution.capacity_factor if execution.expert_backend == "capacity" else 1.0
    slots = tokens * cfg.top_k * max(room, 1.0)
    hidden = (slots + tokens * cfg.num_shared_experts) * cfg.expert_hidden
    dispatch = 2 * slots * cfg.d_model * act_bytes
  else:
    hidden, dispatch = tokens * cfg.mlp_hidden / tensor, 0.0
  layer = attention + 3 * hidden * act_bytes + dispatch + 8 * tokens * cfg.d_model * act_bytes
  logits = 2 * tokens * cfg.vocab_size / tensor * 4  # logits and their gradient, float32
  activations = residual + layer + logits
  total = param_bytes + 2 * f32_bytes + f32_bytes + activations
  out = {
      "mesh": dict(axis_sizes), "devices": math.prod(axis_sizes.values()),
      "micro_batch": micro_batch, "seq_len": seq_len,
      "params_bytes": param_bytes, "optimizer_bytes": 2 * f32_bytes, "gradient_bytes": f32_bytes,
      "activation_bytes": activations, "total_bytes": total,
  }
  if chip is not None:
    if chip not in CHIPS:
      raise ValueError(f"unknown chip {chip!r}; known: {sorted(CHIPS)}")
    out.update(chip=chip, chip_bytes=CHIPS[chip], fits=bool(total <= 0.9 * CHIPS[chip]))
  return out
