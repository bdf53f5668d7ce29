"""Builds a training corpus (split JSONL files) and its SentencePiece tokenizer.

  python -m experiments.prepare_data --corpus demo --out /tmp/demo_data
  python -m experiments.prepare_data --corpus my_docs.jsonl --out /tmp/my_data --vocab_size 16384

`--corpus demo` builds the built-in multi-domain demo corpus (emo_jax/data/demo_corpus.py);
any other value is a path, glob or comma-separated list of JSONL, ArrayRecord, text files or
folders of text (emo_jax/data/sources.py), split by document id. Either way OUT gets
{train,validation,test}.jsonl and tokenizer.model, and the last stdout line is one JSON object:
domains (domain -> documents, bytes), total_bytes, tokenizer, vocab_size, skipped, splits.

Re-running with the same settings reuses what is there (pass --force to rebuild).
"""

import json
import time
from pathlib import Path

from absl import app, flags, logging

from emo_jax.data import demo_corpus, sources

_CORPUS = flags.DEFINE_string("corpus", None, "'demo', or a path / glob / comma-separated list "
                              "of .jsonl, .array_record, text files or folders.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "SentencePiece vocabulary size.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Download cache for the demo corpus "
                                 "(default $EMO_JAX_CACHE or ~/.cache/emo_jax).")
_MAX_BYTES_PER_DOMAIN = flags.DEFINE_integer(
    "max_bytes_per_domain", demo_corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
    "Demo corpus: cap on the text bytes of each domain.")
_VALIDATION = flags.DEFINE_float("validation", 0.02, "Share of documents in validation.")
_TEST = flags.DEFINE_float("test", 0.02, "Share of documents in test.")
_DOMAIN = flags.DEFINE_string("domain", None, "Own corpus: domain for documents without one "
                              "(for a folder of text: instead of the subfolder names).")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                              "Own corpus: stop at a bad JSONL line, or skip and count it.")
_TOKENIZER_BYTES = flags.DEFINE_integer(
    "tokenizer_bytes", 20_000_000, "Text the tokenizer learns from, shared evenly by the "
    "domains of the train split (bounds the training time: ~minutes on 2 cores for 20 MB).")
_SKIP_TOKENIZER = flags.DEFINE_bool("skip_tokenizer", False, "Only build the corpus.")
_FORCE = flags.DEFINE_bool("force", False, "Rebuild even if OUT already holds the result.")

RESULT_FILE = "prepare_data.json"


def build_corpus(out: Path) -> dict:
  """The split JSONL files in `out`; returns domains, total_bytes, splits, skipped."""
  if _CORPUS.value == "demo":
    return demo_corpus.build_demo_corpus(
        out, cache_dir=_CACHE_DIR.value, max_bytes_per_domain=_MAX_BYTES_PER_DOMAIN.value,
        validation=_VALIDATION.value, test=_TEST.value, force=_FORCE.value)
  spec = [p for p in _CORPUS.value.split(",") if p]
  docs = sources.iter_documents(spec, domain=_DOMAIN.value, on_error=_ON_ERROR.value)
  written = sources.write_splits(docs, out, validation=_VALIDATION.value, test=_TEST.value)
  return {**written, "skipped": {},
          "total_bytes": sum(d["bytes"] for d in written["domains"].values())}


def tokenizer_sample(train_path: Path, domains: dict, budget: int):
  """Train texts in file order, at most budget / len(domains) bytes from each domain."""
  per_domain = budget // max(1, len(domains))
  used = dict.fromkeys(domains, 0)
  for doc in sources.read_jsonl(train_path):
    n = len(doc["text"].encode("utf-8"))
    if used.get(doc["domain"], 0) + n <= per_domain:
      used[doc["domain"]] = used.get(doc["domain"], 0) + n
      yield doc["text"]


def train_tokenizer(out: Path, corpus: dict) -> tuple[str | None, int | None]:
  """Trains OUT/tokenizer.model on a bounded, domain-balanced sample of the train split."""
  if _SKIP_TOKENIZER.value:
    return None, None
  from emo_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  texts = tokenizer_sample(out / "train.jsonl", corpus["domains"], _TOKENIZER_BYTES.value)
  tok = tokenizer.train_sentencepiece(texts, model_prefix=str(out / "tokenizer"),
                                      vocab_size=_VOCAB_SIZE.value,
                                      max_input_bytes=_TOKENIZER_BYTES.value)
  return str(out / "tokenizer.model"), int(tok.vocab_size)


def settings() -> dict:
  return {"corpus": _CORPUS.value, "vocab_size": _VOCAB_SIZE.value,
          "max_bytes_per_domain": _MAX_BYTES_PER_DOMAIN.value, "validation": _VALIDATION.value,
          "test": _TEST.value, "domain": _DOMAIN.value, "on_error": _ON_ERROR.value,
          "tokenizer_bytes": _TOKENIZER_BYTES.value, "skip_tokenizer": _SKIP_TOKENIZER.value}


def previous_result(out: Path) -> dict | None:
  """The result of an earlier identical run whose files are all still there, else None."""
  try:
    previous = json.loads((out / RESULT_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  paths = [out / f"{s}.jsonl" for s in sources.SPLITS]
  if previous.get("tokenizer"):
    paths.append(Path(previous["tokenizer"]))
  if previous.get("settings") != settings() or not all(p.is_file() for p in paths):
    return None
  return previous


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = Path(_OUT.value)
  result = None if _FORCE.value else previous_result(out)
  if result is not None:
    logging.info("reusing %s (pass --force to rebuild)", out / RESULT_FILE)
  else:
    start = time.time()
    try:
      corpus = build_corpus(out)
    except sources.DataError as e:
      raise SystemExit(f"prepare_data: bad corpus: {e}") from None
    corpus_s = time.time() - start
    start = time.time()
    tokenizer_path, vocab_size = train_tokenizer(out, corpus)
    result = {
        "domains": corpus["domains"], "total_bytes": corpus["total_bytes"],
        "splits": corpus["splits"], "tokenizer": tokenizer_path, "vocab_size": vocab_size,
        "skipped": corpus["skipped"], "out": str(out),
        "seconds": {"corpus": round(corpus_s, 1), "tokenizer": round(time.time() - start, 1)},
        "settings": settings(),
    }
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["corpus", "out"])
  app.run(main)
