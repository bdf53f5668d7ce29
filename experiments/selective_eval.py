"""Expert subsets on benchmarks: select per task, optionally fine-tune, score (one command).

  python -m experiments.selective_eval --checkpoint W --tasks arc_easy,mmlu \
      --keep 8,16,32,64,all --num_calibration 5 [--finetune_steps N] [--baseline W2] --out DIR
  # the release's MMLU protocol: one subset per category (17 tasks mmlu_merged_<category>)
  python -m experiments.selective_eval --checkpoint W --tasks mmlu_categories --keep 32,all \
      --out DIR

For every task (installed by the eval extra, `pip install -e ".[eval]"`, or a .jsonl file), every
subset size in --keep (experts per layer, shared included; `paper` = the paper's 8/16/32/64/all
of 128 scaled to the model) and every selection method, the experts are chosen from the first
--num_calibration examples of the task's calibration pool and the task is scored 5-shot by
log-likelihood with only those experts (docs/selective_eval.md). `random` is averaged over
--random_seeds seeds. With --finetune_steps the greedy subsets are also pruned, fine-tuned on
the calibration pool and scored again (method `greedy+ft`); each tuned subset is saved as a
parameter checkpoint in DIR/tuned/, and --merge_out writes the full model with every task's
tuned experts of the smallest subset merged back into its bank.

DIR receives results.json ({"settings", "rows": [{model, task, keep, fraction, method,
num_calibration, acc, acc_per_char, primary, instances, seconds, ...}]}), results.md (the
table: primary metric x 100 per task, the paper's layout) and results.png (accuracy against the
fraction of experts kept; the --checkpoint solid, the --baseline dashed). results.json is
rewritten after every row, and a rerun with the same settings skips the rows it holds, so a
killed sweep continues where it stopped.
"""

from __future__ import annotations

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from emo_jax.config import ModelConfig
from emo_jax.convert import loading
from emo_jax.study import calibration, plots, selective, subset_finetune, subset_methods
from emo_jax.tasks import evaluate_task, expand_task_names, load_task, report
from emo_jax.train import checkpoint as ckpt_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint.")
_BASELINE = flags.DEFINE_string("baseline", None, "A second checkpoint (e.g. the StdMoE "
                                "baseline) swept the same way and drawn dashed.")
_LABEL = flags.DEFINE_string("label", "EMO", "Name of --checkpoint in the table and plot.")
_BASELINE_LABEL = flags.DEFINE_string("baseline_label", "baseline", "Name of --baseline.")
_TASKS = flags.DEFINE_list("tasks", None, "Tasks: arc_easy, arc_challenge, boolq, csqa, "
                           "hellaswag, openbookqa, piqa, socialiqa, winogrande, mmlu (+ _mc "
                           "for letters; mmlu:<subject>; mmlu_merged_<category>, or "
                           "mmlu_categories for all 17: the release's protocol, one subset "
                           "per MMLU category) or .jsonl files.")
_KEEP = flags.DEFINE_list("keep", ["paper"], "Experts kept per layer (shared included), 'all', "
                          "or 'paper' (8, 16, 32, 64, all of 128, scaled to the model).")
_METHODS = flags.DEFINE_list("methods", ["greedy", "global", "random", "easy_ep"],
                             "Selection methods: greedy, global, random, easy_ep, and "
                             "greedy_variable (a K per layer, from --keep_per_layer).")
_KEEP_PER_LAYER = flags.DEFINE_multi_string(
    "keep_per_layer", [], "For --methods greedy_variable (the release's "
    "greedy_prune_layerwise_variable): experts kept in each layer, shared included, e.g. "
    "'128,128,32,32,...' (one per layer; 'all' = the whole bank). Repeat for several.")
_NUM_CAL = flags.DEFINE_list("num_calibration", ["5"], "Calibration examples (a list sweeps; "
                             "'all' = the whole pool). The release sweeps 1,5,10,100,all.")
_RANDOM_SEEDS = flags.DEFINE_integer("random_seeds", 3, "Seeds the random baseline averages.")
_LIMIT = flags.DEFINE_integer("limit", None, "Score only the first N instances of each task's "
                              "sample (per subject for MMLU).")
_NUM_SHOTS = flags.DEFINE_integer("num_shots", 5, "Few-shot examples (MMLU, raw JSONL).")
_FT_STEPS = flags.DEFINE_string("finetune_steps", "0", "Fine-tune each greedy subset: 0 = off, "
                                "N steps, or 'epoch' (one pass over the calibration pool).")
