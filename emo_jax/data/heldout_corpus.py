"""Text the demo corpus never held: held-out domains for evaluating expert subsets, built offline.

The selective-expert study asks whether experts selected from a few documents of a domain keep
the model's quality on that domain. On domains the model trained on the answer is easy; the
harder question is text of a different nature altogether. These domains come, like the demo
corpus (data/demo_corpus.py), from Debian packages, so anyone can rebuild them with no dataset
hub, and none of them overlaps the six trained domains:

  domain      source        what                                            Debian package
  legal       licenses      17 software licences (GPL, Apache, MPL, ...)     base-files
  dictionary  gcide         the Collaborative International Dictionary of   dict-gcide
                            English (Webster's 1913 + WordNet), entries
  german      fortunes_de   German aphorisms, anecdotes and jokes            fortunes-de
  spanish     fortunes_es   Spanish quotations and aphorisms                 fortunes-es
  italian     fortunes_it   Italian quotations and jokes                     fortunes-it

Each domain is capped (600 KB by default: enough for the study's 32 calibration documents and
its scored batches) by the demo corpus's fixed pseudo-random order, texts are cut into sections
of at most 4 KB at natural boundaries (blank lines, then lines), fortunes are joined a file at
a time, and exact duplicates are dropped. Everything goes into one file, `eval.jsonl`
({id, text, domain} per line, domains mixed in a fixed order), with `summary.json` beside it:
nothing here is ever trained on, so there are no splits. `experiments.prepare_data --corpus
heldout` builds it; `experiments.reproduce --eval_corpus_default` builds it when missing and
scores every domain. Deterministic: the same packages give byte-identical files.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

from emo_jax.data import demo_corpus, sources as sources_lib
from emo_jax.data.demo_corpus import Source
from emo_jax.data.sources import Doc, PathLike

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES_PER_DOMAIN = 600_000
SECTION_BYTES = 4096
EVAL_FILE = "eval.jsonl"
SUMMARY_FILE = "summary.json"
LICENSES_ON_DISK = Path("/usr/share/common-licenses")
# Fortune files that are pictures or banners rather than prose.
_NOT_PROSE = {"asciiart", "banner"}


def _package_files(package: str, folder: str, cache_dir: Path) -> Iterator[tuple[str, bytes]]:
  """(path, content) of the files of a Debian package below `folder`, sorted by path."""
  deb = demo_corpus.debian_package([package], cache_dir)
  yield from demo_corpus.deb_files(deb, lambda p: f"/{folder.strip('/')}/" in p)


def licenses(cache_dir: Path, *, on_disk: Path = LICENSES_ON_DISK) -> Iterator[Doc]:
  """The licence texts Debian ships in every system (base-files), read from disk when there."""
  if on_disk.is_dir():
    files = [(str(p), p.read_bytes()) for p in sorted(on_disk.iterdir())
             if p.is_file() and not p.is_symlink()]
  else:
    files = list(_package_files("base-files", "usr/share/common-licenses", cache_dir))
  for path, data in files:
    yield from demo_corpus.sections(f"license:{Path(path).name}", data.decode("utf-8", "replace"),
                                    "legal", max_bytes=SECTION_BYTES)


def gcide(cache_dir: Path) -> Iterator[Doc]:
  """GCIDE's dictionary entries (its dictd database, gzip-readable), cut between entries."""
  for path, data in _package_files("dict-gcide", "usr/share/dictd", cache_dir):
    if path.endswith(".dict.dz"):
      text = gzip.decompress(data).decode("utf-8", "replace")
      body = text.split("\n00-database-info", 1)[-1]  # the database's own header is no entry
      yield from demo_corpus.sections("gcide", body, "dictionary", max_bytes=SECTION_BYTES)


def fortune_texts(data: bytes) -> list[str]:
  """The entries of a fortune file: text between lines holding a single '%'."""
  entries, current = [], []
  for line in data.decode("utf-8", "replace").splitlines():
    if line.strip() == "%":
      entries.append("\n".join(current).strip())
      current = []
    else:
      current.append(line)
  entries.append("\n".join(current).strip())
  return [e for e in entries if e]


