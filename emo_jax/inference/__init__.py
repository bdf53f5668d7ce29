"""The inference wing: generating text from a checkpoint (docs/architecture.md, "Inference").

  generate.py  batched prefill and decode with a KV cache, on all experts or a subset
  serve/       the OpenAI-compatible server: expert bank, continuous batching, HTTP
"""
