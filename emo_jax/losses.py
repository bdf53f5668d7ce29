"""Token-level language-model losses shared by training and evaluation."""

import jax
import jax.numpy as jnp


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array):
  """Per-token cross-entropy and log-partition (float32).

  The log-partition is returned too because the output z-loss (docs/algorithm.md, weight 1e-5) is
  its square, and computing both from one logsumexp saves a pass over the vocabulary.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse
