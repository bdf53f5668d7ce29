"""Resolving `config.data` into splits and a tokenizer: preparing (explicitly, once), reusing,
never overwriting, and reading only."""

import json
import logging
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from emo_jax.config import ConfigError
from emo_jax.data import corpus as corpus_lib
from emo_jax.data import fingerprint as fingerprint_lib
from emo_jax.data import sources, synthetic
from emo_jax.data import tokenizer as tokenizer_lib
from emo_jax.data import training_data as training_data_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_jsonl(path, n=120):
  docs = synthetic.synthetic_corpus(n, seed=3)
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return docs


def test_own_jsonl_is_prepared_once_and_reused(tmp_path, caplog):
  source = tmp_path / "mine.jsonl"
  docs = write_jsonl(source)
  dc = corpus_lib.DataConfig(corpus=str(source), data_dir=str(tmp_path / "prepared"),
                             tokenizer="bytes", seq_len=32, batch_size=2)
  with caplog.at_level(logging.INFO, logger="emo_jax.data.corpus"):
    summary = corpus_lib.prepare_corpus(dc)
  assert "corpus: preparing" in caplog.text and "there is no folder" in caplog.text
  corpus = corpus_lib.load_corpus(dc)
  assert sum(len(v) for v in corpus.splits.values()) == len(docs) == sum(summary["splits"].values())
  assert corpus.domains == sorted({d["domain"] for d in docs})
  stamp = (tmp_path / "prepared" / "train.jsonl").stat().st_mtime_ns
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="emo_jax.data.corpus"):
    assert corpus_lib.prepare_corpus(dc) == summary
  assert "corpus: reusing" in caplog.text and "preparing" not in caplog.text
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
  summary = corpus_lib.build_corpus(str(source), out, vocab_size=300)
  model_file = out / "tokenizer.model"
  stamp = model_file.stat().st_mtime_ns
  dc = corpus_lib.DataConfig(corpus=str(source), data_dir=str(out), vocab_size=8192)
  assert corpus_lib.prepare_corpus(dc) == summary
  corpus = corpus_lib.load_corpus(dc)
  assert corpus.tokenizer.vocab_size == summary["vocab_size"] == 300
  assert model_file.stat().st_mtime_ns == stamp


def test_load_corpus_only_reads_and_names_the_command_that_prepares(tmp_path):
  source = tmp_path / "mine.jsonl"
  write_jsonl(source, n=40)
  out = tmp_path / "prepared"
  dc = corpus_lib.DataConfig(corpus=str(source), data_dir=str(out), tokenizer="bytes")
  with pytest.raises(corpus_lib.CorpusNotPreparedError) as missing:
    corpus_lib.load_corpus(dc)
  message = str(missing.value)
  assert "\n" not in message and f"there is no folder {out}" in message
  assert not out.exists()  # reading built nothing
  command = message.split("`")[1]
  assert command == corpus_lib.prepare_command(dc)
  # The command it names prepares exactly what load_corpus reads.
  words = shlex.split(command)
  assert words[:3] == ["python", "-m", "experiments.prepare_data"]
  done = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert sum(len(v) for v in corpus_lib.load_corpus(dc).splits.values()) == 40

  other = tmp_path / "other.jsonl"
  write_jsonl(other, n=8)
  with pytest.raises(corpus_lib.CorpusNotPreparedError, match="prepared from corpus"):
    corpus_lib.load_corpus(dc.replace(corpus=str(other)))
  with pytest.raises(corpus_lib.CorpusNotPreparedError, match="prepared with tokenizer 'bytes'"):
    corpus_lib.load_corpus(dc.replace(tokenizer=str(tmp_path / "x.model")))
  (out / "train.jsonl").unlink()
  with pytest.raises(corpus_lib.CorpusNotPreparedError, match=r"incomplete \(.*train\.jsonl is "
                     r"missing\); prepare it with `python -m experiments\.prepare_data"):
    corpus_lib.load_corpus(dc)
  corpus_lib.prepare_corpus(dc)  # an incomplete folder is prepared again
  assert sum(len(v) for v in corpus_lib.load_corpus(dc).splits.values()) == 40


