"""Which text a run trains on and which tokenizer reads it: `DataConfig` -> `Corpus`.

One place resolves the experiment's data settings into split documents and a tokenizer, so the
trainer, the evaluator and the analysis tools see the same splits:

* `corpus="demo"`: the built-in multi-domain corpus (built once into the cache, see
  demo_corpus.py) with a SentencePiece tokenizer trained on its train split;
* `corpus="synthetic"`: generated multi-domain text with the byte tokenizer (tests, smoke runs);
* any other value: a path to the user's JSONL, text folder or ArrayRecord, split by document id,
  with a tokenizer trained on its train split unless `tokenizer` names one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import pathlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from emo_jax.config import ConfigError
from emo_jax.data import demo_corpus, pipeline, sources, synthetic
from emo_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Data settings of an experiment (`config.data`)."""
  # "demo", "synthetic", or a path to a JSONL file / text folder / ArrayRecord file.
  corpus: str = "demo"
  # Where the prepared splits and tokenizer live; "" = a folder in the cache for this corpus.
  data_dir: str = ""
  # "" = `data_dir/tokenizer.model` (trained when missing); "bytes" = the byte tokenizer; or a
  # SentencePiece .model / Hugging Face tokenizer.json path.
  tokenizer: str = ""
  # Size of a tokenizer trained here.
  vocab_size: int = 8192
  seq_len: int = 512
  # Global batch (rows per step, over all hosts).
  batch_size: int = 16
  seed: int = 0
  # Processes that tokenize and pack in parallel (0 = in the training process).
  num_workers: int = 0
  # Documents generated for corpus="synthetic".
  synthetic_documents: int = 4000

  def __post_init__(self):
    for name in ("seq_len", "batch_size", "vocab_size", "synthetic_documents"):
      if getattr(self, name) < 1:
        raise ConfigError(f"DataConfig.{name}={getattr(self, name)!r} is invalid: must be >= 1")
    if self.num_workers < 0:
      raise ConfigError(f"DataConfig.num_workers={self.num_workers} is invalid: must be >= 0")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "DataConfig":
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown DataConfig field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Corpus:
  """Split documents, their tokenizer and the sorted list of domains."""
  splits: dict[str, Sequence[dict]]
  tokenizer: Any
  domains: list[str]

  def dataset(self, split: str, *, seq_len: int, batch_size: int, max_segments: int,
              seed: int = 0, num_epochs: int | None = None, shuffle: bool = True,
              drop_remainder: bool = True, num_workers: int = 0):
    """The packed, batched Grain dataset of a split for this host (batch_size is global)."""
    import jax
    if batch_size % jax.process_count():
      raise ConfigError(f"data.batch_size={batch_size} must be a multiple of the number of "
                        f"hosts ({jax.process_count()})")
    return pipeline.make_dataset(
        self.splits[split], self.tokenizer, seq_len=seq_len,
        batch_size=batch_size // jax.process_count(), max_segments=max_segments,
        domains=self.domains, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        drop_remainder=drop_remainder, num_workers=num_workers)

  def eval_batches(self, dc: DataConfig, max_segments: int, num_batches: int,
                   split: str = "validation") -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of a split, in a fixed order, padded to full batches."""
    if not self.splits.get(split):
      raise ValueError(f"the {split} split is empty; use a larger corpus or other split "
                       "fractions")
    ds = self.dataset(split, seq_len=dc.seq_len, batch_size=dc.batch_size,
                      max_segments=max_segments, num_epochs=1, shuffle=False,
                      drop_remainder=False)
    return [pad_batch(b, dc.batch_size // _process_count())
            for b in itertools.islice(ds, num_batches)]


def _process_count() -> int:
  import jax
  return jax.process_count()


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Adds all-padding rows (segment 0, no loss) so every batch has the same static shape."""
  have = batch["tokens"].shape[0]
  if have == rows:
    return dict(batch)
  out = {}
  for key, value in batch.items():
    fill = -1 if key == "domain_ids" else 0
    extra = np.full((rows - have,) + value.shape[1:], fill, value.dtype)
    out[key] = np.concatenate([np.asarray(value), extra])
  return out


def default_data_dir(corpus: str) -> pathlib.Path:
  if corpus in ("demo", "synthetic"):
    return demo_corpus.cache_root() / f"{corpus}_data"
  digest = hashlib.sha256(str(pathlib.Path(corpus).absolute()).encode()).hexdigest()[:12]
  return demo_corpus.cache_root() / "corpora" / f"{pathlib.Path(corpus).stem}-{digest}"


