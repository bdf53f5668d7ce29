"""A tiny EMO for tests, notebooks and CPU smoke runs (about 0.2 M parameters).

Same structure as the release (routed experts + 1 shared expert, top-k without
renormalisation, document pool drawn from [top_k, num_experts]) at toy width, trained on the
generated multi-domain corpus with the byte tokenizer, so nothing is downloaded:
  python -m experiments.train --config configs/tiny.py --workdir /tmp/tiny --config.train.steps=20
  python -m experiments.describe --config configs/tiny.py
  python -m experiments.describe --config configs/tiny.py --config.model.pool=False   # StdMoE
"""

import ml_collections

from emo_jax.config import ModelConfig
from emo_jax.data.corpus import DataConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.sharding import MeshConfig
from emo_jax.train import TrainConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "tiny"
  config.model = ModelConfig(
      vocab_size=258,  # the byte tokenizer: 256 bytes + pad + eos
      d_model=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=4,
      head_dim=16,
      num_experts=8,  # 7 routed + 1 shared; 8 divides the fake-device meshes (expert=2, 4, 8)
      num_shared_experts=1,
      top_k=2,
      expert_hidden=32,
      mlp_hidden=128,
      pool=True,
      pool_min=2,
      pool_max=8,
      max_segments=8,
      max_seq_len=128,
      compute_dtype="float32",
  ).to_dict()
  # routed / top_k = 3.5: at capacity 4.0 every expert can take every token, so the capacity
  # backend drops nothing either (the ragged backend never drops).
  config.execution = ExecutionConfig(capacity_factor=4.0).to_dict()
  config.data = DataConfig(corpus="synthetic", tokenizer="bytes", seq_len=64, batch_size=8,
                           synthetic_documents=2000).to_dict()
  config.train = TrainConfig(steps=200, learning_rate=3e-3, warmup_steps=20, log_every=10,
                             eval_every=100, eval_batches=4, checkpoint_every=50).to_dict()
  # Devices per mesh axis (all 1: one device). E.g. --config.mesh.data=2 --config.mesh.expert=4
  config.mesh = MeshConfig().to_dict()
  return config
