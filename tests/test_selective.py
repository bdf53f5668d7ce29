"""Expert selection and pruning: calibration batches, ranking, routing-mask equivalence,
parameter counts, subset sizes."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.study import calibration, selective
from emo_jax.config import ModelConfig
from emo_jax.data.tokenizer import ByteTokenizer
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.transformer import Transformer, count_params
from random_model import random_params

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=8, num_shared_experts=1, top_k=3, expert_hidden=16,
                  pool_min=3, pool_max=8, max_segments=4, compute_dtype="float32",
                  init_std=0.2)


@functools.lru_cache(maxsize=None)
def model_and_params(cfg=CFG):
  return random_params(cfg)


@functools.lru_cache(maxsize=None)
def graphdef_of(cfg):
  return nnx.graphdef(nnx.eval_shape(lambda: Transformer(
      cfg, rngs=nnx.Rngs(0), execution=ExecutionConfig(expert_backend="dense"))))


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens, segment_ids, keep):
  return nnx.merge(graphdef, params)(tokens, segment_ids, keep_experts=keep)[0]


def batch(seed=0, rows=3, length=12, pad_from=8):
  rng = np.random.default_rng(seed)
  b = {"tokens": rng.integers(1, 64, (rows, length)).astype(np.int32),
       "segment_ids": np.ones((rows, length), np.int32),
       "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}
  b["segment_ids"][-1, pad_from:] = 0
  b["positions"][-1, pad_from:] = 0
  return b


@pytest.mark.slow
def test_pruned_model_equals_routing_mask(keep=2):
  graphdef, params = model_and_params()
  b = batch()
  sel = selective.select_experts(graphdef, params, CFG, [b], keep)
  pruned, pcfg = selective.prune(params, CFG, sel)
  assert pcfg.num_experts == keep and pcfg.top_k == min(CFG.top_k, keep - 1)
  masked = forward(graphdef, params, b["tokens"], b["segment_ids"], jnp.asarray(sel.mask))
  small = forward(graphdef_of(pcfg), jax.tree.map(jnp.asarray, pruned), b["tokens"],
                  b["segment_ids"], None)
  full = forward(graphdef, params, b["tokens"], b["segment_ids"], None)
  np.testing.assert_allclose(small, masked, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full) - np.asarray(masked)).max() > 1e-3  # the subset matters


def test_param_count_formula_and_shared_expert_kept():
  graphdef, params = model_and_params()
  sel = selective.select_experts(graphdef, params, CFG, [batch()], 4, greedy=False)
  pruned, pcfg = selective.prune(params, CFG, sel)
  D, H, L = CFG.d_model, CFG.expert_hidden, CFG.num_layers
  expected = count_params(CFG)["total_params"] - L * (8 - 4) * (3 * D * H + D)
  assert selective.param_count(pruned) == expected == selective.pruned_param_count(CFG, 4)
  assert expected == count_params(pcfg)["total_params"]
  assert selective.param_bytes(pruned) == 4 * expected  # float32
  mlp, pmlp = params["blocks"]["mlp"], pruned["blocks"]["mlp"]
  for layer in range(L):
    np.testing.assert_array_equal(pmlp["w_up"][layer, -1], mlp["w_up"][layer, 7])  # shared last
    np.testing.assert_array_equal(pmlp["router"][layer, :, -1], mlp["router"][layer, :, 7])
    for new, old in enumerate(sel.kept_routed[layer]):
      np.testing.assert_array_equal(pmlp["w_down"][layer, new], mlp["w_down"][layer, old])
      np.testing.assert_array_equal(pmlp["router"][layer, :, new], mlp["router"][layer, :, old])
  np.testing.assert_array_equal(pmlp["embed"] if "embed" in pmlp else pruned["embed"],
                                params["embed"])


def test_ranking_deterministic_and_ignores_padding():
  graphdef, params = model_and_params()
  b = batch()
  s1 = selective.select_experts(graphdef, params, CFG, [b], 3)
  s2 = selective.select_experts(graphdef, params, CFG, [dict(b)], 3)
  np.testing.assert_array_equal(s1.kept_routed, s2.kept_routed)
  np.testing.assert_array_equal(s1.scores, s2.scores)
  # Other token ids under the padding change nothing.
  noisy = {k: v.copy() for k, v in b.items()}
  noisy["tokens"][-1, 8:] = (noisy["tokens"][-1, 8:] + 17) % 64
  s3 = selective.select_experts(graphdef, params, CFG, [noisy], 3)
  np.testing.assert_array_equal(s1.scores, s3.scores)
  # Scores are the mean over non-pad tokens of the unmasked routed softmax (layer 0: no mask).
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  _, aux = model(b["tokens"], b["segment_ids"], b["positions"], collect_routing=True)
  probs = np.asarray(aux["routing_probs"][0])[b["segment_ids"] > 0]
  np.testing.assert_allclose(s1.scores[0], probs.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s1.scores.sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(s1.scores[0], np.asarray(aux["routing_probs"][0]).reshape(-1, 7).mean(0))


def test_greedy_scores_later_layers_with_earlier_layers_restricted():
  graphdef, params = model_and_params()
  b = batch()
  greedy = selective.select_experts(graphdef, params, CFG, [b], 3, greedy=True)
  one_pass = selective.select_experts(graphdef, params, CFG, [b], 3, greedy=False)
  np.testing.assert_allclose(greedy.scores[0], one_pass.scores[0], rtol=1e-6)
  mask = np.ones((3, 7), bool)
  mask[0] = greedy.mask[0]
  expected = selective.routing_scores(graphdef, params, [b], mask)[1]
  np.testing.assert_allclose(greedy.scores[1], expected, rtol=1e-6)
  assert not np.allclose(greedy.scores[1], one_pass.scores[1])
  for layer in range(3):
    assert list(greedy.kept_routed[layer]) == sorted(np.argsort(-greedy.scores[layer],
                                                               kind="stable")[:2])


def test_top_experts_ties_go_to_lower_index():
  np.testing.assert_array_equal(selective.top_experts(np.array([0.2, 0.3, 0.3, 0.2]), 2), [1, 2])
  np.testing.assert_array_equal(selective.top_experts(np.array([0.25] * 4), 3), [0, 1, 2])


def test_pruned_config_validates_and_keep_range():
  emo = ModelConfig(num_layers=2, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32,
                    vocab_size=128, expert_hidden=8, eval_pool_size=32)
  for keep in (2, 8, 16, 32, 64, 128):
    c = selective.pruned_config(emo, keep)
    assert c.num_experts == keep and c.top_k == min(7, keep - 1)
    assert c.top_k <= c.pool_min <= c.pool_max <= keep
  assert selective.pruned_config(emo, 16).eval_pool_size is None
  assert selective.pruned_config(emo, 64).eval_pool_size == 32
  with pytest.raises(ValueError, match="keep=1"):
    selective.routed_to_keep(emo, 1)
  with pytest.raises(ValueError, match="keep=129"):
    selective.routed_to_keep(emo, 129)


def test_selection_table(tmp_path):
  graphdef, params = model_and_params()
  sel = selective.select_experts(graphdef, params, CFG, [batch()], 3)
  files = selective.write_selection(sel, tmp_path)
  table = json.load(open(files["table_json"]))
  assert [row["shared"] for row in table["layers"]] == [[7]] * 3
  assert table["layers"][0]["new_index"]["7"] == 2


# ---- calibration batches ------------------------------------------------------------------------
TOK = ByteTokenizer()


class SmallVocab:
  """Bytes folded into CFG's 64 ids (pad 0, eos 1)."""
  pad_id, eos_id = 0, 1

  @staticmethod
  def encode(text):
    return [2 + b % 62 for b in text.encode()]


