"""Which text a run trains on and which tokenizer reads it: `DataConfig` -> `Corpus`.

One place resolves the experiment's data settings into split documents and a tokenizer, so the
trainer, the evaluator and the analysis tools see the same splits:

* `corpus="demo"`: the built-in multi-domain corpus (see demo_corpus.py) with a SentencePiece
  tokenizer trained on its train split;
* `corpus="synthetic"`: generated multi-domain text with the byte tokenizer (tests, smoke runs);
* any other value: a path to the user's JSONL, text folder or ArrayRecord, split by document id,
  with a tokenizer trained on its train split unless `tokenizer` names one.

Building and reading are separate steps, because building downloads, writes files and trains a
tokenizer (seconds to minutes) while reading must never change what a run trains on:
`prepare_corpus(dc)` builds the corpus into its data folder once (the trainer and
`python -m experiments.prepare_data` call it; it returns at once when the folder already holds
it), and `load_corpus(dc)` only reads, refusing a folder that is missing or incomplete with the
command that builds it. `build_corpus(corpus, out, ...)` is the builder both use, with every
setting of experiments/prepare_data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import shlex
import shutil
import tempfile
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from emo_jax.config import ConfigError, ConfigMixin
from emo_jax.data import demo_corpus, pipeline, repetition, sources, synthetic
from emo_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigMixin):
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
  # The release's repetition filter (emo_jax/data/repetition.py): a training row in which an
  # n-gram of repetition_min_period..repetition_max_period tokens repeats back to back
  # repetition_max_count times or more stays in the batch with no loss. Off by default; the
  # release configs turn it on (1..13, 32). Validation batches are never filtered.
  repetition_filter: bool = False
  repetition_min_period: int = 1
  repetition_max_period: int = 13
  repetition_max_count: int = 32

  def __post_init__(self):
    for name in ("seq_len", "batch_size", "vocab_size", "synthetic_documents"):
      if getattr(self, name) < 1:
        raise ConfigError(f"DataConfig.{name}={getattr(self, name)!r} is invalid: must be >= 1")
    if self.num_workers < 0:
      raise ConfigError(f"DataConfig.num_workers={self.num_workers} is invalid: must be >= 0")
    if not isinstance(self.repetition_filter, bool):
      raise ConfigError(f"DataConfig.repetition_filter={self.repetition_filter!r} is invalid: "
                        "must be True or False")
    if not 1 <= self.repetition_min_period <= self.repetition_max_period:
      raise ConfigError(f"DataConfig.repetition_min_period={self.repetition_min_period} and "
                        f"repetition_max_period={self.repetition_max_period} are invalid: need "
                        "1 <= repetition_min_period <= repetition_max_period (the release: 1, 13)")
    if self.repetition_max_count < 2:
      raise ConfigError(f"DataConfig.repetition_max_count={self.repetition_max_count} is "
                        "invalid: must be >= 2 (the release: 32)")

  def row_filter(self):
    """The repetition filter this config asks for, or None."""
    if not self.repetition_filter:
      return None
    return repetition.RepetitionFilter(self.repetition_min_period, self.repetition_max_period,
                                       self.repetition_max_count)


@dataclasses.dataclass
class Corpus:
  """Split documents, their tokenizer and the sorted list of domains."""
  splits: dict[str, Sequence[dict]]
  tokenizer: Any
  domains: list[str]

  def dataset(self, split: str, *, seq_len: int, batch_size: int, max_segments: int,
              seed: int = 0, num_epochs: int | None = None, shuffle: bool = True,
              drop_remainder: bool = True, num_workers: int = 0,
              process_index: int | None = None, process_count: int | None = None,
              row_filter=None):
    """The packed, batched Grain dataset of a split for one host (batch_size is global).

    The host is `process_index` of `process_count` (default: this JAX process); each reads its
    own strided share of the documents and `batch_size / process_count` rows a batch.
    `row_filter` maps each packed row (DataConfig.row_filter(): the repetition filter).
    """
    process_index, process_count = host(process_index, process_count)
    return pipeline.make_dataset(
        self.splits[split], self.tokenizer, seq_len=seq_len,
        batch_size=rows_per_host(batch_size, process_count), max_segments=max_segments,
        domains=self.domains, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        drop_remainder=drop_remainder, num_workers=num_workers, shard_index=process_index,
        shard_count=process_count, row_filter=row_filter)

  def eval_batches(self, dc: DataConfig, max_segments: int, num_batches: int,
                   split: str = "validation", *, process_index: int | None = None,
                   process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of a split, in a fixed order, padded to full batches."""
    if not self.splits.get(split):
      raise ValueError(f"the {split} split is empty; use a larger corpus or other split "
                       "fractions")
    process_index, process_count = host(process_index, process_count)
    ds = self.dataset(split, seq_len=dc.seq_len, batch_size=dc.batch_size,
                      max_segments=max_segments, num_epochs=1, shuffle=False,
                      drop_remainder=False, process_index=process_index,
                      process_count=process_count)
    return [pad_batch(b, rows_per_host(dc.batch_size, process_count))
            for b in itertools.islice(ds, num_batches)]


