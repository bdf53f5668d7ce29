"""The demo: a small EMO trained on the built-in multi-domain corpus, sized for a 2-core CPU
(BENCHMARKS.md has its measured run time; more data and steps on a GPU: raise train.steps and
data.batch_size).

  python -m experiments.train --config configs/demo.py --workdir workdirs/demo

The first run builds the demo corpus (PubMed abstracts, kernel documentation, Metamath, Python
code, Shakespeare, BBC news; cached in ~/.cache/emo_jax) and its tokenizer.
configs/demo_stdmoe.py is the same model and data without the document pool.
"""

import ml_collections

from emo_jax.config import ModelConfig
from emo_jax.data.corpus import DataConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.sharding import MeshConfig
from emo_jax.train import TrainConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "demo"
  # EMO's recipe at toy width: 16 routed experts (top-2) + 1 shared; each document of each
  # layer draws its pool size from [top_k + 1, num_experts], as the release draws from [8, 128].
  config.model = ModelConfig(
      vocab_size=8192,
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=4,
      head_dim=32,
      num_experts=17,
      num_shared_experts=1,
      top_k=2,
      expert_hidden=128,
      pool=True,
      pool_min=3,
      pool_max=17,
      max_segments=16,
      max_seq_len=256,
      compute_dtype="float32",  # bf16 matmuls are slow on most CPUs; use bfloat16 on GPU/TPU
  ).to_dict()
  # Dropless experts: a short run's routers stay far from balanced (at capacity 1.25 about a
  # quarter of the assignments overflowed), and on CPU the "ragged" bank pads each expert's
  # rows to whole blocks instead of to a capacity: fewer rows than capacity 2.0.
  # "chunked" attention skips the keys causality hides from each chunk of queries. Both are
  # exact (BENCHMARKS.md has the figures). capacity_factor applies if expert_backend=capacity.
  # Four layers are few enough to unroll (compiling grows with depth), and an unrolled step
  # skips the layer scan's stacked-residual buffers; the head and loss run fused over chunks
  # of 256 tokens, whose logits stay in cache (the full [4096, 8192] logits would not). Both
  # exact.
  config.execution = ExecutionConfig(remat=False, expert_backend="ragged",
                                     attention_impl="chunked", capacity_factor=2.0,
                                     scan_layers=False, head_chunk_tokens=256).to_dict()
  config.data = DataConfig(corpus="demo", vocab_size=8192, seq_len=256, batch_size=16).to_dict()
  config.train = TrainConfig(steps=400, learning_rate=3e-3, warmup_steps=40, log_every=20,
                             eval_every=200, eval_batches=8, checkpoint_every=200).to_dict()
  # Devices per mesh axis (all 1: one device). E.g. --config.mesh.data=2 --config.mesh.expert=4
  config.mesh = MeshConfig().to_dict()
  return config
