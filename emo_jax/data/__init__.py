"""The data wing: which text a run trains on, its tokenizer, and the packed batches.

  corpus.py         DataConfig; prepare_corpus (builds a corpus once, the one step that writes)
                    and load_corpus (reads it; refuses a missing one with the command to build it)
  training_data.py  training_data(): everything a training run reads from here, in one call
  pipeline.py       Grain: documents -> tokens -> packed rows (segment ids, positions, targets)
  fingerprint.py    the identity of a training stream, saved with every checkpoint
  sources.py        documents from JSONL, text folders and ArrayRecord; the split by id
  jsonl.py          the one loop that reads a JSONL file, with line-numbered errors
  demo_corpus.py    the built-in six-domain demo corpus
  synthetic.py      generated multi-domain text for tests and smoke runs
  tokenizer.py      byte, SentencePiece and Hugging Face tokenizers
  progress.py       progress lines of the long preparation steps

See docs/architecture.md, "Data".
"""