def host(process_index: int | None = None,
         process_count: int | None = None) -> tuple[int, int]:
  """(process_index, process_count) of a host: the given pair, or this JAX process's."""
  if process_index is None or process_count is None:
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def rows_per_host(batch_size: int, process_count: int) -> int:
  """The rows of a global batch each host reads; refuses a batch the hosts cannot share."""
  if batch_size % process_count:
    raise ConfigError(f"data.batch_size={batch_size} must be a multiple of the number of "
                      f"hosts ({process_count})")
  return batch_size // process_count


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


def default_data_dir(dc: DataConfig) -> pathlib.Path:
  """Where a corpus is prepared when the config names no data_dir (inside the cache).

  The folder name carries the tokenizer setting, so configs that want different tokenizers
  for the same text never share (and never overwrite) one folder.
  """
  source = "demo" if dc.corpus == "demo" else str(pathlib.Path(dc.corpus).absolute())
  tokenizer = dc.tokenizer or f"sentencepiece-{dc.vocab_size}"
  tag = hashlib.sha256(f"{source}|{tokenizer}".encode()).hexdigest()[:12]
  return demo_corpus.cache_root() / "corpora" / f"{pathlib.Path(dc.corpus).stem}-{tag}"


def resolved_data_dir(dc: DataConfig) -> pathlib.Path | None:
  """The folder `load_corpus` reads the prepared splits from (None for the synthetic corpus)."""
  if dc.corpus == "synthetic":
    return None
  return pathlib.Path(dc.data_dir) if dc.data_dir else default_data_dir(dc)


RESULT_FILE = "prepare_data.json"


def tokenizer_sample(train_path: pathlib.Path, domains: Iterable[str], budget: int,
                     stats: dict | None = None) -> Iterator[str]:
  """Train texts in file order, at most budget / len(domains) bytes from each domain.

  A document larger than what is left of its domain's share is cut at a line boundary to fit
  (never dropped whole, so one huge document still teaches the tokenizer), and `stats`
  counts the documents taken whole, cut and left out once the share was full.
  """
  domains = list(domains)
  per_domain = budget // max(1, len(domains))
  used = dict.fromkeys(domains, 0)
  if stats is None:
    stats = {}
  stats.update(documents=0, cut=0, left_out=0, bytes=0)
  for doc in sources.read_jsonl(train_path):
    left = per_domain - used.get(doc["domain"], 0)
    text = doc["text"]
    n = len(text.encode("utf-8"))
    if n > left:
      text = _prefix_of_lines(text, left)
      if not text:
        stats["left_out"] += 1
        continue
      stats["cut"] += 1
      n = len(text.encode("utf-8"))
    else:
      stats["documents"] += 1
    used[doc["domain"]] = used.get(doc["domain"], 0) + n
    stats["bytes"] += n
    yield text


def _prefix_of_lines(text: str, max_bytes: int) -> str:
  """The longest run of whole lines of `text` within max_bytes (a cut line when the first
  line alone is longer)."""
  if max_bytes <= 0:
    return ""
  out, size = [], 0
  for line in text.splitlines(keepends=True):
    n = len(line.encode("utf-8"))
    if size + n > max_bytes:
      if not out:  # one over-long line: keep its first max_bytes bytes
        return line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
      break
    out.append(line)
    size += n
  return "".join(out)


