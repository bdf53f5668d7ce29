"""EMO 1b14b, the released model (1 T tokens, 238,419 steps): 128 experts (127 routed top-7 + 1
shared), document pool on.

Shapes and parameter counts, without allocating anything; per-device memory on a mesh:
  python -m experiments.describe --config configs/emo_1b14b.py
  python -m experiments.plan_memory --config configs/emo_1b14b.py --mesh fsdp=16 --chip h100-80gb
Training (the release's recipe; set data.corpus / data.tokenizer to your corpus):
  python -m experiments.train --config configs/emo_1b14b.py --workdir workdirs/emo_1b14b
"""

import ml_collections

from configs._release import release_config
from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  # Intra-document attention and a 32-expert pool for in-loop evaluation, as the launch script.
  # Load balancing per 512 sequences: 4 per GPU x 128 GPUs (16 nodes), the release's scope.
  model = ModelConfig(document_attention=True, eval_pool_size=32, lb_scope_sequences=512)
  return release_config("emo_1b14b", model, steps=238_419)
