"""Tokenizers: exact round trips (code, whitespace, non-ASCII), ids, determinism, loading errors.

A tiny SentencePiece model (vocab 512) is trained once per module on a few hundred KB of
stdlib source and mixed-script prose; a tiny byte-level BPE stands in for dolma2's
tokenizer.json, built with the `tokenizers` library itself.
"""

import argparse
import collections
import dataclasses
import functools
import inspect
import json
import pickle
import textwrap

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from emo_jax.data import tokenizer as tk

VOCAB = 512

PROSE = [
    "The quick brown fox jumps over the lazy dog. Experts specialise by document domain.\n",
    "Café, naïve, résumé, Übermaß, façade — « guillemets » and ‘quotes’.\n",
    "東京は日本の首都です。漢字とひらがなとカタカナ。中文文本也在这里。\n",
    "Emoji: 😀 🚀 👍🏽 and math: ∑ ∫ √2 ≈ 1.41421356.\n",
]
# Numbers are frequent enough that BPE would merge digits ("10", "000", ...) without split_digits.
NUMBERS = "".join(f"row {i}: {i * i}, {1000 + i}, {2000 + i}.00\n" for i in range(3000))

ROUND_TRIPS = {
    "python": textwrap.dedent('''\
        class Foo(Base):
            """Docstring with  two spaces."""

            def bar(self, x: int = 42) -> int:   
                if x > 10:
                    return x * 2  # comment


                return -1
        '''),
    "tabs": "def f(a):\n\tif a:\n\t\treturn 1\n\n\treturn 0\n",
    "blank_lines_and_trailing_spaces": "a   \n\n\n   \n  b\t \n",
    "leading_space": " x",
    "only_whitespace": "  \n\t\n ",
    "windows_newlines": "line one\r\nline two\r\n",
    "accents": "Ça va? Déjà vu, naïve façade. Ärger über Öl.",
    "cjk": "日本語のテキストと中文。",
    "emoji": "launch 🚀🚀 ok 👍🏽",
    "rare_chars": "\x00\x07 ⟦⟧ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "empty": "",
    "spaces_and_digits": "a  b     c 1234567890 3.14159   007",
}


def training_texts():
  sources = [inspect.getsource(m) for m in (argparse, collections, dataclasses, functools, json)]
  tabbed = inspect.getsource(textwrap).replace("    ", "\t")
  return sources + [tabbed, NUMBERS] + [p * 30 for p in PROSE]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("sp") / "tiny"
  return tk.train_sentencepiece(training_texts(), prefix, vocab_size=VOCAB, num_threads=2)


def test_training_text_is_a_few_hundred_kb():
  size = sum(len(t.encode("utf-8")) for t in training_texts())
  assert 150_000 < size < 1_000_000, size


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_sentencepiece_round_trip(sp_tok, name):
  text = ROUND_TRIPS[name]
  ids = sp_tok.encode(text)
  assert sp_tok.decode(ids) == text
  assert tk.SP_UNK_ID not in ids, "byte fallback should spell unknown characters, not <unk>"