def test_prepare_command_names_the_tokenizer_or_the_vocabulary():
  trained = corpus_lib.DataConfig(corpus="my docs.jsonl", data_dir="/d", vocab_size=300)
  assert corpus_lib.prepare_command(trained) == (
      "python -m experiments.prepare_data --corpus 'my docs.jsonl' --out /d --vocab_size 300")
  given = trained.replace(tokenizer="bytes")
  assert corpus_lib.prepare_command(given).endswith("--out /d --tokenizer bytes")


def test_synthetic_corpus_writes_nothing_and_needs_no_preparation(tmp_path, monkeypatch):
  monkeypatch.setenv("EMO_JAX_CACHE", str(tmp_path / "cache"))
  dc = corpus_lib.DataConfig(corpus="synthetic", tokenizer="bytes", synthetic_documents=40)
  assert corpus_lib.prepare_corpus(dc) is None
  corpus = corpus_lib.load_corpus(dc)
  assert sum(len(v) for v in corpus.splits.values()) == 40
  assert not (tmp_path / "cache").exists()


def test_training_data_is_the_corpus_read_once(tmp_path):
  """The trainer's one entry into data/ gives the batches the corpus itself would give."""
  dc = corpus_lib.DataConfig(corpus="synthetic", tokenizer="bytes", synthetic_documents=200,
                             seq_len=32, batch_size=4, seed=3)
  data = training_data_lib.training_data(dc, max_segments=4, eval_batches=3,
                                         process_index=0, process_count=1)
  corpus = corpus_lib.load_corpus(dc)
  assert data.domains == corpus.domains and data.tokenizer.vocab_size == 258
  assert data.fingerprint == fingerprint_lib.data_stream_fingerprint(corpus)
  reference = iter(corpus.dataset("train", seq_len=32, batch_size=4, max_segments=4, seed=3,
                                  num_epochs=None, process_index=0, process_count=1))
  assert data.train_iterator is data.train_iterator  # one stream, whose state checkpoints save
  for _ in range(3):
    got, want = next(data.train_iterator), next(reference)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  first = next(iter(data.train_pass()))  # a pass of its own: the stream above is not advanced
  want = next(iter(corpus.dataset("train", seq_len=32, batch_size=4, max_segments=4, seed=3,
                                  num_epochs=1, process_index=0, process_count=1)))
  assert all(np.array_equal(first[k], want[k]) for k in want)
  evals = corpus.eval_batches(dc, 4, 3, process_index=0, process_count=1)
  assert len(data.eval_batches) == len(evals) == 3
  assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(data.eval_batches, evals))

  # Host 1 of 2 reads its half of every global batch, from its own documents.
  half = training_data_lib.training_data(dc, max_segments=4, eval_batches=1, process_index=1,
                                         process_count=2)
  assert next(half.train_iterator)["tokens"].shape == (2, 32)
  with pytest.raises(ConfigError, match=r"data\.batch_size=4 must be a multiple of the number "
                     r"of hosts \(3\)"):
    training_data_lib.training_data(dc, max_segments=4, eval_batches=1, process_index=0,
                                    process_count=3)


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


# ---- prepare_data on a corpus of one's own: what a first try meets ----------------------------

_WORDS = ("the patient was treated with a new drug and results show improvement in most cases "
          "over time we study how models learn from data when training on many documents of "
          "different kinds such as news code and plays").split()


