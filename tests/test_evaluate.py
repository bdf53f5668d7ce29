"""Evaluation: perplexity overall and per domain, under an expert subset."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.train import evaluate
from emo_jax.config import ModelConfig
from random_model import random_params

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=5, num_shared_experts=1, top_k=2, expert_hidden=16,
                  pool_min=2, pool_max=5, max_segments=4, compute_dtype="float32",
                  init_std=0.3)


@functools.lru_cache(maxsize=None)
def model():
  graphdef, params = random_params(CFG)
  return graphdef, jax.tree.map(jnp.asarray, params)


def eval_batch():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 256, (2, 16)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones_like(tokens),
          "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
          "loss_mask": np.ones_like(tokens), "domain_ids": np.array([[0] * 16, [1] * 16])}


def reference_losses(graphdef, params, batch):
  """Per-token cross-entropy [B, L] by a plain forward pass and NumPy."""
  logits = np.asarray(nnx.merge(graphdef, params)(batch["tokens"])[0], np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]


@pytest.mark.slow
def test_perplexity_per_domain_and_with_a_subset():
  graphdef, params = model()
  batches = [eval_batch()]
  full = evaluate.perplexity(graphdef, params, batches, ["a", "b"])
  assert set(full) == {"loss", "perplexity", "perplexity/a", "perplexity/b"}
  ce = reference_losses(graphdef, params, batches[0])
  np.testing.assert_allclose(full["loss"], ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(full["perplexity/b"], math.exp(ce[1].mean()), rtol=1e-5)
  all_kept = evaluate.perplexity(graphdef, params, batches, ["a", "b"],
                                 keep_experts=np.ones((2, 4), bool))
  np.testing.assert_allclose(full["loss"], all_kept["loss"], rtol=1e-6)
  subset = np.zeros((2, 4), bool)
  subset[:, 0] = True
  one = evaluate.perplexity(graphdef, params, batches, ["a", "b"], keep_experts=subset)
  assert abs(one["loss"] - full["loss"]) > 1e-4
