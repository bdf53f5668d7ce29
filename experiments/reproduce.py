"""The paper's claim at small scale: EMO keeps its quality on expert subsets, a StdMoE does not.

  python -m experiments.reproduce --workdir workdirs/reproduce            # ~35 min, 2-core CPU
  python -m experiments.reproduce --workdir /tmp/repro_quick --quick      # a few minutes
  python -m experiments.reproduce --workdir workdirs/repro_gpu --steps 4000 --batch_size 64  # GPU

Trains configs/demo.py (EMO) and configs/demo_stdmoe.py (the same without the document pool) with
the same data, steps and seed; then for every domain of the demo corpus selects experts from 5
training documents of that domain (greedy, EMO_SPEC.md) and measures the held-out (test split)
loss of that domain with 100, 50, 25 and 12.5 % of the experts (a routing mask on the full
weights, which equals the physically pruned model). Writes reproduce.json, reproduce.png (loss
increase over the full model against the fraction kept, EMO solid, StdMoE dashed, one colour per
domain) and reproduce.md (the table), and prints the table. Training resumes if interrupted.
"""

import importlib.util
import itertools
import json
import pathlib
import time

import numpy as np
from absl import app, flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/reproduce", "Output folder.")
_QUICK = flags.DEFINE_bool("quick", False, "A few-minute version (fewer steps and batches).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per model (default 600; quick 60).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per step (default: the demo's 16).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Held-out batches per domain "
                                     "(default 4; quick 1).")
_CALIBRATION = flags.DEFINE_integer("num_calibration", 5, "Calibration documents per domain.")
_FRACTIONS = flags.DEFINE_list("fractions", ["1", "0.5", "0.25", "0.125"],
                               "Fractions of the experts to keep.")