def fortunes(package: str, language: str, domain: str):
  """A source of one language's fortune files: each file's entries, a blank line apart."""

  def load(cache_dir: Path) -> Iterator[Doc]:
    for path, data in _package_files(package, f"usr/share/games/fortunes/{language}", cache_dir):
      name = Path(path).name
      if name.endswith((".dat", ".u8")) or name.split(".")[0] in _NOT_PROSE:
        continue
      text = "\n\n".join(fortune_texts(data))
      if text:
        yield from demo_corpus.sections(f"{package}:{name}", text, domain,
                                        max_bytes=SECTION_BYTES)

  return load


HELDOUT_SOURCES = (
    Source("licenses", "legal", "Debian base-files (/usr/share/common-licenses)", licenses,
           270_000),
    Source("gcide", "dictionary", "Debian dict-gcide (gcide.dict.dz)", gcide, 40_000_000),
    Source("fortunes_de", "german", "Debian fortunes-de", fortunes("fortunes-de", "de", "german"),
           1_500_000),
    Source("fortunes_es", "spanish", "Debian fortunes-es",
           fortunes("fortunes-es", "es", "spanish"), 700_000),
    Source("fortunes_it", "italian", "Debian fortunes-it",
           fortunes("fortunes-it", "it", "italian"), 1_100_000),
)


def default_dir(cache_dir: PathLike | None = None) -> Path:
  """Where the held-out corpus is built by default: <cache>/corpora/heldout."""
  return demo_corpus.cache_root(cache_dir) / "corpora" / "heldout"


def _settings(sources: Sequence[Source], max_bytes_per_domain: int) -> dict:
  return {"version": FORMAT_VERSION, "max_bytes_per_domain": max_bytes_per_domain,
          "section_bytes": SECTION_BYTES, "sources": [s.name for s in sources]}


def _complete(out_dir: Path, settings: dict) -> dict | None:
  try:
    summary = json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  path = out_dir / EVAL_FILE
  if (summary.get("settings") != settings or summary.get("skipped") or not path.is_file()
      or path.stat().st_size != summary.get("file_bytes")):
    return None
  return summary


def build_heldout_corpus(out_dir: PathLike | None = None, *, cache_dir: PathLike | None = None,
                         max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
                         sources: Sequence[Source] = HELDOUT_SOURCES,
                         force: bool = False) -> dict:
  """Builds out_dir/eval.jsonl and summary.json (out_dir default: `default_dir`).

  Returns the summary: `domains` (domain -> {"documents", "bytes"}), `skipped` (source ->
  reason), `path` (the JSONL). A complete build with the same settings is reused unless
  `force`; a source that cannot be had is skipped with its reason, and a build missing one is
  tried again next time.
  """
  out_dir = Path(out_dir) if out_dir is not None else default_dir(cache_dir)
  settings = _settings(sources, max_bytes_per_domain)
  if not force and (summary := _complete(out_dir, settings)) is not None:
    log.info("reusing the held-out corpus in %s", out_dir)
    return summary
  cache = demo_corpus.cache_root(cache_dir)
  start = time.time()
  log.info("building the held-out corpus from %d sources into %s (once; later runs reuse it)",
           len(sources), out_dir)
  corpus: list[Doc] = []
  skipped = {}
  for k, source in enumerate(sources, 1):
    try:
      docs = demo_corpus.load_source(source, cache, label=f"[{k}/{len(sources)}] ")
    except Exception as e:  # pylint: disable=broad-except
      skipped[source.name] = str(e)
      logging.warning("skipping held-out source %s (%s): %s", source.name, source.origin, e)
      continue
    corpus += demo_corpus.cap(demo_corpus.dedupe(sorted(docs, key=lambda d: d["id"])),
                              max_bytes_per_domain)
  if not corpus:
    raise demo_corpus.SourceUnavailable(f"no held-out source could be had: {skipped}")
  corpus.sort(key=demo_corpus.order_key)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
  path = out_dir / EVAL_FILE
  sources_lib.write_jsonl(corpus, path)
  summary = {"domains": sources_lib.count_by_domain(corpus), "skipped": skipped,
             "sources": {s.name: {"domain": s.domain, "origin": s.origin} for s in sources
                         if s.name not in skipped},
             "settings": settings, "path": str(path.absolute()),
             "file_bytes": path.stat().st_size}
  (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n",
                                      encoding="utf-8")
  log.info("held-out corpus: %d documents in %d domains, %.1f MB, %.0f s -> %s", len(corpus),
           len(summary["domains"]), path.stat().st_size / 1e6, time.time() - start, path)
  return summary
