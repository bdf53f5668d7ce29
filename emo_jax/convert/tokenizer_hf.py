"""Tokenizer files that `transformers.AutoTokenizer` loads offline and that encode like ours.

Three kinds of tokenizer reach an export:

* the byte tokenizer (pad 0, eos 1, byte b -> b + 2): a `tokenizers` BPE model with no merges
  whose vocabulary is the 256 byte pieces `<0x00>`..`<0xFF>` at ids 2..257 and byte fallback on,
  so every character becomes its UTF-8 bytes, exactly like `ByteTokenizer`;
* a SentencePiece BPE model trained by `train_sentencepiece`: converted piece for piece (same
  ids), with merges ranked by piece score, no pre-tokenizer, " " -> "▁" as the only
  normaliser and byte fallback. SentencePiece's BPE encoder merges the best-scoring adjacent
  pair over the whole normalised text and our models have no dummy prefix and an identity
  normaliser, so this is the same algorithm; transformers' generic `SpmConverter` is not (it
  strips whitespace and pre-splits on "▁"). Every export re-encodes sample texts (code,
  whitespace runs, digits, non-ASCII, special-token look-alikes, plus the run's validation
  text when available) with both and reports any difference;
* a Hugging Face `tokenizer.json` (e.g. dolma2 of the release): copied with its config files.

Special tokens are written with `split_special_tokens=true`, because our tokenizers encode the
text "</s>" as characters, never as the control token.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Iterable

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from emo_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Texts that exercise what goes wrong in tokenizer conversions.
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
    "def f(x):\n\tif x  >  1:\n        return [i ** 2 for i in range(x)]  # comment\r\n",
    "  leading, trailing and   inner   whitespace  \n\n\n",
    "Ünïcödé, ‹quotes›, 中文, 日本語, русский, עברית, emoji 😀👍🏽, math 𝔘 ∑ ∞",
    "</s><pad><unk> <0x41> ▁ literal special-token look-alikes",
    "\x00\x01\x7f control bytes and a very long word: " + "abc" * 40,
)


class TokenizerExportError(ValueError):
  """The tokenizer cannot be written as Hugging Face files that encode identically."""


def _write_json(path: pathlib.Path, value) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _configs(out: pathlib.Path, *, eos: str, pad: str, unk: str | None,
             model_max_length: int) -> None:
  _write_json(out / "tokenizer_config.json", {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": eos,
      "pad_token": pad, "unk_token": unk, "add_bos_token": False, "add_eos_token": False,
      "split_special_tokens": True, "clean_up_tokenization_spaces": False,
      "model_max_length": model_max_length})
  special = {"eos_token": eos, "pad_token": pad}
  if unk is not None:
    special["unk_token"] = unk
  _write_json(out / "special_tokens_map.json", special)


def byte_tokenizer_json():
  """A `tokenizers.Tokenizer` that encodes exactly like `ByteTokenizer`."""
  vocab = {"<pad>": tokenizer_lib.ByteTokenizer.pad_id, "<eos>": tokenizer_lib.ByteTokenizer.eos_id}
  vocab.update({f"<0x{b:02X}>": b + 2 for b in range(256)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
  tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False),
                          AddedToken("<eos>", special=True, normalized=False)])
  return tok


def sentencepiece_tokenizer_json(model_path: str | pathlib.Path):
  """A `tokenizers.Tokenizer` equivalent to a SentencePiece BPE model (see module docstring)."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(pathlib.Path(model_path).read_bytes())
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  if spec.model_type != spec.BPE:
    raise TokenizerExportError(
        f"{model_path} is a SentencePiece {spec.ModelType.Name(spec.model_type)} model; only BPE "
        "models (what train_sentencepiece writes) convert to tokenizer.json exactly here. Pass "
        "--tokenizer with a tokenizer.json, or --tokenizer=none to export without one.")
  unfaithful = []
  if norm.add_dummy_prefix:
    unfaithful.append("add_dummy_prefix=true")
  if norm.remove_extra_whitespaces:
    unfaithful.append("remove_extra_whitespaces=true")
  if norm.precompiled_charsmap:
    unfaithful.append(f"normalization rule {norm.name!r}")
  if spec.treat_whitespace_as_suffix:
    unfaithful.append("treat_whitespace_as_suffix=true")
  if unfaithful:
    raise TokenizerExportError(
        f"{model_path} uses {', '.join(unfaithful)}, which this converter does not reproduce "
        "(models from train_sentencepiece use none of them); pass --tokenizer with a "
        "tokenizer.json, or --tokenizer=none to export without one.")
  normal, unknown, control, user = 1, 2, 3, 4  # SentencePiece piece types
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  mergeable = {p.piece for p in proto.pieces if p.type in (normal, user)}
  ranked = []
  for i, p in enumerate(proto.pieces):
    if p.type != normal:
      continue
    for k in range(1, len(p.piece)):
      left, right = p.piece[:k], p.piece[k:]
      if left in mergeable and right in mergeable:
        ranked.append((-p.score, i, k, left, right))
  merges = [(left, right) for *_, left, right in sorted(ranked)]
  unk = proto.pieces[spec.unk_id].piece if spec.unk_id >= 0 else None
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                             byte_fallback=spec.byte_fallback))
  tok.normalizer = normalizers.Replace(" ", "▁")
  steps = [decoders.Replace("▁", " ")]
  if spec.byte_fallback:
    steps += [decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps)
  tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                          for p in proto.pieces if p.type in (control, unknown)])
  tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                  for p in proto.pieces if p.type == user])
  return tok


