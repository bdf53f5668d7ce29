"""Packing invariants, checkpointable iterator state and host sharding of the Grain pipeline."""

import json

import numpy as np
import pytest

from emo_jax.data import pipeline

PAD, EOS = 0, 2


class CharTokenizer:
  """One id per character (ids 3..), EOS 2, PAD 0: easy to reason about in assertions."""
  eos_id, pad_id, vocab_size = EOS, PAD, 256

  def encode(self, text):
    return [3 + (ord(c) % 250) for c in text]


def make_docs(n, seed=0, max_len=50):
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  return [{"id": f"d{i}", "domain": ["code", "news", "bio"][i % 3],
           "text": "".join(rng.choice(letters, size=int(rng.integers(0, max_len))))}
          for i in range(n)]


DOMAINS = ["bio", "code", "news"]


def rows_of(dataset):
  """Flattens batches into a list of per-row dicts."""
  rows = []
  for batch in dataset:
    for r in range(batch["tokens"].shape[0]):
      rows.append({k: batch[k][r] for k in pipeline.FIELDS})
  return rows


def test_one_epoch_packs_every_token_once_with_correct_annotations():
  docs = make_docs(80)
  L, S = 24, 3
  ds = pipeline.make_dataset(docs, CharTokenizer(), seq_len=L, batch_size=4, max_segments=S,
                             domains=DOMAINS, seed=3, num_epochs=1, drop_remainder=False,
                             shard_index=0, shard_count=1)
  rows = rows_of(ds)
  order = list(pipeline.document_dataset(docs, seed=3, num_epochs=1))
  expected = [CharTokenizer().encode(d["text"]) + [EOS] for d in order]
  # Every token of every document, in order, exactly once (fragments rejoined).
  stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
  np.testing.assert_array_equal(stream, np.concatenate(expected))
  domain_stream = np.concatenate([r["domain_ids"][r["segment_ids"] > 0] for r in rows])
  np.testing.assert_array_equal(
      domain_stream, np.concatenate([[DOMAINS.index(d["domain"])] * len(e)
                                     for d, e in zip(order, expected)]))
  for r in rows:
    seg = r["segment_ids"]
    real = seg > 0
    n_real = int(real.sum())
    assert real[:n_real].all() and not real[n_real:].any()  # padding only at the end
    assert 1 <= seg.max() <= S
    np.testing.assert_array_equal(np.unique(seg[real]), np.arange(1, seg.max() + 1))
    assert np.all(np.diff(seg[real]) >= 0)
    for s in range(1, seg.max() + 1):
      idx = np.where(seg == s)[0]
      np.testing.assert_array_equal(r["positions"][idx], np.arange(len(idx)))
      # Loss on every token but the fragment's last: no loss across a boundary.
      np.testing.assert_array_equal(r["loss_mask"][idx], [1.0] * (len(idx) - 1) + [0.0])
      np.testing.assert_array_equal(r["targets"][idx[:-1]], r["tokens"][idx[1:]])
    assert np.all(r["tokens"][~real] == PAD) and np.all(r["loss_mask"][~real] == 0)
    assert np.all(r["domain_ids"][~real] == -1)
    # A row closes early only when it holds max_segments fragments.
    if not real.all() and r is not rows[-1]:
      assert seg.max() == S


def test_long_documents_continue_as_fragments():
  docs = [{"id": "long", "domain": "bio", "text": "x" * 70}]
  rows = rows_of(pipeline.make_dataset(docs, CharTokenizer(), seq_len=32, batch_size=1,
                                       max_segments=2, shuffle=False, num_epochs=1,
                                       drop_remainder=False, shard_index=0, shard_count=1))
  assert [int((r["segment_ids"] > 0).sum()) for r in rows] == [32, 32, 7]
  assert all(r["positions"][0] == 0 for r in rows)  # each fragment restarts its positions


@pytest.mark.parametrize("split_at", [1, 4, 9])
def test_restored_iterator_yields_exactly_the_batches_that_would_have_come(split_at):
  docs = make_docs(40, seed=1, max_len=90)  # documents longer than a row: mid-document states
  make = lambda: pipeline.make_dataset(docs, CharTokenizer(), seq_len=32, batch_size=2,
                                       max_segments=4, domains=DOMAINS, seed=5,
                                       num_epochs=None, shard_index=0, shard_count=1)
  reference = iter(make())
  want = [next(reference) for _ in range(split_at + 6)]
  it = iter(make())
  for _ in range(split_at):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  restored = iter(make())
  restored.set_state(state)
  for expected in want[split_at:]:
    got = next(restored)
    for k in pipeline.FIELDS:
      np.testing.assert_array_equal(got[k], expected[k])


def test_epochs_are_reshuffled_and_training_repeats_forever():
  docs = make_docs(10)
  order = [d["id"] for d in pipeline.document_dataset(docs, seed=0, num_epochs=3)]
  assert len(order) == 30
  epochs = [order[i * 10:(i + 1) * 10] for i in range(3)]
  assert all(sorted(e) == sorted(d["id"] for d in docs) for e in epochs)
  assert epochs[0] != epochs[1]


