"""Bits per byte of gold continuations: the metric in closed form on a planted model, the
installed request folders, and the errors a bad folder gets."""

import gzip
import json
import math

import numpy as np
import pytest

from emo_jax.data.jsonl import DataError
from emo_jax.tasks import bpb, data
from test_tasks import CFG, TOK, needs_data, planted_model


def test_bits_per_byte_is_the_mean_of_per_instance_bits_over_utf8_bytes():
  # 2 nats over 4 bytes and 1 nat over 1 byte: per instance 0.5/ln2 and 1/ln2 bits per byte
  assert bpb.bits_per_byte([-2.0, -1.0], [4, 1]) == pytest.approx(0.75 / math.log(2))
  assert bpb.continuation_bytes("é z") == 4
  with pytest.raises(ValueError, match="byte count"):
    bpb.bits_per_byte([-1.0], [0])


def test_evaluate_bpb_equals_the_planted_models_closed_form():
  graphdef, params, logp = planted_model()
  items = [bpb.BpbItem(0, "Q: one\nA:", " zz"), bpb.BpbItem(1, "Q: two\nA:", " qé z"),
           bpb.BpbItem(2, "", "zzzz")]
  task = bpb.BpbTask("hand", "gold_bpb_0shot", items, calibration=[])
  result = bpb.evaluate_bpb(graphdef, params, TOK, task, max_len=CFG.max_seq_len, batch_size=4)
  want = [-sum(logp[t] for t in TOK.encode(i.continuation))
          / (math.log(2) * len(i.continuation.encode())) for i in items]
  np.testing.assert_allclose(result["bpb_per_instance"], want, rtol=1e-5)
  assert result["bpb"] == pytest.approx(np.mean(want), rel=1e-5)
  assert result["instances"] == 3 and result["bytes"] == 3 + 6 + 4


def test_a_continuation_longer_than_the_window_counts_the_bytes_it_scores():
  assert bpb.scored_bytes(TOK, "ab" * 10, max_len=8) == 8
  assert bpb.scored_bytes(TOK, "abc", max_len=8) == 3


def _write_folder(root, task, variant, lines):
  folder = root / bpb.TASKS_FOLDER / task / variant
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps({"task_config": {"random_subsample_seed": 1}}))
  with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
    for line in lines:
      f.write(line + "\n")
  return folder


def test_folders_are_found_and_bad_lines_named(monkeypatch, tmp_path):
  good = [json.dumps({"doc_id": i, "request": {"context": f"c{i}", "continuation": f" a{i}"}})
          for i in range(30)]
  _write_folder(tmp_path, "toy", "gold_bpb_0shot", good)
  _write_folder(tmp_path, "toy", "gold_bpb_3shot", good[:5])
  _write_folder(tmp_path, "broken", "gold_bpb_0shot",
                [good[0], json.dumps({"doc_id": 1, "request": {"context": "c"}})])
  monkeypatch.setattr(data, "package_root", lambda required=True: tmp_path)
  assert bpb.bpb_task_names() == ["broken", "toy"]
  task = bpb.load_bpb_task("toy")
  assert task.variant == "gold_bpb_0shot"
  assert len(task.calibration) == 3 and len(task.items) == 27  # 10 % held out to calibrate
  assert not {i.doc_id for i in task.items} & {i.doc_id for i in task.calibration}
  assert [i.doc_id for i in task.items] == sorted(i.doc_id for i in task.items)
  assert bpb.load_bpb_task("toy", limit=4).items == task.items[:4]
  assert bpb.load_bpb_task("toy:3shot").variant == "gold_bpb_3shot"
  with pytest.raises(DataError, match=r"no variant '5shot'.*toy:0shot"):
    bpb.load_bpb_task("toy:5shot")
  with pytest.raises(data.TaskNotInstalled, match=r"unknown bits-per-byte task 'nope'.*toy"):
    bpb.load_bpb_task("nope")
  with pytest.raises(DataError, match=r"requests.jsonl.gz:2: not a gold-continuation request"):
    bpb.load_bpb_task("broken")


@needs_data
def test_installed_gold_bpb_tasks_are_the_olmes_request_folders():
  names = bpb.bpb_task_names()
  for name in ("gsm8k", "codex_humaneval", "mt_mbpp_python", "minerva_math_algebra"):
    assert name in names
  task = bpb.load_bpb_task("mt_mbpp_python")
  assert task.variant == "gold_bpb_3shot"
  assert len(task.items) + len(task.calibration) == 500 and len(task.calibration) == 50
  assert "```python" in task.items[0].context and task.items[0].continuation.strip()
  assert bpb.load_bpb_task("codex_humaneval:3shot").variant == "gold_bpb_3shot"
