"""Documents from JSONL, plain text and ArrayRecord files, as `{"text", "domain", "id"}` dicts.

Why these three fields and nothing else: the pipeline tokenizes `text`; EMO's claim is that
experts specialise by *domain*, so every document carries one (for per-domain metrics and the
routing analysis); and a stable `id` lets `split_of` put each document in train, validation or
test by hashing alone, with no index file to keep in sync and no dependence on file order.

Formats:
  JSONL        one JSON object per line: {"text": str, "domain": str?, "id": str?}. Small to
               medium corpora, easy to write by hand or from other tools.
  text         a file is one document; a folder holds one document per file, and the first
               subfolder under the root names the domain (root/news/..., root/code/...).
  ArrayRecord  Grain's native random-access format, for corpora too big to hold in memory;
               `jsonl_to_array_record` converts, `ArrayRecordDocuments` reads.

Bad input fails loudly with the file and line and what to do, because a silently dropped line
in a training corpus is found weeks later, if ever. `on_error="skip"` is the explicit opt-out;
the skipped lines are counted and logged.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

from absl import logging

from emo_jax.data import jsonl
from emo_jax.data.jsonl import DataError

Doc = dict[str, str]
PathLike = Union[str, os.PathLike]

UNKNOWN_DOMAIN = "unknown"
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
SPLITS = ("train", "validation", "test")
# One record per group: each read decodes one record, which is what random access wants.
_ARRAY_RECORD_WRITER_OPTIONS = "group_size:1"
# How to opt out of a stop at bad input, for the command line and for Python callers.
SKIP_HINT = "pass --on_error=skip (on_error='skip' in Python)"


def _check_on_error(on_error: str) -> None:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


# --------------------------------------------------------------------------------------------
# JSONL


class JsonlReader:
  """Iterates the documents of one JSONL file; counts what it read and skipped.

  Each iteration re-reads the file and resets the counts, so after a full pass `documents`,
  `skipped` and `errors` (the first few messages) describe that pass.
  """

  def __init__(self, path: PathLike, *, on_error: str = "raise",
               default_domain: str | None = None):
    _check_on_error(on_error)
    self.path = Path(path)
    self.on_error = on_error
    self.default_domain = default_domain or UNKNOWN_DOMAIN
    self.documents = 0
    self.skipped = 0
    self.errors: list[str] = []

  def __iter__(self) -> Iterator[Doc]:
    counts = jsonl.LineCounts()
    self.documents, self.skipped, self.errors = 0, 0, counts.errors
    for doc in jsonl.read_records(self.path, expected='{"text": "...", "domain": "news"}',
                                  check=self._make_doc, on_error=self.on_error,
                                  skip_hint=SKIP_HINT, counts=counts):
      self.documents, self.skipped = counts.records, counts.skipped
      yield doc
    self.documents, self.skipped = counts.records, counts.skipped

  def _make_doc(self, obj: Any, where: str, line_no: int) -> Doc:
    return make_doc(obj, where=where, default_domain=self.default_domain,
                    default_id=f"{self.path.stem}:{line_no}")


def make_doc(obj: Any, *, where: str, default_domain: str, default_id: str) -> Doc:
  """Validates one decoded record and fills in a missing domain or id."""
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object with a \"text\" field, got "
                    f"{type(obj).__name__}. Wrap the record as {{\"text\": ...}}.")
  text = obj.get("text")
  if not isinstance(text, str):
    got = "no \"text\" field" if "text" not in obj else f"\"text\" of type {type(text).__name__}"
    raise DataError(f"{where}: {got}; every record needs a string \"text\" "
                    f"(keys present: {sorted(obj)[:8]}).")
  domain = obj.get("domain")
  if domain is None:
    domain = default_domain
  elif not isinstance(domain, str) or not domain:
    raise DataError(f"{where}: \"domain\" must be a non-empty string, got {domain!r}.")
  doc_id = obj.get("id")
  if doc_id is None:
    doc_id = default_id
  elif isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool):
    doc_id = str(doc_id)
  else:
    raise DataError(f"{where}: \"id\" must be a string or an integer, got {doc_id!r}.")
  return {"text": text, "domain": domain, "id": doc_id}


def read_jsonl(path: PathLike, *, on_error: str = "raise",
               default_domain: str | None = None) -> JsonlReader:
  """Documents of a JSONL file (an iterable; its `.skipped` counts lines skipped).

  Missing "domain" -> `default_domain` or "unknown"; missing "id" -> "{file stem}:{line}".
  on_error="raise" stops at the first bad line; "skip" skips and counts bad lines.
  """
  return JsonlReader(path, on_error=on_error, default_domain=default_domain)


def write_jsonl(docs: Iterable[Doc], path: PathLike) -> int:
  """Writes documents one per line (id, domain, text) atomically; returns the count."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  n = 0
  with open(tmp, "w", encoding="utf-8", newline="\n") as f:
    for doc in docs:
      record = {"id": doc["id"], "domain": doc["domain"], "text": doc["text"]}
      f.write(json.dumps(record, ensure_ascii=False))
      f.write("\n")
      n += 1
  os.replace(tmp, path)
  return n