_FT_LR = flags.DEFINE_float("finetune_lr", 5e-5, "Fine-tuning peak learning rate.")
_FT_BATCH = flags.DEFINE_integer("finetune_batch", 16, "Fine-tuning batch size.")
_FT_TRAINABLE = flags.DEFINE_enum("finetune_trainable", "all", ["all", "experts"],
                                  "Train every parameter, or only the expert bank.")
_FT_PROTOCOL = flags.DEFINE_enum(
    "finetune_protocol", "emo_jax", ["emo_jax", "release"],
    "emo_jax: the router losses at the model's weights, the document pool kept, "
    "--finetune_batch / --finetune_lr / --finetune_trainable. release: the release's "
    "protocol (batch 32, lr 5e-5, 10 % warm-up + linear decay, weight decay 0, one epoch unless "
    "--finetune_steps is a count, no document pool, balancing loss at 0.01, no z-loss; "
    "--finetune_* flags given explicitly still apply). Each row's finetune record names it.")
_MERGE_OUT = flags.DEFINE_string("merge_out", None, "With --finetune_steps: write the full "
                                 "--checkpoint with every task's tuned experts of the smallest "
                                 "subset merged back into its bank (a parameter checkpoint).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Scoring batch (requests per forward pass).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Tokens per request (0 = model's max_seq_len).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the calibration-example permutation.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer override (\"bytes\", .model or "
                                 "tokenizer.json); default: the checkpoint's.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")


def parse_keep(values, cfg) -> list:
  """Subset sizes (ints, then "all") for a model; 'paper' expands to the scaled paper sizes."""
  sizes: set = set()
  for v in values:
    v = v.strip().lower()
    if v == "paper":
      sizes.update(selective.subset_sizes(cfg, allow_below_active=True))
    elif v == "all":
      sizes.add(cfg.num_experts)
    elif v.isdigit():
      sizes.add(int(v))
    else:
      raise app.UsageError(f"--keep value {v!r} must be an integer, 'all' or 'paper'")
  for k in sizes:
    try:
      selective.routed_to_keep(cfg, k)
    except ValueError as e:
      raise app.UsageError(f"--keep {k}: {e}") from None
  return [("all" if k == cfg.num_experts else k) for k in sorted(sizes)]


def parse_num_calibration(values) -> list:
  out = []
  for v in values:
    v = v.strip().lower()
    if v == "all":
      out.append("all")
    elif v.isdigit() and int(v) > 0:
      out.append(int(v))
    else:
      raise app.UsageError(f"--num_calibration value {v!r} must be a positive integer or 'all'")
  return out


def parse_finetune_steps(value: str):
  value = value.strip().lower()
  if value == "epoch":
    return "epoch"
  if value.isdigit():
    return int(value) or None
  raise app.UsageError(f"--finetune_steps={value!r} must be 0 (off), a step count or 'epoch'")


def row_key(row) -> tuple:
  return (row["model"], row["task"], str(row["keep"]), row["method"],
          str(row.get("num_calibration")))


class Results:
  """results.json: the settings and the rows so far, rewritten after every row."""

  def __init__(self, out: pathlib.Path, settings: dict):
    self.path = out / "results.json"
    self.settings, self.rows = settings, []
    if self.path.exists():
      old = json.loads(self.path.read_text())
      if old.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                         if settings.get(k) != old.get("settings", {}).get(k))
        raise app.UsageError(f"{self.path} holds results of other settings ({changed}); choose "
                             "another --out or delete it")
      self.rows = old["rows"]
      print(f"resuming: {len(self.rows)} rows already in {self.path}", file=sys.stderr)
    self.done = {row_key(r) for r in self.rows}

  def has(self, **key) -> bool:
    return row_key(key) in self.done

  def add(self, row: dict):
    self.rows.append(row)
    self.done.add(row_key(row))
    tmp = self.path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": self.settings, "rows": self.rows}, indent=1))
    tmp.replace(self.path)
    print(f"  {row['model']} {row['task']} keep={row['keep']} {row['method']}"
          f" n_cal={row.get('num_calibration')}: acc {row['acc']:.3f}, acc_per_char "
          f"{row['acc_per_char']:.3f} ({row['instances']} instances, {row['seconds']} s)",
          file=sys.stderr, flush=True)


