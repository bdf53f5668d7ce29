"""The selective-evaluation table in the paper's layout: one row per (model, subset, method),
one column per task (its primary metric x 100), and the average over tasks."""

from __future__ import annotations

from typing import Any, Sequence

METHOD_ORDER = ("full", "greedy", "greedy+ft", "global", "easy_ep", "random", "greedy_variable")


def _order(row: dict[str, Any]) -> tuple:
  keep = row["keep"]
  if keep == "all":
    keep = -1
  elif isinstance(keep, str):  # a schedule "K0,K1,...": ordered by its mean K
    sizes = [int(k) for k in keep.split(",")]
    keep = sum(sizes) / len(sizes)
  method = METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER else 99
  n_cal = row.get("num_calibration")
  n_cal = -1 if n_cal is None else (10**9 if n_cal == "all" else n_cal)
  return (keep, method, n_cal)


def markdown_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
  """Markdown table; a cell is blank where that task has no row, the average needs all."""
  models = list(dict.fromkeys(r["model"] for r in rows))
  groups: dict[tuple, dict[str, float]] = {}
  meta: dict[tuple, dict[str, Any]] = {}
  for r in rows:
    key = (models.index(r["model"]),) + _order(r)
    groups.setdefault(key, {})[r["task"]] = r["primary"]
    meta[key] = r
  header = ["model", "experts kept", "method", "calibration"] + list(tasks) + ["avg"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for key in sorted(groups):
    r, scores = meta[key], groups[key]
    cells = [f"{100 * scores[t]:.1f}" if t in scores else "" for t in tasks]
    avg = (f"{100 * sum(scores[t] for t in tasks) / len(tasks):.1f}"
           if all(t in scores for t in tasks) else "")
    n_cal = r.get("num_calibration")
    lines.append("| " + " | ".join([r["model"], str(r["keep"]), r["method"],
                                     "" if n_cal is None else str(n_cal)] + cells + [avg]) + " |")
  return "\n".join(lines)