def test_sentencepiece_ids_and_vocab(sp_tok):
  assert (sp_tok.vocab_size, sp_tok.pad_id, sp_tok.eos_id) == (VOCAB, 0, 2)
  sp = spm.SentencePieceProcessor(model_file=sp_tok.path)
  assert (sp.pad_id(), sp.unk_id(), sp.eos_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.get_piece_size() == VOCAB
  assert sp_tok.path.endswith("tiny.model")


def test_encode_adds_no_bos_or_eos(sp_tok):
  assert len(sp_tok.encode("a")) == 1
  ids = sp_tok.encode("hello world")
  assert sp_tok.eos_id not in ids and ids[0] != sp_tok.eos_id
  assert sp_tok.encode("") == []


def test_digits_are_single_pieces(sp_tok):
  ids = sp_tok.encode("1234567890")
  assert [sp_tok.id_to_piece(i) for i in ids] == list("1234567890")
  for number in ("2024", "1000", "10000", "2999"):
    ids = sp_tok.encode(f"x = {number}")
    assert [sp_tok.id_to_piece(i) for i in ids][-len(number):] == list(number)


def test_newline_tab_and_indentation_pieces(sp_tok):
  # Newlines and tabs are real pieces (not <0x0A> byte fallback), so code stays cheap.
  for ch in "\n\t\r":
    (i,) = sp_tok.encode(ch)
    assert sp_tok.id_to_piece(i) == ch
  # Indentation is learned as whitespace-only pieces: 8 spaces take fewer than 8 tokens.
  assert len(sp_tok.encode("        return")) < 8
  # No dummy prefix: a leading space is kept and not invented.
  assert sp_tok.id_to_piece(sp_tok.encode("def")[0]) != "▁def"


def test_decode_ignores_pad_and_takes_arrays(sp_tok):
  text = ROUND_TRIPS["python"]
  ids = sp_tok.encode(text)
  padded = [sp_tok.pad_id] + ids + [sp_tok.pad_id] * 3
  assert sp_tok.decode(padded) == text
  assert sp_tok.decode(np.asarray(padded, np.int32)) == text


def test_decode_ignores_a_pad_id_that_is_an_ordinary_piece(sp_tok):
  # A foreign model may make pad an ordinary piece, which SentencePiece itself would print.
  (a_id,), (b_id,) = sp_tok.encode("a"), sp_tok.encode("b")
  tok = tk.SentencePieceTokenizer(sp_tok.path, pad_id=a_id)
  assert tok.pad_id == a_id and tok.eos_id == sp_tok.eos_id
  assert sp_tok.decode([a_id, b_id, a_id]) == "aba"
  assert tok.decode([a_id, b_id, a_id]) == "b"


def test_encode_batch_matches_encode(sp_tok):
  texts = list(ROUND_TRIPS.values())
  assert sp_tok.encode_batch(texts) == [sp_tok.encode(t) for t in texts]


def test_sentencepiece_pickles(sp_tok):
  # Grain's multiprocess prefetch pickles the transforms that hold the tokenizer.
  clone = pickle.loads(pickle.dumps(sp_tok))
  text = ROUND_TRIPS["python"]
  assert clone.encode(text) == sp_tok.encode(text)


def test_load_tokenizer_sentencepiece(sp_tok, tmp_path):
  loaded = tk.load_tokenizer(sp_tok.path)
  assert isinstance(loaded, tk.SentencePieceTokenizer)
  assert isinstance(loaded, tk.Tokenizer)
  assert loaded.encode(ROUND_TRIPS["tabs"]) == sp_tok.encode(ROUND_TRIPS["tabs"])
  # A directory holding exactly one .model file also works.
  (tmp_path / "tok.model").write_bytes(open(sp_tok.path, "rb").read())
  assert tk.load_tokenizer(tmp_path).vocab_size == VOCAB


def test_training_is_deterministic(tmp_path):
  texts = training_texts()
  a = tk.train_sentencepiece(iter(texts), tmp_path / "a", vocab_size=VOCAB)
  b = tk.train_sentencepiece((t for t in texts), tmp_path / "b", vocab_size=VOCAB)
  other = tk.train_sentencepiece(texts[1:], tmp_path / "c", vocab_size=VOCAB)
  bytes_a, bytes_b = (open(t.path, "rb").read() for t in (a, b))
  assert bytes_a == bytes_b
  assert open(other.path, "rb").read() != bytes_a  # the file does depend on the input


def test_long_lines_are_cut_not_dropped(tmp_path):
  # SentencePiece silently skips sentences over max_sentence_length; a minified file is one
  # long line. If it were dropped the trainer would see no text at all and fail.
  one_line = inspect.getsource(argparse).replace("\n", " ")
  assert len(one_line) > 20 * 1024
  tok = tk.train_sentencepiece([one_line], tmp_path / "long", vocab_size=VOCAB,
                               max_sentence_bytes=1024)
  assert tok.decode(tok.encode(one_line[:5000])) == one_line[:5000]


def test_max_input_bytes_bounds_the_training_text(tmp_path):
  texts = training_texts()
  full = tk.train_sentencepiece(texts, tmp_path / "full", vocab_size=VOCAB)
  # Only argparse's source (the first text) fits: a different model, still a working one.
  capped = tk.train_sentencepiece(texts, tmp_path / "capped", vocab_size=VOCAB,
                                  max_input_bytes=len(texts[0]))
  assert open(full.path, "rb").read() != open(capped.path, "rb").read()
  assert capped.decode(capped.encode(ROUND_TRIPS["cjk"])) == ROUND_TRIPS["cjk"]


@pytest.mark.parametrize(
    "texts, kwargs, match",
    [
        ([], {}, "no text"),
        (["", ""], {}, "no text"),
        ([b"bytes"], {}, "iterable of str"),
        (["abc"], dict(vocab_size=200), "vocab_size=200"),
        (["short text " * 10], {}, r"more than this text can fill: .* at most \d+ pieces"),
        ([PROSE[2] * 10], dict(vocab_size=280), "no room for every character"),
    ],
)
def test_training_errors(tmp_path, texts, kwargs, match):
  kwargs = {"vocab_size": VOCAB, **kwargs}
  with pytest.raises(tk.TokenizerError, match=match):
    tk.train_sentencepiece(texts, tmp_path / "bad", **kwargs)
  assert not (tmp_path / "bad.model").exists()


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def build_hf_tokenizer(folder, vocab_size=320):
  """A tiny byte-level BPE like dolma2's, with <|endoftext|> and <|pad|> as special tokens."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(training_texts()[:2] + PROSE, trainer=trainer)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hf")
  build_hf_tokenizer(folder)
  return folder


def test_hf_round_trip_and_ids_from_args(hf_dir):
  tok = tk.load_tokenizer(hf_dir / "tokenizer.json", eos_id=0, pad_id=1)
  assert isinstance(tok, tk.HFTokenizer) and isinstance(tok, tk.Tokenizer)
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 320)
  for text in ROUND_TRIPS.values():
    ids = tok.encode(text)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.pad_id] + ids + [tok.pad_id]) == text
  texts = list(ROUND_TRIPS.values())
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(texts[0]) == tok.encode(texts[0])


def test_hf_ids_from_tokenizer_config(tmp_path):
  build_hf_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|endoftext|>",
      "pad_token": {"content": "<|pad|>", "lstrip": False, "rstrip": False},
  }))
  tok = tk.load_tokenizer(tmp_path)  # the directory
  assert (tok.eos_id, tok.pad_id) == (0, 1)
  # Arguments win over the file.
  assert tk.load_tokenizer(tmp_path, eos_id=5, pad_id=6).pad_id == 6


def test_hf_ids_from_special_tokens_map(tmp_path):
  build_hf_tokenizer(tmp_path)
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({
      "eos_token": "<|pad|>", "pad_token": "<|endoftext|>"}))
  tok = tk.HFTokenizer(tmp_path / "tokenizer.json")
  assert (tok.eos_id, tok.pad_id) == (1, 0)


def test_hf_missing_ids_is_an_error(hf_dir, tmp_path):
  with pytest.raises(tk.TokenizerError, match="eos_id"):
    tk.load_tokenizer(hf_dir)
  with pytest.raises(tk.TokenizerError, match="pad_id"):
    tk.load_tokenizer(hf_dir, eos_id=0)
  with pytest.raises(tk.TokenizerError, match="outside the vocabulary"):
    tk.load_tokenizer(hf_dir, eos_id=0, pad_id=10_000)
  build_hf_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(tk.TokenizerError, match="'</s>'.*not in the vocabulary"):
    tk.load_tokenizer(tmp_path)


def test_hf_dolma2_defaults_by_vocabulary_size(tmp_path):
  # Stand-in with dolma2's size: defaults apply without any config file.
  vocab = {f"t{i}": i for i in range(tk.DOLMA2_VOCAB_SIZE)}
  tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(
      str(tmp_path / "tokenizer.json"))
  tok = tk.load_tokenizer(tmp_path / "tokenizer.json")
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (100_278, 100_257, 100_277)


# ---------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer():
  tok = tk.ByteTokenizer()
  assert isinstance(tok, tk.Tokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (258, 0, 1)
  for text in ROUND_TRIPS.values():
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert min(ids, default=2) >= 2 and max(ids, default=2) < 258  # never pad or eos
    assert tok.decode([0] + ids + [1, 0]) == text
  assert tok.encode("A") == [ord("A") + 2]
  assert tok.encode_batch(["a", "é"]) == [tok.encode("a"), tok.encode("é")]
  assert tok.decode([0xC3 + 2]) == "\ufffd"  # a cut UTF-8 sequence does not raise
  with pytest.raises(tk.TokenizerError, match="outside"):
    tok.decode([258])
  with pytest.raises(tk.TokenizerError, match="outside"):
    tok.decode([-1])


# ---------------------------------------------------------------- load_tokenizer errors


def test_load_missing_path(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(tk.TokenizerError, match="does not exist") as e:
    tk.load_tokenizer(missing)
  assert str(missing) in str(e.value) and ".json" in str(e.value)


def test_load_unknown_suffix(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("a\nb\n")
  with pytest.raises(tk.TokenizerError, match="Do not know how to load") as e:
    tk.load_tokenizer(path)
  assert str(path) in str(e.value) and ".model" in str(e.value)


def test_load_empty_directory_and_corrupt_files(tmp_path):
  with pytest.raises(tk.TokenizerError, match="holds neither") as e:
    tk.load_tokenizer(tmp_path)
  assert str(tmp_path) in str(e.value)
  (tmp_path / "broken.model").write_bytes(b"not a model")
  with pytest.raises(tk.TokenizerError, match="not a readable SentencePiece model"):
    tk.load_tokenizer(tmp_path / "broken.model")
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(tk.TokenizerError, match="not a Hugging Face tokenizer file"):
    tk.load_tokenizer(tmp_path / "tokenizer.json")