def sweep_model(label: str, checkpoint: str, tasks: dict, results: Results, args: dict):
  """Every (task, keep, method, num_calibration) row of one checkpoint."""
  cfg, graphdef, params, tok, spec = loading.load_checkpoint(checkpoint,
                                                              tokenizer=_TOKENIZER.value)
  if tok is None:
    raise app.UsageError(f"cannot tell which tokenizer {checkpoint} uses; pass --tokenizer")
  if not cfg.is_moe:
    raise app.UsageError(f"{checkpoint} is a dense model; expert subsets need an MoE")
  seq_len = _SEQ_LEN.value or cfg.max_seq_len
  if seq_len > cfg.max_seq_len:
    raise app.UsageError(f"--seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  keeps = parse_keep(_KEEP.value, cfg)
  score = lambda task, g, p, keep_mask=None: evaluate_task(
      g, p, tok, task, max_len=seq_len, keep_experts=keep_mask, batch_size=_BATCH.value,
      label=f"{label} {task.name}")

  def base_row(task, keep, method, n_cal):
    return {"model": label, "task": task.name, "keep": keep, "method": method,
            "num_calibration": n_cal,
            "fraction": 1.0 if keep == "all" else (
                keep / cfg.num_experts if isinstance(keep, int) else None)}

  def finish(row, result):
    row.update({k: result[k] for k in ("acc", "acc_per_char", "primary", "instances",
                                      "seconds")})
    return row

  try:
    schedules = [subset_methods.parse_keep_per_layer(s, cfg) for s in args["keep_per_layer"]]
  except ValueError as e:
    raise app.UsageError(f"--keep_per_layer: {e}") from None
  for name, task in tasks.items():
    for schedule in schedules:  # greedy_variable: a K per layer
      for n_cal in args["num_calibration"]:
        row = base_row(task, ",".join(map(str, schedule)), "greedy_variable", n_cal)
        row["fraction"] = sum(schedule) / (cfg.num_experts * cfg.num_layers)
        if results.has(**row):
          continue
        start = time.perf_counter()
        texts = task.calibration_texts(None if n_cal == "all" else n_cal, _SEED.value)
        batches = calibration.calibration_batches(texts, tok, seq_len=seq_len, rows=16,
                                                  prompts=True)
        selection = subset_methods.greedy_variable_selection(graphdef, params, cfg, batches,
                                                             schedule)
        result = score(task, graphdef, params, selection.mask)
        result["seconds"] = round(time.perf_counter() - start, 2)
        row = finish(row, result)
        row["kept_routed"] = [k.tolist() for k in selection.kept_routed]
        results.add(row)
    for keep in keeps:
      if keep == "all":
        if not results.has(**base_row(task, keep, "full", None)):
          results.add(finish(base_row(task, keep, "full", None), score(task, graphdef, params)))
        continue
      for n_cal in args["num_calibration"]:
        texts = task.calibration_texts(None if n_cal == "all" else n_cal, _SEED.value)
        batches = calibration.calibration_batches(texts, tok, seq_len=seq_len, rows=16,
                                                  prompts=True)
        for method in [m for m in args["methods"] if m != "greedy_variable"]:
          n_key = None if method == "random" else n_cal
          row = base_row(task, keep, method, n_key)
          if results.has(**row):
            continue
          start = time.perf_counter()
          seeds = range(_RANDOM_SEEDS.value) if method == "random" else [0]
          per_seed, kept = [], []
          for seed in seeds:
            selection = subset_methods.select(method, graphdef, params, cfg, batches, keep,
                                              seed=seed)
            per_seed.append(score(task, graphdef, params, selection.mask))
            kept.append(selection.kept_routed.tolist())
          result = {k: float(np.mean([r[k] for r in per_seed]))
                    for k in ("acc", "acc_per_char", "primary")}
          result.update(instances=per_seed[0]["instances"],
                        seconds=round(time.perf_counter() - start, 2))
          row = finish(row, result)
          row["kept_routed"] = kept if method == "random" else kept[0]
          if method == "random":
            row["per_seed_primary"] = [r["primary"] for r in per_seed]
          results.add(row)
        ft_steps = args["finetune_steps"]
        ft_row = base_row(task, keep, "greedy+ft", n_cal)
        if ft_steps is None or "greedy" not in args["methods"] or results.has(**ft_row):
          continue
        start = time.perf_counter()
        selection = subset_methods.select("greedy", graphdef, params, cfg, batches, keep)
        pruned, pruned_cfg = selective.prune(jax_to_numpy(params), cfg, selection)
        small_graphdef, small_params = loading.build_model(pruned_cfg, pruned)
        fc = finetune_config(ft_steps)
        tuned, info = subset_finetune.finetune(small_graphdef, small_params, tok,
                                               task.calibration, max_len=seq_len, config=fc)
        save_tuned(tuned_dir(results.path.parent, label, task.name, keep, n_cal), tuned,
                   pruned_cfg, selection, checkpoint, spec)
        result = score(task, small_graphdef, tuned)
        result["seconds"] = round(time.perf_counter() - start, 2)
        ft_row = finish(ft_row, result)
        info["split"] = task.calibration_split or "calibration pool"
        ft_row.update(kept_routed=selection.kept_routed.tolist(), finetune=info)
        results.add(ft_row)


def finetune_config(ft_steps) -> subset_finetune.FinetuneConfig:
  """The FinetuneConfig of --finetune_protocol and the --finetune_* flags."""
  changes = {"steps": None if ft_steps == "epoch" else ft_steps, "seed": _SEED.value}
  for flag, field in ((_FT_LR, "learning_rate"), (_FT_BATCH, "batch_size"),
                      (_FT_TRAINABLE, "trainable")):
    if _FT_PROTOCOL.value == "emo_jax" or flags.FLAGS[flag.name].present:
      changes[field] = flag.value
  return subset_finetune.protocol_config(_FT_PROTOCOL.value, **changes)


def tuned_dir(out: pathlib.Path, label: str, task: str, keep, n_cal) -> pathlib.Path:
  """Where a fine-tuned subset is saved: OUT/tuned/<model>_<task>_keep<K>_cal<n>."""
  stem = pathlib.Path(task).stem if task.endswith(".jsonl") else task.replace(":", "-")
  return out / "tuned" / f"{label}_{stem}_keep{keep}_cal{n_cal}"


def save_tuned(directory: pathlib.Path, params, cfg, selection, checkpoint: str, spec):
  """The tuned pruned model as a parameter checkpoint that generates, exports and trains like
  experiments/select_experts.py's, with its kept_experts.json and source.json."""
  if directory.exists():  # left by a run killed before its row was written
    shutil.rmtree(directory)
  ckpt_lib.save_params(directory, jax_to_numpy(params), cfg.to_dict())
  selective.write_selection(selection, directory)
  (directory / loading.SOURCE_FILE).write_text(json.dumps(
      {"checkpoint": str(pathlib.Path(checkpoint).absolute()), "tokenizer": spec}, indent=1))


def merge_tuned(out: pathlib.Path, rows, label: str, checkpoint: str, merge_out: str) -> dict:
  """The full checkpoint with each task's tuned routed experts (smallest fine-tuned subset)
  written into its bank, in task order; an expert tuned by two tasks keeps the later one."""
  ft = [r for r in rows if r["model"] == label and r["method"] == "greedy+ft"]
  if not ft:
    raise app.UsageError("--merge_out needs fine-tuned subsets: pass --finetune_steps and "
                         "keep the greedy method")
  keep = min(r["keep"] for r in ft)
  params, model_config = ckpt_lib.load_params(checkpoint)
  cfg = ModelConfig.from_dict(model_config)
  merged, owner, merged_tasks = params, {}, {}
  for r in ft:
    if r["keep"] != keep or r["task"] in merged_tasks:
      continue
    tuned, _ = ckpt_lib.load_params(tuned_dir(out, label, r["task"], keep, r["num_calibration"]))
    kept = np.asarray(r["kept_routed"], np.int64)
    selection = selective.Selection(keep=keep, kept_routed=kept, scores=np.zeros(
        (cfg.num_layers, cfg.num_routed_experts)), num_routed=cfg.num_routed_experts,
                                    num_shared=cfg.num_shared_experts, greedy=True)
    merged = subset_finetune.merge_back(merged, tuned, selection)
    overwritten = sorted({owner[(l, int(e))] for l, row in enumerate(kept) for e in row
                          if (l, int(e)) in owner})
    owner.update({(l, int(e)): r["task"] for l, row in enumerate(kept) for e in row})
    merged_tasks[r["task"]] = {"kept_routed": kept.tolist(), "overwrites_experts_of": overwritten}
  ckpt_lib.save_params(merge_out, merged, cfg.to_dict())
  (pathlib.Path(merge_out) / "merged_tasks.json").write_text(json.dumps(
      {"keep": keep, "tasks": merged_tasks}, indent=1))
  return {"merge_out": str(pathlib.Path(merge_out).absolute()), "keep": keep,
          "tasks": list(merged_tasks)}


def jax_to_numpy(params):
  return jax.tree.map(np.asarray, params)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  methods = [m.strip() for m in _METHODS.value]
  unknown = [m for m in methods if m not in subset_methods.METHODS]
  if unknown:
    raise app.UsageError(f"--methods {unknown} unknown; choose from {list(subset_methods.METHODS)}")
  if _RANDOM_SEEDS.value < 1:
    raise app.UsageError(f"--random_seeds={_RANDOM_SEEDS.value} must be >= 1")
  args = {"methods": methods, "num_calibration": parse_num_calibration(_NUM_CAL.value),
          "finetune_steps": parse_finetune_steps(_FT_STEPS.value),
          "keep_per_layer": _KEEP_PER_LAYER.value if "greedy_variable" in methods else []}
  if ("greedy_variable" in methods) != bool(_KEEP_PER_LAYER.value):
    raise app.UsageError("--methods greedy_variable and --keep_per_layer go together: the "
                         "method needs a schedule (e.g. --keep_per_layer=128,128,32,...,32)")
  if _MERGE_OUT.value and (args["finetune_steps"] is None or "greedy" not in methods):
    raise app.UsageError("--merge_out merges fine-tuned greedy subsets: pass --finetune_steps "
                         "and keep greedy in --methods")
  if _MERGE_OUT.value and (pathlib.Path(_MERGE_OUT.value) / "params").exists():
    raise app.UsageError(f"{_MERGE_OUT.value}/params already exists; choose another --merge_out")
  start = time.time()
  tasks = {}
  for name in expand_task_names(_TASKS.value):
    try:
      tasks[name] = load_task(name, limit=_LIMIT.value, num_shots=_NUM_SHOTS.value)
    except ValueError as e:  # DataError and TaskNotInstalled are ValueErrors
      raise app.UsageError(str(e)) from None
    t = tasks[name]
    print(f"{name}: {len(t.instances)} instances scored, {len(t.calibration)} calibration "
          f"examples, primary metric {t.primary_metric} ({t.source})", file=sys.stderr)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  settings = {"checkpoint": str(pathlib.Path(_CHECKPOINT.value).absolute()),
              "baseline": _BASELINE.value and str(pathlib.Path(_BASELINE.value).absolute()),
              "limit": _LIMIT.value, "num_shots": _NUM_SHOTS.value, "seq_len": _SEQ_LEN.value,
              "seed": _SEED.value, "random_seeds": _RANDOM_SEEDS.value,
              "tokenizer": _TOKENIZER.value, "finetune_steps": _FT_STEPS.value,
              "finetune_lr": _FT_LR.value, "finetune_batch": _FT_BATCH.value,
              "finetune_trainable": _FT_TRAINABLE.value}
  if _FT_PROTOCOL.value != "emo_jax":  # absent by default, so older results.json still resume
    settings["finetune_protocol"] = _FT_PROTOCOL.value
  results = Results(out, settings)
  models = [(_LABEL.value, _CHECKPOINT.value)]
  if _BASELINE.value:
    models.append((_BASELINE_LABEL.value, _BASELINE.value))
  for label, checkpoint in models:
    sweep_model(label, checkpoint, tasks, results, args)
  wanted = {(label, t) for label, _ in models for t in tasks}
  rows = [r for r in results.rows if (r["model"], r["task"]) in wanted]
  table = report.markdown_table(rows, [t.name for t in tasks.values()])
  (out / "results.md").write_text(table + "\n")
  plots.plot_selective_eval(rows, out / "results.png",
                            dashed=[_BASELINE_LABEL.value] if _BASELINE.value else [])
  print(table)
  summary = {"out": str(out.absolute()), "rows": len(rows)}
  if _MERGE_OUT.value:
    summary["merged"] = merge_tuned(out, rows, _LABEL.value, _CHECKPOINT.value, _MERGE_OUT.value)
  summary["seconds"] = round(time.time() - start, 1)
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "tasks", "out"])
  app.run(main)