def tokenizer_sample(docs: Iterable[dict], max_bytes: int) -> Iterator[str]:
  """Texts for tokenizer training, alternating between domains so none dominates."""
  by_domain: dict[str, list[dict]] = {}
  for doc in docs:
    by_domain.setdefault(doc["domain"], []).append(doc)
  used = 0
  for group in itertools.zip_longest(*(by_domain[d] for d in sorted(by_domain))):
    for doc in group:
      if doc is None:
        continue
      yield doc["text"]
      used += len(doc["text"].encode("utf-8"))
      if used >= max_bytes:
        return


def prepare_corpus(dc: DataConfig, *, tokenizer_bytes: int = 20_000_000) -> dict[str, Any]:
  """Makes sure the splits and the tokenizer of `dc` exist on disk; returns a summary.

  Idempotent: finished pieces are reused. The summary has `domains` (domain -> documents and
  bytes), `total_bytes`, `splits`, `tokenizer`, `vocab_size`, `skipped`, `data_dir`.
  """
  data_dir = pathlib.Path(dc.data_dir) if dc.data_dir else default_data_dir(dc.corpus)
  if dc.corpus == "synthetic":
    raise ValueError("the synthetic corpus is generated in memory and has nothing to prepare")
  if dc.corpus == "demo":
    summary = demo_corpus.build_demo_corpus(data_dir)
  else:
    docs = sources.load_documents(dc.corpus)
    if len(docs) == 0:
      raise ValueError(f"the corpus {dc.corpus!r} holds no documents")
    data_dir.mkdir(parents=True, exist_ok=True)
    written = sources.write_splits(docs, data_dir)
    domains = written["domains"]
    summary = {"domains": domains, "splits": written["splits"], "skipped": {},
               "total_bytes": sum(d["bytes"] for d in domains.values())}
  tokenizer_path = pathlib.Path(dc.tokenizer) if dc.tokenizer and dc.tokenizer != "bytes" \
      else data_dir / "tokenizer.model"
  if dc.tokenizer == "bytes":
    tok = tokenizer_lib.ByteTokenizer()
    tokenizer_path = "bytes"
  elif tokenizer_path.exists():
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)
  elif dc.tokenizer:
    raise FileNotFoundError(f"data.tokenizer={dc.tokenizer!r} does not exist; give a .model or "
                            "tokenizer.json path, 'bytes', or '' to train one on the corpus")
  else:
    log.info("training a %d-piece SentencePiece tokenizer on %s", dc.vocab_size, data_dir)
    train_docs = sources.read_jsonl(data_dir / "train.jsonl")
    tok = tokenizer_lib.train_sentencepiece(tokenizer_sample(train_docs, tokenizer_bytes),
                                            data_dir / "tokenizer", vocab_size=dc.vocab_size)
  return {"domains": summary["domains"], "total_bytes": summary["total_bytes"],
          "splits": summary.get("splits", {}), "tokenizer": str(tokenizer_path),
          "vocab_size": tok.vocab_size, "skipped": summary.get("skipped", {}),
          "data_dir": str(data_dir)}


def load_corpus(dc: DataConfig) -> Corpus:
  """Splits and tokenizer for `dc`, preparing them first when they are missing."""
  if dc.corpus == "synthetic":
    docs = synthetic.synthetic_corpus(dc.synthetic_documents, seed=0)
    splits = sources.split_documents(docs, validation=0.05, test=0.05)
    tok = (tokenizer_lib.ByteTokenizer() if dc.tokenizer in ("", "bytes")
           else tokenizer_lib.load_tokenizer(dc.tokenizer))
    return Corpus(splits, tok, sorted({d["domain"] for d in docs}))
  summary = prepare_corpus(dc)
  data_dir = pathlib.Path(summary["data_dir"])
  splits = {split: list(sources.read_jsonl(data_dir / f"{split}.jsonl"))
            for split in ("train", "validation", "test")}
  tok = (tokenizer_lib.ByteTokenizer() if summary["tokenizer"] == "bytes"
         else tokenizer_lib.load_tokenizer(summary["tokenizer"]))
  return Corpus(splits, tok, sorted(summary["domains"]))
