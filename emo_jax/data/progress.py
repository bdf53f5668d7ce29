"""Progress lines for the long steps of data preparation (reading sources, splitting, tokenizer).

Building the demo corpus or a tokenizer on a cold cache takes tens of seconds to minutes with
nothing else to show, so each long loop reports every few seconds how far it is: bytes and
documents so far, the rate, and an ETA when the total is known (or estimated).
"""

from __future__ import annotations

import logging
import time


def duration(seconds: float) -> str:
  """'1h05m', '3m07s' or '12s'."""
  seconds = max(int(seconds), 0)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def size(num_bytes: float) -> str:
  """'950 B', '44.9 kB', '12.3 MB' or '1.2 GB'."""
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.1f} {unit}"
  return f"{int(num_bytes)} B"


def _documents(n: int) -> str:
  return f"{n:,} document{'' if n == 1 else 's'}"


class ProgressLog:
  """Logs `what: 12.3 MB, 4,567 documents, 2.1 MB/s, ETA 6s` at most every `every_s` seconds.

  total_bytes: the expected total (for the ETA and a percentage); None when unknown.
  """

  def __init__(self, logger: logging.Logger, what: str, *, total_bytes: int | None = None,
               every_s: float = 5.0):
    self.logger = logger
    self.what = what
    self.total = total_bytes if total_bytes and total_bytes > 0 else None
    self.every_s = every_s
    self.bytes = 0
    self.documents = 0
    self.start = self._last = time.perf_counter()
    # The rate (and so the ETA) counts from the first document, not from the start: a source
    # may spend seconds unpacking before it yields anything.
    self._first: tuple[float, int] | None = None

  def update(self, num_bytes: int, documents: int = 1) -> None:
    now = time.perf_counter()
    self.bytes += num_bytes
    self.documents += documents
    if self._first is None:
      self._first = (now, self.bytes)
    if now - self._last >= self.every_s:
      self._last = now
      self.logger.info("%s", self.line(now))

  def line(self, now: float | None = None) -> str:
    now = time.perf_counter() if now is None else now
    first_time, first_bytes = self._first or (self.start, 0)
    elapsed = now - first_time
    rate = (self.bytes - first_bytes) / elapsed if elapsed > 0.5 else 0.0
    parts = [f"{self.what}: {size(self.bytes)}"]
    if self.total:
      parts[0] += f" of ~{size(self.total)} ({min(100 * self.bytes / self.total, 100):.0f}%)"
    parts.append(_documents(self.documents))
    if rate > 0:
      parts.append(f"{size(rate)}/s")
    if self.total and rate > 0:
      parts.append(f"ETA {duration(max(self.total - self.bytes, 0) / rate)}")
    return ", ".join(parts)

  def done(self) -> str:
    """The final line (logged): totals and time taken."""
    line = (f"{self.what}: {size(self.bytes)}, {_documents(self.documents)} in "
            f"{duration(time.perf_counter() - self.start)}")
    self.logger.info("%s", line)
    return line
