"""EMO 1b14b trained on 130 B tokens (30,995 steps), the paper's ablation scale.

Shapes and parameter counts, without allocating anything; per-device memory on a mesh:
  python -m experiments.describe --config configs/emo_1b14b_130b.py
  python -m experiments.plan_memory --config configs/emo_1b14b_130b.py --mesh fsdp=16 --chip h100-80gb
Training (the release's recipe; set data.corpus / data.tokenizer to your corpus):
  python -m experiments.train --config configs/emo_1b14b_130b.py --workdir workdirs/emo_1b14b_130b
"""

import ml_collections

from configs._release import release_config
from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  # Intra-document attention and a 32-expert pool for in-loop evaluation, as the launch script.
  # Load balancing per 256 sequences: 4 per GPU x 64 GPUs (8 nodes), the release's scope.
  model = ModelConfig(document_attention=True, eval_pool_size=32, lb_scope_sequences=256)
  return release_config("emo_1b14b_130b", model, steps=30_995)
