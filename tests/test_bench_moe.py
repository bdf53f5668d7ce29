"""experiments/bench_moe.py on the tiny shape: the report is complete and self-consistent."""

import pytest

from experiments import bench_moe


@pytest.mark.slow
@pytest.mark.integration
def test_report_rows_per_backend_and_consistent_ratios():
  report = bench_moe.run(["tiny"], tokens=64, backends=["capacity", "ragged:xla"], steps=1,
                         matmul_size=64)
  (result,) = report["results"]
  assert [b["backend"] for b in result["backends"]] == ["capacity", "ragged:xla"]
  shape = bench_moe.SHAPES["tiny"]
  # 3 matmuls x 2 D H FLOPs per assignment forward, backward twice that.
  assert result["useful_flops"] == 18 * shape["d_model"] * shape["expert_hidden"] * 64 * 2
  for row in result["backends"]:
    assert row["seconds"] > 0
    assert row["tflops"] == pytest.approx(result["useful_flops"] / row["seconds"] / 1e12)
    assert row["fraction_of_matmul"] == pytest.approx(
        row["tflops"] / report["matmul"]["tflops"])
    assert 0.0 <= row["dropped_fraction"] <= 1.0
  assert result["backends"][1]["dropped_fraction"] == 0.0  # ragged is dropless


def test_unknown_backend_and_shape_are_named():
  with pytest.raises(ValueError, match="unknown backend 'ragged:cutlass'"):
    bench_moe.run(["tiny"], tokens=64, backends=["ragged:cutlass"], steps=1, matmul_size=64)
  with pytest.raises(ValueError, match="unknown shape preset"):
    bench_moe.run(["huge"], tokens=64, steps=1, matmul_size=64)
