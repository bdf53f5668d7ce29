"""What a saved data-iterator state is a position in: the fingerprint of a run's data stream.

A Grain iterator state is a document index and an offset into that document. It only means the
same thing again if the same documents come in the same order, so every checkpoint stores the
fingerprint of the stream it was written on and a restart compares it before restoring anything
(checkpoint.Checkpointer.restore_latest). A changed corpus is then refused, naming what changed,
instead of being mistaken for a damaged checkpoint.

The config fields that choose the documents and their order are compared as config
(checkpoint.DATA_STREAM_FIELDS); the fingerprint adds what they cannot say: the number of
training documents, a digest of a fixed sample of them (first, last and up to 1,024 evenly
spaced: cheap for corpora of any size, and any edit that changes a document's length or the
document count also shows in the count or in the prepared file's size), the size of the
prepared training split file, and the tokenizer's identity (its class, vocabulary size and the
ids of a fixed probe text).
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Mapping, Sequence

SAMPLED_DOCUMENTS = 1024
PROBE_TEXT = ("The patient was given 5 mg twice daily.\ndef main(argv):\n    return 0\n"
              "|- ( ph -> ps )  Enter KING HENRY.  Shares fell 3% on Monday.")


def _document_digest(documents: Sequence[Mapping[str, Any]]) -> str:
  n = len(documents)
  picks = sorted({0, n - 1} | {i * (n - 1) // (SAMPLED_DOCUMENTS - 1)
                               for i in range(SAMPLED_DOCUMENTS)}) if n else []
  digest = hashlib.sha256()
  for i in picks:
    doc = documents[i]
    digest.update(f"{i}|{doc.get('domain', '')}|".encode())
    digest.update(str(doc.get("text", "")).encode("utf-8", errors="surrogatepass"))
  return digest.hexdigest()[:16]


def tokenizer_identity(tokenizer) -> str:
  """Class, vocabulary size and a digest of the probe text's ids."""
  ids = ",".join(map(str, tokenizer.encode(PROBE_TEXT)))
  return (f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:"
          f"{hashlib.sha256(ids.encode()).hexdigest()[:12]}")


def data_stream_fingerprint(corpus, data_dir: str | pathlib.Path | None = None) -> dict:
  """The fingerprint of the training documents of `corpus` (prepared in `data_dir`, if any)."""
  train = corpus.splits.get("train", [])
  out = {"train_documents": len(train), "train_sample_digest": _document_digest(train),
         "tokenizer_identity": tokenizer_identity(corpus.tokenizer)}
  if data_dir is not None and (pathlib.Path(data_dir) / "train.jsonl").is_file():
    out["train_file_bytes"] = (pathlib.Path(data_dir) / "train.jsonl").stat().st_size
  return out


def changed_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """`data_stream.NAME: checkpoint has X, this run has Y` for each field both sides hold."""
  return [f"data_stream.{name}: checkpoint has {saved[name]!r}, this run has {current[name]!r}"
          for name in sorted(set(saved) & set(current)) if saved[name] != current[name]]
