"""Rematerialisation policies: what each scanned decoder block keeps for the backward pass.

The blocks run under `jax.checkpoint`; a policy names the tensors that are saved instead of
recomputed. The names are `jax.ad_checkpoint.checkpoint_name` tags set in the decoder
(attention output, MoE input) and inside the attention kernels (splash's residuals); cuDNN's
attention is recognised by its primitive.
"""

from __future__ import annotations

import jax

# The jax.checkpoint_name tags of the tensors that the named remat policies keep.
ATTENTION_OUT = "attention_out"  # attention result [B, L, H, K], before the output projection
ATTENTION_RESIDUALS = "attention_residuals"  # splash's output and softmax statistics
MOE_INPUT = "moe_input"  # normalised input of the MoE (or dense MLP) [B, L, D]
# The primitive whose outputs (result and softmax statistics) jax's cuDNN attention keeps for
# its backward pass; saving them is what spares re-running the kernel under remat.
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def _cudnn_attention_forward(prim, *_, **__) -> bool:
  return prim.name == CUDNN_ATTENTION_FORWARD


_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_RESIDUALS, MOE_INPUT),
    _cudnn_attention_forward)
# Module-level so that every trace sees the same policy objects (they are static arguments).
CHECKPOINT_POLICIES = {
    "full": None,
    "dots": _DOTS,
    "save_attention_and_moe_input": _ATTENTION,
    "dots_and_attention": jax.checkpoint_policies.save_from_both_policies(_DOTS, _ATTENTION),
}
# Every value of ExecutionConfig.remat_policy ("none" is the same as remat=False).
REMAT_POLICIES = (*CHECKPOINT_POLICIES, "none")


def checkpoint_policy(remat: bool, remat_policy: str):
  """(rematerialise?, jax.checkpoint policy) for ExecutionConfig.remat and .remat_policy.

  * "full": keep only each block's input; the backward recomputes the whole block.
  * "dots": also keep matmul outputs without batch dimensions (the q/k/v/output projections,
    the router, dense-MLP matmuls); attention and the batched expert matmuls are recomputed.
  * "save_attention_and_moe_input": keep the attention result with the kernel's softmax
    statistics (cuDNN, splash) so that the backward does not run attention a second time, and
    the MoE input. (With the "xla" reference the probabilities are still recomputed: keeping
    [B, H, L, L] would cost more memory than remat saves.)
  * "dots_and_attention": the union of the two above.
  * "none" (or remat=False): keep everything, recompute nothing.
  """
  if not remat or remat_policy == "none":
    return False, None
  if remat_policy not in CHECKPOINT_POLICIES:
    raise ValueError(f"remat_policy={remat_policy!r} unknown; allowed: {list(REMAT_POLICIES)}")
  return True, CHECKPOINT_POLICIES[remat_policy]
