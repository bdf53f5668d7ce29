"""Projections as one 2-D matmul, whatever the activation's leading axes.

``einsum("bld,dv->blv")`` and friends are the natural way to write a projection of [B, L, D]
activations, but XLA lowers them as dot_generals over 3-D operands whose weight gradient
contracts two axes (b and l) at once. On XLA:CPU that path transposes the activations
before the matmul, which made the demo's LM head and attention projections markedly slower
than the same products as reshaped 2-D matmuls (BENCHMARKS.md, "CPU", has the figures).
Reshaping leading axes is free (no data moves), so every dense projection of the model goes
through ``flat_matmul``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def flat_matmul(x, w, *, contract: int = 1, preferred_element_type=None, precision=None):
  """``x[..., c_1..c_n] @ w[c_1..c_n, o_1..o_m] -> [..., o_1..o_m]`` as a single 2-D matmul.

  contract: how many trailing axes of x (= leading axes of w) are summed over, e.g. 2 for an
    attention output projection [B, L, H, K] x [H, K, D].
  """
  in_shape = x.shape[x.ndim - contract:]
  if tuple(w.shape[:contract]) != tuple(in_shape):
    raise ValueError(f"flat_matmul: x's trailing axes {tuple(in_shape)} must equal w's leading "
                     f"axes {tuple(w.shape[:contract])} (x {x.shape}, w {w.shape})")
  lead, out = x.shape[:x.ndim - contract], w.shape[contract:]
  fan_in = math.prod(in_shape)
  y = jnp.dot(x.reshape(-1, fan_in), w.reshape(fan_in, -1), precision=precision,
              preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out)