# --------------------------------------------------------------------------------------------
# Plain text


def _read_utf8(path: Path) -> str:
  """The text of a file; binary or non-UTF-8 content is a DataError naming the file."""
  data = path.read_bytes()
  nul = data.find(b"\0", 0, 1 << 16)
  if nul >= 0:
    raise DataError(f"{path}: a binary file (NUL byte at offset {nul}), not text. Move it out "
                    f"of the corpus, or {SKIP_HINT} to skip such files.")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: invalid UTF-8 at byte {e.start}. Text documents must be UTF-8: "
                    "re-encode the file (e.g. iconv -t UTF-8) or move it out of the corpus, or "
                    f"{SKIP_HINT} to skip such files.") from None


def _text_files(root: Path, suffixes: Sequence[str] | None) -> list[Path]:
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in filenames:
      if name.startswith("."):
        continue
      if suffixes is not None and not name.endswith(tuple(suffixes)):
        continue
      files.append(Path(dirpath) / name)
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_text(path: PathLike, *, domain: str | None = None,
              suffixes: Sequence[str] | None = None, on_error: str = "raise",
              skipped: dict | None = None) -> Iterator[Doc]:
  """Documents from a text file (one document) or a folder (one document per file).

  In a folder, files are read sorted and recursively (hidden files and folders skipped; only
  names ending in one of `suffixes` when given). The domain is `domain` if given, else the
  first subfolder under the root (root/news/2004/a.txt -> "news"), else the root's own name
  for files directly in it. Ids are paths relative to the root. Empty files are skipped.
  A binary or non-UTF-8 file stops the read (on_error="raise") or is skipped and counted in
  `skipped[str(path)]` as {"files": n, "first": message} (on_error="skip").
  """
  _check_on_error(on_error)
  path = Path(path)
  if path.is_file():
    files, root = [path], path.parent
  elif path.is_dir():
    files, root = _text_files(path, suffixes), path
    if not files:
      raise DataError(f"{path}: the folder holds no text files"
                      + (f" ending in {list(suffixes)}" if suffixes else "") + ".")
  else:
    raise DataError(f"{path}: no such file or folder.")
  empty = bad = 0
  for file in files:
    try:
      text = _read_utf8(file)
    except DataError as e:
      if on_error == "raise":
        raise
      bad += 1
      if skipped is not None:
        entry = skipped.setdefault(str(path), {"files": 0, "first": str(e)})
        entry["files"] += 1
      continue
    if not text.strip():
      if path.is_file():
        raise DataError(f"{path}: the file is empty; a text document needs some text.")
      empty += 1
      continue
    if path.is_file():
      yield {"text": text, "domain": domain or UNKNOWN_DOMAIN, "id": path.name}
      continue
    rel = file.relative_to(root)
    file_domain = domain or (rel.parts[0] if len(rel.parts) > 1 else path.resolve().name)
    yield {"text": text, "domain": file_domain, "id": rel.as_posix()}
  if empty:
    logging.warning("%s: skipped %d empty file(s)", path, empty)
  if bad:
    logging.warning("%s: skipped %d binary or non-UTF-8 file(s) (on_error=skip)", path, bad)


# --------------------------------------------------------------------------------------------
# ArrayRecord


