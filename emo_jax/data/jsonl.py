"""JSON Lines input: the one loop that reads a JSONL file, for every JSONL file the package reads.

Corpora (data/sources.py), task files and the gzip'd OLMES request files (tasks/data.py) differ
only in what a valid record is, so each caller passes a `check` that turns a decoded object into
its record (or raises `DataError`), and this module owns the rest: blank lines skipped, UTF-8
decoded line by line, a `.gz` file read through gzip, and every error one line that names the
file, the line number and the fix. A bad line stops the read (on_error="raise"), or with
on_error="skip" is left out and counted in `LineCounts`: the explicit opt-out of a corpus whose
few bad lines are not worth stopping for. `DataError` lives here, in the lowest module that
raises it; data/sources.py imports it, so `sources.DataError` is the same class.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar, Union

from absl import logging

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

_MAX_ERRORS_KEPT = 20


class DataError(ValueError):
  """Bad input data. The message names the file (and line) and says how to fix it."""


@dataclasses.dataclass
class LineCounts:
  """What one pass read: records yielded, bad lines skipped, the first few skip messages."""
  records: int = 0
  skipped: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)


def check_on_error(on_error: str) -> None:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _keep_object(obj: Any, where: str, line_no: int) -> Any:
  del where, line_no
  return obj


def read_records(path: PathLike, *, expected: str,
                 check: Callable[[Any, str, int], T] = _keep_object, on_error: str = "raise",
                 skip_hint: str = "", counts: LineCounts | None = None) -> Iterator[T]:
  """The records of a JSONL file, in order: `check(obj, where, line_no)` of each line's object.

  expected: what a valid line is, for the messages (e.g. '{"text": "..."}').
  check: validates one decoded object and returns the record; `where` is "path:line" for its
    errors, `line_no` the 1-based line number. It raises DataError for a bad record.
  on_error: "raise" stops at the first bad line; "skip" leaves it out and counts it in `counts`.
  skip_hint: how the caller's user opts into skipping (e.g. "pass --on_error=skip"), appended
    to the messages of bad lines; "" when the caller offers no such option.
  A missing file and a file with no line of content are errors either way: skipping cannot fix
  them.
  """
  check_on_error(on_error)
  path = Path(path)
  counts = LineCounts() if counts is None else counts
  if not path.is_file():
    raise DataError(f"{path}: no such JSONL file. Check the path (expected one JSON object per "
                    f"line: {expected}).")
  fix = f"fix the line or {skip_hint}" if skip_hint else "fix the line"
  seen_content = False
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      seen_content = True
      where = f"{path}:{line_no}"
      try:
        record = check(_decode(raw, where, expected, fix, skip_hint), where, line_no)
      except DataError as e:
        if on_error == "raise":
          raise
        counts.skipped += 1
        if len(counts.errors) < _MAX_ERRORS_KEPT:
          counts.errors.append(str(e))
        continue
      counts.records += 1
      yield record
  if not seen_content:
    raise DataError(f"{path}: the file is empty. A JSONL file needs one JSON object per line: "
                    f"{expected}.")
  if counts.skipped:
    logging.warning("%s: skipped %d bad line(s) of %d (on_error=skip); first: %s", path,
                    counts.skipped, counts.skipped + counts.records, counts.errors[0])


def _decode(raw: bytes, where: str, expected: str, fix: str, skip_hint: str) -> Any:
  """One line's JSON value; bad UTF-8 or bad JSON is a DataError naming the line and the fix."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    skip = f", or {skip_hint} to skip such lines" if skip_hint else ""
    raise DataError(f"{where}: invalid UTF-8 (byte {e.start} of the line). Re-encode the file "
                    f"as UTF-8{skip}.") from None
  line = line.rstrip("\r\n")
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    msg = e.msg if e.msg.endswith(" at") else f"{e.msg} at"
    if e.pos >= len(line.rstrip()) or e.msg.startswith("Unterminated"):
      problem = (f"the line ends before its JSON object does ({msg} column {e.colno} of "
                 f"{len(line)}; was it cut short?)")
    else:
      problem = f"{msg} column {e.colno}"
    raise DataError(f"{where}: not valid JSON: {problem}. Each line must be one JSON object "
                    f"like {expected}; {fix}.") from None
