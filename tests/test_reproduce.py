"""The selective-expert study (emo_jax/study/reproduction.py, reproduction_report.py): the regime of
configs/repro.py, held-out splits, the model cache key, EMO-anneal's start, and the table."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import demo, repro, repro_stdmoe, tiny
from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.study import calibration, plots, selective
from emo_jax.study import reproduction as study
from emo_jax.study import reproduction_report as report
from emo_jax.config import ConfigError, ModelConfig
from emo_jax.data.corpus import DataConfig, load_corpus
from emo_jax.data.tokenizer import ByteTokenizer
from emo_jax.model.execution import ExecutionConfig
from emo_jax.train.experiment import Experiment
from emo_jax.model.transformer import count_params
from emo_jax.study.selective import pruned_param_count
from emo_jax.train import TrainConfig, evaluate
from emo_jax.train.trainer import init_state
from emo_jax.convert import loading
from emo_jax.tasks import bpb
from random_model import random_params


def test_repro_config_is_the_papers_regime():
  cfg = Experiment.from_config(repro.get_config()).model
  active = selective.active_experts(cfg)
  assert (cfg.num_experts, cfg.num_shared_experts, cfg.top_k) == (64, 1, 3)
  assert active * 16 == cfg.num_experts                      # 1/16 of the bank, as 8 of 128
  assert (cfg.pool_min, cfg.pool_max) == (cfg.top_k + 1, cfg.num_experts)
  sizes = selective.subset_sizes(cfg, study.DEFAULT_FRACTIONS)
  assert sizes == [64, 32, 16, 8, 4]
  assert all(k >= active for k in sizes)
  assert 8 == 2 * active                                     # 12.5 % holds twice the active count
  assert tuple(study.DEFAULT_FRACTIONS[1:]) == repro.SUBSET_FRACTIONS
  twin = Experiment.from_config(repro_stdmoe.get_config()).model
  # The baseline differs only in the pool and, as the release's StdMoE does, attends over the row.
  assert cfg.document_attention and not twin.document_attention
  assert twin == cfg.replace(pool=False, document_attention=False)


def test_subsets_below_the_active_count_are_refused():
  cfg = Experiment.from_config(demo.get_config()).model   # 17 experts, 3 active
  assert selective.subset_sizes(cfg, [1, 0.5, 0.25]) == [17, 8, 4]
  with pytest.raises(ValueError, match="fewer than the 3 every token uses"):
    selective.subset_sizes(cfg, [0.125])
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    selective.subset_sizes(cfg, [1.5])


def _docs(n_per_domain, domains=("code", "math", "news")):
  return [{"id": f"{d}-{i}", "domain": d, "text": f"{d} document {i} " * 5}
          for d in domains for i in range(n_per_domain)]


def test_holdout_no_held_out_document_reaches_training(tmp_path):
  splits = {"train": _docs(6), "validation": _docs(2), "test": _docs(3)}
  held_ids = {d["id"] for s in splits.values() for d in s if d["domain"] == "math"}
  out = study.write_holdout_data(splits, "math", tmp_path / "without-math", "bytes", 258)
  config = tiny.get_config()
  config = study.holdout_config(config, out)
  corpus = load_corpus(DataConfig.from_dict(config.data))     # what the trainer reads
  assert corpus.domains == ["code", "news"]
  seen = {d["id"] for s in corpus.splits.values() for d in s}
  assert not seen & held_ids
  assert seen == {d["id"] for s in splits.values() for d in s} - held_ids
  # The study still scores the held-out domain, calibrating on its (never trained) train docs.
  full = type(corpus)(splits, corpus.tokenizer, ["code", "math", "news"])
  sets = {e.domain: e for e in study.corpus_eval_sets(full, "math", pool=4)}
  assert sets["math"].group == "held-out" and sets["code"].group == "trained"
  assert sets["math"].calibration == [d["text"] for d in splits["train"]
                                      if d["domain"] == "math"][:4]
  with pytest.raises(study.StudyError, match="not a domain of the corpus"):
    study.write_holdout_data(splits, "poetry", tmp_path / "x", "bytes", 258)


# A value every config accepts for each field, different from the tiny config's.
_CHANGED = {"schedule": "linear", "compute_dtype": "bfloat16", "param_dtype": "bfloat16",
            "expert_backend": "ragged", "ragged_dot_impl": "xla", "attention_impl": "jax_xla",
            "remat_policy": "dots", "expert_transport": "all_to_all", "eval_pool_size": 3,
            "corpus": "other.jsonl", "data_dir": "/tmp/elsewhere", "tokenizer": "x.model",
            "init_from": "/tmp/init", "num_kv_heads": 2, "head_dim": 32, "pool_min": 3,
            "num_heads": 8, "top_k": 1, "weight_decay_exempt": "embedding",
            "continue_from": "/tmp/stdmoe-s0-abc"}
# Fields valid only with others changed too: the key must still change with the field itself.
_COMPANIONS = {"continue_from": {"schedule": "linear_from_checkpoint", "warmup_steps": 0,
                                  "continue_from": "/tmp/stdmoe-s0-def"}}


def _changed(value, name):
  if name in _CHANGED:
    return _CHANGED[name]
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 0.5 if value else 0.5
  raise AssertionError(f"no changed value for {name}={value!r}")


def test_cache_key_changes_with_every_training_field():
  base = tiny.get_config()
  key = study.training_key(base)
  sections = {"model": ModelConfig, "execution": ExecutionConfig, "data": DataConfig,
              "train": TrainConfig}
  tested = 0
  for section, cls in sections.items():
    defaults = cls.from_dict(base[section]).to_dict()
    for field in dataclasses.fields(cls):
      config = tiny.get_config()
      values = {**defaults, **_COMPANIONS.get(field.name, {})}
      config[section] = dict(values)
      before = study.training_key(config) if field.name in _COMPANIONS else key
      values[field.name] = _changed(values[field.name], field.name)
      cls.from_dict(values)                                   # the changed value is valid
      config[section] = values
      unkeyed = field.name in study.UNKEYED_FIELDS.get(section, ())
      assert (study.training_key(config) == before) == unkeyed, f"{section}.{field.name}"
      tested += 1
  assert tested > 50
  spelled = tiny.get_config()                                 # defaults spelled out or not
  spelled.execution = ExecutionConfig.from_dict(spelled.execution).to_dict()
  del spelled.train["peak_flops"]
  assert study.training_key(spelled) == key


def test_new_fields_at_their_neutral_values_keep_the_cached_models_keys():
  # The keys configs/tiny.py and configs/repro.py had before lb_scope_sequences and the
  # repetition filter existed: models cached then are found again.
  assert study.training_key(tiny.get_config()) == "2116d89b4a97"
  assert study.training_key(repro.get_config()) == "687d62d571a0"
  scoped = tiny.get_config()
  scoped.model.lb_scope_sequences = 4
  assert study.training_key(scoped) != "2116d89b4a97"


def test_memory_matched_models_have_the_subsets_parameter_count():
  config = repro.get_config()
  cfg = Experiment.from_config(config).model
  for keep in (16, 8):
    target = pruned_param_count(cfg, keep)
    dense = Experiment.from_config(study.memory_matched_config(config, keep, "dense")).model
    moe = Experiment.from_config(study.memory_matched_config(config, keep, "moe")).model
    assert dense.num_experts == 0
    assert abs(count_params(dense)["total_params"] - target) <= 3 * cfg.d_model * cfg.num_layers
    assert (moe.num_experts, moe.top_k, moe.pool) == (keep, cfg.top_k, False)
    assert count_params(moe)["total_params"] == target


@pytest.mark.slow
def test_anneal_continues_the_trained_stdmoe_with_the_pool_on(tmp_path):
  """EMO-anneal is the StdMoE twin continued on top of its checkpoint: the step count goes on
  from the StdMoE's, the rate starts at the StdMoE's last one and falls to 0, the pool is on,
  and a second call reuses the cached model."""
  config = tiny.get_config()
  config.train.steps = 4
  config.train.warmup_steps = 1
  config.train.log_every = 1
  config.train.eval_every = 4
  config.train.eval_batches = 1
  config.data.synthetic_documents = 200
  stdmoe = study.train_cached("StdMoE", study.stdmoe_config(config), tmp_path, 0)
  anneal = study.anneal_config(config, 0.5, stdmoe.path)
  assert anneal.model.pool is True and anneal.train.steps == 2
  assert (anneal.train.schedule, anneal.train.warmup_steps) == ("linear_from_checkpoint", 0)
  run = study.train_cached("EMO-anneal", anneal, tmp_path, 0)
  rows = [json.loads(line) for line in open(f"{run.path}/metrics.jsonl")]
  first = [json.loads(line) for line in open(f"{stdmoe.path}/metrics.jsonl")]
  assert [r["step"] for r in rows] == [5, 6]
  assert rows[0]["learning_rate"] == pytest.approx(first[-1]["learning_rate"], rel=1e-5)
  assert rows[1]["learning_rate"] == pytest.approx(first[-1]["learning_rate"] / 2, rel=1e-5)
  assert ckpt_lib.load_params(run.path)[1]["pool"] is True
  assert max(r["pool_size"] for r in rows) < anneal.model.num_routed_experts  # a drawn pool
  again = study.train_cached("EMO-anneal", anneal, tmp_path, 0)
  assert again.cached and again.path == run.path
  # The key names the StdMoE by its cached folder, not by where the cache lives.
  moved = study.anneal_config(config, 0.5, tmp_path / "elsewhere" / pathlib.Path(stdmoe.path).name)
  assert study.training_key(moved) == run.key


def jax_tree(params):
  return jax.tree.map(np.asarray, params)


def jax_leaves(params):
  return sorted((jax.tree_util.keystr(k), np.asarray(v))
                for k, v in jax.tree_util.tree_leaves_with_path(params))


def _measure(full, deltas, random_deltas, seed_shift=0.0):
  select = {"5": {k: full + d + seed_shift for k, d in deltas.items()},
            "1": {k: full + 2 * d + seed_shift for k, d in deltas.items()}}
  return {"full": full + seed_shift, "select": select,
          "random": {k: full + d + seed_shift for k, d in random_deltas.items()},
          "calibration_documents": {"5": 5, "1": 1}, "tokens": 100}


def _trained(label, seeds, params=1e6):
  summary = {"total_params": params, "active_params": params / 4, "steps": 10,
             "val_perplexity": 100.0, "unigram_val_perplexity": 500.0}
  return [study.Trained(label, s, f"/m/{label}-{s}", "k", 1.0, False, summary) for s in seeds]


def test_rows_average_seeds_and_mark_differences_within_noise(tmp_path):
  groups = {"a": "trained", "b": "trained", "math": "held-out", "law": "eval-corpus"}
  results = {"EMO": {}, "StdMoE": {}, "Dense, 25 % params": {}}
  for seed, shift in ((0, 0.0), (1, 0.01), (2, -0.01)):
    noise = (seed - 1) * 0.05                                 # StdMoE's 50 % cell: noise only
    results["EMO"][seed] = {"num_experts": 4, "domains": {
        d: _measure(2.0, {"2": 0.1, "1": 0.2}, {"2": 0.5, "1": 0.9}, shift) for d in groups}}
    results["StdMoE"][seed] = {"num_experts": 4, "domains": {
        d: _measure(2.1, {"2": 0.1 + noise, "1": 0.6 + noise / 10}, {"2": 0.5, "1": 0.9}, shift)
        for d in groups}}
    results["Dense, 25 % params"][seed] = {"num_experts": 0, "domains": {
        d: {"full": 2.3 + shift, "select": {}, "random": {}, "calibration_documents": {},
            "tokens": 100} for d in groups}}
  trained = {k: _trained(k, [0, 1, 2]) for k in results}
  rows = report.build_rows(results, trained, groups, {"Dense, 25 % params": 1})
  by = {(r["model"], r["domain"]): r for r in rows}
  emo = by["EMO", "trained domains (mean of 2)"]
  np.testing.assert_allclose(emo["full"]["mean"], 2.0)
  np.testing.assert_allclose(emo["full"]["std"], 0.01)
  np.testing.assert_allclose(emo["subsets"]["1"]["delta"]["mean"], 0.2)
  np.testing.assert_allclose(emo["subsets"]["1"]["calibration"]["1"]["delta"]["mean"], 0.4)
  std = by["StdMoE", "math"]
  assert std["group"] == "held-out" and std["checkpoints"] == ["/m/StdMoE-0", "/m/StdMoE-1",
                                                               "/m/StdMoE-2"]
  assert std["subsets"]["2"]["within_noise_of_emo"] is True    # 0.1 +- 0.05 vs 0.1
  assert std["subsets"]["1"]["within_noise_of_emo"] is False   # 0.6 vs 0.2
  np.testing.assert_allclose(std["subsets"]["1"]["vs_emo_full"]["mean"], 2.1 + 0.6 - 2.0)
  dense = by["Dense, 25 % params", "math"]
  assert not dense["subsets"] and dense["matched_fraction"] == 0.25
  np.testing.assert_allclose(dense["vs_emo_subset"]["mean"], 2.3 - 2.2)
  table = report.results_table(rows)
  assert "| EMO | math | 2.000 ± 0.010 | +0.100 ± 0.000 | +0.200 ± 0.000 |" in table
  assert "| StdMoE | math | 2.100 ± 0.010 | +0.100 ± 0.050 ≈ | +0.600 ± 0.005 |" in table
  assert "| EMO, random experts | math |" in table
  assert "2/4 (50 %)" in table
  assert "| Dense, 25 % params | 1.00 M | math | 2.300 ± 0.010 | 2.200 ± 0.010 |" in (
      report.matched_table(rows))
  assert "+0.400 ± 0.000 (1)" in report.calibration_table(rows)
  path = plots.plot_reproduction(rows, tmp_path / "r.png")
  assert path.stat().st_size > 10_000


def test_one_seed_marks_nothing():
  assert report.within_noise([1.0], [2.0]) is None
  assert report.stats([1.0])["std"] is None


def test_eval_corpus_sets_split_calibration_from_scored(tmp_path):
  path = tmp_path / "extra.jsonl"
  path.write_text("\n".join(json.dumps(d) for d in _docs(5, ("law", "poems"))) + "\n")
  sets = study.file_eval_sets(str(path), pool=2)
  assert [s.domain for s in sets] == ["law", "poems"]
  assert len(sets[0].calibration) == 2 and len(sets[0].documents) == 3
  assert not {d["text"] for d in sets[0].documents} & set(sets[0].calibration)
  path.write_text(json.dumps({"text": "alone", "domain": "x"}) + "\n")
  with pytest.raises(study.StudyError, match="at least 2"):
    study.file_eval_sets(str(path), pool=2)
  assert study.calibration_counts(3, ["1", "5", "all"]) == {"1": 1, "5": 3, "all": 3}
  with pytest.raises(study.StudyError, match="calibrations"):
    study.calibration_counts(3, ["some"])


def test_bad_settings_are_refused():
  with pytest.raises(study.StudyError, match="anneal_fraction"):
    study.anneal_config(tiny.get_config(), 1.5, "/w")
  with pytest.raises(ConfigError):
    study.training_key({**tiny.get_config().to_dict(), "train": {"steps": 0}})


@pytest.mark.slow
def test_measure_model_scores_the_selected_and_random_subsets(tmp_path):
  """The study's numbers equal evaluate.perplexity with the masks selective picks itself."""
  cfg = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                    head_dim=8, num_experts=8, num_shared_experts=1, top_k=1, expert_hidden=16,
                    pool_min=2, pool_max=8, max_segments=4, max_seq_len=32,
                    compute_dtype="float32", init_std=0.3)
  _, params = random_params(cfg)
  ckpt_lib.save_params(tmp_path / "m", params, cfg.to_dict())
  tok = ByteTokenizer()
  docs = _docs(4, ("code", "math"))
  sets = [study.EvalSet("math", "held-out", [d["text"] for d in docs[4:]], docs[4:]),
          study.EvalSet("code", "trained", [d["text"] for d in docs[:3]], docs[:4])]
  out = study.measure_model(str(tmp_path / "m"), sets, tok, fractions=[1, 0.25],
                            calibrations=["1", "all"], seq_len=32, batch_size=2,
                            num_batches=2, random_floor=True, seed=0)
  assert out["num_experts"] == 8 and out["active_experts"] == 2
  math_ = out["domains"]["math"]
  assert math_["calibration_documents"] == {"1": 1, "all": 4}
  assert set(math_["select"]["all"]) == set(math_["random"]) == {"2"}
  graphdef, p = loading.build_model(cfg, ckpt_lib.load_params(tmp_path / "m")[0])
  batches = study.scoring_batches(docs[4:], tok, seq_len=32, batch_size=2, max_segments=4,
                                  num_batches=2)
  np.testing.assert_allclose(math_["full"], evaluate.perplexity(graphdef, p, batches, [])["loss"],
                             rtol=1e-6)
  calib = calibration.calibration_batches([d["text"] for d in docs[4:5]], tok, seq_len=32)
  mask = selective.select_experts(graphdef, p, cfg, calib, 2).mask
  want = evaluate.perplexity(graphdef, p, batches, [], keep_experts=mask)["loss"]
  np.testing.assert_allclose(math_["select"]["1"]["2"], want, rtol=1e-6)
  assert math_["random"]["2"] != math_["select"]["all"]["2"]
  with pytest.raises(ValueError, match="fewer than the 2"):
    study.measure_model(str(tmp_path / "m"), sets, tok, fractions=[0.125], calibrations=["1"],
                        seq_len=32, batch_size=2, num_batches=1, random_floor=False, seed=0)
  # Bits per byte of a task's gold answers: all experts, and experts its own examples select.
  item = lambda i, d: bpb.BpbItem(i, d["text"][:20], d["text"][20:40])
  task = bpb.BpbTask("toy", "gold_bpb_0shot", [item(i, d) for i, d in enumerate(docs[:3])],
                     calibration=[item(9, docs[5])])
  r = study.measure_bpb(str(tmp_path / "m"), [task], tok, fractions=[1, 0.25],
                        calibrations=["1"], seq_len=32, batch_size=2, random_floor=True,
                        seed=0)["domains"]["toy"]
  score = lambda mask: bpb.evaluate_bpb(graphdef, p, tok, task, max_len=32, batch_size=2,
                                        keep_experts=mask)["bpb"]
  np.testing.assert_allclose(r["full"], score(None), rtol=1e-6)
  calib = calibration.calibration_batches([task.calibration[0].text], tok, seq_len=32, rows=2,
                                          full_width=True)
  mask = selective.select_experts(graphdef, p, cfg, calib, 2).mask
  np.testing.assert_allclose(r["select"]["1"]["2"], score(mask), rtol=1e-6)
  assert r["instances"] == 3 and set(r["random"]) == {"2"}


