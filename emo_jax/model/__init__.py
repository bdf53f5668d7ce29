"""The model wing: what EMO computes, one idea a module (docs/architecture.md, "The model").

  transformer.py      Transformer: embeddings, blocks (attention + MoE or MLP), LM head
  attention.py        segment-masked attention and its kernels (xla, cudnn, splash)
  moe.py              the MoE layer: router, document pool, experts, shared expert
  routing.py          top-k routing, the document pool mask, load-balancing and z-losses
  experts.py          the routed-expert kernels (dense reference, capacity, ragged)
  expert_slots.py     row index maps for the expert kernels (gather-only gradients)
  expert_parallel.py  experts sharded over the `expert` mesh axis, with its transports
  execution.py        ExecutionConfig: how the model runs, as opposed to what it is
  sharding.py         the device mesh and each parameter's logical axes
  losses.py           token cross-entropy, z-loss and the fused LM head + loss
  layers.py, matmul.py, remat.py  RMSNorm and init, the flat matmul, remat policies
  summary.py          parameter counts by component (experiments.describe)
"""

from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.sharding import MeshConfig
from emo_jax.model.transformer import Transformer, count_params, describe

__all__ = ["ExecutionConfig", "MeshConfig", "Transformer", "count_params", "describe"]
