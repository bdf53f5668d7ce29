"""Building blocks shared by the decoder (model.py) and the MoE layer (moe.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax.config import ModelConfig


def init_normal(cfg: ModelConfig):
  """The initialiser of every weight matrix: truncated normal of std `cfg.init_std`."""
  return nnx.initializers.truncated_normal(stddev=cfg.init_std)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (weight initialised to 1), cast back to the input dtype."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)