def jsonl_to_array_record(jsonl_path: PathLike, out_path: PathLike, *, on_error: str = "raise",
                          default_domain: str | None = None) -> int:
  """Converts a JSONL corpus to ArrayRecord (one JSON-encoded document per record).

  Documents are validated on the way (see `read_jsonl`), so the ArrayRecord file holds only
  complete {"text", "domain", "id"} records. Written to a temporary name and renamed, so an
  interrupted conversion never leaves a plausible-looking partial file. Returns the count.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_path.with_name(out_path.name + ".tmp")
  reader = read_jsonl(jsonl_path, on_error=on_error, default_domain=default_domain)
  writer = array_record_module.ArrayRecordWriter(str(tmp), _ARRAY_RECORD_WRITER_OPTIONS)
  n = 0
  try:
    for doc in reader:
      writer.write(json.dumps(doc, ensure_ascii=False).encode("utf-8"))
      n += 1
      if n % 100_000 == 0:
        logging.info("%s: %d documents written", out_path, n)
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)
    raise
  writer.close()
  os.replace(tmp, out_path)
  logging.info("wrote %d documents to %s (%d skipped)", n, out_path, reader.skipped)
  return n


class ArrayRecordDocuments:
  """Random-access documents of one or more ArrayRecord files (a `grain.MapDataset` source).

    docs = ArrayRecordDocuments("corpus.array_record")
    ds = grain.MapDataset.source(docs).shuffle(seed=0)
  """

  def __init__(self, paths: PathLike | Sequence[PathLike]):
    import grain  # pylint: disable=g-import-not-at-top
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    self.paths = [str(p) for p in paths]
    if not self.paths:
      raise DataError("ArrayRecordDocuments needs at least one file.")
    for p in self.paths:
      if not Path(p).is_file():
        raise DataError(f"{p}: no such ArrayRecord file. Create one from JSONL with "
                        "emo_jax.data.sources.jsonl_to_array_record.")
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def _decode(self, record: bytes, index: int) -> Doc:
    try:
      return json.loads(record.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f"{self.paths}: record {index} is not a UTF-8 JSON document ({e}). "
                      "Was the file written by jsonl_to_array_record?") from None

  def __getitem__(self, index: int) -> Doc:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"document index {index} out of range for {n} documents")
    index %= n
    return self._decode(self._source[index], index)

  def __getitems__(self, indices: Sequence[int]) -> list[Doc]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"ArrayRecordDocuments({self.paths!r}, {len(self)} documents)"


# --------------------------------------------------------------------------------------------
# Dispatch and splits


def _expand(path_or_spec: PathLike | Sequence[PathLike]) -> list[Path]:
  if not isinstance(path_or_spec, (str, os.PathLike)):
    return [p for item in path_or_spec for p in _expand(item)]
  spec = os.fspath(path_or_spec)
  if os.path.exists(spec):
    return [Path(spec)]
  matches = sorted(globlib.glob(spec, recursive=True))
  if not matches:
    raise DataError(f"{spec}: no such file, folder or glob match. Expected a .jsonl file, an "
                    ".array_record file, a text file or a folder of text files.")
  return [Path(m) for m in matches]


def iter_documents(path_or_spec: PathLike | Sequence[PathLike], *, domain: str | None = None,
                   on_error: str = "raise", skipped: dict | None = None) -> Iterator[Doc]:
  """Streams the documents at a path, glob or list of them (see `load_documents`).

  With on_error="skip", `skipped` (when given) receives what was left out, per input:
  {path: {"lines": n, "first": message}} for JSONL, {path: {"files": n, "first": ...}} for
  text files and folders.
  """
  for p in _expand(path_or_spec):
    if p.is_file() and p.name.endswith(ARRAY_RECORD_SUFFIXES):
      source = ArrayRecordDocuments(p)
      yield from (source[i] for i in range(len(source)))
    elif p.is_file() and p.suffix == ".jsonl":
      reader = read_jsonl(p, on_error=on_error, default_domain=domain)
      yield from reader
      if reader.skipped and skipped is not None:
        skipped[str(p)] = {"lines": reader.skipped, "first": reader.errors[0]}
    else:
      yield from read_text(p, domain=domain, on_error=on_error, skipped=skipped)


def load_documents(path_or_spec: PathLike | Sequence[PathLike], *, domain: str | None = None,
                   on_error: str = "raise") -> Sequence[Doc]:
  """All documents at a path, glob or list of them, as a sequence (random access).

  `.jsonl` -> read_jsonl (`domain` is the default for records without one); `.array_record`
  / `.arrayrecord` -> ArrayRecordDocuments (lazy, for big corpora); a folder or any other file
  -> read_text (`domain` overrides the folder names). A spec naming only ArrayRecord files
  stays lazy; anything else is read into a list.
  """
  _check_on_error(on_error)
  paths = _expand(path_or_spec)
  if all(p.is_file() and p.name.endswith(ARRAY_RECORD_SUFFIXES) for p in paths):
    return ArrayRecordDocuments(paths)
  return list(iter_documents(paths, domain=domain, on_error=on_error))


def _check_fractions(validation: float, test: float) -> None:
  if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
    raise ValueError(f"split fractions must be >= 0 and sum to < 1 (the rest is train); got "
                     f"validation={validation}, test={test}")


def stable_fraction(key: str) -> float:
  """A number in [0, 1) from sha256(key): the same on every machine, process and Python."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(doc_id: str, *, validation: float = 0.02, test: float = 0.02) -> str:
  """"train", "validation" or "test" for a document id, by a stable hash of the id.

  Adding or removing other documents never moves a document between splits.
  """
  _check_fractions(validation, test)
  u = stable_fraction(doc_id)
  if u < test:
    return "test"
  if u < test + validation:
    return "validation"
  return "train"


