"""The release's repetition filter: a training row holding a highly repeated n-gram gets no loss.

AllenAI's EMO runs train with OLMo-core's instance filter
`{repetition_min_period: 1, repetition_max_period: 13, repetition_max_count: 32}`: an instance
(one packed training sequence) in which some n-gram of length 1..13 repeats back to back 32
times or more keeps its place in the batch, but all its labels are masked out of the loss. Such
rows are mostly markup, tables and degenerate text, whose loss would be near zero and crowd out
the rest.

`repetition_count` measures, for every period p, the longest stretch in which each token equals
the one p positions before it; a stretch of c such tokens is a p-periodic run of c + p tokens,
(c + p) // p repetitions of its n-gram. Only a row's real tokens are read (padding, which
repeats the pad id, is dropped first); as in the release, document boundaries inside a row do
not break a run.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def repetition_count(ids: np.ndarray, min_period: int = 1, max_period: int = 13) -> tuple[int, int]:
  """(most back-to-back repetitions of one n-gram, its period) over periods min..max_period;
  (0, 0) when no n-gram repeats (a sequence with no run of even 2 repetitions)."""
  ids = np.asarray(ids).reshape(-1)
  best, best_period = 0, 0
  for period in range(min_period, max_period + 1):
    if len(ids) < 2 * period:
      break
    same = ids[period:] == ids[:-period]
    if not same.any():
      continue
    # Lengths of the runs of True: boundaries of the 0/1 signal padded with zeros.
    edges = np.flatnonzero(np.diff(np.concatenate(([0], same.astype(np.int8), [0]))))
    longest = int(np.max(edges[1::2] - edges[0::2]))
    times = (longest + period) // period
    if times > best:
      best, best_period = times, period
  return best, best_period


class RepetitionFilter:
  """Packed row -> the same row, its loss_mask zeroed when a period min..max_period n-gram of
  its real tokens repeats max_count times or more. A class so that Grain workers pickle it."""

  def __init__(self, min_period: int = 1, max_period: int = 13, max_count: int = 32):
    self.min_period, self.max_period, self.max_count = min_period, max_period, max_count

  def masks(self, tokens: np.ndarray, segment_ids: np.ndarray) -> bool:
    """Whether a row of tokens (with its segment ids, 0 = padding) is masked out."""
    real = np.asarray(tokens)[np.asarray(segment_ids) > 0]
    times, _ = repetition_count(real, self.min_period, self.max_period)
    return times >= self.max_count

  def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if self.masks(row["tokens"], row["segment_ids"]):
      row["loss_mask"] = np.zeros_like(row["loss_mask"])
    return row

  def __repr__(self) -> str:
    return (f"RepetitionFilter(min_period={self.min_period}, max_period={self.max_period}, "
            f"max_count={self.max_count})")
