"""Tests for emo_jax.data.sources: readers, error messages, ArrayRecord, splits."""

import json
from pathlib import Path

import grain
import pytest

from emo_jax.data import sources
from emo_jax.data.sources import DataError


def write_lines(path: Path, lines) -> Path:
  path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
  return path


GOOD = [
    json.dumps({"text": "first", "domain": "news", "id": "a"}),
    json.dumps({"text": "second"}),
    "",  # Blank lines are allowed.
    json.dumps({"text": "third", "id": 7, "extra": 1}),
]


def test_read_jsonl_fills_defaults(tmp_path):
  docs = list(sources.read_jsonl(write_lines(tmp_path / "c.jsonl", GOOD)))
  assert docs == [
      {"text": "first", "domain": "news", "id": "a"},
      {"text": "second", "domain": "unknown", "id": "c:2"},
      {"text": "third", "domain": "unknown", "id": "7"},
  ]
  docs = list(sources.read_jsonl(tmp_path / "c.jsonl", default_domain="web"))
  assert [d["domain"] for d in docs] == ["news", "web", "web"]


@pytest.mark.parametrize("bad, line, words", [
    (b"\xff\xfe not utf8", 2, "invalid UTF-8"),
    (b"{not json", 2, "not valid JSON"),
    (b'{"title": "no text"}', 2, '"text"'),
    (b'{"text": 3}', 2, '"text" of type int'),
    (b'["text"]', 2, "expected a JSON object"),
    (b'{"text": "x", "domain": 5}', 2, '"domain"'),
    (b'{"text": "x", "id": [1]}', 2, '"id"'),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad, line, words):
  path = write_lines(tmp_path / "bad.jsonl", [GOOD[0], bad, GOOD[1]])
  with pytest.raises(DataError) as e:
    list(sources.read_jsonl(path))
  assert f"{path}:{line}:" in str(e.value)
  assert words in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_read_jsonl_empty_file(tmp_path, content):
  path = tmp_path / "empty.jsonl"
  path.write_bytes(content)
  with pytest.raises(DataError, match="empty"):
    list(sources.read_jsonl(path))
  with pytest.raises(DataError, match="empty"):  # Not a bad line: skipping cannot fix it.
    list(sources.read_jsonl(path, on_error="skip"))


def test_read_jsonl_missing_file(tmp_path):
  with pytest.raises(DataError, match="no such JSONL file"):
    list(sources.read_jsonl(tmp_path / "nope.jsonl"))


def test_read_jsonl_skip_counts(tmp_path):
  path = write_lines(tmp_path / "mixed.jsonl",
                     [GOOD[0], b"\xff", b"{", GOOD[1], b'{"no": "text"}', GOOD[3]])
  reader = sources.read_jsonl(path, on_error="skip")
  docs = list(reader)
  assert [d["text"] for d in docs] == ["first", "second", "third"]
  assert (reader.documents, reader.skipped) == (3, 3)
  assert len(reader.errors) == 3
  assert all(e.startswith(f"{path}:{n}:") for e, n in zip(reader.errors, [2, 3, 5]))
  list(reader)  # A second pass recounts instead of accumulating.
  assert reader.skipped == 3
  with pytest.raises(ValueError, match="on_error"):
    sources.read_jsonl(path, on_error="ignore")


def test_write_jsonl_round_trip(tmp_path):
  docs = [{"text": "héllo\nwörld \u2028 x", "domain": "d", "id": "1"},
          {"text": "", "domain": "e", "id": "2"}]
  assert sources.write_jsonl(docs, tmp_path / "out.jsonl") == 2
  assert list(sources.read_jsonl(tmp_path / "out.jsonl")) == docs


def make_folder(root: Path) -> Path:
  (root / "news").mkdir(parents=True)
  (root / "code" / "deep").mkdir(parents=True)
  (root / ".hidden").mkdir()
  (root / "news" / "b.txt").write_text("news b")
  (root / "news" / "a.txt").write_text("news a")
  (root / "code" / "deep" / "m.py").write_text("x = 1\n")
  (root / "top.txt").write_text("top level")
  (root / "empty.txt").write_text("  \n")
  (root / ".hidden" / "h.txt").write_text("hidden")
  (root / ".dotfile").write_text("hidden")
  return root


def test_read_text_folder_domains(tmp_path):
  root = make_folder(tmp_path / "corpus")
  docs = list(sources.read_text(root))
  assert [(d["id"], d["domain"], d["text"]) for d in docs] == [
      ("code/deep/m.py", "code", "x = 1\n"),
      ("news/a.txt", "news", "news a"),
      ("news/b.txt", "news", "news b"),
      ("top.txt", "corpus", "top level"),
  ]
  assert {d["domain"] for d in sources.read_text(root, domain="mine")} == {"mine"}
  assert [d["id"] for d in sources.read_text(root, suffixes=[".py"])] == ["code/deep/m.py"]


def test_read_text_file_and_errors(tmp_path):
  path = tmp_path / "one.txt"
  path.write_text("just one")
  assert list(sources.read_text(path, domain="x")) == [
      {"text": "just one", "domain": "x", "id": "one.txt"}]
  root = make_folder(tmp_path / "corpus")
  (root / "news" / "bad.txt").write_bytes(b"ok \xff\xfe")
  with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8"):
    list(sources.read_text(root))
  with pytest.raises(DataError, match="no such file"):
    list(sources.read_text(tmp_path / "missing"))
  (tmp_path / "void").mkdir()
  with pytest.raises(DataError, match="no text files"):
    list(sources.read_text(tmp_path / "void"))


def test_array_record_round_trip(tmp_path):
  jsonl = write_lines(tmp_path / "c.jsonl", GOOD)
  out = tmp_path / "c.array_record"
  assert sources.jsonl_to_array_record(jsonl, out) == 3
  expected = list(sources.read_jsonl(jsonl))
  docs = sources.ArrayRecordDocuments(out)
  assert len(docs) == 3
  assert [docs[i] for i in range(len(docs))] == expected
  assert docs[-1] == expected[-1]
  with pytest.raises(IndexError):
    docs[3]  # pylint: disable=pointless-statement
  assert list(grain.MapDataset.source(docs)) == expected
  loaded = sources.load_documents(out)
  assert isinstance(loaded, sources.ArrayRecordDocuments) and list(loaded) == expected
  assert list(sources.iter_documents(out)) == expected


def test_array_record_conversion_errors(tmp_path):
  jsonl = write_lines(tmp_path / "c.jsonl", [GOOD[0], b"{broken"])
  out = tmp_path / "c.array_record"
  with pytest.raises(DataError, match=":2:"):
    sources.jsonl_to_array_record(jsonl, out)
  assert not out.exists() and not (tmp_path / "c.array_record.tmp").exists()
  assert sources.jsonl_to_array_record(jsonl, out, on_error="skip") == 1
  with pytest.raises(DataError, match="no such ArrayRecord"):
    sources.ArrayRecordDocuments(tmp_path / "nope.array_record")


def test_load_documents_dispatch(tmp_path):
  write_lines(tmp_path / "a.jsonl", GOOD)
  write_lines(tmp_path / "b.jsonl", [json.dumps({"text": "b", "id": "b1"})])
  root = make_folder(tmp_path / "folder")
  assert len(sources.load_documents(tmp_path / "a.jsonl")) == 3
  assert [d["domain"] for d in sources.load_documents(tmp_path / "b.jsonl", domain="z")] == ["z"]
  assert len(sources.load_documents(root)) == 4
  assert len(sources.load_documents(str(tmp_path / "*.jsonl"))) == 4
  assert len(sources.load_documents([tmp_path / "a.jsonl", root])) == 7
  with pytest.raises(DataError, match="no such file"):
    sources.load_documents(tmp_path / "missing.jsonl")


def test_split_of_golden_values():
  # Fixed values: a changed hash would silently move documents between splits.
  assert sources.stable_fraction("doc-0") == pytest.approx(0.7393403678886653, abs=1e-12)
  assert [sources.split_of(f"doc-{i}", validation=0.25, test=0.25) for i in range(8)] == [
      "train", "train", "validation", "train", "train", "train", "validation", "test"]


def test_split_of_proportions_and_checks():
  n = 20_000
  counts = {"train": 0, "validation": 0, "test": 0}
  for i in range(n):
    counts[sources.split_of(f"id-{i}", validation=0.05, test=0.1)] += 1
  assert abs(counts["validation"] / n - 0.05) < 0.01
  assert abs(counts["test"] / n - 0.1) < 0.01
  assert {sources.split_of(f"x{i}", validation=0, test=0) for i in range(100)} == {"train"}
  for bad in [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)]:
    with pytest.raises(ValueError, match="fractions"):
      sources.split_of("a", validation=bad[0], test=bad[1])


def test_write_splits(tmp_path):
  docs = [{"text": f"t{i}" * (i % 5), "domain": "ab"[i % 2], "id": f"d{i}"} for i in range(300)]
  written = sources.write_splits(docs, tmp_path, validation=0.1, test=0.1)
  assert sum(written["splits"].values()) == 300
  assert written["domains"] == sources.count_by_domain(docs)
  back = []
  for split in sources.SPLITS:
    part = list(sources.read_jsonl(tmp_path / f"{split}.jsonl")) if written["splits"][split] else []
    assert all(sources.split_of(d["id"], validation=0.1, test=0.1) == split for d in part)
    back += part
  assert sorted(back, key=lambda d: d["id"]) == sorted(docs, key=lambda d: d["id"])
  with pytest.raises(DataError, match="occurs twice"):
    sources.write_splits(docs + docs[:1], tmp_path / "dup")
  assert not list((tmp_path / "dup").glob("*.jsonl*"))
