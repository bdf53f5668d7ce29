"""The held-out evaluation corpus (emo_jax/data/heldout_corpus.py) on sources made here: one
JSONL of every domain, capped, deduplicated, reused, and a missing source named."""

import json

from emo_jax.data import heldout_corpus as heldout
from emo_jax.data.demo_corpus import Source, SourceUnavailable


def _source(name, domain, texts):
  return Source(name, domain, f"made in the test ({name})",
                lambda cache_dir: ({"id": f"{name}:{i}", "text": t, "domain": domain}
                                   for i, t in enumerate(texts)))


def _missing(cache_dir):
  raise SourceUnavailable("apt-get download failed (no such package)")
  yield  # pragma: no cover


def test_fortune_files_split_at_percent_lines():
  data = "Erster Spruch\nzweite Zeile\n%\n\n%\nZweiter Spruch\n%\n".encode()
  assert heldout.fortune_texts(data) == ["Erster Spruch\nzweite Zeile", "Zweiter Spruch"]


def test_licenses_are_read_from_disk_in_sections(tmp_path):
  (tmp_path / "GPL-9").write_text("Preamble.\n\n" + "Terms and conditions. " * 400)
  (tmp_path / "MIT-0").write_text("Permission is hereby granted.")
  docs = list(heldout.licenses(tmp_path, on_disk=tmp_path))
  assert {d["domain"] for d in docs} == {"legal"}
  assert all(len(d["text"].encode()) <= heldout.SECTION_BYTES for d in docs)
  assert [d["id"] for d in docs if d["id"].startswith("license:MIT-0")] == ["license:MIT-0#0"]
  assert len(docs) >= 4


def test_build_writes_one_capped_file_and_reuses_it(tmp_path):
  sources = (_source("laws", "legal", [f"Article {i}. " * 20 for i in range(40)] + ["dup"] * 3),
             _source("poems", "german", [f"Gedicht {i}: " * 10 for i in range(10)]))
  out = tmp_path / "heldout"
  summary = heldout.build_heldout_corpus(out, sources=sources, max_bytes_per_domain=2_000)
  docs = [json.loads(line) for line in (out / heldout.EVAL_FILE).read_text().splitlines()]
  assert summary["path"] == str((out / heldout.EVAL_FILE).absolute())
  assert {d["domain"] for d in docs} == {"legal", "german"}
  assert summary["domains"]["legal"]["bytes"] <= 2_000
  assert sum(d["text"] == "dup" for d in docs) <= 1
  first = (out / heldout.EVAL_FILE).read_bytes()
  again = heldout.build_heldout_corpus(out, sources=sources, max_bytes_per_domain=2_000)
  assert again == summary                                         # reused, not rebuilt
  heldout.build_heldout_corpus(out, sources=sources, max_bytes_per_domain=2_000, force=True)
  assert (out / heldout.EVAL_FILE).read_bytes() == first          # deterministic


def test_a_missing_source_is_named_and_retried(tmp_path):
  laws = _source("laws", "legal", ["Article 1.", "Article 2."])
  out = tmp_path / "h"
  summary = heldout.build_heldout_corpus(
      out, sources=(laws, Source("gone", "italian", "Debian fortunes-it", _missing)))
  assert "no such package" in summary["skipped"]["gone"]
  assert list(summary["domains"]) == ["legal"]
  # once the source can be had, the next build takes it instead of reusing the partial one
  rebuilt = heldout.build_heldout_corpus(
      out, sources=(laws, _source("gone", "italian", ["Ciao a tutti.", "Buona sera."])))
  assert rebuilt["skipped"] == {} and list(rebuilt["domains"]) == ["italian", "legal"]
