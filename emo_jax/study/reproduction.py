"""The paper's selective-expert study at small scale: which models, on which data, measured how.

experiments/reproduce.py runs it; this module holds its pieces so each can be tested alone:

* the models: EMO, its StdMoE twin, EMO-anneal (the trained StdMoE continued on top of its
  checkpoint with the document pool on, the learning rate decaying linearly to 0) and the
  memory-matched models trained from scratch (a dense model and a small StdMoE with the
  parameter count of a subset of the EMO bank);
* a cache of trained models keyed by a hash of every field that changes training, so adding a
  seed or a baseline trains only what is new;
* held-out domains: a data folder that is the training corpus minus one domain, so the study
  can select experts for, and evaluate on, text the model never trained on;
* the measurement: per domain, experts selected from 1, 5 or all calibration documents (or at
  random, the floor) at each subset size, and the held-out loss with that routing mask; per
  benchmark, the same with bits per byte of the gold answers (tasks/bpb.py), experts selected
  from the task's own held-out examples.

The README's "The paper's claim at small scale" section shows the command and its table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import pathlib
import time
from typing import Any, Mapping, Sequence

import numpy as np

from emo_jax.config import ModelConfig
from emo_jax.data import corpus as corpus_lib, pipeline, sources
from emo_jax.convert import loading
from emo_jax.model.transformer import count_params
from emo_jax.study import calibration, selective
from emo_jax.tasks import bpb
from emo_jax.train import evaluate
from emo_jax.train.experiment import Experiment
from emo_jax.train.trainer import train_and_evaluate

log = logging.getLogger(__name__)

# Fractions of the bank the study keeps: the paper's 128, 64, 32, 16 and 8 of 128 experts.
DEFAULT_FRACTIONS = selective.PAPER_FRACTIONS
# Subsets whose parameter count the memory-matched models get (the paper: 16 of 128 ~ dense 1B).
MATCHED_FRACTIONS = (0.25, 0.125)
# Calibration sets: the first 1 and 5 documents of a domain, and all of its calibration pool.
CALIBRATIONS = ("1", "5", "all")
# Benchmarks scored in bits per byte (tasks/bpb.py): code and math, the paper's task domains.
BPB_TASKS = ("mt_mbpp_python", "codex_humaneval", "minerva_math_algebra", "gsm8k")
# Fields that change how a run logs, evaluates or checkpoints but not the parameters it trains.
UNKEYED_FIELDS = {
    "train": ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
              "async_checkpoint", "peak_flops"),
    "data": ("num_workers",),
    "execution": ("decode_loop_tokens",),   # decoding only: training never reads it
}
# Fields that came after models were first cached: left out of the key while at these values
# (which train exactly as before they existed), so the models already cached keep their keys.
LATER_FIELDS = {
    "model": {"lb_scope_sequences": 0},
    "train": {"continue_from": "", "continue_data_position": True},
    "data": {"repetition_filter": False, "repetition_min_period": 1,
             "repetition_max_period": 13, "repetition_max_count": 32},
}


class StudyError(ValueError):
  """A study setting that cannot be honoured; the message names the flag or field."""


# ---- the models -------------------------------------------------------------------------------------
def training_key(config) -> str:
  """12 hex digits that change whenever a field that changes the trained parameters does.

  Architecture, execution (the capacity backend's drops change results; minus decode-only
  settings), data (minus worker count) and train settings (minus logging, evaluation and
  checkpoint cadence) are hashed after filling in defaults, so spelling a default out does not
  change the key; LATER_FIELDS at their neutral values are left out, so a new field does not
  orphan the cache. The mesh is left out: results agree across meshes to rounding.
  """
  experiment = Experiment.from_config(config)
  keyed = {"model": experiment.model.to_dict(), "execution": experiment.execution.to_dict(),
           "data": experiment.data.to_dict(), "train": experiment.train.to_dict()}
  for section, names in UNKEYED_FIELDS.items():
    for name in names:
      keyed[section].pop(name)
  train = keyed["train"]
  for section, defaults in LATER_FIELDS.items():
    for name, value in defaults.items():
      if keyed[section].get(name) == value:
        keyed[section].pop(name)
  if train.get("continue_from"):  # a cached model's folder name holds its own key
    train["continue_from"] = pathlib.Path(train["continue_from"]).name
  return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def with_seed(config, seed: int) -> Experiment:
  """The experiment with its initialisation, pool draws and data order all from `seed`."""
  e = Experiment.from_config(config)
  return e.replace(train=e.train.replace(seed=int(seed)), data=e.data.replace(seed=int(seed)))


def stdmoe_config(config) -> Experiment:
  """The same experiment without the document pool."""
  e = Experiment.from_config(config)
  return e.replace(model=e.model.replace(pool=False))


def _model(config) -> ModelConfig:
  return Experiment.from_config(config).model


def matched_dense_hidden(cfg: ModelConfig, keep: int) -> int:
  """mlp_hidden of a dense model with as many parameters as `cfg` pruned to `keep` experts."""
  target = selective.pruned_param_count(cfg, keep)
  dense = cfg.replace(num_experts=0, pool=False, mlp_hidden=1)
  base = count_params(dense)["total_params"] - 3 * cfg.d_model * cfg.num_layers
  return max(1, int(round((target - base) / (3 * cfg.d_model * cfg.num_layers))))


def memory_matched_config(config, keep: int, kind: str):
  """A model trained from scratch with the parameter count of `config` pruned to `keep` experts:
  kind "dense" (a SwiGLU MLP of matched width) or "moe" (keep - shared routed experts + the
  shared ones, no pool)."""
  e = Experiment.from_config(config)
  cfg = e.model
  if kind == "dense":
    model = cfg.replace(mlp_hidden=matched_dense_hidden(cfg, keep), num_experts=0, pool=False)
  elif kind == "moe":
    top_k = min(cfg.top_k, keep - cfg.num_shared_experts)
    model = cfg.replace(num_experts=keep, top_k=top_k, pool=False, pool_max=keep,
                        pool_min=min(max(cfg.pool_min, top_k), keep))
  else:
    raise StudyError(f"memory-matched kind {kind!r} is unknown: use 'dense' or 'moe'")
  return e.replace(model=model)


def anneal_config(config, fraction: float, stdmoe_workdir: str | pathlib.Path) -> Experiment:
  """EMO-anneal as the paper: the trained StdMoE twin continued with the document pool on.

  The anneal trains `fraction` of EMO's steps on top of the StdMoE's last checkpoint
  (train.continue_from: its parameters, Adam moments, step count and data position), the
  learning rate falling linearly to 0 from the rate the StdMoE ended at, with no warm-up
  (docs/algorithm.md, "Training recipe"). It trains that many tokens more than EMO.
  """
  if not 0 < fraction <= 1:
    raise StudyError(f"--anneal_fraction={fraction} must be in (0, 1]")
  e = Experiment.from_config(config)
  anneal_steps = max(1, int(round(fraction * e.train.steps)))
  return e.replace(model=e.model.replace(pool=True),
                   train=e.train.replace(steps=anneal_steps, schedule_steps=0,
                                         schedule="linear_from_checkpoint", warmup_steps=0,
                                         continue_from=str(stdmoe_workdir)))


@dataclasses.dataclass
class Trained:
  label: str
  seed: int
  path: str
  key: str
  seconds: float
  cached: bool
  summary: dict

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def train_cached(label: str, config, models_dir: pathlib.Path, seed: int) -> Trained:
  """Trains `config` into models_dir/<label>-s<seed>-<key>, or reuses a finished run there.

  An interrupted run resumes from its last checkpoint (the trainer's own resume)."""
  config = Experiment.from_config(config)
  key = training_key(config)
  slug = "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
  path = models_dir / f"{slug}-s{seed}-{key}"
  done = path / "done.json"
  if done.is_file():
    record = json.loads(done.read_text())
    if record.get("key") == key:
      log.info("%s seed %d: reusing the trained model in %s", label, seed, path)
      return Trained(label, seed, str(path), key, record["seconds"], True, record["summary"])
  start = time.time()
  log.info("%s seed %d: training %d steps into %s", label, seed, config.train.steps, path)
  last = train_and_evaluate(config, path)
  seconds = round(time.time() - start, 1)
  reached = last_logged_step(path)
  if reached < config.train.steps:
    raise StudyError(f"{label} seed {seed} stopped before step {config.train.steps} (its log ends "
                     f"at step {reached}"
                     "); run the same command again to resume it from its checkpoint in "
                     f"{path}")
  counts = count_params(config.model)
  summary = {k: v for k, v in last.items() if k.startswith(("val_", "unigram_val_"))}
  summary.update(counts, steps=int(config.train.steps), loss=last.get("loss"))
  done.write_text(json.dumps({"key": key, "seconds": seconds, "summary": summary}, indent=1))
  return Trained(label, seed, str(path), key, seconds, False, summary)


def last_logged_step(workdir: pathlib.Path) -> int:
  """The last step a training run logged (0 when it logged none)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return 0
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  return int(json.loads(lines[-1])["step"]) if lines else 0


# ---- held-out domains ---------------------------------------------------------------------------------
def base_tokenizer(dc: corpus_lib.DataConfig) -> str:
  """The tokenizer file (or "bytes") of a prepared corpus, to reuse for a derived one."""
  if dc.tokenizer:
    return dc.tokenizer
  data_dir = pathlib.Path(dc.data_dir) if dc.data_dir else corpus_lib.default_data_dir(dc)
  summary = json.loads((data_dir / corpus_lib.RESULT_FILE).read_text())
  return summary["tokenizer"]


def write_holdout_data(splits: Mapping[str, Sequence[Mapping]], domain: str,
                       out_dir: pathlib.Path, tokenizer: str, vocab_size: int) -> pathlib.Path:
  """A prepared data folder holding every split of `splits` except the documents of `domain`.

  It reuses the base corpus's tokenizer, so losses stay comparable with the models trained on
  the whole corpus. Returns the folder; config.data.corpus must be its train.jsonl path (what
  its prepare_data.json records) and config.data.data_dir the folder.
  """
  if not any(d["domain"] == domain for split in splits.values() for d in split):
    found = sorted({d["domain"] for split in splits.values() for d in split})
    raise StudyError(f"--holdout {domain!r} is not a domain of the corpus; its domains are "
                     f"{found}")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  domains: dict[str, dict] = {}
  counts = {}
  for split in sources.SPLITS:
    kept = [d for d in splits.get(split, []) if d["domain"] != domain]
    counts[split] = sources.write_jsonl(kept, out_dir / f"{split}.jsonl")
    for d in kept:
      entry = domains.setdefault(d["domain"], {"documents": 0, "bytes": 0})
      entry["documents"] += 1
      entry["bytes"] += len(d["text"].encode("utf-8"))
  summary = {"domains": domains, "total_bytes": sum(d["bytes"] for d in domains.values()),
             "splits": counts, "tokenizer": tokenizer, "vocab_size": vocab_size,
             "skipped": {}, "tokenizer_sample": None, "out": str(out_dir.absolute()),
             "seconds": {}, "held_out": domain,
             "settings": {"corpus": str((out_dir / "train.jsonl").absolute()),
                          "tokenizer": tokenizer if tokenizer == "bytes" else ""}}
  (out_dir / corpus_lib.RESULT_FILE).write_text(json.dumps(summary, indent=1) + "\n")
  return out_dir


def holdout_config(config, data_dir: pathlib.Path) -> Experiment:
  """The experiment trained on a folder written by write_holdout_data."""
  e = Experiment.from_config(config)
  summary = json.loads((data_dir / corpus_lib.RESULT_FILE).read_text())
  return e.replace(data=e.data.replace(corpus=summary["settings"]["corpus"],
                                       data_dir=str(data_dir.absolute()),
                                       tokenizer=summary["settings"]["tokenizer"]))


# ---- what is measured -----------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalSet:
  """One domain of the study: documents to select experts from and documents to score."""
  domain: str
  group: str                 # "trained", "held-out" or "eval-corpus"
  calibration: list[str]     # texts, in a fixed order; "1" and "5" take the first ones
  documents: list[dict]      # scored documents


def corpus_eval_sets(corpus, holdout: str | None, pool: int) -> list[EvalSet]:
  """Every domain of the corpus: calibration from its train split (first `pool` documents),
  scoring on its test split (validation when test is empty)."""
  split = "test" if corpus.splits.get("test") else "validation"
  sets = []
  for domain in corpus.domains:
    texts = [d["text"] for d in corpus.splits["train"] if d["domain"] == domain][:pool]
    documents = [d for d in corpus.splits[split] if d["domain"] == domain]
    if not texts or not documents:
      raise StudyError(f"domain {domain!r} has {len(texts)} train and {len(documents)} "
                       f"{split} documents; the study needs both")
    sets.append(EvalSet(domain, "held-out" if domain == holdout else "trained", texts,
                        documents))
  return sets


def file_eval_sets(path: str, pool: int) -> list[EvalSet]:
  """Domains of a JSONL file of {text, domain} documents outside the training corpus: per
  domain the first half (at most `pool`) calibrates, the rest is scored."""
  try:
    docs = list(sources.load_documents(path))
  except (OSError, ValueError) as e:
    raise StudyError(f"--eval_corpus {path}: {e}") from None
  by_domain: dict[str, list[dict]] = {}
  for d in docs:
    by_domain.setdefault(d["domain"], []).append(d)
  if not by_domain:
    raise StudyError(f"--eval_corpus {path} holds no documents")
  sets = []
  for domain, group in sorted(by_domain.items()):
    if len(group) < 2:
      raise StudyError(f"--eval_corpus {path}: domain {domain!r} has {len(group)} document; "
                       "each domain needs at least 2 (one to calibrate, one to score)")
    n = min(pool, len(group) // 2)
    sets.append(EvalSet(domain, "eval-corpus", [d["text"] for d in group[:n]], group[n:]))
  return sets


def scoring_batches(documents, tokenizer, *, seq_len: int, batch_size: int, max_segments: int,
                    num_batches: int) -> list[dict]:
  """The first `num_batches` packed batches of the documents, in order, padded to full rows."""
  ds = pipeline.make_dataset(documents, tokenizer, seq_len=seq_len, batch_size=batch_size,
                             max_segments=max_segments, shuffle=False, num_epochs=1,
                             drop_remainder=False, shard_index=0, shard_count=1)
  return [corpus_lib.pad_batch(b, batch_size) for b in itertools.islice(ds, num_batches)]


def calibration_counts(num_available: int, calibrations: Sequence[str]) -> dict[str, int]:
  """Documents each calibration set uses: "1" -> 1, "5" -> 5, "all" -> every one available."""
  out = {}
  for c in calibrations:
    if c == "all":
      out[c] = num_available
    elif c.isdigit() and int(c) > 0:
      out[c] = min(int(c), num_available)
    else:
      raise StudyError(f"--calibrations holds {c!r}: use positive counts or 'all'")
  return out


def random_mask(cfg: ModelConfig, keep: int, rng: np.random.Generator) -> np.ndarray:
  """bool [layers, routed]: keep - shared routed experts per layer, uniformly at random."""
  n = keep - cfg.num_shared_experts
  mask = np.zeros((cfg.num_layers, cfg.num_routed_experts), bool)
  for layer in range(cfg.num_layers):
    mask[layer, rng.choice(cfg.num_routed_experts, n, replace=False)] = True
  return mask


def _subset_scores(graphdef, params, cfg: ModelConfig, sizes: Sequence[int], score,
                   calibration_texts: Sequence[str], tokenizer, *, calibrations: Sequence[str],
                   seq_len: int, batch_size: int, greedy: bool, random_floor: bool,
                   random_key: tuple[int, int]) -> dict[str, Any]:
  """score(mask) with all experts, with experts selected from the first 1, 5, ... calibration
  texts at each subset size, and (random_floor) with random experts drawn from random_key =
  (seed, eval set index): the cell layout that measure_model and measure_bpb share."""
  r = {"full": score(None), "select": {}, "random": {}, "calibration_documents": {}}
  counts = calibration_counts(len(calibration_texts), calibrations)
  for name, n in counts.items() if sizes else ():
    calib = calibration.calibration_batches(list(calibration_texts[:n]), tokenizer,
                                            seq_len=seq_len, rows=batch_size, full_width=True)
    r["calibration_documents"][name] = n
    r["select"][name] = {}
    for keep in sizes:
      mask = selective.select_experts(graphdef, params, cfg, calib, keep, greedy=greedy).mask
      r["select"][name][str(keep)] = score(mask)
  if random_floor:
    for keep in sizes:
      seed, index = random_key
      r["random"][str(keep)] = score(random_mask(cfg, keep, np.random.default_rng(
          [seed, keep, index])))
  return r


def _progress(label: str, name: str, i: int, total: int, kind: str, r: Mapping, start: float):
  elapsed = time.time() - start
  log.info("measured %s on %s (%d/%d, %s): full %.3f, %s; %.0f s, ETA %.0f s", label, name,
           i + 1, total, kind, r["full"],
           {c: {k: round(v - r["full"], 3) for k, v in s.items()}
            for c, s in r["select"].items()}, elapsed, elapsed / (i + 1) * (total - i - 1))


def measure_model(path: str, eval_sets: Sequence[EvalSet], tokenizer, *, fractions,
                  calibrations: Sequence[str], seq_len: int, batch_size: int,
                  num_batches: int, random_floor: bool, seed: int, greedy: bool = True,
                  label: str = "") -> dict[str, Any]:
  """Losses of one trained model on every eval set.

  {domain: {"full": loss, "select": {calibration: {keep: loss}}, "random": {keep: loss},
  "calibration_documents": {calibration: n}, "tokens": scored tokens}}; a dense model (or a
  bank no larger than the smallest subset) has only "full".
  """
  cfg, graphdef, params = loading.load_model(path)
  sizes = selective.subset_sizes(cfg, fractions)[1:] if cfg.is_moe else []
  out = {}
  start = time.time()
  for i, es in enumerate(eval_sets):
    batches = scoring_batches(es.documents, tokenizer, seq_len=seq_len, batch_size=batch_size,
                              max_segments=cfg.max_segments, num_batches=num_batches)
    score = lambda mask, b=batches: evaluate.perplexity(graphdef, params, b, [],
                                                        keep_experts=mask)["loss"]
    r = _subset_scores(graphdef, params, cfg, sizes, score, es.calibration, tokenizer,
                       calibrations=calibrations, seq_len=seq_len, batch_size=batch_size,
                       greedy=greedy, random_floor=random_floor, random_key=(seed, i))
    r["tokens"] = int(sum(np.sum(b["loss_mask"]) for b in batches))
    out[es.domain] = r
    _progress(label, es.domain, i, len(eval_sets), es.group, r, start)
  return {"num_experts": cfg.num_experts, "active_experts": selective.active_experts(cfg)
          if cfg.is_moe else 0, "domains": out}


def measure_bpb(path: str, tasks: Sequence[bpb.BpbTask], tokenizer, *, fractions,
                calibrations: Sequence[str], seq_len: int, batch_size: int, random_floor: bool,
                seed: int, greedy: bool = True, label: str = "") -> dict[str, Any]:
  """Bits per byte of each task's gold continuations, with all experts and with experts
  selected from the task's own calibration examples (the paper's task-level protocol), in
  measure_model's layout: {"domains": {task: {"full": bpb, "select": ..., "random": ...}}}."""
  cfg, graphdef, params = loading.load_model(path)
  sizes = selective.subset_sizes(cfg, fractions)[1:] if cfg.is_moe else []
  out = {}
  start = time.time()
  for i, task in enumerate(tasks):
    score = lambda mask, t=task: bpb.evaluate_bpb(graphdef, params, tokenizer, t,
                                                  max_len=seq_len, keep_experts=mask,
                                                  batch_size=batch_size)["bpb"]
    r = _subset_scores(graphdef, params, cfg, sizes, score, task.calibration_texts(), tokenizer,
                       calibrations=calibrations, seq_len=seq_len, batch_size=batch_size,
                       greedy=greedy, random_floor=random_floor, random_key=(seed, 1000 + i))
    r["instances"] = len(task.items)
    out[task.name] = r
    _progress(label, task.name, i, len(tasks), "bits per byte", r, start)
  return {"num_experts": cfg.num_experts, "active_experts": selective.active_experts(cfg)
          if cfg.is_moe else 0, "domains": out}
