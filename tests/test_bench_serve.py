"""experiments/bench_serve_peers: the level rows and the table every run of bench_serve shares.

Nothing is timed: the rows are built from fixed latencies, so these check the arithmetic and
the table's shape, not any speed.
"""

import pytest

from experiments import bench_serve_peers as peers


def test_level_summary_rates_and_percentiles():
  row = peers.level_summary(4, [1.0, 2.0, 3.0, 4.0], tokens=40, seconds=5.0)
  assert row == {"concurrency": 4, "requests": 4, "tokens": 40, "seconds": 5.0,
                 "tokens_per_s": 8.0, "p50_latency_s": 2.5, "p95_latency_s": 3.85}
  with pytest.raises(ValueError, match="finished no request"):
    peers.level_summary(1, [], tokens=0, seconds=1.0)


def test_generated_count_stops_at_the_first_eos_inclusive():
  assert peers.generated_count([5, 6, 1, 0, 0], eos=1) == 3
  assert peers.generated_count([5, 6, 7], eos=1) == 3


def test_batches_take_the_prompts_in_turn():
  prompts = ["a", "b", "c"]
  assert peers.batch_prompts(prompts, 0, 2) == ["a", "b"]
  assert peers.batch_prompts(prompts, 1, 2) == ["c", "a"]


def test_markdown_rows_compare_each_level_with_transformers():
  level = lambda c, rate: peers.level_summary(c, [0.5], tokens=int(rate), seconds=1.0)
  runs = {"all": {"keep": 8, "resident_expert_bytes": 100, "full_expert_bytes": 100,
                  "rss_bytes": 2**30, "peak_rss_bytes": 2**31, "levels": [level(1, 30)]},
          "transformers": {"rss_bytes": 2**20, "peak_rss_bytes": 2**20, "levels": [level(1, 10)]},
          "llama_cpp": {"skipped": "not installed"}}
  rows = peers.markdown_rows(runs, num_experts=8)
  assert len(rows) == 5 and all(r.count("|") == 8 for r in rows)
  assert rows[2].startswith("| all (8/8 experts, 100% of expert bytes) | 1,024 MiB; 2,048 MiB "
                            "| 1 | 30.0 | 3.00 |")
  assert "| 1.00 |" in rows[3]
  assert "skipped: not installed" in rows[4]
