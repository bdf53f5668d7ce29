"""experiments/bench_step: one in-process run on the tiny config, checked field by field.

Small on purpose (batch 2 x 32, 2 timed steps): it checks that the benchmark measures what it
says and that its numbers agree with each other, not how fast anything is.
"""

import json
import math
import pathlib

import numpy as np
import pytest

from emo_jax.train.experiment import Experiment
from experiments import bench_step

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
BACKENDS = ["capacity", "ragged"]


@pytest.fixture(scope="module")
def result():
  return bench_step.run(bench_step.load_config(TINY), batch=2, seq_len=32, backends=BACKENDS,
                        steps=2, warmup=1, isolate=False, matmul_size=128)


@pytest.mark.slow
@pytest.mark.integration
def test_json_has_both_sides_and_their_ratio(result):
  result = json.loads(json.dumps(result))  # what --json_out writes
  for key in ("config", "device", "versions", "date", "shapes", "matmul", "emo_jax", "torch",
              "emo_jax_tokens_per_s", "emo_jax_backend", "torch_tokens_per_s", "ratio"):
    assert key in result, key
  assert result["config"] == "tiny"
  assert result["shapes"]["batch"] == 2 and result["shapes"]["seq_len"] == 32
  assert result["matmul"]["flops_per_s"] > 0
  best = max(result["emo_jax"], key=lambda r: r["tokens_per_s"])
  assert result["emo_jax_tokens_per_s"] == best["tokens_per_s"] > 0
  assert result["emo_jax_backend"] == best["backend"]
  if bench_step.torch_available():
    torch_row = result["torch"]
    assert "error" not in torch_row, torch_row
    assert result["torch_tokens_per_s"] == torch_row["tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["emo_jax_tokens_per_s"]
                                            / result["torch_tokens_per_s"])
    assert math.isfinite(torch_row["loss"])
    assert torch_row["experts_implementation"] in ("grouped_mm", "eager", "batched_mm")
  else:
    assert result["torch"] is None and result["ratio"] is None and result["torch_skipped"]


@pytest.mark.slow
@pytest.mark.integration
def test_one_finite_row_per_requested_backend(result):
  rows = result["emo_jax"]
  assert [r["backend"] for r in rows] == BACKENDS
  for row in rows:
    assert "error" not in row, row
    assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"])
    assert math.isfinite(row["loss"]) and math.isfinite(row["total_loss"])
    # Random tokens over a 258-id vocabulary: the loss starts near log(258) = 5.55.
    assert 3.0 < row["loss"] < 8.0
    assert 0.0 <= row["dropped_fraction"] <= 1.0
    assert row["compile_s"] > 0 and row["max_rss_bytes"] > 0
    assert row["mfu_vs_matmul"] == pytest.approx(row["model_flops_per_s"]
                                                 / result["matmul"]["flops_per_s"])
  table = bench_step.format_table(result)
  assert all(f"emo_jax {b}" in table for b in BACKENDS)


def test_unknown_backend_fails_before_measuring():
  with pytest.raises(ValueError, match=r"unknown expert backend 'nope'.*allowed names are"):
    bench_step.run(bench_step.load_config(TINY), backends=["capacity", "nope"], isolate=False)


def test_backend_with_implementation_sets_the_execution_field():
  execution = Experiment.from_config(bench_step.load_config(TINY)).execution
  [(label, changes)] = bench_step.parse_backends(["ragged:xla"], execution)
  assert label == "ragged:xla"
  assert changes == {"expert_backend": "ragged", "ragged_dot_impl": "xla"}
  with pytest.raises(ValueError, match="empty implementation"):
    bench_step.parse_backends(["ragged:"], execution)


def test_default_backends_leave_out_the_dense_reference():
  execution = Experiment.from_config(bench_step.load_config(TINY)).execution
  labels = [label for label, _ in bench_step.parse_backends(None, execution)]
  assert labels[0] == execution.expert_backend
  assert "dense" not in labels and len(labels) == len(set(labels))


def test_random_batch_has_the_pipelines_layout():
  cfg = Experiment.from_config(bench_step.load_config(TINY)).model
  b = bench_step.random_batch(cfg, 4, 40, seed=1)
  seg, pos = b["segment_ids"], b["positions"]
  assert seg.min() == 1 and (seg.max(axis=1) == bench_step.DOCUMENTS_PER_ROW).all()
  starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  assert (pos[starts] == 0).all() and (pos[~starts] == np.roll(pos, 1, axis=1)[~starts] + 1).all()
  # A document's last token has no target; every other token predicts its successor.
  ends = np.concatenate([seg[:, 1:] != seg[:, :-1], np.ones((4, 1), bool)], axis=1)
  assert (b["loss_mask"][ends] == 0).all() and (b["loss_mask"][~ends] == 1).all()
  assert (b["targets"][:, :-1][~ends[:, :-1]] == b["tokens"][:, 1:][~ends[:, :-1]]).all()
