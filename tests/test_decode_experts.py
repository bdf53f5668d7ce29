"""The decode step's expert loop (model/decode_experts.py) against the bank kernels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.config import ConfigError, ModelConfig
from emo_jax.convert import loading
from emo_jax.inference import decode
from emo_jax.model import experts
from emo_jax.model.decode_experts import chosen_experts_loop
from emo_jax.model.execution import ExecutionConfig
from random_model import random_params

L, E, S, D, H, K = 3, 7, 1, 16, 12, 2  # layers, experts (S shared, last), width, hidden, top-k


def banks(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(keys[0], (L, E, D, H)) * 0.3,
          jax.random.normal(keys[1], (L, E, D, H)) * 0.3,
          jax.random.normal(keys[2], (L, E, H, D)) * 0.3)


def choices(tokens, seed):
  rng = np.random.RandomState(seed)
  ids = np.stack([rng.choice(E - S, K, replace=False) for _ in range(tokens)]).astype(np.int32)
  weights = rng.uniform(0.1, 1.0, (tokens, K)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(weights)


def reference(x, ids, weights, w_gate, w_up, w_down, layer, mask=None):
  """The dense backend on the layer's routed experts, plus every shared expert."""
  R = E - S
  y, _ = experts.routed_experts(x, ids, weights, w_gate[layer, :R], w_up[layer, :R],
                                w_down[layer, :R], backend="dense", token_mask_T=mask)
  for e in range(R, E):
    y = y + experts.swiglu(x, w_gate[layer, e], w_up[layer, e], w_down[layer, e])
  if mask is not None:
    y = jnp.where(mask[:, None], y, 0.0)
  return y


looped = jax.jit(functools.partial(chosen_experts_loop, num_shared=S))


@pytest.mark.parametrize("tokens,seed", [(1, 0), (3, 1), (8, 2)])
def test_loop_equals_the_dense_backend_on_random_inputs(tokens, seed):
  w = banks(seed)
  x = jax.random.normal(jax.random.PRNGKey(100 + seed), (tokens, D))
  ids, weights = choices(tokens, seed)
  for layer in range(L):  # a traced layer index, as the layer scan gives it
    got = looped(x, ids, weights, *w, jnp.int32(layer))
    np.testing.assert_allclose(got, reference(x, ids, weights, *w, layer), atol=2e-5, rtol=2e-5)


def test_padding_tokens_output_zero_and_choose_nothing():
  w = banks(3)
  x = jax.random.normal(jax.random.PRNGKey(7), (4, D))
  ids, weights = choices(4, 3)
  mask = jnp.asarray([True, False, True, False])
  got = looped(x, ids, weights, *w, jnp.int32(1), token_mask_T=mask)
  np.testing.assert_allclose(got, reference(x, ids, weights, *w, 1, mask), atol=2e-5, rtol=2e-5)
  assert np.all(np.asarray(got)[~np.asarray(mask)] == 0)


def test_only_the_chosen_experts_and_the_layer_are_read():
  """NaN everywhere the loop must not look (other layers, unchosen routed experts, the
  padding token's choices): the result stays finite and equal to the clean bank's."""
  clean = banks(4)
  x = jax.random.normal(jax.random.PRNGKey(8), (3, D))
  ids, weights = choices(3, 4)
  mask = jnp.asarray([True, True, False])
  read = set(np.asarray(ids[:2]).reshape(-1).tolist()) | set(range(E - S, E))
  poisoned = []
  for bank in clean:
    b = np.full(bank.shape, np.nan, np.float32)
    for e in read:
      b[1, e] = np.asarray(bank[1, e])
    poisoned.append(jnp.asarray(b))
  got = looped(x, ids, weights, *poisoned, jnp.int32(1), token_mask_T=mask)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(got, looped(x, ids, weights, *clean, jnp.int32(1),
                                         token_mask_T=mask), atol=1e-6)


CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=6, num_shared_experts=1, top_k=2, expert_hidden=16,
                  pool_min=2, pool_max=6, max_segments=4, compute_dtype="float32", init_std=0.2)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decode_steps_equal_with_and_without_the_loop(scan_layers):
  """Prefill then three decode steps, each row under its own routing mask: the looped steps
  (decode_loop_tokens=16) give the logits of the capacity kernel (decode_loop_tokens=0)."""
  _, params = random_params(CFG)
  prompts = np.asarray([[5, 9, 11, 3], [8, 1, 2, 2], [4, 4, 60, 1]], np.int32)
  B, T = prompts.shape
  keep = np.ones((B, CFG.num_layers, CFG.num_routed_experts), bool)
  keep[1, :, :2] = False
  keep[2, 0, 3:] = False
  logits = {}
  for loop_tokens in (0, 16):
    run = ExecutionConfig(expert_backend="capacity", scan_layers=scan_layers,
                          decode_loop_tokens=loop_tokens)
    graphdef, state = loading.build_model(CFG, params, run)
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(B, T + 3)
    out, cache = model.decode(jnp.asarray(prompts), jnp.tile(jnp.arange(T), (B, 1)),
                              jnp.ones((B, T), bool), cache, keep_experts=jnp.asarray(keep))
    steps = [out[:, -1]]
    token = jnp.argmax(out[:, -1], -1)
    for i in range(3):
      out, cache = model.decode(token[:, None], jnp.full((B, 1), T + i), jnp.ones((B, 1), bool),
                                cache, keep_experts=jnp.asarray(keep))
      steps.append(out[:, 0])
      token = jnp.argmax(out[:, 0], -1)
    logits[loop_tokens] = np.stack(steps)
  np.testing.assert_allclose(logits[16], logits[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("value", [-1, 1.5, True, "16"])
def test_bad_decode_loop_tokens_is_refused_naming_the_field(value):
  with pytest.raises(ConfigError, match="decode_loop_tokens"):
    ExecutionConfig(decode_loop_tokens=value)


def test_decode_step_uses_the_loop_only_up_to_its_token_count():
  """With decode_loop_tokens=4 and the layers unrolled, the step at 3 rows holds one loop (a
  while) per layer more than the step at 5 rows, where the bank kernel runs."""
  _, params = random_params(CFG)
  graphdef, state = loading.build_model(
      CFG, params, ExecutionConfig(decode_loop_tokens=4, scan_layers=False))
  model = nnx.merge(graphdef, state)
  from emo_jax.inference import sampling  # pylint: disable=import-outside-toplevel
  whiles = {}
  for rows in (3, 5):
    cache = model.init_cache(rows, 8)
    hlo = decode.decode_step.lower(
        graphdef, state, jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.int32), cache, None,
        sampling.Rows(sampling.row_keys(0, rows), jnp.zeros(rows), jnp.ones(rows))).as_text()
    whiles[rows] = hlo.count("stablehlo.while")
  assert whiles[3] == whiles[5] + CFG.num_layers, whiles
