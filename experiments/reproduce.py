"""The paper's selective-expert study at small scale: EMO keeps its quality on expert subsets,
a StdMoE trained the same way does not; on trained and on held-out domains, against the paper's
baselines.

  python -m experiments.reproduce --config configs/repro.py --workdir workdirs/reproduce
  python -m experiments.reproduce --config configs/repro.py --workdir workdirs/reproduce --full
  python -m experiments.reproduce --config configs/repro.py --workdir /tmp/r --quick --holdout math
  python -m experiments.reproduce --workdir workdirs/repro_gpu --steps 8000 --batch_size 64

The default trains EMO (--config) and its StdMoE twin (the same without the pool) on the corpus
minus the --holdout domain (default math), one seed. Then, for every domain of the corpus (the
held-out one included) and of --eval_corpus, it selects experts from that domain's calibration
documents (1, 5 and all of them, never used in training for the held-out domain) at each
--fractions subset and measures the loss on the domain's test documents with that routing mask
(equal to the physically pruned model), next to randomly chosen experts (the floor). --baselines
(on with --quick and --full) adds EMO-anneal (the trained StdMoE continued on top of its
checkpoint with the pool on for --anneal_fraction more steps, the learning rate falling linearly
to 0 from where the StdMoE ended, as the paper's anneal) and the memory-matched
models trained from scratch (a dense model and a small StdMoE with the parameter count of the
25 % and 12.5 % subsets). The routing clustering (document concentration, purity, NMI) of EMO,
StdMoE and EMO-anneal goes in the same report.

Trained models are cached in WORKDIR/models by a hash of their training settings, and their
measurements beside them, so adding a seed or a baseline trains and measures only what is new;
an interrupted run resumes. Writes WORKDIR/reproduce.json (every row, with the checkpoints it
used), reproduce.md (the tables and the command) and reproduce.png (the paper's figure).
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json
import hashlib
import pathlib
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from emo_jax.data import corpus as corpus_lib, heldout_corpus
from emo_jax.study import analysis, plots, selective
from emo_jax.study import reproduction as study
from emo_jax.study import reproduction_report as report
from emo_jax.tasks import bpb
from emo_jax.tasks.data import DataError
from emo_jax.train.experiment import Experiment
from experiments import cli

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

_CONFIG = config_flags.DEFINE_config_file("config", str(CONFIGS / "repro.py"),
                                          "EMO config of the study (its StdMoE twin and the "
                                          "baselines are derived from it).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/reproduce", "Output folder (and model cache).")
_QUICK = flags.DEFINE_bool("quick", False, "A few-minute smoke run of the whole study: 20 steps "
                           "of 8 rows, one batch per domain, 5 calibration documents.")
_FULL = flags.DEFINE_bool("full", False, "Seeds 0,1,2 and all baselines.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default 0; --full 0,1,2).")
_HOLDOUT = flags.DEFINE_string("holdout", "math", "Domain left out of training and reported "
                               "separately; '' trains on every domain.")
_EVAL_CORPUS = flags.DEFINE_string("eval_corpus", None, "JSONL of {text, domain} documents from "
                                   "domains outside the training corpus, also measured.")
_EVAL_CORPUS_DEFAULT = flags.DEFINE_bool(
    "eval_corpus_default", True, "Also measure the built-in held-out domains (legal, "
    "dictionary, German, Spanish, Italian; built from Debian packages into "
    "<cache>/corpora/heldout when missing, as `experiments.prepare_data --corpus heldout`); "
    "--noeval_corpus_default leaves them out.")
_BPB_TASKS = flags.DEFINE_list(
    "bpb_tasks", None, "Benchmarks scored in bits per byte of the gold continuation, experts "
    f"selected from each task's own held-out examples (default {','.join(study.BPB_TASKS)} "
    "when the eval extra is installed; '' for none). Names: emo_jax.tasks.bpb.bpb_task_names().")
_BPB_LIMIT = flags.DEFINE_integer("bpb_limit", None, "Scored instances per bits-per-byte task "
                                  "(default 100; quick 16).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per model (default: the config's; "
                              "quick 20).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per step (default: the config's; "
                              "quick 8).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Scored batches per domain "
                                     "(default 4; quick 1).")
_CALIBRATIONS = flags.DEFINE_list("calibrations", None, "Calibration sets: document counts or "
                                  "'all' (default 1,5,all; quick 5).")
_POOL = flags.DEFINE_integer("calibration_pool", None, "Calibration documents per domain, the "
                             "'all' set (default 32; quick 5).")
_FRACTIONS = flags.DEFINE_list("fractions", [str(f) for f in study.DEFAULT_FRACTIONS],
                               "Fractions of the experts to keep.")
_BASELINES = flags.DEFINE_bool("baselines", None, "Train EMO-anneal and the memory-matched "
                               "models (default: on with --quick and --full).")
_ANNEAL = flags.DEFINE_float("anneal_fraction", 0.25, "EMO-anneal's steps on top of the "
                             "trained StdMoE, as a share of EMO's steps.")
_RANDOM = flags.DEFINE_bool("random_floor", True, "Also score randomly chosen experts.")
_CLUSTER_DOCS = flags.DEFINE_integer("cluster_documents", None, "Test documents clustered per "
                                     "model (default 600; quick 60; 0 skips clustering).")
_CLUSTERS = flags.DEFINE_integer("clusters", None, "k of the clustering (default 32; quick 8).")
_ONE_PASS = flags.DEFINE_bool("one_pass", False, "One-pass instead of greedy ranking.")


def settings() -> dict:
  quick, full = _QUICK.value, _FULL.value
  if quick and full:
    raise app.UsageError("--quick and --full exclude each other")
  pick = lambda flag, default, quick_value: (flag.value if flag.value is not None else
                                             quick_value if quick else default)
  seeds = [int(s) for s in (_SEEDS.value or (["0", "1", "2"] if full else ["0"]))]
  fractions = [float(f) for f in _FRACTIONS.value]
  baselines = _BASELINES.value if _BASELINES.value is not None else (quick or full)
  missing = [f for f in study.MATCHED_FRACTIONS if f not in fractions]
  if baselines and missing:
    raise app.UsageError(
        f"--baselines compares the memory-matched models with EMO's subsets at "
        f"{', '.join(f'{100 * f:g} %' for f in study.MATCHED_FRACTIONS)} of the experts, but "
        f"--fractions={','.join(_FRACTIONS.value)} does not measure "
        f"{','.join(f'{f:g}' for f in missing)}: add them to --fractions, or pass --nobaselines")
  return {"seeds": seeds, "steps": pick(_STEPS, None, 20), "batch_size": pick(_BATCH, None, 8),
          "eval_batches": pick(_EVAL_BATCHES, 4, 1),
          "calibrations": pick(_CALIBRATIONS, list(study.CALIBRATIONS), ["5"]),
          "calibration_pool": pick(_POOL, 32, 5),
          "fractions": fractions, "baselines": baselines,
          "anneal_fraction": _ANNEAL.value, "random_floor": _RANDOM.value,
          "cluster_documents": pick(_CLUSTER_DOCS, 600, 60), "clusters": pick(_CLUSTERS, 32, 8),
          "greedy": not _ONE_PASS.value, "holdout": _HOLDOUT.value or None,
          "eval_corpus": _EVAL_CORPUS.value, "eval_corpus_default": _EVAL_CORPUS_DEFAULT.value,
          "bpb_tasks": (list(study.BPB_TASKS) if bpb.bpb_task_names() else [])
          if _BPB_TASKS.value is None else [t for t in _BPB_TASKS.value if t],
          "bpb_limit": pick(_BPB_LIMIT, 100, 16), "quick": quick}


def prepared_config(s: dict) -> Experiment:
  """The EMO experiment with the study's steps and batch; evaluation once, at the end."""
  e = cli.experiment(_CONFIG.value)
  steps = s["steps"] or e.train.steps
  data = e.data.replace(batch_size=s["batch_size"]) if s["batch_size"] else e.data
  train = e.train.replace(steps=steps,
                          warmup_steps=max(1, min(e.train.warmup_steps, steps // 10)),
                          eval_every=steps, checkpoint_every=max(1, min(200, steps)),
                          log_every=max(1, min(20, steps)),
                          eval_batches=2 if s["quick"] else e.train.eval_batches)
  return cli.checked(lambda: e.replace(data=data, train=train))


def model_plan(config, s: dict):
  """[(label, config, matched subset size or None)] for one seed; EMO-anneal's config is built
  once its StdMoE has trained (see run_models)."""
  cfg = config.model
  plan = [("EMO", config, None), ("StdMoE", study.stdmoe_config(config), None)]
  if s["baselines"]:
    plan.append(("EMO-anneal", None, None))
    try:
      sizes = selective.subset_sizes(cfg, study.MATCHED_FRACTIONS)[1:]
    except ValueError as e:
      raise study.StudyError(f"--baselines: the memory-matched models' subsets: {e}") from None
    for keep in sizes:
      pct = f"{100 * keep / cfg.num_experts:.3g} %"
      plan.append((f"Dense, {pct} params", study.memory_matched_config(config, keep, "dense"),
                   keep))
      plan.append((f"MoE-{keep}, {pct} params", study.memory_matched_config(config, keep, "moe"),
                   keep))
  return plan


def run_models(config, s: dict, models_dir: pathlib.Path):
  """Trains (or finds in the cache) every model of every seed: {label: [Trained per seed]},
  {label: matched subset size}."""
  trained, matched = {}, {}
  for seed in s["seeds"]:
    seeded = study.with_seed(config, seed)
    plan = model_plan(seeded, s)
    for i, (label, model_config, keep) in enumerate(plan):
      logging.info("seed %d: model %d/%d, %s", seed, i + 1, len(plan), label)
      if label == "EMO-anneal":  # on top of this seed's StdMoE, trained before it
        base = trained["StdMoE"][-1]
        model_config = study.anneal_config(seeded, s["anneal_fraction"], base.path)
      run = study.train_cached(label, model_config, models_dir, seed)
      if label == "EMO-anneal":  # the whole recipe: the StdMoE's steps and time, then the anneal's
        run.summary = {**run.summary, "stdmoe_steps": base.summary["steps"],
                       "steps": base.summary["steps"] + run.summary["steps"],
                       "unigram_val_perplexity": base.summary.get("unigram_val_perplexity")}
        run.seconds = round(base.seconds + run.seconds, 1)
        run.cached = run.cached and base.cached
      trained.setdefault(label, []).append(run)
      if keep is not None:
        matched[label] = keep
  return trained, matched


def _cached(path: pathlib.Path, spec: dict, measure):
  """measure() cached in path/measure-<hash of spec>.json."""
  key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
  cache = pathlib.Path(path) / f"measure-{key}.json"
  if cache.is_file():
    return json.loads(cache.read_text())
  measured = measure()
  cache.write_text(json.dumps(measured, indent=1))
  return measured


def measure_all(trained, matched, eval_sets, bpb_tasks, tokenizer, config, s: dict):
  """({label: {seed: domain measurement}}, {label: {seed: bits-per-byte measurement}}), each
  cached beside its model by the measurement settings."""
  sets_id = [(e.domain, e.group, len(e.calibration), [d.get("id") for d in e.documents][:50],
              len(e.documents)) for e in eval_sets]
  tasks_id = [(t.name, t.variant, len(t.items), len(t.calibration)) for t in bpb_tasks]
  results, bpb_results = {}, {}
  for label, runs in trained.items():
    fractions = [1.0] if label in matched else s["fractions"]
    for t in runs:
      common = {"fractions": fractions, "calibrations": s["calibrations"],
                "seq_len": config.data.seq_len, "batch_size": config.data.batch_size,
                "random_floor": s["random_floor"], "greedy": s["greedy"], "seed": t.seed}
      args = dict(fractions=fractions, calibrations=s["calibrations"],
                  seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                  random_floor=s["random_floor"] and label not in matched, seed=t.seed,
                  greedy=s["greedy"], label=f"{label} seed {t.seed}")
      results.setdefault(label, {})[t.seed] = _cached(
          t.path, {"sets": sets_id, "eval_batches": s["eval_batches"], **common},
          lambda: study.measure_model(t.path, eval_sets, tokenizer,
                                      num_batches=s["eval_batches"], **args))
      if bpb_tasks:
        bpb_results.setdefault(label, {})[t.seed] = _cached(
            t.path, {"bpb_tasks": tasks_id, **common},
            lambda: study.measure_bpb(t.path, bpb_tasks, tokenizer, **args))
  return results, bpb_results


def cluster(trained, corpus, s: dict, out: pathlib.Path):
  """Concentration, purity and NMI of EMO, StdMoE and EMO-anneal (first seed) on a sample of
  the corpus's test documents (every domain, the held-out one included)."""
  if not s["cluster_documents"]:
    return None
  docs = list(corpus.splits["test"])
  if len(docs) > s["cluster_documents"]:
    keep = np.sort(np.random.default_rng(0).choice(len(docs), s["cluster_documents"],
                                                   replace=False))
    docs = [docs[i] for i in keep]
  names = [n for n in ("EMO", "StdMoE", "EMO-anneal") if n in trained]
  result = analysis.cluster_checkpoints([trained[n][0].path for n in names], docs, out,
                                        names=names, clusters=s["clusters"])
  return {n: {k: result["models"][n][k] for k in ("concentration", "purity", "nmi",
                                                 "expert_share", "expert_share_top")}
          for n in names}


def write_outputs(workdir, command, s, trained, results, rows, clusters, timings,
                  bpb_results=None, bpb_rows=()):
  out = {"command": command, "settings": s, "timings": timings,
         "models": {k: [t.to_json() for t in v] for k, v in trained.items()},
         "rows": rows, "bpb_rows": list(bpb_rows), "clusters": clusters,
         "measurements": results, "bpb_measurements": bpb_results or {}}
  (workdir / "reproduce.json").write_text(json.dumps(out, indent=1, default=str))
  plots.plot_reproduction(rows, workdir / "reproduce.png")
  seeds = ",".join(str(x) for x in s["seeds"])
  parts = [f"`{command}`", "",
           f"Seeds {seeds}; mean ± standard deviation over seeds; ≈: within noise of EMO's "
           "cell (two standard errors of the paired difference; not marked with one seed).", "",
           "## Models", "", report.models_table(trained), "",
           f"## Loss increase over all experts (experts selected from "
           f"{report.MAIN_CALIBRATION} calibration documents of the domain)", "",
           report.results_table(rows, random_floor=s["random_floor"])]
  bpb_table = report.results_table(bpb_rows, random_floor=s["random_floor"],
                                   metric="bits per byte", item="task")
  for title, table in ((f"Benchmarks: bits per byte of the gold answer, increase over all "
                        f"experts (experts selected from {report.MAIN_CALIBRATION} examples of "
                        f"the task; {s['bpb_limit']} instances each)", bpb_table),
                       ("Memory-matched models trained from scratch", report.matched_table(rows)),
                       ("Calibration: 1, 5 or all documents", report.calibration_table(rows)),
                       ("Routing clustering (first seed)", report.clustering_table(clusters))):
    if table:
      parts += ["", f"## {title}", "", table]
  text = "\n".join(parts) + "\n"
  (workdir / "reproduce.md").write_text(text)
  return text


def main(argv):
  cli.start(argv)
  try:
    run(argv)
  except study.StudyError as e:  # a setting that cannot be honoured: one line, no traceback
    sys.exit(f"error: {e}")


def run(argv):
  start = time.time()
  s = settings()
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  config = prepared_config(s)
  dc = config.data
  try:  # refuse bad subset sizes before anything trains
    selective.subset_sizes(config.model, s["fractions"])
  except ValueError as e:
    raise study.StudyError(f"--fractions: {e}") from None
  corpus_lib.prepare_corpus(dc)  # built here on a first run (the study splits it for --holdout)
  corpus = corpus_lib.load_corpus(dc)
  train_config = config
  if s["holdout"]:
    if s["holdout"] not in corpus.domains:
      raise app.UsageError(f"--holdout {s['holdout']!r} is not a domain of the corpus; its "
                           f"domains are {corpus.domains}")
    data_dir = study.write_holdout_data(corpus.splits, s["holdout"],
                                        workdir / "data" / f"without-{s['holdout']}",
                                        study.base_tokenizer(dc), corpus.tokenizer.vocab_size)
    train_config = study.holdout_config(config, data_dir)
  eval_sets = study.corpus_eval_sets(corpus, s["holdout"], s["calibration_pool"])
  if s["eval_corpus"]:
    eval_sets += study.file_eval_sets(s["eval_corpus"], s["calibration_pool"])
  if s["eval_corpus_default"]:
    logging.info("held-out domains: the built-in corpus (built once, then reused)")
    try:
      built = heldout_corpus.build_heldout_corpus()
    except heldout_corpus.demo_corpus.SourceUnavailable as e:
      raise study.StudyError(f"--eval_corpus_default: the held-out corpus: {e}; pass "
                             "--noeval_corpus_default (and --eval_corpus with a JSONL of your "
                             "own)") from None
    eval_sets += study.file_eval_sets(built["path"], s["calibration_pool"])
  try:
    bpb_tasks = [bpb.load_bpb_task(name, limit=s["bpb_limit"]) for name in s["bpb_tasks"]]
  except (DataError, ValueError) as e:
    raise study.StudyError(f"--bpb_tasks: {e}") from None
  timings = {}
  trained, matched = run_models(train_config, s, workdir / "models")
  timings["train_s"] = round(time.time() - start, 1)
  results, bpb_results = measure_all(trained, matched, eval_sets, bpb_tasks, corpus.tokenizer,
                                     config, s)
  timings["measure_s"] = round(time.time() - start - timings["train_s"], 1)
  clusters = cluster(trained, corpus, s, workdir / "clusters")
  timings["total_s"] = round(time.time() - start, 1)
  rows = report.build_rows(results, trained, {e.domain: e.group for e in eval_sets}, matched)
  bpb_rows = report.build_rows(bpb_results, trained, {t.name: report.BPB_GROUP
                                                      for t in bpb_tasks}, {})
  command = "python -m experiments.reproduce " + " ".join(sys.argv[1:])
  print(write_outputs(workdir, command, s, trained, results, rows, clusters, timings,
                      bpb_results, bpb_rows))
  print(json.dumps({"out": str(workdir.absolute()), **timings}))


if __name__ == "__main__":
  cli.run(main)