def _compare(ours, theirs, texts: Iterable[str]) -> tuple[int, int, list[str]]:
  """(texts checked, texts encoded differently, the first differences) of two encoders."""
  theirs.encode_special_tokens = True
  checked, differ, examples = 0, 0, []
  for text in texts:
    checked += 1
    a, b = ours.encode(text), theirs.encode(text, add_special_tokens=False).ids
    if a != b:
      differ += 1
      if len(examples) < 5:
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        examples.append(f"{text[:40]!r}: ids differ from position {i}: ours {a[i:i + 5]}, "
                        f"tokenizer.json {b[i:i + 5]}")
  return checked, differ, examples


def write_tokenizer(source: str, out: str | pathlib.Path, *, model_max_length: int,
                    check_texts: Iterable[str] = ()) -> dict:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`.

  Args:
    source: "bytes", a SentencePiece `.model`, a `tokenizer.json`, or a folder holding one of
      the latter (e.g. the `tokenizer/` folder an import wrote).
    out: the export folder.
    model_max_length: the model's context length, recorded for transformers.
    check_texts: extra texts (e.g. validation documents) to compare encodings on.

  Returns:
    {"kind", "source", "vocab_size", "eos_token_id", "pad_token_id", "bos_token_id",
    "checked_texts", "texts_encoded_differently", "differences"} (the first few, described).
  """
  out = pathlib.Path(out)
  if source == "bytes":
    ours = tokenizer_lib.ByteTokenizer()
    tok = byte_tokenizer_json()
    tok.save(str(out / "tokenizer.json"))
    _configs(out, eos="<eos>", pad="<pad>", unk=None, model_max_length=model_max_length)
    kind = "bytes"
  else:
    ours = tokenizer_lib.load_tokenizer(source)
    if isinstance(ours, tokenizer_lib.SentencePieceTokenizer):
      tok = sentencepiece_tokenizer_json(ours.path)
      tok.save(str(out / "tokenizer.json"))
      unk = None if ours.unk_id is None else ours.id_to_piece(ours.unk_id)
      _configs(out, eos=ours.id_to_piece(ours.eos_id), pad=ours.id_to_piece(ours.pad_id), unk=unk,
               model_max_length=model_max_length)
      kind = "sentencepiece"
    else:
      folder = pathlib.Path(ours.path).parent
      for name in TOKENIZER_FILES:
        if (folder / name).is_file():
          shutil.copyfile(folder / name, out / name)
      tok = Tokenizer.from_file(ours.path)
      if not (out / "tokenizer_config.json").is_file():
        _configs(out, eos=tok.id_to_token(ours.eos_id), pad=tok.id_to_token(ours.pad_id),
                 unk=None, model_max_length=model_max_length)
      kind = "tokenizer.json"
  checked, differ, examples = 0, 0, []
  if kind != "tokenizer.json":
    checked, differ, examples = _compare(ours, tok, [*SAMPLE_TEXTS, *check_texts])
    if differ:
      log.warning("the exported tokenizer.json encodes %d of %d checked texts differently from "
                  "the model's tokenizer %s, e.g.\n  %s", differ, checked, source,
                  "\n  ".join(examples))
  return {"kind": kind, "source": str(source), "vocab_size": int(ours.vocab_size),
          "eos_token_id": int(ours.eos_id),
          "pad_token_id": int(ours.pad_id), "bos_token_id": None, "checked_texts": checked,
          "texts_encoded_differently": differ, "differences": examples}