def small_jsonl(path, n=48, bad_line=None):
  """n documents of a few hundred words from a small vocabulary, and optionally one line cut
  short before document `bad_line`. Returns the 1-based line number of the bad line."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    if i == bad_line:
      lines.append('{"text": "a line cut sh')
    text = " ".join(rng.choice(_WORDS, 300))
    lines.append(json.dumps({"text": text, "domain": ["news", "medicine"][i % 2]}))
  path.write_text("\n".join(lines) + "\n")
  return None if bad_line is None else bad_line + 1


def run_prepare_data(*args):
  return subprocess.run([sys.executable, "-m", "experiments.prepare_data", *map(str, args)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.integration
def test_prepare_data_names_what_it_skipped_and_refuses_a_vocabulary_too_large(tmp_path):
  corpus = tmp_path / "mine.jsonl"
  bad = small_jsonl(corpus, bad_line=17)
  out = tmp_path / "out"
  done = run_prepare_data("--corpus", corpus, "--out", out, "--on_error=skip",
                          "--vocab_size", 512)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["skipped"][str(corpus)]["lines"] == 1
  first = result["skipped"][str(corpus)]["first"]
  assert first.startswith(f"{corpus}:{bad}: not valid JSON") and "cut short" in first
  assert "--on_error=skip" in first
  assert sum(result["splits"].values()) == 48 and result["vocab_size"] == 512

  out2 = tmp_path / "out2"
  failed = run_prepare_data("--corpus", corpus, "--out", out2, "--on_error=skip",
                            "--vocab_size", 8192)
  assert failed.returncode != 0
  message = failed.stderr.strip().splitlines()[-1]
  assert "Traceback" not in failed.stderr
  largest = tokenizer_lib.TokenizerError  # the message names the largest workable size
  assert message.startswith("prepare_data: vocab_size=8192 is more than this text can fill")
  n = int(message.split("--vocab_size ")[1].split(")")[0])
  assert 300 < n < 8192 and largest
  assert not out2.exists() or not any(p.name.endswith(".jsonl") for p in out2.rglob("*"))

  # The size it names works.
  ok = corpus_lib.build_corpus(str(corpus), tmp_path / "out3", vocab_size=n,
                                 on_error="skip")
  assert ok["vocab_size"] == n


def test_too_small_corpus_leaves_out_as_it_was(tmp_path):
  corpus = tmp_path / "mine.jsonl"
  small_jsonl(corpus)
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(tokenizer_lib.TokenizerError) as info:
    corpus_lib.build_corpus(str(corpus), out, vocab_size=8192)
  assert "\n" not in str(info.value) and info.value.max_vocab_size < 8192
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_binary_file_in_a_folder_is_refused_or_skipped_by_name(tmp_path):
  folder = tmp_path / "docs" / "news"
  folder.mkdir(parents=True)
  for i in range(3):
    (folder / f"{i}.txt").write_text(f"news text number {i}. " * 40)
  (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
  out = tmp_path / "out"
  with pytest.raises(sources.DataError, match=r"image\.png: a binary file"):
    corpus_lib.build_corpus(str(tmp_path / "docs"), out, tokenizer="bytes")
  assert not out.exists()
  result = corpus_lib.build_corpus(str(tmp_path / "docs"), out, tokenizer="bytes",
                                     on_error="skip")
  entry = result["skipped"][str(tmp_path / "docs")]
  assert entry["files"] == 1 and "image.png" in entry["first"]
  assert sum(result["splits"].values()) == 3


def test_a_document_larger_than_the_tokenizer_share_is_cut_not_dropped(tmp_path):
  corpus = tmp_path / "big.jsonl"
  rng = np.random.default_rng(1)
  words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(2000)]
  text = "".join(" ".join(rng.choice(words, 12)) + "\n" for _ in range(1500))
  corpus.write_text(json.dumps({"text": text, "domain": "one", "id": "big"}) + "\n")
  out = tmp_path / "out"
  result = corpus_lib.build_corpus(str(corpus), out, vocab_size=300, tokenizer_bytes=20_000,
                                     validation=0.0, test=0.0)
  sample = result["tokenizer_sample"]
  assert sample == {"documents": 0, "cut": 1, "left_out": 0, "bytes": sample["bytes"]}
  assert 19_000 < sample["bytes"] <= 20_000
  assert result["splits"]["train"] == 1  # the whole document is still in the train split


@pytest.mark.parametrize("make, match", [
    (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a folder"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "sub", "is a file, so no folder"),
    (lambda t: pathlib.Path("/proc/emo_jax_test/out"), "cannot be written"),
])
def test_a_bad_out_folder_is_one_line(tmp_path, make, match):
  corpus = tmp_path / "mine.jsonl"
  small_jsonl(corpus, n=4)
  with pytest.raises(corpus_lib.OutputFolderError, match=match) as info:
    corpus_lib.build_corpus(str(corpus), make(tmp_path), tokenizer="bytes")
  assert "\n" not in str(info.value)