_ONE_PASS = flags.DEFINE_bool("one_pass", False, "One-pass instead of greedy ranking.")

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def experiment_configs(steps: int, batch_size: int | None):
  out = {}
  for label, name in (("EMO", "demo"), ("StdMoE", "demo_stdmoe")):
    config = load_config(name)
    config.train.steps = steps
    config.train.warmup_steps = max(1, min(config.train.warmup_steps, steps // 10))
    config.train.eval_every = steps  # one evaluation, at the end
    config.train.checkpoint_every = max(1, min(200, steps))
    config.train.log_every = max(1, min(20, steps))
    if batch_size:
      config.data.batch_size = batch_size
    out[label] = config
  return out


def domain_batches(corpus, dc, max_segments: int, domain: str, num_batches: int):
  """The first num_batches held-out (test split) batches of one domain, padded to full rows."""
  from emo_jax.data import corpus as corpus_lib, pipeline  # pylint: disable=import-outside-toplevel
  split = "test" if corpus.splits.get("test") else "validation"
  docs = [d for d in corpus.splits[split] if d["domain"] == domain]
  if not docs:
    raise ValueError(f"the {split} split has no documents of domain {domain!r}")
  ds = pipeline.make_dataset(docs, corpus.tokenizer, seq_len=dc.seq_len,
                             batch_size=dc.batch_size, max_segments=max_segments,
                             domains=corpus.domains, shuffle=False, num_epochs=1,
                             drop_remainder=False, shard_index=0, shard_count=1)
  return [corpus_lib.pad_batch(b, dc.batch_size) for b in itertools.islice(ds, num_batches)]


def calibration_texts(corpus, domain: str, n: int) -> list[str]:
  docs = [d for d in corpus.splits["train"] if d["domain"] == domain][:n]
  if not docs:
    raise ValueError(f"the train split has no documents of domain {domain!r}")
  return [d["text"] for d in docs]


def measure(label, config, workdir, fractions, eval_batches, num_calibration, greedy):
  """{domain: {keep: {loss, perplexity, tokens}}} for one trained model."""
  from emo_jax import checkpoint as ckpt_lib, evaluate, generate, selective  # pylint: disable=import-outside-toplevel
  from emo_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from emo_jax.data.corpus import DataConfig, load_corpus  # pylint: disable=import-outside-toplevel
  params, model_config = ckpt_lib.load_params(workdir)
  cfg = ModelConfig.from_dict(model_config)
  graphdef, params = generate.build_model(cfg, params)
  dc = DataConfig.from_dict(config.data)
  corpus = load_corpus(dc)
  sizes = sorted({min(cfg.num_experts, max(cfg.num_shared_experts + 1,
                                           int(round(float(f) * cfg.num_experts))))
                  for f in fractions}, reverse=True)
  out = {}
  for domain in corpus.domains:
    batches = domain_batches(corpus, dc, cfg.max_segments, domain, eval_batches)
    calib = [selective.calibration_batch(calibration_texts(corpus, domain, num_calibration),
                                         corpus.tokenizer, seq_len=dc.seq_len)]
    out[domain] = {}
    for keep in sizes:
      mask = None
      if keep < cfg.num_experts:
        mask = selective.select_experts(graphdef, params, cfg, calib, keep, greedy=greedy).mask
      r = evaluate.perplexity(graphdef, params, batches, corpus.domains, keep_experts=mask)
      out[domain][keep] = {"loss": r["loss"], "perplexity": r["perplexity"]}
    logging.info("%s %s: %s", label, domain,
                 {k: round(v["loss"], 3) for k, v in out[domain].items()})
  return out, cfg.num_experts


def summarize(results, num_experts):
  """Rows of the table: per model and domain, loss at each size and its increase over full."""
  rows = []
  for label, by_domain in results.items():
    for domain, by_keep in by_domain.items():
      full = by_keep[max(by_keep)]["loss"]
      rows.append({"model": label, "domain": domain,
                   **{str(k): {"loss": v["loss"], "delta": v["loss"] - full}
                      for k, v in by_keep.items()}})
    sizes = sorted(next(iter(by_domain.values())), reverse=True)
    rows.append({"model": label, "domain": "MEAN",
                 **{str(k): {"loss": float(np.mean([by_domain[d][k]["loss"] for d in by_domain])),
                             "delta": float(np.mean([by_domain[d][k]["loss"]
                                                     - by_domain[d][max(sizes)]["loss"]
                                                     for d in by_domain]))}
                    for k in sizes}})
  return rows


def format_table(rows, num_experts) -> str:
  sizes = sorted((int(k) for k in rows[0] if k not in ("model", "domain")), reverse=True)
  head = "| model | domain | " + " | ".join(
      f"{k}/{num_experts} ({100 * k / num_experts:.0f} %)" for k in sizes) + " |"
  lines = [head, "|" + "---|" * (len(sizes) + 2)]
  for r in rows:
    cells = []
    for k in sizes:
      c = r[str(k)]
      cells.append(f"{c['loss']:.3f}" if k == sizes[0] else f"{c['loss']:.3f} ({c['delta']:+.3f})")
    name = f"**{r['domain']}**" if r["domain"] == "MEAN" else r["domain"]
    lines.append(f"| {r['model']} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results, num_experts, path):
  from emo_jax.evaluate import plot_fraction_curves  # pylint: disable=import-outside-toplevel
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  curves, styles = {}, {}
  domains = sorted(next(iter(results.values())))
  for label, by_domain in results.items():
    for i, domain in enumerate(domains):
      by_keep = by_domain[domain]
      full = by_keep[max(by_keep)]["loss"]
      name = f"{label} {domain}"
      curves[name] = [(k / num_experts, v["loss"] - full) for k, v in by_keep.items()]
      styles[name] = {"color": colormaps["tab10"](i % 10),
                      "linestyle": "-" if label == "EMO" else "--"}
  return plot_fraction_curves(
      curves, path, ylabel="held-out loss increase over all experts (nats per token)",
      title="Loss of an expert subset, per domain: EMO (solid) vs StdMoE (dashed)",
      styles=styles)


def main(argv):
  cli.start(argv)
  from emo_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  quick = _QUICK.value
  steps = _STEPS.value or (60 if quick else 600)
  eval_batches = _EVAL_BATCHES.value or (1 if quick else 4)
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  configs = experiment_configs(steps, _BATCH.value)
  timings, results, num_experts = {}, {}, None
  for label, config in configs.items():
    start = time.time()
    train_and_evaluate(config, workdir / label.lower())
    timings[f"train_{label}_s"] = round(time.time() - start, 1)
  for label, config in configs.items():
    start = time.time()
    results[label], num_experts = measure(label, config, workdir / label.lower(),
                                          _FRACTIONS.value, eval_batches, _CALIBRATION.value,
                                          greedy=not _ONE_PASS.value)
    timings[f"measure_{label}_s"] = round(time.time() - start, 1)
  rows = summarize(results, num_experts)
  table = format_table(rows, num_experts)
  command = ("python -m experiments.reproduce " + f"--workdir {workdir}" +
      (" --quick" if quick else "") +
      (f" --steps {_STEPS.value}" if _STEPS.value else "") +
      (f" --batch_size {_BATCH.value}" if _BATCH.value else ""))
  out = {"command": command, "steps": steps, "eval_batches_per_domain": eval_batches,
         "num_calibration": _CALIBRATION.value, "greedy": not _ONE_PASS.value,
         "num_experts": num_experts, "timings": timings,
         "results": {m: {d: {str(k): v for k, v in by_keep.items()}
                         for d, by_keep in by_domain.items()} for m, by_domain in results.items()},
         "table": rows}
  (workdir / "reproduce.json").write_text(json.dumps(out, indent=1))
  plot(results, num_experts, workdir / "reproduce.png")
  (workdir / "reproduce.md").write_text(
      f"`{command}`\n\nHeld-out loss per domain (increase over all experts in brackets)\n\n"
      f"{table}\n")
  print(table)
  print(json.dumps({"out": str(workdir.absolute()), **timings}))


if __name__ == "__main__":
  app.run(main)
