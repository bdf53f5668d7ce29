"""KV-cache decoding against full recomputation; EOS, batching, sampling, pruned models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.config import ConfigError
from emo_jax.inference import decode, generate, sampling
from emo_jax.study import calibration, selective
from emo_jax.config import ModelConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.convert import loading
from random_model import random_params

# capacity backend with a small factor: generation must make it dropless by itself.
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=6, num_shared_experts=1, top_k=2, expert_hidden=16,
                  pool_min=2, pool_max=6, max_segments=4, compute_dtype="float32",
                  init_std=0.2)
RUN = ExecutionConfig(expert_backend="capacity", capacity_factor=1.0)
PROMPTS = [[5, 9, 11, 3, 7, 2], [8, 1], [4, 4, 60]]
NEW = 7


@functools.lru_cache(maxsize=None)
def model():
  _, params = random_params(CFG)
  return (params,) + loading.build_model(CFG, params, RUN)


@functools.partial(jax.jit, static_argnums=0)
def full_logits(graphdef, params, tokens, segment_ids, keep):
  return nnx.merge(graphdef, params)(tokens, segment_ids, keep_experts=keep)[0]


def recompute(graphdef, params, prompts, outputs, keep=None):
  """Logits of every generated step from one full causal forward per row (right-padded)."""
  seqs = [p + o for p, o in zip(prompts, outputs)]
  width = max(len(s) for s in seqs)
  tokens = np.zeros((len(seqs), width), np.int32)
  segs = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    segs[i, :len(s)] = 1
  logits = np.asarray(full_logits(graphdef, params, tokens, segs, keep))
  return [logits[i, len(p) - 1:len(p) - 1 + len(o)] for i, (p, o) in enumerate(zip(prompts,
                                                                                    outputs))]


def check_against_recompute(graphdef, params, result, keep=None):
  expected = recompute(graphdef, params, PROMPTS, result["tokens"], keep)
  for i, row in enumerate(result["tokens"]):
    got = result["logits"][i, :len(row)]
    np.testing.assert_allclose(got, expected[i], atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(np.argmax(expected[i], -1), row)  # greedy = argmax each step


@pytest.mark.slow
def test_kv_cache_equals_full_recompute_batched():
  _, graphdef, params = model()
  assert nnx.merge(graphdef, params).execution.capacity_factor >= 5 / 2  # dropless for inference
  result = generate.generate_ids(graphdef, params, PROMPTS, generate.SamplingConfig(NEW),
                                 return_logits=True)
  assert [len(r) for r in result["tokens"]] == [NEW] * 3
  # Each row against its own unpadded forward: the left padding is invisible.
  check_against_recompute(graphdef, params, result)
  assert result["tokens_per_s"] > 0


def test_stops_at_eos_per_row():
  _, graphdef, params = model()
  first = generate.generate_ids(graphdef, params, PROMPTS, generate.SamplingConfig(NEW))
  eos = first["tokens"][0][0]
  result = generate.generate_ids(graphdef, params, PROMPTS, generate.SamplingConfig(NEW),
                                 eos_id=eos)
  assert result["tokens"][0] == [eos]
  for row in result["tokens"]:
    assert eos not in row[:-1] and len(row) <= NEW
    assert row[-1] == eos or len(row) == NEW


@pytest.mark.slow
def test_pruned_model_and_routing_mask_generate_the_same():
  raw, graphdef, params = model()
  batches = calibration.calibration_batches(["abc"], type("T", (), {
      "encode": staticmethod(lambda s: [ord(c) % 64 for c in s]), "eos_id": 1, "pad_id": 0})(),
                                            seq_len=16)
  sel = selective.select_experts(graphdef, params, CFG, batches, 3)
  pruned, pcfg = selective.prune(raw, CFG, sel)
  pgraphdef, pparams = loading.build_model(pcfg, pruned)
  sampling = generate.SamplingConfig(NEW)
  masked = generate.generate_ids(graphdef, params, PROMPTS, sampling, keep_experts=sel.mask,
                                 return_logits=True)
  small = generate.generate_ids(pgraphdef, pparams, PROMPTS, sampling, return_logits=True)
  assert masked["tokens"] == small["tokens"]
  np.testing.assert_allclose(masked["logits"], small["logits"], atol=2e-4, rtol=2e-4)
  full = generate.generate_ids(graphdef, params, PROMPTS, sampling, return_logits=True)
  assert np.abs(full["logits"] - masked["logits"]).max() > 1e-3  # the mask took effect


def draw(temperature, top_p, *, rows=4000, seed=0, **fields):
  """Tokens sampled from [0.4, 0.3, 0.2, 0.1] in every row, under per-row settings."""
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * rows))
  settings = sampling.Rows(keys=sampling.row_keys(seed, rows),
                           temperature=jnp.broadcast_to(jnp.float32(temperature), (rows,)),
                           top_p=jnp.broadcast_to(jnp.float32(top_p), (rows,)), **fields)
  return sampling.sample(logits, settings, top_logprobs=2)


def test_sampling_top_p_and_temperature():
  assert set(np.asarray(draw(0.0, 1.0).tokens).tolist()) == {0}
  assert set(np.asarray(draw(1.0, 1e-6).tokens).tolist()) == {0}
  nucleus = np.asarray(draw(1.0, 0.5).tokens)
  assert set(nucleus.tolist()) == {0, 1}  # 0.4 + 0.3 reaches 0.5; 2 and 3 are cut
  assert abs(np.mean(nucleus == 0) - 0.4 / 0.7) < 0.05
  free = np.asarray(draw(1.0, 1.0).tokens)
  np.testing.assert_allclose(np.bincount(free, minlength=4) / free.size, [0.4, 0.3, 0.2, 0.1],
                             atol=0.03)
  hot = np.asarray(draw(100.0, 1.0).tokens)
  assert abs(np.mean(hot == 3) - 0.25) < 0.05  # high temperature flattens
  # Sampled generation is reproducible by seed, and the seed matters.
  _, graphdef, params = model()
  s = generate.SamplingConfig(NEW, temperature=1.0, top_p=0.9, seed=3)
  a = generate.generate_ids(graphdef, params, PROMPTS, s)["tokens"]
  assert a == generate.generate_ids(graphdef, params, PROMPTS, s)["tokens"]
  other = generate.SamplingConfig(NEW, temperature=1.0, top_p=0.9, seed=4)
  assert a != generate.generate_ids(graphdef, params, PROMPTS, other)["tokens"]


def test_sampling_settings_are_per_row_and_rows_are_independent():
  rows = 400
  temperature = jnp.asarray(np.tile([0.0, 1.0], rows // 2), jnp.float32)
  top_p = jnp.asarray(np.tile([1.0, 1.0, 1.0, 0.5], rows // 4), jnp.float32)
  out = draw(temperature, top_p, rows=rows)
  tokens = np.asarray(out.tokens)
  assert set(tokens[0::2].tolist()) == {0}           # greedy rows
  assert set(tokens[3::4].tolist()) == {0, 1}        # top-p 0.5
  assert set(tokens[1::4].tolist()) == {0, 1, 2, 3}  # the whole distribution
  keys = sampling.row_keys(0, rows)
  for row in (1, 3, 6):  # a row draws the same alone as in the batch
    alone = sampling.sample(jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]])), sampling.Rows(
        keys[row:row + 1], temperature[row:row + 1], top_p[row:row + 1]))
    assert int(alone.tokens[0]) == tokens[row]
  # Log-probabilities are the model's, whatever the temperature.
  np.testing.assert_allclose(out.logprobs, np.log([0.4, 0.3, 0.2, 0.1])[tokens], rtol=1e-5)
  np.testing.assert_array_equal(out.top_ids, [[0, 1]] * rows)
  # The keys move on, so the next draw differs.
  again = sampling.sample(jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * rows)),
                          sampling.Rows(out.keys, temperature, top_p))
  assert not np.array_equal(np.asarray(again.tokens)[1::2], tokens[1::2])


def test_penalties_are_per_row():
  seen = jnp.array([[True, False, False, False]] * 2)
  banned = jnp.array([[False, True, False, False]] * 2)
  out = draw(0.0, 1.0, rows=2, seen=seen, banned=banned,
             repetition_penalty=jnp.array([1.0, 4.0], jnp.float32))
  # Row 0: token 0 is seen but unpenalised; row 1: 0.4 -> log 0.4 * 4 falls below log 0.2.
  assert np.asarray(out.tokens).tolist() == [0, 2]  # token 1 is banned in both


def test_bad_inputs():
  with pytest.raises(ConfigError, match="top_p"):
    generate.SamplingConfig(top_p=0.0)
  with pytest.raises(ConfigError, match="temperature"):
    sampling.SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="shorter than the longest prompt"):
    decode.left_pad([[1, 2, 3]], 0, length=2)
  np.testing.assert_array_equal(decode.left_pad([[1, 2]], 9, length=4)[0], [[9, 9, 1, 2]])
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate.left_pad([[1], []], 0)
  tokens, positions, valid = generate.left_pad([[1, 2, 3], [4]], 0)
  np.testing.assert_array_equal(tokens[1], [0, 0, 4])
  np.testing.assert_array_equal(positions[1], [0, 0, 0])
  np.testing.assert_array_equal(valid[1], [False, False, True])
