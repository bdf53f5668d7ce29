"""Dense 1B: OLMo-2 style pre-norm decoder, no QK-norm, SwiGLU MLP of width 8192.

Shapes and parameter counts, without allocating anything; per-device memory on a mesh:
  python -m experiments.describe --config configs/dense_1b.py
  python -m experiments.plan_memory --config configs/dense_1b.py --mesh fsdp=16 --chip h100-80gb
Training (the release's recipe; set data.corpus / data.tokenizer to your corpus):
  python -m experiments.train --config configs/dense_1b.py --workdir workdirs/dense_1b
"""

import ml_collections

from configs._release import release_config
from emo_jax.config import ModelConfig


def get_config() -> ml_collections.ConfigDict:
  # The release's baselines attend causally across the documents of a packed row.
  model = ModelConfig(num_experts=0, num_shared_experts=0, pool=False, mlp_hidden=8192,
                      document_attention=False)
  return release_config("dense_1b", model, steps=238_419)
