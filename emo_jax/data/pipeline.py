"""Grain input pipeline: documents -> tokens -> packed rows -> batches.

The model learns document boundaries only from what this module emits, so the packed rows carry
everything the attention mask and the EMO expert pool need:

  tokens       int32 [B, L]  input ids
  targets      int32 [B, L]  the next token *within the same fragment* (0 where there is none)
  segment_ids  int32 [B, L]  1..max_segments per fragment, 0 for padding
  positions    int32 [B, L]  position within the fragment (RoPE restarts at every fragment)
  loss_mask    float32 [B, L] 1 where `targets` is a real next token of the same fragment
  domain_ids   int32 [B, L]  index of the document's domain in `domains`, -1 for padding

Packing is sequential (documents in order fill rows; EOS is appended to each document); a
document longer than the rest of a row continues in the next row as a new fragment, exactly as
the reference trainer cuts its packed stream. A row closes early once it holds `max_segments`
fragments: that bound is a static shape of the pool computation.

The packing iterator checkpoints as (state of the document iterator *before* the current
document, offset into it): a few integers whatever the document length, and restoring replays
exactly the rows that would have come.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags

FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "domain_ids")


def empty_rows(num_rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """`num_rows` rows of padding in the packed layout: segment id 0, no target, no domain."""
  shape = (num_rows, seq_len)
  return {"tokens": np.full(shape, pad_id, np.int32), "targets": np.zeros(shape, np.int32),
          "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
          "loss_mask": np.zeros(shape, np.float32), "domain_ids": np.full(shape, -1, np.int32)}


def write_fragment(row: Mapping[str, np.ndarray], start: int, ids, segment: int,
                   domain: int = -1) -> None:
  """Writes one fragment into a row (1-D arrays of `empty_rows`) from `start`: its tokens, the
  next token of the same fragment as target, segment id `segment` (>= 1), positions from 0."""
  n = len(ids)
  span = slice(start, start + n)
  row["tokens"][span] = ids
  row["targets"][start:start + n - 1] = ids[1:]
  row["loss_mask"][start:start + n - 1] = 1.0
  row["segment_ids"][span] = segment
  row["positions"][span] = np.arange(n)
  row["domain_ids"][span] = domain


def pack_rows(rows: Sequence[Sequence[Sequence[int]]], *, pad_id: int, seq_len: int | None = None,
              num_rows: int | None = None) -> dict[str, np.ndarray]:
  """A batch in the packer's layout from hand-placed documents: row i holds the documents
  `rows[i]` (token-id lists) one after another, segment ids 1, 2, ..., then padding.

  `seq_len` defaults to the longest row; `num_rows` (>= len(rows)) adds rows of padding only.
  For batches that are not drawn from a corpus: calibration text, benchmarks, tests.
  """
  seq_len = seq_len or max(sum(len(d) for d in docs) for docs in rows)
  batch = empty_rows(num_rows or len(rows), seq_len, pad_id)
  for i, docs in enumerate(rows):
    row = {k: v[i] for k, v in batch.items()}
    fill = 0
    for segment, ids in enumerate(docs, start=1):
      if fill + len(ids) > seq_len:
        raise ValueError(f"row {i} holds {sum(len(d) for d in docs)} tokens, more than "
                         f"seq_len={seq_len}; cut its documents first")
      write_fragment(row, fill, np.asarray(ids, np.int32), segment)
      fill += len(ids)
  return batch


class IteratorStateMismatchError(ValueError):
  """A saved iterator state points at documents this data does not have (the data changed)."""


@dataclasses.dataclass(frozen=True)
class PackingSpec:
  """Static shape of a packed row."""
  seq_len: int
  max_segments: int

  def __post_init__(self):
    if self.seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
    if self.max_segments < 1:
      raise ValueError(f"max_segments must be >= 1, got {self.max_segments}")


class _Tokenize:
  """Document dict -> {"ids": int32 tokens + EOS, "domain": int}. A class so it pickles."""

  def __init__(self, tokenizer, domain_index: Mapping[str, int], append_eos: bool):
    self.tokenizer = tokenizer
    self.domain_index = dict(domain_index)
    self.append_eos = append_eos

  def __call__(self, doc: Mapping[str, Any]) -> dict[str, Any]:
    ids = list(self.tokenizer.encode(doc["text"]))
    if self.append_eos:
      ids.append(self.tokenizer.eos_id)
    domain = self.domain_index.get(doc.get("domain", ""), -1)
    return {"ids": np.asarray(ids, np.int32), "domain": np.int32(domain)}


class _PackIterator(grain.DatasetIterator):
  """Fills rows of `seq_len` tokens from a stream of tokenized documents."""

  def __init__(self, parent: grain.DatasetIterator, spec: PackingSpec, pad_id: int):
    super().__init__(parent)
    self._spec = spec
    self._pad_id = pad_id
    self._doc = None           # the document being cut into fragments, or None
    self._offset = 0           # tokens of self._doc already emitted
    self._state_before_doc = None
    self._exhausted = False

  def _next_document(self) -> bool:
    self._state_before_doc = self._parent.get_state()
    try:
      doc = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return False
    if len(doc["ids"]):
      self._doc, self._offset = doc, 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    L, S = self._spec.seq_len, self._spec.max_segments
    row = empty_rows(1, L, self._pad_id)
    row = {k: v[0] for k, v in row.items()}
    fill, segment = 0, 0
    while fill < L and segment < S:
      if self._doc is None:
        if self._exhausted or not self._next_document():
          break
        continue
      ids = self._doc["ids"]
      n = min(L - fill, len(ids) - self._offset)
      segment += 1
      write_fragment(row, fill, ids[self._offset:self._offset + n], segment,
                     self._doc["domain"])
      fill += n
      self._offset += n
      if self._offset == len(ids):
        self._doc = None
    if fill == 0:
      raise StopIteration
    return row

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": 0,
              "exhausted": int(self._exhausted)}
    return {"parent": self._state_before_doc, "offset": int(self._offset),
            "exhausted": 0}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._offset = None, 0
    self._exhausted = bool(state.get("exhausted", 0))
    if state["offset"]:
      if not self._next_document() or self._doc is None:
        raise IteratorStateMismatchError(
            "iterator state does not match the data: the document it points into is missing; "
            "was the corpus or its shuffle seed changed?")
      if state["offset"] >= len(self._doc["ids"]):
        raise IteratorStateMismatchError(
            f"iterator state does not match the data: offset {state['offset']} lies past the "
            "end of the document it points into")
      self._offset = int(state["offset"])


class PackIterDataset(grain.IterDataset):
  """Grain IterDataset that packs tokenized documents into fixed-length rows."""

  def __init__(self, parent: grain.IterDataset, spec: PackingSpec, pad_id: int = 0):
    super().__init__(parent)
    self._spec = spec
    self._pad_id = pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._spec, self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._spec.seq_len}, max_segments={self._spec.max_segments})"


def document_dataset(documents: Sequence[Mapping[str, Any]], *, seed: int = 0,
                     shuffle: bool = True, num_epochs: int | None = 1,
                     shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """Documents of this host's shard, shuffled anew every epoch, repeated `num_epochs` times.

  Shards are strided (`documents[shard_index::shard_count]`): disjoint and together the whole
  corpus. `num_epochs=None` repeats forever (training by steps).
  """
  if len(documents) == 0:
    raise ValueError("the corpus has no documents; check the path given as the corpus, or "
                     "build the demo corpus with `python -m experiments.prepare_data`")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, shard_count={shard_count}), "
                     f"got {shard_index}")
  if len(documents) < shard_count:
    raise ValueError(f"{len(documents)} documents cannot be split over {shard_count} hosts; "
                     "every host needs at least one")
  ds = grain.MapDataset.source(documents)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  return ds


def make_dataset(documents: Sequence[Mapping[str, Any]], tokenizer, *, seq_len: int,
                 batch_size: int, max_segments: int, domains: Sequence[str] = (),
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, shard_index: int | None = None,
                 shard_count: int | None = None, append_eos: bool = True,
                 num_workers: int = 0,
                 row_filter: Callable[[dict], dict] | None = None) -> grain.IterDataset:
  """The whole pipeline as a Grain IterDataset of batches (dicts of [B, L] NumPy arrays).

  `shard_index` / `shard_count` default to `jax.process_index()` / `jax.process_count()`, so
  every host reads only its part. `num_workers > 0` tokenizes and packs in that many
  processes (Grain multiprocess prefetch); the iterator state stays checkpointable.
  `row_filter` maps every packed row before batching (repetition.RepetitionFilter: the
  release's repetition filter, which zeroes a row's loss_mask).
  """
  if shard_index is None or shard_count is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  spec = PackingSpec(seq_len, max_segments)
  docs = document_dataset(documents, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                          shard_index=shard_index, shard_count=shard_count)
  tokenized = docs.map(_Tokenize(tokenizer, {d: i for i, d in enumerate(domains)}, append_eos))
  packed = PackIterDataset(tokenized.to_iter_dataset(), spec, pad_id=tokenizer.pad_id)
  if row_filter is not None:
    packed = packed.map(row_filter)
  batched = packed.batch(batch_size, drop_remainder=drop_remainder)
  if num_workers > 0:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
    # are unparsed, so accept their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return batched

