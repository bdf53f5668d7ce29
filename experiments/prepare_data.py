"""Builds a training corpus (split JSONL files) and its SentencePiece tokenizer.

  python -m experiments.prepare_data --corpus demo --out /tmp/demo_data
  python -m experiments.prepare_data --corpus my_docs.jsonl --out /tmp/my_data --vocab_size 16384
  python -m experiments.prepare_data --corpus heldout [--out DIR]

This is the step that writes; training and the other commands only read the prepared folder
(the trainer runs this step itself, with the config's data settings, when its folder is missing;
emo_jax.data.corpus.prepare_corpus). A command that finds no prepared corpus names the exact
prepare_data command to run.

`--corpus demo` builds the built-in multi-domain demo corpus (emo_jax/data/demo_corpus.py);
any other value is a path, glob or comma-separated list of JSONL, ArrayRecord, text files or
folders of text (emo_jax/data/sources.py), split by document id. Either way OUT gets
{train,validation,test}.jsonl and tokenizer.model (unless --tokenizer names one), and the last
stdout line is one JSON object: domains (domain -> documents, bytes), total_bytes, tokenizer,
vocab_size, skipped, splits.

`--corpus heldout` builds the held-out evaluation domains instead (legal text, a dictionary,
German, Spanish and Italian prose; emo_jax/data/heldout_corpus.py): one file, OUT/eval.jsonl
(default OUT: <cache>/corpora/heldout), never trained on and not tokenized, which
`experiments.reproduce --eval_corpus` scores (`--eval_corpus_default` finds it there).

Re-running with the same settings reuses what is there (pass --force to rebuild). Nothing is
written to OUT until the whole input has been read and the tokenizer trained: bad input (a bad
JSONL line, a binary file; --on_error=skip skips and counts them, named under "skipped") or a
--vocab_size larger than the corpus can fill stops with one line and leaves OUT as it was.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json

from absl import app, flags

from emo_jax.data import corpus as corpus_lib
from emo_jax.data import demo_corpus, heldout_corpus, sources
from emo_jax.data.tokenizer import TokenizerError
from experiments import cli

_CORPUS = flags.DEFINE_string("corpus", None, "'demo', 'heldout', or a path / glob / comma-separated list "
                              "of .jsonl, .array_record, text files or folders.")
_OUT = flags.DEFINE_string("out", None, "Output folder (with --corpus heldout default "
                           "<cache>/corpora/heldout).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "SentencePiece vocabulary size.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Use this tokenizer instead of training one: "
                                 "'bytes' or a SentencePiece .model / tokenizer.json path (what "
                                 "config.data.tokenizer names).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Download cache for the demo corpus "
                                 "(default $EMO_JAX_CACHE or ~/.cache/emo_jax).")
_MAX_BYTES_PER_DOMAIN = flags.DEFINE_integer(
    "max_bytes_per_domain", demo_corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
    "Demo corpus: cap on the text bytes of each domain (held-out corpus: default "
    f"{heldout_corpus.DEFAULT_MAX_BYTES_PER_DOMAIN}).")
_VALIDATION = flags.DEFINE_float("validation", 0.02, "Share of documents in validation.")
_TEST = flags.DEFINE_float("test", 0.02, "Share of documents in test.")
_DOMAIN = flags.DEFINE_string("domain", None, "Own corpus: domain for documents without one "
                              "(for a folder of text: instead of the subfolder names).")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                              "Own corpus: stop at a bad JSONL line or binary file, or skip "
                              "and count it (the printed JSON's `skipped` names them).")
_TOKENIZER_BYTES = flags.DEFINE_integer(
    "tokenizer_bytes", 20_000_000, "Text the tokenizer learns from, shared evenly by the "
    "domains of the train split (bounds the training time: ~minutes on 2 cores for 20 MB).")
_SKIP_TOKENIZER = flags.DEFINE_bool("skip_tokenizer", False, "Only build the corpus.")
_FORCE = flags.DEFINE_bool("force", False, "Rebuild even if OUT already holds the result.")


def build_heldout():
  cap = (_MAX_BYTES_PER_DOMAIN.value if _MAX_BYTES_PER_DOMAIN.present
         else heldout_corpus.DEFAULT_MAX_BYTES_PER_DOMAIN)
  try:
    return heldout_corpus.build_heldout_corpus(_OUT.value, cache_dir=_CACHE_DIR.value,
                                               max_bytes_per_domain=cap, force=_FORCE.value)
  except demo_corpus.SourceUnavailable as e:
    raise SystemExit(f"prepare_data: the held-out corpus: {e}") from None


def main(argv):
  cli.start(argv)
  if _CORPUS.value == "heldout":
    print(json.dumps(build_heldout()), flush=True)
    return
  if not _OUT.value:
    raise app.UsageError("--out is required (the folder the prepared corpus is written to)")
  try:
    result = corpus_lib.build_corpus(
        _CORPUS.value, _OUT.value, vocab_size=_VOCAB_SIZE.value, tokenizer=_TOKENIZER.value,
        cache_dir=_CACHE_DIR.value, max_bytes_per_domain=_MAX_BYTES_PER_DOMAIN.value,
        validation=_VALIDATION.value,
        test=_TEST.value, domain=_DOMAIN.value, on_error=_ON_ERROR.value,
        tokenizer_bytes=_TOKENIZER_BYTES.value, skip_tokenizer=_SKIP_TOKENIZER.value,
        force=_FORCE.value)
  except corpus_lib.OutputFolderError as e:
    raise SystemExit(f"prepare_data: {e}") from None
  except sources.DataError as e:
    raise SystemExit(f"prepare_data: bad corpus: {e}") from None
  except TokenizerError as e:
    kept = "" if _CORPUS.value == "demo" else f" Nothing was written to {_OUT.value}."
    raise SystemExit(f"prepare_data: {e}{kept}") from None
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["corpus"])
  app.run(main)