class OutputFolderError(sources.DataError):
  """The output folder cannot be used (a file, not writable, under a read-only tree)."""


def _usable_output_folder(out: pathlib.Path, what: str = "--out") -> bool:
  """Creates `out` when missing; returns whether it was created here. One-line errors."""
  if out.exists() and not out.is_dir():
    raise OutputFolderError(f"{what} {out} is a file, not a folder; pass a folder path")
  for parent in out.parents:
    if parent.exists():
      if not parent.is_dir():
        raise OutputFolderError(f"{what} {out}: {parent} is a file, so no folder can be made "
                                "under it; pass another path")
      break
  created = not out.exists()
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise OutputFolderError(f"{what} {out} cannot be written ({e.strerror or e}); pass a "
                            "folder you can write to") from None
  return created


def _read_preparation(out: pathlib.Path) -> tuple[dict | None, str]:
  """(the result of an earlier preparation in `out` whose files are all still there, "") or
  (None, what is missing)."""
  if not out.is_dir():
    return None, f"there is no folder {out}"
  try:
    previous = json.loads((out / RESULT_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None, f"{out} holds no complete preparation (no readable {RESULT_FILE})"
  paths = [out / f"{s}.jsonl" for s in sources.SPLITS]
  if previous.get("tokenizer") not in (None, "bytes"):
    paths.append(pathlib.Path(previous["tokenizer"]))
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    return None, f"the preparation in {out} is incomplete ({missing[0]} is missing)"
  return previous, ""


def _previous_result(out: pathlib.Path, settings: Mapping[str, Any]) -> dict | None:
  """The result of an earlier preparation with exactly these settings, files all there."""
  previous, _ = _read_preparation(out)
  if previous is None or previous.get("settings") != dict(settings):
    return None
  return previous


def build_corpus(corpus: str, out: str | pathlib.Path, *, vocab_size: int = 8192,
                 tokenizer: str = "", cache_dir: str | None = None,
                 max_bytes_per_domain: int = demo_corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
                 validation: float = 0.02, test: float = 0.02, domain: str | None = None,
                 on_error: str = "raise", tokenizer_bytes: int = 20_000_000,
                 skip_tokenizer: bool = False, force: bool = False) -> dict[str, Any]:
  """Writes `out/{train,validation,test}.jsonl` and a tokenizer; returns a summary.

  `corpus` is "demo" (the built-in corpus) or a path / glob / comma-separated list of JSONL,
  ArrayRecord, text files or folders. The tokenizer is `tokenizer` when given ("bytes" or a
  file), else a SentencePiece model trained on a domain-balanced sample of the train split.
  Re-running with the same settings reuses the result (`out/prepare_data.json`) unless `force`.
  The summary has `domains` (domain -> documents and bytes), `total_bytes`, `splits`,
  `tokenizer`, `vocab_size`, `skipped` (input -> count and first message, for on_error="skip";
  demo sources that could not be had), `tokenizer_sample`, `out`, `seconds` and `settings`.

  Everything is built in a staging folder inside `out` and moved into place only when the
  input has been read through and the tokenizer trained, so a failure (bad input, a
  vocabulary the corpus cannot fill) leaves `out` as it was.
  """
  out = pathlib.Path(out)
  settings = {"corpus": corpus, "vocab_size": vocab_size, "tokenizer": tokenizer,
              "max_bytes_per_domain": max_bytes_per_domain, "validation": validation,
              "test": test, "domain": domain, "on_error": on_error,
              "tokenizer_bytes": tokenizer_bytes, "skip_tokenizer": skip_tokenizer}
  if not force and (previous := _previous_result(out, settings)) is not None:
    log.info("reusing %s (force=True rebuilds)", out / RESULT_FILE)
    return previous
  if corpus == "demo":
    # The demo build writes through temporary names itself and is reused from there.
    _usable_output_folder(out)
    return _finish(corpus, out, out, settings, cache_dir=cache_dir, force=force)
  created = _usable_output_folder(out)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
  try:
    result = _finish(corpus, out, staging, settings, cache_dir=cache_dir, force=force)
    for name in [f"{s}.jsonl" for s in sources.SPLITS] + ["tokenizer.model", RESULT_FILE]:
      if (staging / name).exists():
        os.replace(staging / name, out / name)
    return result
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if created and not any(out.iterdir()):
      out.rmdir()
    raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _finish(corpus: str, out: pathlib.Path, build: pathlib.Path, settings: Mapping[str, Any],
            *, cache_dir: str | None, force: bool) -> dict[str, Any]:
  """The corpus and tokenizer of `build_corpus`, written into `build`; paths name `out`."""
  start = time.time()
  if corpus == "demo":
    built = demo_corpus.build_demo_corpus(
        build, cache_dir=cache_dir, max_bytes_per_domain=settings["max_bytes_per_domain"],
        validation=settings["validation"], test=settings["test"], force=force)
  else:
    spec = [p for p in corpus.split(",") if p]
    skipped: dict[str, dict] = {}
    docs = sources.iter_documents(spec, domain=settings["domain"],
                                  on_error=settings["on_error"], skipped=skipped)
    written = sources.write_splits(docs, build, validation=settings["validation"],
                                   test=settings["test"])
    if not any(written["splits"].values()):
      raise sources.DataError(f"the corpus {corpus!r} holds no documents"
                              + (f" (skipped: {skipped})" if skipped else ""))
    if not written["splits"]["train"]:
      raise sources.DataError(
          f"all {sum(written['splits'].values())} documents of {corpus!r} fell into validation "
          "or test, none into train; add documents or lower --validation / --test")
    built = {**written, "skipped": skipped,
             "total_bytes": sum(d["bytes"] for d in written["domains"].values())}
  corpus_seconds = time.time() - start
  start = time.time()
  tokenizer, vocab_size = settings["tokenizer"], settings["vocab_size"]
  tokenizer_path, size, sample = None, None, None
  if tokenizer == "bytes":
    tokenizer_path, size = "bytes", tokenizer_lib.ByteTokenizer().vocab_size
  elif tokenizer:
    tokenizer_path = str(pathlib.Path(tokenizer).absolute())
    size = tokenizer_lib.load_tokenizer(tokenizer_path).vocab_size
  elif not settings["skip_tokenizer"]:
    budget = settings["tokenizer_bytes"]
    sample = {}
    texts = tokenizer_sample(build / "train.jsonl", built["domains"], budget, sample)
    per_domain = budget // max(1, len(built["domains"]))
    expected = sum(min(d["bytes"], per_domain) for d in built["domains"].values())
    tok = tokenizer_lib.train_sentencepiece(texts, build / "tokenizer", vocab_size=vocab_size,
                                            max_input_bytes=budget, expected_bytes=expected)
    if sample["cut"] or sample["left_out"]:
      log.info("tokenizer sample: %d documents whole, %d cut to fit the per-domain share of "
               "tokenizer_bytes, %d left out once the share was full", sample["documents"],
               sample["cut"], sample["left_out"])
    tokenizer_path, size = str((out / "tokenizer.model").absolute()), int(tok.vocab_size)
  result = {"domains": built["domains"], "total_bytes": built["total_bytes"],
            "splits": built["splits"], "tokenizer": tokenizer_path, "vocab_size": size,
            "skipped": built["skipped"], "tokenizer_sample": sample,
            "out": str(out.absolute()),
            "seconds": {"corpus": round(corpus_seconds, 1),
                        "tokenizer": round(time.time() - start, 1)},
            "settings": dict(settings)}
  (build / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  return result


class CorpusNotPreparedError(FileNotFoundError):
  """`load_corpus` found no complete preparation of the configured corpus in its data folder."""


def prepare_command(dc: DataConfig) -> str:
  """The shell command that prepares exactly the folder `load_corpus(dc)` reads."""
  words = ["python", "-m", "experiments.prepare_data", "--corpus", dc.corpus, "--out",
           str(resolved_data_dir(dc))]
  words += ["--tokenizer", dc.tokenizer] if dc.tokenizer else ["--vocab_size", str(dc.vocab_size)]
  return shlex.join(words)


def _matching_preparation(dc: DataConfig, data_dir: pathlib.Path) -> tuple[dict | None, str]:
  """(the preparation in `data_dir` that serves `dc`, "") or (None, why there is none).

  Any complete preparation of the same corpus serves, whatever its other settings (e.g. one
  made by experiments/prepare_data with another vocab size), so a run never rewrites the
  tokenizer under its own checkpoints; only a `dc.tokenizer` that names another tokenizer
  asks for a new one.
  """
  summary, problem = _read_preparation(data_dir)
  if summary is None:
    return None, problem
  settings = summary.get("settings", {})
  if settings.get("corpus") != dc.corpus:
    return None, f"{data_dir} was prepared from corpus {settings.get('corpus')!r}"
  if dc.tokenizer and settings.get("tokenizer") != dc.tokenizer:
    made = (f"tokenizer {settings['tokenizer']!r}" if settings.get("tokenizer")
            else "a tokenizer trained on it")
    return None, f"{data_dir} was prepared with {made}, not data.tokenizer={dc.tokenizer!r}"
  return summary, ""


def prepare_corpus(dc: DataConfig, *, cache_dir: str | None = None) -> dict | None:
  """Builds the corpus `dc` names into its data folder, unless the folder already holds it.

  The one step of data/ that writes (sources are downloaded or read, the splits written, a
  tokenizer trained, with progress lines); run it once before `load_corpus`, which only
  reads. It returns at once when the folder already holds a complete preparation that serves
  `dc` (see `_matching_preparation`), and logs which of the two it did. Returns the
  preparation's summary (its prepare_data.json). The synthetic corpus is generated in memory
  by `load_corpus` and never written: nothing to prepare, returns None.
  """
  if dc.corpus == "synthetic":
    log.info("corpus: synthetic, %d documents generated in memory from seed 0 (nothing to "
             "prepare)", dc.synthetic_documents)
    return None
  data_dir = resolved_data_dir(dc)
  summary, problem = _matching_preparation(dc, data_dir)
  if summary is not None:
    log.info("corpus: reusing %r prepared in %s", dc.corpus, data_dir)
    return summary
  log.info("corpus: preparing %r in %s (%s; later runs reuse it)", dc.corpus, data_dir, problem)
  return build_corpus(dc.corpus, data_dir, vocab_size=dc.vocab_size, tokenizer=dc.tokenizer,
                      cache_dir=cache_dir)


def load_corpus(dc: DataConfig) -> Corpus:
  """The splits and tokenizer of the corpus `dc` names, read from its prepared data folder.

  Reads only: a missing, incomplete or mismatching folder is refused with the command that
  prepares it (`prepare_corpus(dc)` does the same from Python). The synthetic corpus is the
  exception that needs no preparation: it is generated here in memory from a fixed seed and
  writes nothing.
  """
  if dc.corpus == "synthetic":
    docs = synthetic.synthetic_corpus(dc.synthetic_documents, seed=0)
    splits = sources.split_documents(docs, validation=0.05, test=0.05)
    tok = tokenizer_lib.load_tokenizer(dc.tokenizer or "bytes")
    return Corpus(splits, tok, sorted({d["domain"] for d in docs}))
  data_dir = resolved_data_dir(dc)
  summary, problem = _matching_preparation(dc, data_dir)
  if summary is None:
    raise CorpusNotPreparedError(
        f"corpus {dc.corpus!r} is not prepared: {problem}; prepare it with `{prepare_command(dc)}`"
        " (or emo_jax.data.corpus.prepare_corpus(data_config) from Python)")
  if summary["tokenizer"] is None:
    raise ValueError(f"{data_dir} was prepared without a tokenizer (--skip_tokenizer); run "
                     "experiments/prepare_data again without it, or set data.tokenizer")
  # A small corpus can leave a split empty (an empty file is a valid split, not bad input).
  splits = {split: (list(sources.read_jsonl(data_dir / f"{split}.jsonl"))
                    if (data_dir / f"{split}.jsonl").stat().st_size else [])
            for split in sources.SPLITS}
  return Corpus(splits, tokenizer_lib.load_tokenizer(summary["tokenizer"]),
                sorted(summary["domains"]))
