"""The release's training recipe (docs/algorithm.md), shared by the configs of the released models.

AdamW lr 4e-3, betas (0.9, 0.95), weight decay 0.1 on all but the embedding, clip 1.0, 2,000
warm-up steps, cosine to 10 %; 4,096-token sequences, 1,024 per step; bf16 compute over float32
master weights. The data default is the built-in demo corpus so the configs run anywhere: point
data.corpus and data.tokenizer at your own corpus (e.g. the dolma2 tokenizer.json) for a real
run.
"""

import ml_collections

from emo_jax.config import ModelConfig
from emo_jax.data.corpus import DataConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.sharding import MeshConfig
from emo_jax.train import TrainConfig


def release_config(name: str, model: ModelConfig, steps: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = name
  # Every ModelConfig field, overridable on the command line, e.g. --config.model.num_layers=4
  config.model = model.to_dict()
  # How it runs (kernels, transport, remat, capacity), e.g. --config.execution.expert_backend=ragged
  config.execution = ExecutionConfig().to_dict()
  # The release's instance filter: a row with a period-1..13 n-gram repeated 32 times or more
  # is masked out of the loss.
  config.data = DataConfig(corpus="demo", seq_len=4096, batch_size=1024, repetition_filter=True,
                           repetition_min_period=1, repetition_max_period=13,
                           repetition_max_count=32).to_dict()
  # The release exempts only the embedding from weight decay (its norms are decayed).
  config.train = TrainConfig(steps=steps, learning_rate=4e-3, warmup_steps=2000,
                             weight_decay_exempt="embedding", log_every=10, eval_every=1000,
                             checkpoint_every=1000).to_dict()
  # Shard parameters and optimizer state over every device (see experiments/plan_memory.py).
  config.mesh = MeshConfig(fsdp=-1).to_dict()
  return config

