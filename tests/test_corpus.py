"""Resolving `config.data` into splits and a tokenizer: preparing, reusing, never overwriting."""

import json

import numpy as np
import pytest

from emo_jax.config import ConfigError
from emo_jax.data import corpus as corpus_lib
from emo_jax.data import synthetic


def write_jsonl(path, n=120):
  docs = synthetic.synthetic_corpus(n, seed=3)
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return docs


def test_own_jsonl_is_prepared_once_and_reused(tmp_path):
  source = tmp_path / "mine.jsonl"
  docs = write_jsonl(source)
  dc = corpus_lib.DataConfig(corpus=str(source), data_dir=str(tmp_path / "prepared"),
                             tokenizer="bytes", seq_len=32, batch_size=2)
  corpus = corpus_lib.load_corpus(dc)
  assert sum(len(v) for v in corpus.splits.values()) == len(docs)
  assert corpus.domains == sorted({d["domain"] for d in docs})
  stamp = (tmp_path / "prepared" / "train.jsonl").stat().st_mtime_ns
  again = corpus_lib.load_corpus(dc)
  assert (tmp_path / "prepared" / "train.jsonl").stat().st_mtime_ns == stamp  # reused
  assert [d["id"] for d in again.splits["train"]] == [d["id"] for d in corpus.splits["train"]]
  batch = next(iter(corpus.dataset("train", seq_len=32, batch_size=2, max_segments=4)))
  assert batch["tokens"].shape == (2, 32)


def test_a_prepared_folder_is_used_as_it_is(tmp_path):
  """Training with another vocab_size setting must not retrain the folder's tokenizer."""
  source = tmp_path / "mine.jsonl"
  write_jsonl(source)
  out = tmp_path / "prepared"
  summary = corpus_lib.prepare_corpus(str(source), out, vocab_size=300)
  model_file = out / "tokenizer.model"
  stamp = model_file.stat().st_mtime_ns
  corpus = corpus_lib.load_corpus(corpus_lib.DataConfig(corpus=str(source), data_dir=str(out),
                                                        vocab_size=8192))
  assert corpus.tokenizer.vocab_size == summary["vocab_size"] == 300
  assert model_file.stat().st_mtime_ns == stamp


def test_default_folders_differ_by_tokenizer():
  a = corpus_lib.default_data_dir(corpus_lib.DataConfig(corpus="demo", vocab_size=8192))
  b = corpus_lib.default_data_dir(corpus_lib.DataConfig(corpus="demo", vocab_size=4096))
  assert a != b and a == corpus_lib.default_data_dir(corpus_lib.DataConfig(corpus="demo"))


def test_synthetic_corpus_has_all_splits_and_domains():
  corpus = corpus_lib.load_corpus(corpus_lib.DataConfig(corpus="synthetic", tokenizer="bytes",
                                                        synthetic_documents=400))
  assert corpus.domains == sorted(synthetic.DOMAIN_LETTERS)
  assert all(len(corpus.splits[s]) > 0 for s in ("train", "validation", "test"))


def test_eval_batches_are_padded_to_full_static_shape():
  dc = corpus_lib.DataConfig(corpus="synthetic", tokenizer="bytes", synthetic_documents=200,
                             seq_len=64, batch_size=64)
  corpus = corpus_lib.load_corpus(dc)
  batches = corpus.eval_batches(dc, max_segments=8, num_batches=100)
  assert all(b["tokens"].shape == (64, 64) for b in batches)
  last = batches[-1]
  empty = last["segment_ids"].sum(-1) == 0
  assert empty.any()  # the validation split does not fill the last batch
  assert np.all(last["loss_mask"][empty] == 0) and np.all(last["domain_ids"][empty] == -1)


def test_bad_data_config_names_the_field():
  with pytest.raises(ConfigError, match=r"DataConfig\.seq_len"):
    corpus_lib.DataConfig(seq_len=0)
  with pytest.raises(ConfigError, match="unknown DataConfig field"):
    corpus_lib.DataConfig.from_dict({"seqlen": 3})
