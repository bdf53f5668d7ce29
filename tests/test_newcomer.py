"""What a newcomer reads: the evaluation table, describe's table, sampling for small models, the
notebooks' install step."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colab import colab_setup
from emo_jax.inference import generate
from emo_jax.train import metrics
from emo_jax.model import summary
from emo_jax.config import ModelConfig
from emo_jax.model.transformer import count_params, describe
from emo_jax.convert import loading
from random_model import random_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- the evaluation table ---------------------------------------------------------------------

def _table_rows(text):
  """{domain: [perplexity, unigram, change or None]} parsed from an evaluation table."""
  rows = {}
  for line in text.splitlines()[1:]:
    cells = line.split()
    change = None if cells[3] == "-" else float(cells[3])
    rows[cells[0]] = [float(cells[1]), None if cells[2] == "-" else float(cells[2]), change]
  return rows


def test_evaluation_table_has_a_row_per_domain_with_the_logged_numbers(tmp_path, capsys):
  writer = metrics.MetricsWriter(tmp_path, total_steps=20)
  rng = np.random.default_rng(0)
  logged = []
  for step in (10, 20):
    row = {"loss": 4.0, "loss_mean": 4.2, "val_perplexity": float(rng.uniform(50, 90))}
    for d in ("code", "medicine", "news"):
      row[f"val_perplexity/{d}"] = float(rng.uniform(20, 200))
    row.update(metrics.baseline_fields({"perplexity": 300.0, "perplexity/code": 250.0,
                                        "perplexity/medicine": 310.0, "perplexity/news": 400.0,
                                        "loss": 5.7}))
    writer.write(step, row)
    logged.append(row)
  writer.close()
  out = capsys.readouterr().out
  assert "step 10/20 | loss 4.0000 (mean 4.2000)" in out
  tables = out.split("step 20/20")
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for text, record in zip(tables, records):
    table = "\n".join(l for l in text.splitlines() if l.startswith("  "))
    rows = _table_rows(table)
    assert set(rows) == {"all", "code", "medicine", "news"}
    for name, (ppl, unigram, _) in rows.items():
      key = "val_perplexity" if name == "all" else f"val_perplexity/{name}"
      assert ppl == pytest.approx(record[key], abs=0.006)
      assert unigram == pytest.approx(record[f"unigram_{key}"], abs=0.006)
  second = _table_rows("\n".join(l for l in tables[1].splitlines() if l.startswith("  ")))
  assert "change since step 10" in tables[1]
  for name, (ppl, _, change) in second.items():
    key = "val_perplexity" if name == "all" else f"val_perplexity/{name}"
    assert change == pytest.approx(records[1][key] - records[0][key], abs=0.006)
  # A resumed run compares its first evaluation with the last one on file.
  resumed = metrics.MetricsWriter(tmp_path, resume_step=20, total_steps=30)
  resumed.write(30, logged[0])
  resumed.close()
  assert "change since step 20" in capsys.readouterr().out


def test_loss_mean_is_the_mean_since_the_last_line():
  cfg = ModelConfig(vocab_size=32, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, num_experts=0, mlp_hidden=16)
  window = [(s, {"loss": l, "total_loss": l, "output_z_loss": 0.0, "grad_norm": 1.0,
                 "learning_rate": 1e-3}) for s, l in ((1, 3.0), (2, 5.0), (3, 7.0))]
  row = metrics.summarize(window[-1][1], cfg, window=window)
  assert row["loss"] == 7.0 and row["loss_mean"] == pytest.approx(5.0)


# ---- describe -----------------------------------------------------------------------------------

CONFIGS = {
    "moe": ModelConfig(vocab_size=300, d_model=32, num_layers=3, num_heads=2, num_kv_heads=1,
                       head_dim=16, num_experts=6, num_shared_experts=1, top_k=2,
                       expert_hidden=24, pool_min=2, pool_max=5, max_segments=4),
    "tied_two_shared": ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=2,
                                   num_kv_heads=2, head_dim=16, num_experts=7,
                                   num_shared_experts=2, top_k=3, expert_hidden=8,
                                   pool_min=3, pool_max=5, max_segments=4, tie_embeddings=True),
    "dense": ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                         head_dim=16, num_experts=0, mlp_hidden=40),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_describe_components_sum_to_the_counts(name):
  cfg = CONFIGS[name]
  s = summary.parameter_summary(cfg, describe(cfg)["params"])
  counts = count_params(cfg)
  assert s["total_params"] == counts["total_params"]
  assert s["active_params"] == counts["active_params"]
  assert sum(c["params"] for c in s["components"].values()) == s["total_params"]
  assert s["bytes"] == {"bf16": 2 * s["total_params"], "fp32": 4 * s["total_params"]}
  # Independent arithmetic for the MoE pieces.
  if cfg.num_experts:
    per_expert = 3 * cfg.d_model * cfg.expert_hidden * cfg.num_layers
    routed = cfg.num_experts - cfg.num_shared_experts
    assert s["components"]["routed experts"]["params"] == routed * per_expert
    assert s["components"]["shared expert"]["params"] == cfg.num_shared_experts * per_expert
    assert s["components"]["routed experts"]["active"] == cfg.top_k * per_expert
    assert s["components"]["router"]["params"] == cfg.num_layers * cfg.d_model * cfg.num_experts
  embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  assert s["components"]["embeddings"]["params"] == embeddings
  assert s["active_params_without_embeddings"] == s["active_params"] - embeddings


@pytest.mark.slow
@pytest.mark.integration
def test_describe_prints_a_table_that_sums_to_its_json():
  def run(*extra):
    done = subprocess.run([sys.executable, "-m", "experiments.describe", "--config",
                           "configs/tiny.py", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
  table, as_json = run(), json.loads(run("--json"))
  numbers = {}
  for line in table.splitlines():
    m = re.match(r"(\S.*?)\s{2,}([\d,]+)\s+([\d.]+)%\s+([\d,]+)$", line)
    if m:
      numbers[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(4).replace(",", "")))
  total = numbers.pop("total")
  assert total == (as_json["total_params"], as_json["active_params"])
  assert sum(p for p, _ in numbers.values()) == total[0]
  assert sum(a for _, a in numbers.values()) == total[1]
  assert len(numbers) == 6  # embeddings, attention, routed, shared, router, norms
  assert f"{as_json['active_params_without_embeddings']:,}" in table
  assert "params" in as_json and "config" in as_json


# ---- sampling for small models ----------------------------------------------------------------

def test_banned_next_tokens_is_the_ngram_rule():
  history = [5, 6, 7, 5, 6, 9, 5]
  assert generate.banned_next_tokens(history, 2) == {6}          # (5, 6) seen twice
  assert generate.banned_next_tokens(history + [6], 3) == {7, 9}  # (5, 6, 7), (5, 6, 9)
  assert generate.banned_next_tokens(history, 1) == set(history)
  assert generate.banned_next_tokens(history, 0) == set()
  assert generate.banned_next_tokens([1], 3) == set()


def test_penalize_follows_the_ctrl_rule():
  logits = jnp.array([[2.0, -2.0, 1.0, 0.5]])
  seen = jnp.array([[True, True, False, False]])
  banned = jnp.array([[False, False, False, True]])
  got = np.asarray(generate.penalize(logits, seen, banned, 2.0))
  np.testing.assert_allclose(got, [[1.0, -4.0, 1.0, -np.inf]])


@pytest.fixture(scope="module")
def small_model():
  cfg = ModelConfig(vocab_size=12, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                    head_dim=8, num_experts=0, mlp_hidden=32, max_seq_len=64, init_std=0.5)
  graphdef, params = random_params(cfg, seed=1)
  return loading.build_model(cfg, params)


@pytest.mark.slow
def test_no_repeat_ngram_and_penalty_hold_in_generation(small_model):
  graphdef, params = small_model
  prompts = [[1, 2, 3], [4, 4]]
  greedy = generate.generate_ids(graphdef, params, prompts, generate.SamplingConfig(24))
  def ngrams(row, n):
    return [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
  # A random small model loops under argmax (the premise of the defaults).
  assert any(len(set(ngrams(p + r, 2))) < len(ngrams(p + r, 2))
             for p, r in zip(prompts, greedy["tokens"]))
  for temperature in (0.0, 0.8):
    sampling = generate.SamplingConfig(24, temperature=temperature, top_p=0.95,
                                       repetition_penalty=1.3, no_repeat_ngram=2, seed=4)
    out = generate.generate_ids(graphdef, params, prompts, sampling)
    for p, r in zip(prompts, out["tokens"]):
      grams = ngrams(p + r, 2)
      # 12 tokens give 144 bigrams; within 24 new tokens none may repeat.
      assert len(set(grams)) == len(grams), (temperature, p + r)


def test_sampling_config_refuses_bad_values():
  with pytest.raises(ValueError, match="repetition_penalty"):
    generate.SamplingConfig(repetition_penalty=0.5)
  with pytest.raises(ValueError, match="no_repeat_ngram"):
    generate.SamplingConfig(no_repeat_ngram=-1)


# ---- the notebooks' install step -----------------------------------------------------------------

def test_jax_requirement_matches_setup_py():
  setup = (ROOT / "setup.py").read_text()
  assert f'"{colab_setup.JAX_REQUIREMENT}"' in setup


@pytest.mark.parametrize("version, ok", [("0.10.2", True), ("0.11.1", True), ("0.12.9", True),
                                         ("0.13.0", False), ("0.10.1", False),
                                         ("0.11.0.dev20260101+cuda12", True), ("1.0", False)])
def test_satisfies(version, ok):
  assert colab_setup.satisfies(version) is ok


def test_pip_command_keeps_a_suitable_runtime_jax(tmp_path):
  keep = colab_setup.kept_packages({"jax": "0.11.1", "jaxlib": "0.11.1"})
  assert keep == {"jax": "0.11.1", "jaxlib": "0.11.1"}
  path = colab_setup.write_constraints(keep, str(tmp_path / "c.txt"))
  assert (tmp_path / "c.txt").read_text() == "jax==0.11.1\njaxlib==0.11.1\n"
  cmd = colab_setup.pip_command(".", ["hf"], keep=keep, constraints_file=path, python="py")
  assert cmd == ["py", "-m", "pip", "install", "-q", "-e", ".[hf]", "-c", path]
  # An unsuitable or missing JAX is left to pip.
  assert colab_setup.kept_packages({"jax": "0.4.30", "jaxlib": "0.4.30"}) == {}
  assert colab_setup.kept_packages({"jax": None, "jaxlib": None}) == {}
  wheel = "/content/emo_jax-0.1.0-py3-none-any.whl"
  assert colab_setup.pip_command(wheel, [], python="py") == [
      "py", "-m", "pip", "install", "-q", wheel]
  assert colab_setup.pip_command("https://example.org/emo_jax.git", ["hf", "test"],
                                 python="py")[-1] == (
      "emo_jax[hf,test] @ git+https://example.org/emo_jax.git")
  with pytest.raises(ValueError, match="constraints_file"):
    colab_setup.pip_command(".", keep=keep)


def test_install_runs_the_command_it_builds(monkeypatch, tmp_path):
  ran = []
  monkeypatch.setattr(colab_setup, "kept_packages", lambda: {"jax": "0.11.1"})
  cmd = colab_setup.install(str(tmp_path), ["hf"], run=lambda c, check: ran.append(c))
  assert ran == [cmd] and cmd[-2] == "-c" and cmd[-3] == f"{tmp_path}[hf]"
  assert str(tmp_path) in sys.path
  sys.path.remove(str(tmp_path))


def test_runtime_report_names_the_accelerator():
  class Device:
    device_kind = "NVIDIA T4"
  assert colab_setup.runtime_report([Device()], "gpu", hint=None) == (
      f"JAX {colab_setup.installed_version('jax')} on gpu: 1 x NVIDIA T4")
  cpu = colab_setup.runtime_report(jax.devices()[:1], "cpu", hint="gpu")
  assert "WARNING" in cpu and "jax[cuda12]" in cpu
  assert "no accelerator" in colab_setup.runtime_report(jax.devices()[:1], "cpu", hint=None)


def test_notebooks_install_cell_is_a_no_op_here():
  """The headless run (test_notebooks.py) executes this cell with emo_jax importable; here
  its source is checked to take that branch first and to read its settings from cell one."""
  for path in sorted((ROOT / "colab").glob("*.ipynb")):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    first, install = ("".join(c["source"]) for c in cells[:2])
    assert "REPO_URL" in first and "WHEEL" in first and "EXTRAS" in first
    assert install.index('find_spec("emo_jax") is not None') < install.index("colab_setup.install")
    assert "colab_setup.runtime_report()" in install


# ---- plots ------------------------------------------------------------------------------------

def test_fraction_axis_is_labelled_in_percent():
  from matplotlib.figure import Figure
  from emo_jax.study import plots
  ax = Figure().add_subplot(1, 1, 1)
  ax.plot([0.125, 0.25, 1.0], [3, 2, 1], "--", marker="o", label="x")
  plots.fraction_axis(ax, [0.125, 0.25, 1.0, 0.25])
  assert [t.get_text() for t in ax.get_xticklabels()] == ["12.5%", "25%", "100%"]
  assert ax.get_xscale() == "log" and "%" in ax.get_xlabel()
  legend = ax.legend(handlelength=plots.LEGEND_HANDLE_LENGTH)
  assert legend.get_lines()[0].get_linestyle() == "--"


# ---- progress lines ---------------------------------------------------------------------------

def test_progress_line_rate_and_eta_count_from_the_first_document(monkeypatch):
  import logging
  from emo_jax.data import progress
  clock = iter([0.0, 10.0, 12.0, 12.0])  # start, first document, second, line
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  p = progress.ProgressLog(logging.getLogger("test"), "source x", total_bytes=4_000_000,
                           every_s=1e9)
  p.update(1_000_000)
  p.update(1_000_000)
  # 1 MB in the 2 s since the first document: 500 kB/s, 2 MB left -> 4 s (not 10 s of unpacking).
  assert p.line() == ("source x: 2.0 MB of ~4.0 MB (50%), 2 documents, 500.0 kB/s, ETA 4s")
