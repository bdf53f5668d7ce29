"""Evaluation: multiple-choice scoring, bad JSONL, perplexity under a subset, sweeps."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.train import evaluate
from emo_jax.config import ModelConfig
from emo_jax.data.sources import DataError
from emo_jax.data.tokenizer import ByteTokenizer
from random_model import random_params

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=5, num_shared_experts=1, top_k=2, expert_hidden=16,
                  pool_min=2, pool_max=5, max_segments=4, compute_dtype="float32",
                  init_std=0.3)
TOK = ByteTokenizer()


@functools.lru_cache(maxsize=None)
def model():
  graphdef, params = random_params(CFG)
  return graphdef, jax.tree.map(jnp.asarray, params)


def reference_loglik(graphdef, params, context, continuation):
  """log p(continuation | context) by a plain forward pass and NumPy."""
  ctx, cont = TOK.encode(context), TOK.encode(continuation)
  ids = np.asarray([ctx + cont], np.int32)
  logits = np.asarray(nnx.merge(graphdef, params)(ids[:, :-1])[0][0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
      - logits.max(-1, keepdims=True)
  targets = ids[0, 1:]
  return sum(logp[t, targets[t]] for t in range(len(ctx) - 1, len(ids[0]) - 1))


ITEMS = [{"question": "2+2?", "choices": ["four", "fish"], "answer": 0},
         {"question": "Sky?", "choices": ["blue", "a very long answer indeed"], "answer": 1},
         {"question": "Cat?", "choices": ["meow", "woof", "moo"], "answer": 2}]


def test_choice_logliks_match_reference_and_pick_the_higher():
  graphdef, params = model()
  contexts = ["Question: Sky?\nAnswer:", "Question: Sky?\nAnswer:"]
  conts = [" blue", " red"]
  ll = evaluate.choice_logliks(graphdef, params, TOK, contexts, conts, seq_len=64)
  for c, x, got in zip(contexts, conts, ll):
    np.testing.assert_allclose(got, reference_loglik(graphdef, params, c, x), rtol=1e-4)
  # The item's prediction is the choice with the higher log-likelihood.
  item = {"question": "Sky?", "choices": ["blue", "red"], "answer": 0}
  r = evaluate.multiple_choice(graphdef, params, TOK, [item], num_shots=0, seq_len=64)
  assert r["predictions"][0]["prediction"] == int(np.argmax(ll))
  assert r["accuracy"] == float(np.argmax(ll) == 0)
  np.testing.assert_allclose(r["predictions"][0]["logliks"], ll, atol=1e-3)


def test_multiple_choice_accuracy_and_normalisation():
  graphdef, params = model()
  r = evaluate.multiple_choice(graphdef, params, TOK, ITEMS, num_shots=1, seq_len=128)
  preds = r["predictions"]
  for item, p in zip(ITEMS, preds):
    ll = np.asarray(p["logliks"])
    lengths = np.asarray([len((" " + c).encode()) for c in item["choices"]])
    assert p["prediction"] == int(np.argmax(ll))
    assert p["prediction_norm"] == int(np.argmax(ll / lengths))
  assert r["accuracy"] == np.mean([p["prediction"] == it["answer"]
                                   for p, it in zip(preds, ITEMS)])
  assert r["accuracy_norm"] == np.mean([p["prediction_norm"] == it["answer"]
                                        for p, it in zip(preds, ITEMS)])
  # Random models prefer short continuations; normalising by length changes item 1's choice.
  assert preds[1]["prediction"] == 0 and preds[1]["prediction_norm"] == 1
  # Few-shot prompts use other items with their correct answers, never the item itself.
  prefix = evaluate.few_shot_prefix(ITEMS, 0, 2)
  assert "2+2?" not in prefix and "Sky?\nAnswer: a very long answer indeed" in prefix
  assert prefix == evaluate.few_shot_prefix(ITEMS, 0, 2)


def test_bad_jsonl_names_the_line(tmp_path):
  path = tmp_path / "mc.jsonl"
  good = json.dumps(ITEMS[0])
  path.write_text(good + "\n" + "{not json\n")
  with pytest.raises(DataError, match=r"mc.jsonl:2: not valid JSON"):
    evaluate.read_multiple_choice(path)
  path.write_text(good + "\n\n" + json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n")
  with pytest.raises(DataError, match=r"mc.jsonl:3: missing field\(s\) \['answer'\]"):
    evaluate.read_multiple_choice(path)
  path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
  with pytest.raises(DataError, match=r"mc.jsonl:1: answer must be an index"):
    evaluate.read_multiple_choice(path)
  path.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 0}) + "\n")
  with pytest.raises(DataError, match=r"mc.jsonl:1: choices"):
    evaluate.read_multiple_choice(path)
  path.write_text(good + "\n")
  assert evaluate.read_multiple_choice(path) == [ITEMS[0]]


def eval_batch():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 256, (2, 16)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones_like(tokens),
          "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
          "loss_mask": np.ones_like(tokens), "domain_ids": np.array([[0] * 16, [1] * 16])}


def test_perplexity_with_subset_and_sweep(tmp_path):
  graphdef, params = model()
  batches = [eval_batch()]
  full = evaluate.perplexity(graphdef, params, batches, ["a", "b"])
  all_kept = evaluate.perplexity(graphdef, params, batches, ["a", "b"],
                                 keep_experts=np.ones((2, 4), bool))
  np.testing.assert_allclose(full["loss"], all_kept["loss"], rtol=1e-6)
  assert set(full) == {"loss", "perplexity", "perplexity/a", "perplexity/b"}
  subset = np.zeros((2, 4), bool)
  subset[:, 0] = True
  one = evaluate.perplexity(graphdef, params, batches, ["a", "b"], keep_experts=subset)
  assert abs(one["loss"] - full["loss"]) > 1e-4

  calib = [{k: batches[0][k] for k in ("tokens", "segment_ids", "positions")}]
  sweep = evaluate.subset_sweep(
      graphdef, params, CFG, calib,
      lambda keep: evaluate.perplexity(graphdef, params, batches, ["a", "b"], keep_experts=keep),
      sizes=[2, 5], out_dir=tmp_path, name="s")
  assert [r["keep"] for r in sweep["results"]] == [2, 5]
  assert sweep["results"][1]["kept_routed"] is None
  np.testing.assert_allclose(sweep["results"][1]["loss"], full["loss"], rtol=1e-6)
  assert len(sweep["results"][0]["kept_routed"][0]) == 1
  assert json.loads((tmp_path / "s.json").read_text())["sizes"] == [2, 5]
  assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_subset_sizes_scale_the_papers():
  assert evaluate.subset_sizes(128) == [8, 16, 32, 64, 128]
  assert evaluate.subset_sizes(17) == [2, 4, 8, 17]
  assert evaluate.subset_sizes(8) == [2, 4, 8]
