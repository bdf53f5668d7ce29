"""What one training run reads from data/: `training_data(dc, ...)` -> `TrainingData`.

The trainer enters data/ here and nowhere else. One call prepares the corpus (or reuses the
prepared one, and logs which: corpus.prepare_corpus), reads it (corpus.load_corpus), and
fingerprints the training stream (fingerprint.py); the result holds what the loop uses: the
tokenizer and domains, this host's endless training iterator (whose state every checkpoint
saves), the validation batches and a separate pass over the training batches for the unigram
baseline. The iterator and the validation batches are made on first use, not by training_data
itself, so a caller that stops at a check of its own (the trainer's: a vocabulary the model
cannot hold) has started no data workers and tokenized nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from emo_jax.data import corpus as corpus_lib
from emo_jax.data import fingerprint as fingerprint_lib


@dataclasses.dataclass(eq=False)
class TrainingData:
  """The data side of one training run, on one host."""
  corpus: corpus_lib.Corpus
  config: corpus_lib.DataConfig
  # Static shape of the packed rows (the model's max_segments) and the evaluation's length.
  max_segments: int
  num_eval_batches: int
  process_index: int
  process_count: int
  # The identity of the training stream: recorded with every checkpoint, compared on restart.
  fingerprint: dict[str, Any]

  @property
  def tokenizer(self):
    return self.corpus.tokenizer

  @property
  def domains(self) -> list[str]:
    return self.corpus.domains

  def _train_dataset(self, **changes) -> grain.IterDataset:
    dc = self.config
    settings = dict(seq_len=dc.seq_len, batch_size=dc.batch_size,
                    max_segments=self.max_segments, seed=dc.seed,
                    process_index=self.process_index, process_count=self.process_count,
                    row_filter=dc.row_filter())
    return self.corpus.dataset("train", **{**settings, **changes})

  @functools.cached_property
  def train_iterator(self) -> grain.DatasetIterator:
    """This host's training batches, endless (epochs reshuffled by data.seed); checkpointable
    through its get_state / set_state, so a resumed run sees exactly the batches to come."""
    return iter(self._train_dataset(num_epochs=None, num_workers=self.config.num_workers))

  @functools.cached_property
  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """The validation batches every evaluation scores: the first `num_eval_batches` of the
    split in a fixed order, padded to full static shape."""
    return self.corpus.eval_batches(self.config, self.max_segments, self.num_eval_batches,
                                    process_index=self.process_index,
                                    process_count=self.process_count)

  def train_pass(self) -> grain.IterDataset:
    """One pass over this host's training batches in the training order, independent of
    `train_iterator` (the unigram baseline counts its token frequencies on it)."""
    return self._train_dataset(num_epochs=1)


def training_data(dc: corpus_lib.DataConfig, *, max_segments: int, eval_batches: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> TrainingData:
  """Prepares (or reuses) the corpus of `dc`, reads it and fingerprints its training stream.

  The host is `process_index` of `process_count` (default: this JAX process); `dc.batch_size`
  is the global batch, of which each host reads its share.
  """
  corpus_lib.prepare_corpus(dc)
  corpus = corpus_lib.load_corpus(dc)
  process_index, process_count = corpus_lib.host(process_index, process_count)
  corpus_lib.rows_per_host(dc.batch_size, process_count)  # refused now, not at the first batch
  fingerprint = fingerprint_lib.data_stream_fingerprint(corpus, corpus_lib.resolved_data_dir(dc))
  return TrainingData(corpus, dc, max_segments=max_segments, num_eval_batches=eval_batches,
                      process_index=process_index, process_count=process_count,
                      fingerprint=fingerprint)