def test_host_shards_are_disjoint_and_cover_the_corpus():
  docs = make_docs(31)
  shards = [[d["id"] for d in pipeline.document_dataset(docs, seed=2, shard_index=i,
                                                        shard_count=4)]
            for i in range(4)]
  seen = [doc_id for shard in shards for doc_id in shard]
  assert len(seen) == len(set(seen)) == len(docs)
  assert set(seen) == {d["id"] for d in docs}


@pytest.mark.slow
def test_multiprocess_prefetch_is_deterministic_and_complete():
  """Workers pack disjoint slices of the documents: other rows, same tokens, same every run."""
  docs = make_docs(30)
  kwargs = dict(seq_len=16, batch_size=2, max_segments=3, domains=DOMAINS, seed=0,
                num_epochs=1, drop_remainder=False, shard_index=0, shard_count=1)
  tokens = lambda rows: np.sort(np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows]))
  plain = rows_of(pipeline.make_dataset(docs, CharTokenizer(), **kwargs))
  parallel = rows_of(pipeline.make_dataset(docs, CharTokenizer(), num_workers=2, **kwargs))
  again = rows_of(pipeline.make_dataset(docs, CharTokenizer(), num_workers=2, **kwargs))
  np.testing.assert_array_equal(tokens(plain), tokens(parallel))
  assert len(parallel) == len(again)
  for a, b in zip(parallel, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_bad_arguments_are_explained():
  with pytest.raises(ValueError, match="no documents"):
    pipeline.document_dataset([])
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.document_dataset(make_docs(3), shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.PackingSpec(seq_len=1, max_segments=2)


# ---- the release's repetition filter -------------------------------------------------------------
def test_repetition_count_on_hand_made_sequences():
  from emo_jax.data.repetition import RepetitionFilter, repetition_count
  gram = list(range(10, 23))  # a 13-gram, the longest period the release checks
  prefix, suffix = [7, 8, 9], [99, 98]
  assert repetition_count(prefix + gram * 32 + suffix) == (32, 13)
  assert repetition_count(prefix + gram * 31 + suffix) == (31, 13)
  assert repetition_count([5] * 40) == (40, 1)
  assert repetition_count([1, 2] * 20 + [1]) == (20, 2)  # a trailing partial n-gram is no repeat
  assert repetition_count(list(range(50))) == (0, 0)
  # A 14-gram is outside periods 1..13, however often it repeats.
  assert repetition_count(list(range(30, 44)) * 40)[0] < 32
  rf = RepetitionFilter(1, 13, 32)
  seg = lambda n: np.ones(n, np.int32)
  assert rf.masks(np.array(prefix + gram * 32), seg(3 + 13 * 32))
  assert not rf.masks(np.array(prefix + gram * 31), seg(3 + 13 * 31))
  # Padding (the pad id repeated) is not read; a run across two documents of one row counts.
  padded = np.array(prefix + [0] * 60)
  assert not rf.masks(padded, np.array([1] * 3 + [0] * 60))
  two_docs = np.array([4] * 20 + [4] * 12)
  assert rf.masks(two_docs, np.array([1] * 20 + [2] * 12))


def test_repetition_filter_masks_only_the_rows_holding_the_repeat():
  from emo_jax.data.corpus import DataConfig
  docs = make_docs(12, seed=4, max_len=30)
  docs[5] = {"id": "rep", "domain": "code", "text": "ab" * 40}  # period 2, 40 times
  make = lambda dc: rows_of(pipeline.make_dataset(
      docs, CharTokenizer(), seq_len=32, batch_size=2, max_segments=4, domains=DOMAINS,
      seed=0, num_epochs=1, drop_remainder=False, shard_index=0, shard_count=1,
      row_filter=dc.row_filter()))
  assert DataConfig().row_filter() is None  # off by default
  plain = make(DataConfig())
  filtered = make(DataConfig(repetition_filter=True, repetition_max_period=13,
                             repetition_max_count=8))
  assert len(plain) == len(filtered)
  masked = 0
  for a, b in zip(plain, filtered):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    real = a["tokens"][a["segment_ids"] > 0]
    if any(len(real) >= 16 and np.all(real[i:i + 16:2] == real[i]) and
           np.all(real[i + 1:i + 16:2] == real[i + 1]) for i in range(len(real) - 15)):
      masked += 1
      assert b["loss_mask"].sum() == 0 and a["loss_mask"].sum() > 0
    else:
      np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
  assert masked >= 2  # the 81-token document spans at least 3 rows of 32


def test_repetition_filter_settings_are_validated_and_on_in_the_release_configs():
  import pathlib
  import sys
  from emo_jax.config import ConfigError
  from emo_jax.data.corpus import DataConfig
  with pytest.raises(ConfigError, match="repetition_min_period=3 and repetition_max_period=2"):
    DataConfig(repetition_min_period=3, repetition_max_period=2)
  with pytest.raises(ConfigError, match="repetition_max_count=1"):
    DataConfig(repetition_max_count=1)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from configs import emo_1b14b, stdmoe_1b14b_130b, tiny  # pylint: disable=import-outside-toplevel
  for module in (emo_1b14b, stdmoe_1b14b_130b):
    data = module.get_config().data
    assert (data.repetition_filter, data.repetition_min_period, data.repetition_max_period,
            data.repetition_max_count) == (True, 1, 13, 32)
  assert tiny.get_config().data.get("repetition_filter", False) is False
