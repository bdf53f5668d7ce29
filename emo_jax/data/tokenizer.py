"""Tokenizers behind one small interface: SentencePiece models we train, Hugging Face files we load.

Two kinds of tokenizer meet here. Models trained from scratch (tiny configs, the demo corpus)
use a SentencePiece BPE model trained by `train_sentencepiece`, because it is one small file,
trains in seconds on 2 cores and needs no network. The released EMO checkpoints use the dolma2
BPE tokenizer (a tiktoken-style byte-level BPE, 100,278 tokens, EOS 100257, PAD 100277) that
ships as a Hugging Face `tokenizer.json`; `HFTokenizer` loads it with the `tokenizers` package.
`ByteTokenizer` (UTF-8 bytes, 258 ids) needs neither, for tiny configs and smoke runs.
The rest of the project (packer, evaluation, generation) only sees the `Tokenizer` protocol:
`encode`, `decode`, `eos_id`, `pad_id`, `vocab_size`.

Training settings and why:

* **Code must survive a round trip.** A corpus with Python in it is useless if indentation,
  tabs, blank lines or trailing spaces are normalised away, so the model uses the identity
  normaliser, keeps extra whitespace, and learns whitespace-only pieces ("▁▁▁▁") so that
  indentation costs one token, not four.
* **Newlines.** SentencePiece's trainer reads *sentences*; from a file it splits at newlines,
  so a newline would never be seen in training. We feed it chunks of whole lines (newlines
  kept) through `sentence_iterator=`, which passes each string through unsplit, so pieces like
  ":\n" and "\n\n" are learned; `required_chars` puts "\n", "\t" and "\r" in the vocabulary even
  when the corpus lacks them. Chunks are bounded by `max_sentence_bytes` because the trainer
  *silently drops* longer sentences.
* **No dummy prefix.** SentencePiece normally prepends a space ("▁") to every input and
  strips one when decoding, which makes decode(slice) lose a leading space and makes the first
  word of a document a different token from the same word after a newline. Byte-level BPE
  (dolma2) has neither quirk; we turn it off.
* **Byte fallback** so that any text (CJK, emoji, control bytes) encodes without `<unk>`;
  **digits split** into single-digit pieces "0".."9" (always in the vocabulary), as in most LM
  tokenizers, for arithmetic.
* **Ids**: pad 0, unk 1, eos 2 and no BOS, because EMO has no BOS; the packer appends EOS, so
  `encode` adds nothing.
* **Deterministic**: no input shuffling or sampling (we bound the input ourselves, by bytes),
  so the same text and settings give a byte-identical `.model` file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import re
import time
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

from emo_jax.data import progress as progress_lib

log = logging.getLogger(__name__)

# The dolma2 tokenizer of the released EMO / OLMo 2 checkpoints.
DOLMA2_VOCAB_SIZE = 100_278
DOLMA2_EOS_ID = 100_257
DOLMA2_PAD_ID = 100_277

# Ids of the SentencePiece models we train. EMO has no BOS.
SP_PAD_ID, SP_UNK_ID, SP_EOS_ID = 0, 1, 2
# Meta pieces every trained model holds: pad, unk, eos and the 256 byte-fallback pieces.
SP_NUM_META_PIECES = 3 + 256

# Characters that must be pieces of their own even when the training text has few or none
# (character_coverage would otherwise leave rare ones to byte fallback): the whitespace code
# needs, and the digits, so that split digits are always the pieces "0".."9".
_REQUIRED_CHARS = "\n\t\r0123456789"

ACCEPTED_KINDS = (
    "a SentencePiece model file ending in .model, "
    "a Hugging Face tokenizer file ending in .json (e.g. tokenizer.json), "
    "a directory holding tokenizer.json or exactly one .model file, "
    "or \"bytes\" (UTF-8 bytes, no file)"
)


class TokenizerError(ValueError):
  """A tokenizer cannot be loaded or trained as asked; the message says why and how to fix it.

  `max_vocab_size` is set when the training text cannot fill the asked vocabulary: the
  largest vocab_size that works on it.
  """

  def __init__(self, message: str, *, max_vocab_size: int | None = None):
    super().__init__(message)
    self.max_vocab_size = max_vocab_size


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of emo_jax needs from a tokenizer."""

  # Number of ids the model's embedding must cover (1 + the largest id the tokenizer can emit).
  vocab_size: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with no BOS or EOS added (the packer appends EOS)."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad ids are ignored."""
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` over many texts, in parallel where the backend can."""
    ...


def _ints_without(ids: Sequence[int], skip: int) -> list[int]:
  # Accept numpy / jax arrays as well as lists; int() also turns numpy scalars into Python ints,
  # which both backends require.
  return [i for i in (int(x) for x in ids) if i != skip]


def _check_id(name: str, value: int, vocab_size: int, path: str) -> int:
  value = int(value)
  if not 0 <= value < vocab_size:
    raise TokenizerError(
        f"{name}={value} is outside the vocabulary of {path!r} (ids 0..{vocab_size - 1}); "
        f"pass an id of a token that exists."
    )
  return value


class SentencePieceTokenizer:
  """A SentencePiece `.model` file (normally one from `train_sentencepiece`).

  eos_id / pad_id default to the ids recorded in the model; pass them to override, e.g. for a
  foreign model trained without a pad piece.
  """

  def __init__(self, model_path: str | os.PathLike, *, eos_id: int | None = None,
               pad_id: int | None = None, num_threads: int = 2):
    self.path = str(model_path)
    if not os.path.isfile(self.path):
      raise TokenizerError(
          f"SentencePiece model {self.path!r} does not exist; train one with "
          f"train_sentencepiece(texts, model_prefix) or pass the path of an existing .model file."
      )
    self._processor = spm.SentencePieceProcessor()
    try:
      self._processor.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(
          f"{self.path!r} is not a readable SentencePiece model ({e}); pass a .model file "
          f"written by SentencePiece."
      ) from e
    self.num_threads = num_threads
    self.vocab_size = self._processor.get_piece_size()
    self.eos_id = self._resolve("eos_id", eos_id, self._processor.eos_id())
    self.pad_id = self._resolve("pad_id", pad_id, self._processor.pad_id())

  def _resolve(self, name: str, given: int | None, from_model: int) -> int:
    if given is not None:
      return _check_id(name, given, self.vocab_size, self.path)
    if from_model < 0:
      raise TokenizerError(
          f"SentencePiece model {self.path!r} defines no {name[:-3]} piece; pass "
          f"{name}=<id> to SentencePieceTokenizer (or retrain with train_sentencepiece, which "
          f"sets pad={SP_PAD_ID}, eos={SP_EOS_ID})."
      )
    return from_model

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._processor.encode(list(texts), out_type=int, num_threads=self.num_threads)

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode(_ints_without(ids, self.pad_id))

  def id_to_piece(self, i: int) -> str:
    return self._processor.id_to_piece(int(i))

  @property
  def unk_id(self) -> int | None:
    """The id of the model's unknown piece, or None when it has none."""
    unk = self._processor.unk_id()
    return unk if unk >= 0 else None

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class ByteTokenizer:
  """UTF-8 bytes as tokens: pad 0, eos 1, byte b -> b + 2 (258 ids).

  Needs no file and no training, so tiny configs and smoke runs tokenize anything offline.
  """

  vocab_size = 258
  pad_id = 0
  eos_id = 1
  _OFFSET = 2
  path = "bytes"

  def encode(self, text: str) -> list[int]:
    return [b + self._OFFSET for b in text.encode("utf-8")]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytearray()
    for i in (int(x) for x in ids):
      if i < 0 or i >= self.vocab_size:
        raise TokenizerError(
            f"id {i} is outside the byte tokenizer's vocabulary (0..{self.vocab_size - 1}); "
            f"the model's vocab_size must be {self.vocab_size} with this tokenizer."
        )
      if i >= self._OFFSET:  # pad and eos have no text
        data.append(i - self._OFFSET)
    # A model can emit byte sequences that are not UTF-8; show them as U+FFFD, do not fail.
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _token_from_json(path: pathlib.Path, key: str) -> str | None:
  """The special-token string stored under `key` in a transformers JSON file, if any."""
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(
        f"{str(path)!r} is not valid JSON ({e}); fix or remove it, or pass eos_id / pad_id "
        f"explicitly."
    ) from e
  value = data.get(key) if isinstance(data, dict) else None
  if isinstance(value, dict):  # {"content": "<|pad|>", "lstrip": false, ...}
    value = value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (a file, or a directory holding one), read offline.

  eos_id / pad_id come from, in order: the constructor arguments; `eos_token` / `pad_token` in
  `tokenizer_config.json`, then `special_tokens_map.json`, beside the file; the dolma2 ids
  (EOS 100257, PAD 100277) when the vocabulary has dolma2's 100,278 tokens; otherwise an error
  asks for them. Never touches the network: a hub name is not a path and is refused.

  `decode` drops pad ids but keeps other special tokens (EOS decodes to its text, e.g.
  "<|endoftext|>"), which shows document boundaries in generated text.
  """

  def __init__(self, path: str | os.PathLike, *, eos_id: int | None = None,
               pad_id: int | None = None):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise TokenizerError(
          "Loading a Hugging Face tokenizer.json needs the `tokenizers` package; "
          "pip install tokenizers (it comes with transformers)."
      ) from e
    p = pathlib.Path(path)
    if p.is_dir():
      p = p / "tokenizer.json"
    if not p.is_file():
      raise TokenizerError(
          f"Hugging Face tokenizer file {str(p)!r} does not exist; pass the path of a "
          f"tokenizer.json or of a directory holding one (download it first: nothing is "
          f"fetched from the hub here)."
      )
    self.path = str(p)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file.
      raise TokenizerError(
          f"{self.path!r} is not a Hugging Face tokenizer file ({e}); pass a tokenizer.json "
          f"saved by the tokenizers / transformers library."
      ) from e
    vocab = self._tok.get_vocab(with_added_tokens=True)
    # Ids may have holes; the embedding must cover the largest one.
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    self.eos_id = self._resolve("eos", eos_id, p.parent)
    self.pad_id = self._resolve("pad", pad_id, p.parent)

  def _resolve(self, name: str, given: int | None, folder: pathlib.Path) -> int:
    if given is not None:
      return _check_id(f"{name}_id", given, self.vocab_size, self.path)
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
      token = _token_from_json(folder / fname, f"{name}_token")
      if token is None:
        continue
      i = self._tok.token_to_id(token)
      if i is None:
        raise TokenizerError(
            f"{str(folder / fname)!r} names {name}_token={token!r}, which is not in the "
            f"vocabulary of {self.path!r}; fix that file or pass {name}_id=<id>."
        )
      return i
    if self.vocab_size == DOLMA2_VOCAB_SIZE:
      return DOLMA2_EOS_ID if name == "eos" else DOLMA2_PAD_ID
    raise TokenizerError(
        f"Cannot tell the {name} id of {self.path!r}: no {name}_token in tokenizer_config.json "
        f"or special_tokens_map.json beside it, and its vocabulary ({self.vocab_size} ids) is "
        f"not dolma2's ({DOLMA2_VOCAB_SIZE}). Pass {name}_id=<id> (and the other of "
        f"eos_id / pad_id) to HFTokenizer or load_tokenizer."
    )

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(_ints_without(ids, self.pad_id), skip_special_tokens=False)

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id})")


def load_tokenizer(path: str | os.PathLike, *, eos_id: int | None = None,
                   pad_id: int | None = None) -> Tokenizer:
  """The tokenizer at `path`, chosen by its kind (see ACCEPTED_KINDS); "bytes" is the byte
  tokenizer, which has no file."""
  if str(path) == "bytes":
    if eos_id is not None or pad_id is not None:
      raise TokenizerError("the byte tokenizer's ids are fixed (pad 0, eos 1): drop eos_id / "
                           "pad_id, or pass a tokenizer file")
    return ByteTokenizer()
  p = pathlib.Path(path)
  if not p.exists():
    raise TokenizerError(f"Tokenizer path {str(p)!r} does not exist; expected {ACCEPTED_KINDS}.")
  if p.is_dir():
    if (p / "tokenizer.json").is_file():
      return HFTokenizer(p, eos_id=eos_id, pad_id=pad_id)
    models = sorted(p.glob("*.model"))
    if len(models) == 1:
      return SentencePieceTokenizer(models[0], eos_id=eos_id, pad_id=pad_id)
    found = f"{len(models)} .model files" if models else "neither"
    raise TokenizerError(
        f"Directory {str(p)!r} holds {found}, not a tokenizer.json or exactly one .model file; "
        f"pass the tokenizer file itself. Accepted: {ACCEPTED_KINDS}."
    )
  if p.suffix == ".model":
    return SentencePieceTokenizer(p, eos_id=eos_id, pad_id=pad_id)
  if p.suffix == ".json":
    return HFTokenizer(p, eos_id=eos_id, pad_id=pad_id)
  raise TokenizerError(
      f"Do not know how to load tokenizer {str(p)!r} (suffix {p.suffix or 'none'!r}); "
      f"expected {ACCEPTED_KINDS}."
  )


def _cut(line: str, max_bytes: int) -> Iterator[str]:
  """`line`, or pieces of it of max_bytes // 4 characters when it is longer than max_bytes
  (a character is at most 4 UTF-8 bytes, so each piece fits)."""
  if len(line.encode("utf-8")) <= max_bytes:
    yield line
    return
  step = max(1, max_bytes // 4)
  for i in range(0, len(line), step):
    yield line[i:i + step]


def _sentences(texts: Iterable[str], max_sentence_bytes: int, max_input_bytes: int,
               stats: dict, progress: progress_lib.ProgressLog | None = None) -> Iterator[str]:
  """Training sentences: runs of whole lines (newlines kept), each <= max_sentence_bytes.

  Over-long lines are cut (see `_cut`), so the trainer never silently drops a sentence.
  Stops after max_input_bytes in total.
  """
  total = 0
  for text in texts:
    if progress is not None:
      progress.update(total - progress.bytes, 1)
    if not isinstance(text, str):
      raise TokenizerError(
          f"train_sentencepiece wants an iterable of str, got an item of type "
          f"{type(text).__name__}; decode bytes to str first."
      )
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
      for piece in _cut(line, max_sentence_bytes):
        n = len(piece.encode("utf-8"))
        if total + n > max_input_bytes:
          if buf:
            yield "".join(buf)
          stats["truncated"] = True
          return
        if buf and size + n > max_sentence_bytes:
          yield "".join(buf)
          buf, size = [], 0
        buf.append(piece)
        size += n
        total += n
        stats["bytes"] = total
    if buf:
      yield "".join(buf)
    stats["documents"] += 1


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike,
                        vocab_size: int = 8192, *, max_sentence_bytes: int = 4096,
                        max_input_bytes: int = 100_000_000, num_threads: int = 2,
                        character_coverage: float = 0.9995,
                        user_defined_symbols: Sequence[str] = (),
                        max_piece_length: int = 16,
                        expected_bytes: int | None = None) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece model on `texts` and writes `{model_prefix}.model`.

  Args:
    texts: documents, streamed once (a generator is fine). Only the first `max_input_bytes`
      bytes are used, in the order given, so interleave domains if the input is grouped by one.
    model_prefix: where to write; parent directories are created.
    vocab_size: number of pieces, including pad, unk, eos and the 256 byte pieces.
    max_sentence_bytes: texts are cut into chunks of whole lines of at most this many bytes
      (SentencePiece skips longer sentences).
    max_input_bytes: bound on the training text; keeps time and memory bounded for big corpora.
    num_threads: trainer threads.
    character_coverage: share of characters that get their own piece; the rarest others are
      spelled with byte pieces. Lower it if a tiny vocab_size has no room for every character.
    user_defined_symbols: strings always kept as one piece (never merged or split).
    max_piece_length: longest piece, in characters (bounds whitespace runs too).
    expected_bytes: how much text `texts` holds, when the caller knows; only for the ETA of
      the progress lines.

  Returns:
    The trained tokenizer, loaded from the written file.
  """
  reserved = SP_NUM_META_PIECES + len(_REQUIRED_CHARS) + len(user_defined_symbols)
  if vocab_size <= reserved:
    raise TokenizerError(
        f"vocab_size={vocab_size} leaves no room for learned pieces: {reserved} are reserved "
        f"(pad, unk, eos, 256 byte pieces, whitespace, digits and user_defined_symbols); use "
        f"vocab_size >= 512 (8192 is the default)."
    )
  if max_sentence_bytes < 16:
    raise TokenizerError(f"max_sentence_bytes={max_sentence_bytes} is too small; use >= 1024.")
  out = pathlib.Path(f"{os.fspath(model_prefix)}.model")
  out.parent.mkdir(parents=True, exist_ok=True)
  stats = {"bytes": 0, "documents": 0, "truncated": False}
  writer = io.BytesIO()
  start = time.perf_counter()
  progress = progress_lib.ProgressLog(
      log, "tokenizer: reading text",
      total_bytes=min(expected_bytes or max_input_bytes, max_input_bytes))
  log.info("training a %d-piece SentencePiece BPE tokenizer (reads up to %s, then learns its "
           "merges without further progress lines)", vocab_size, progress_lib.size(progress.total))

  def sentences_then_report():
    yield from _sentences(texts, max_sentence_bytes, max_input_bytes, stats, progress)
    progress.bytes = stats["bytes"]
    progress.done()
    log.info("tokenizer: learning %d pieces from %s", vocab_size,
             progress_lib.size(stats["bytes"]))

  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences_then_report(),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        required_chars=_REQUIRED_CHARS,
        user_defined_symbols=list(user_defined_symbols),
        max_sentencepiece_length=max_piece_length,
        max_sentence_length=max_sentence_bytes,
        pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, eos_id=SP_EOS_ID, bos_id=-1,
        # Deterministic: read every sentence, in order (we bound the input by bytes above).
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=2,
    )
  except RuntimeError as e:
    msg = str(e)
    if "sentences_.empty()" in msg:
      raise TokenizerError(
          "train_sentencepiece got no text (the iterable was empty or held only empty "
          "strings); pass the documents to learn from."
      ) from e
    detail = " ".join(msg.split("] ")[-1].split())
    if "Vocabulary size too high" in msg:
      largest = re.search(r"<=\s*(\d+)", detail)
      if largest:
        n = int(largest.group(1))
        raise TokenizerError(
            f"vocab_size={vocab_size} is more than this text can fill: SentencePiece can make "
            f"at most {n} pieces from its {stats['bytes']:,} bytes ({stats['documents']} "
            f"document{'' if stats['documents'] == 1 else 's'}). Use vocab_size={n} or less "
            f"(--vocab_size {n}), or train on more text.", max_vocab_size=n) from e
      raise TokenizerError(
          f"SentencePiece cannot make {vocab_size} pieces from this text ({stats['bytes']:,} "
          f"bytes): {detail} Use a smaller vocab_size or train on more text.") from e
    if "Vocabulary size is smaller than required_chars" in msg:
      raise TokenizerError(
          f"vocab_size={vocab_size} has no room for every character of this text: {detail} "
          f"Use a larger vocab_size or a lower character_coverage (now {character_coverage}); "
          f"characters left out are spelled with byte pieces."
      ) from e
    raise TokenizerError(f"SentencePiece training failed: {' '.join(msg.split())}") from e
  # Write through a temporary name so a crash never leaves a half-written model behind.
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_bytes(writer.getvalue())
  os.replace(tmp, out)
  log.info(
      "trained SentencePiece BPE vocab %d on %d bytes from %d documents%s in %.1f s -> %s",
      vocab_size, stats["bytes"], stats["documents"],
      " (truncated at max_input_bytes)" if stats["truncated"] else "",
      time.perf_counter() - start, out)
  return SentencePieceTokenizer(out, num_threads=num_threads)