def reference_rows(texts, seq_len, prompts=False, tok=TOK):
  """Each text's row by hand: its first seq_len tokens of text + EOS, or for prompts its last
  seq_len tokens and no EOS."""
  if prompts:
    return [tok.encode(t)[-seq_len:] for t in texts]
  return [(tok.encode(t) + [tok.eos_id])[:seq_len] for t in texts]


def unpack(batches):
  """The real tokens of every non-empty row, in order, and the batch shapes."""
  rows = [list(b["tokens"][i][b["segment_ids"][i] > 0]) for b in batches
          for i in range(len(b["tokens"]))]
  return [r for r in rows if r], [b["tokens"].shape for b in batches]


def test_calibration_rows_are_documents_or_prompts():
  texts = ["abc", "hello world, a longer text", "x" * 40]
  rows, shapes = unpack(calibration.calibration_batches(texts, TOK, seq_len=24))
  assert rows == reference_rows(texts, 24) and rows[0][-1] == TOK.eos_id
  assert shapes == [(3, 24)]                        # the longest row, at most seq_len
  rows, shapes = unpack(calibration.calibration_batches(texts, TOK, seq_len=64, rows=2,
                                                        prompts=True))
  assert rows == reference_rows(texts, 64, prompts=True)
  assert shapes == [(2, 32), (2, 64)]               # power-of-two widths, a padding row added
  ends = unpack(calibration.calibration_batches(texts, TOK, seq_len=8, prompts=True))[0]
  assert ends == reference_rows(texts, 8, prompts=True) and TOK.decode(ends[1]) == "ger text"
  b = calibration.calibration_batches(["abc", "hello world"], TOK, seq_len=8)[0]
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 0, 0, 0, 0])  # 3 bytes + EOS
  np.testing.assert_array_equal(b["positions"][1], np.arange(8))
  assert (b["tokens"][0, 4:] == TOK.pad_id).all()
  with pytest.raises(ValueError, match="no calibration"):
    calibration.calibration_batches([], TOK, seq_len=8)