def split_documents(docs: Iterable[Doc], *, validation: float = 0.02,
                    test: float = 0.02) -> dict[str, list[Doc]]:
  """Documents grouped by `split_of` their id, keeping their order within each split."""
  _check_fractions(validation, test)
  out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
  for doc in docs:
    out[split_of(doc["id"], validation=validation, test=test)].append(doc)
  return out


def count_by_domain(docs: Iterable[Doc]) -> dict[str, dict[str, int]]:
  """{domain: {"documents": n, "bytes": UTF-8 bytes of text}}, domains sorted by name."""
  counts: dict[str, list[int]] = {}
  for doc in docs:
    c = counts.setdefault(doc["domain"], [0, 0])
    c[0] += 1
    c[1] += len(doc["text"].encode("utf-8"))
  return {d: {"documents": counts[d][0], "bytes": counts[d][1]} for d in sorted(counts)}


def write_splits(docs: Iterable[Doc], out_dir: PathLike, *, validation: float = 0.02,
                 test: float = 0.02) -> dict[str, Any]:
  """Streams documents into out_dir/{train,validation,test}.jsonl by `split_of` their id.

  Returns {"splits": {split: documents}, "domains": count_by_domain(all documents)}. Files
  are written under temporary names and renamed at the end, so a failed run leaves no split
  that looks complete. Duplicate ids are an error: they would make the split ambiguous.
  """
  _check_fractions(validation, test)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = {s: out_dir / f"{s}.jsonl.tmp" for s in SPLITS}
  files = {s: open(p, "w", encoding="utf-8", newline="\n") for s, p in tmp.items()}
  counts = {s: 0 for s in SPLITS}
  domains: dict[str, list[int]] = {}
  seen: set[bytes] = set()
  try:
    for doc in docs:
      key = hashlib.sha256(doc["id"].encode("utf-8")).digest()[:16]
      if key in seen:
        raise DataError(f"document id {doc['id']!r} occurs twice; ids must be unique across "
                        "all inputs. Give the records distinct \"id\" fields (a missing id is "
                        "'file stem:line', so also rename input files with the same stem).")
      seen.add(key)
      split = split_of(doc["id"], validation=validation, test=test)
      record = {"id": doc["id"], "domain": doc["domain"], "text": doc["text"]}
      files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
      counts[split] += 1
      c = domains.setdefault(doc["domain"], [0, 0])
      c[0] += 1
      c[1] += len(doc["text"].encode("utf-8"))
      if len(seen) % 200_000 == 0:
        logging.info("%s: %d documents split", out_dir, len(seen))
  except BaseException:
    for s in SPLITS:
      files[s].close()
      tmp[s].unlink(missing_ok=True)
    raise
  for s in SPLITS:
    files[s].close()
    os.replace(tmp[s], out_dir / f"{s}.jsonl")
    if not counts[s]:
      logging.warning("%s: the %s split is empty (%d documents in all); use more documents or "
                      "a larger %s fraction", out_dir, s, len(seen), s)
  return {"splits": counts,
          "domains": {d: {"documents": domains[d][0], "bytes": domains[d][1]}
                      for d in sorted(domains)}}
