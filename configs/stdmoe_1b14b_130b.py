"""StdMoE 1b14b trained on 130 B tokens (30,995 steps): the ablation baseline.

Shapes and parameter counts, without allocating anything; per-device memory on a mesh:
  python -m experiments.describe --config configs/stdmoe_1b14b_130b.py
  python -m experiments.plan_memory --config configs/stdmoe_1b14b_130b.py --mesh fsdp=16 --chip h100-80gb
Training (the release's recipe; set data.corpus / data.tokenizer to your corpus):
  python -m experiments.train --config configs/stdmoe_1b14b_130b.py --workdir workdirs/stdmoe_1b14b_130b
"""

import ml_collections

from configs._release import release_config
from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  # The release's baselines attend causally across the documents of a packed row.
  # Load balancing per 512 sequences: 4 per GPU x 128 GPUs (16 nodes), the release's scope.
  model = ModelConfig(pool=False, document_attention=False, lb_scope_sequences=512)
  return release_config("stdmoe_1b14b_130b", model, steps=30_995)
