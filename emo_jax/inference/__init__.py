"""The inference wing: generating text from a checkpoint (docs/architecture.md, "After
training").

  sampling.py  the one sampler: per-row greedy / temperature / top-p, repetition penalty, n-grams
  decode.py    the jitted prefill and decode step with a KV cache, shared by generate and serve
  generate.py  a batch of prompts to their continuations, on all experts or a subset
  serve/       the OpenAI-compatible server: expert bank, continuous batching, HTTP

Checkpoints load through `emo_jax.convert.loading` (`load_model`, `load_checkpoint`), which the
study wing uses too.
"""

from emo_jax.inference.generate import generate_ids, generate_text
from emo_jax.inference.sampling import SamplingConfig

__all__ = ["SamplingConfig", "generate_ids", "generate_text"]