def test_full_width_batches_have_one_shape():
  batches = calibration.calibration_batches(["a b c", "longer text " * 20, "x"], TOK, seq_len=32,
                                            rows=2, full_width=True)
  assert [b["tokens"].shape for b in batches] == [(2, 32), (2, 32)]
  assert batches[1]["segment_ids"][1].sum() == 0              # the padding row is never scored
  assert batches[0]["segment_ids"][1].sum() == 32             # truncated to seq_len
  assert calibration.calibration_tokens(batches) == 6 + 32 + 2


@pytest.mark.slow
def test_padding_and_batching_never_change_the_scores():
  """The scores of one tight batch built by hand (as wide as its longest row) equal those of
  the same texts in padded batches of every shape the builder makes."""
  graphdef, params = model_and_params()
  texts = ["abc", "hello there", "the third text is the longest one", "z"]
  rows = reference_rows(texts, 24, tok=SmallVocab)
  width = max(len(r) for r in rows)
  tight = {k: np.zeros((len(rows), width), np.int32) for k in calibration.FIELDS}
  for i, r in enumerate(rows):
    tight["tokens"][i, :len(r)] = r
    tight["segment_ids"][i, :len(r)] = 1
    tight["positions"][i, :len(r)] = np.arange(len(r))
  mask = np.ones((CFG.num_layers, CFG.num_routed_experts), bool)
  want = selective.routing_scores(graphdef, params, [tight], mask)
  for options in ({}, {"rows": 3}, {"rows": 8, "full_width": True}):
    batches = calibration.calibration_batches(texts, SmallVocab, seq_len=24, **options)
    got = selective.routing_scores(graphdef, params, batches, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ---- subset sizes --------------------------------------------------------------------------------
def test_subset_sizes_scale_the_papers():
  emo = ModelConfig(num_layers=2, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32,
                    vocab_size=128, expert_hidden=8)                 # 128 experts, 7 + 1 active
  assert selective.subset_sizes(emo) == [128, 64, 32, 16, 8]
  assert selective.active_experts(emo) == 8
  small = dict(num_shared_experts=1, top_k=2, pool_min=2)
  for experts, sizes in ((17, [17, 8, 4, 2]), (8, [8, 4, 2])):
    cfg = emo.replace(num_experts=experts, pool_max=experts, **small)
    assert selective.subset_sizes(cfg, allow_below_active=True) == sizes
    with pytest.raises(ValueError, match="fewer than the 3 every token uses"):
      selective.subset_sizes(cfg)
  cfg = emo.replace(num_experts=17, pool_max=17, **small)
  assert selective.subset_sizes(cfg, [1, 0.5, 0.25]) == [17, 8, 4]
  assert selective.subset_sizes(cfg, [0.5]) == [17, 8]                # the whole bank is first
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    selective.subset_sizes(cfg, [1.5])
  with pytest.raises(ValueError, match="mixture-of-experts"):
    selective.subset_sizes(emo.replace(num_experts=0, pool=False, mlp_hidden=8))