def test_bpb_tasks_get_rows_of_their_own_after_the_domains():
  groups = {"a": "trained", "law": "eval-corpus", "mbpp": report.BPB_GROUP}
  assert [g for _, g, _ in report.domain_groups(groups)] == ["trained-mean", "eval-corpus",
                                                            "trained", report.BPB_GROUP]
  results = {"EMO": {0: {"num_experts": 4, "domains": {
      "mbpp": _measure(3.0, {"2": 0.25}, {"2": 0.5})}}}}
  rows = report.build_rows(results, {"EMO": _trained("EMO", [0])}, {"mbpp": report.BPB_GROUP},
                           {})
  table = report.results_table(rows, metric="bits per byte", item="task")
  assert "| model | task | all experts: bits per byte | 2/4 (50 %) |" in table
  assert "| EMO | mbpp | 3.000 | +0.250 |" in table and "| EMO, random experts | mbpp |" in table


@pytest.mark.slow
@pytest.mark.integration
def test_the_command_reports_seeds_held_out_domains_and_bpb_tasks(tmp_path):
  """experiments.reproduce as a user runs it, two seeds: per-seed values and mean ± std for an
  eval-corpus domain and a bits-per-byte task at every subset size, in the JSON and the table."""
  import subprocess
  import sys
  from emo_jax.tasks import data as task_data
  if task_data.package_root(required=False) is None:
    pytest.skip("needs the eval extra's benchmark data")
  extra = tmp_path / "extra.jsonl"
  extra.write_text("\n".join(json.dumps(d) for d in _docs(6, ("law", "poems"))) + "\n")
  out = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--config", "configs/tiny.py",
       "--workdir", str(out), "--quick", "--steps", "2", "--seeds", "0,1", "--holdout", "",
       "--baselines=false", "--cluster_documents", "0", "--fractions", "1,0.5",
       "--eval_corpus", str(extra), "--noeval_corpus_default", "--bpb_tasks", "mt_mbpp_python",
       "--bpb_limit", "2"], cwd=pathlib.Path(__file__).resolve().parents[1],
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "reproduce.json").read_text())
  rows = {(r["model"], r["domain"]): r for r in result["rows"]}
  bpb_rows = {(r["model"], r["domain"]): r for r in result["bpb_rows"]}
  for model in ("EMO", "StdMoE"):
    for row in (rows[model, "law"], bpb_rows[model, "mt_mbpp_python"]):
      cell = row["subsets"]["4"]
      assert len(cell["delta"]["values"]) == 2 and cell["delta"]["std"] is not None
      assert len(cell["random_delta"]["values"]) == 2
  assert rows["EMO", "law"]["group"] == "eval-corpus"
  assert bpb_rows["EMO", "mt_mbpp_python"]["group"] == report.BPB_GROUP
  assert 0 < bpb_rows["EMO", "mt_mbpp_python"]["full"]["mean"] < 20
  table = (out / "reproduce.md").read_text()
  assert "| EMO | mt_mbpp_python |" in table and "all experts: bits per byte" in table


def test_baselines_without_the_matched_fractions_are_refused_before_anything_runs(tmp_path):
  """The memory-matched rows compare with EMO's 25 % and 12.5 % subsets: --baselines with
  fractions that leave them out is a usage error naming the fix, and nothing is trained."""
  import subprocess
  import sys
  out = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--config", "configs/tiny.py",
       "--workdir", str(out), "--quick", "--baselines", "--fractions", "1,0.5"],
      cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  assert "add them to --fractions, or pass --nobaselines" in proc.stderr
  assert "0.25,0.125" in proc.stderr
  assert not out.exists()
