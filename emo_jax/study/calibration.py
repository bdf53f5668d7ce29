"""Calibration batches: how a few texts of a task or domain become input for expert selection.

Every selection method ranks experts by what the routers do on calibration text (docs/algorithm.md,
"Selective expert use"; docs/selective_eval.md). `calibration_batches` is the one way that text
becomes model input, in the packer's batch layout (tokens, segment_ids, positions):

* each text is one row holding one document (segment id 1), so no text attends to another;
* a document is the text's tokens followed by EOS, as the packer ends every training document,
  cut to its first `seq_len` tokens;
* rows are right-padded with segment id 0, which attention, the routing scores and EASY-EP all
  skip, so padding never enters a score;
* rows go `rows` to a batch (default: all texts in one batch) and a short last batch is filled
  with empty rows; a batch is as wide as its longest row rounded up to a power of two (at most
  seq_len), so a few compiled shapes serve any set of texts.

Two options change that, each for the caller that needs it:

* `prompts=True` (experiments/selective_eval.py): the texts are few-shot task prompts followed by
  their right answer. Each keeps its *last* seq_len tokens, because its start is the few-shot
  examples every prompt shares while its end is the instance itself; and no EOS is added,
  because tasks/scoring.py reads a prompt without one.
* `full_width=True` (study/reproduction.py): every batch is exactly [rows, seq_len], so the
  study's calibration sets (1, 5 or all documents of a domain) share one compiled routing pass
  across every model, domain and subset size it measures.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from emo_jax.data.pipeline import pack_rows
from emo_jax.tasks.scoring import bucket

FIELDS = ("tokens", "segment_ids", "positions")


def _token_rows(texts: Sequence[str], tokenizer, *, seq_len: int,
                     prompts: bool = False) -> list[list[int]]:
  """The token ids of each text's row (see the module docstring), unpadded."""
  if not texts:
    raise ValueError("no calibration texts given; pass at least one document")
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be at least 1 token per calibration row")
  rows = []
  for text in texts:
    ids = list(tokenizer.encode(text))
    rows.append(ids[max(len(ids) - seq_len, 0):] if prompts
                else (ids + [tokenizer.eos_id])[:seq_len])
  return rows


def calibration_batches(texts: Sequence[str], tokenizer, *, seq_len: int,
                        rows: int | None = None, prompts: bool = False,
                        full_width: bool = False) -> list[dict[str, np.ndarray]]:
  """Calibration texts as batches {tokens, segment_ids, positions}, one text per row.

  rows: rows per batch (None: every text in one batch); prompts, full_width: see the module
  docstring (documents by default; their last tokens and no EOS for task prompts; batches of
  exactly [rows, seq_len]).
  """
  token_rows = _token_rows(texts, tokenizer, seq_len=seq_len, prompts=prompts)
  per_batch = rows or len(token_rows)
  if per_batch < 1:
    raise ValueError(f"rows={rows} must be at least 1 row per calibration batch")
  batches = []
  for start in range(0, len(token_rows), per_batch):
    chunk = token_rows[start:start + per_batch]
    width = seq_len if full_width else bucket(max(len(r) for r in chunk), seq_len)
    packed = pack_rows([[r] for r in chunk], pad_id=tokenizer.pad_id, seq_len=width,
                       num_rows=per_batch)
    batches.append({k: packed[k] for k in FIELDS})
  return batches


def calibration_tokens(batches: Sequence[dict[str, np.ndarray]]) -> int:
  """The tokens the batches hold (padding left out): what a selection was ranked on."""
  return int(sum(np.sum(b["segment_ids"] > 0) for b in batches))
