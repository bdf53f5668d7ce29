"""Rows, statistics over seeds and Markdown tables of the selective-expert study
(reproduction.py measures, this module summarises).

Every cell is a mean over seeds with its sample standard deviation. A model's difference from
EMO in a cell is "within noise" when the mean of the per-seed differences (seeds pair up: the
same seed means the same data order) is smaller than two standard errors of that mean; with a
single seed there is no noise estimate and nothing is marked.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

REFERENCE = "EMO"
MAIN_CALIBRATION = "5"
# The group of a benchmark scored in bits per byte (reproduction.measure_bpb): one row each.
BPB_GROUP = "bpb-task"


def stats(values: Sequence[float]) -> dict[str, Any]:
  values = [float(v) for v in values]
  n = len(values)
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if n > 1 else None,
          "n": n, "values": values}


def within_noise(a: Sequence[float], b: Sequence[float]) -> bool | None:
  """Whether paired per-seed values a and b differ by less than two standard errors; None with
  one seed."""
  d = np.asarray(a, float) - np.asarray(b, float)
  if len(d) < 2:
    return None
  se = float(np.std(d, ddof=1)) / math.sqrt(len(d))
  return bool(abs(float(np.mean(d))) < 2 * se)


def _per_seed(measures: Mapping[int, Mapping], domains: Sequence[str], fn):
  """fn(domain result) averaged over `domains`, one value per seed (None when fn gives None)."""
  out = []
  for seed in sorted(measures):
    vals = [fn(measures[seed]["domains"][d]) for d in domains]
    if any(v is None for v in vals):
      return None
    out.append(float(np.mean(vals)))
  return out


def domain_groups(eval_groups: Mapping[str, str]) -> list[tuple[str, str, list[str]]]:
  """(row name, group, domains averaged) in table order: the trained domains' mean, each
  held-out domain, the eval-corpus mean, each eval-corpus domain, each trained domain, then
  each bits-per-byte task."""
  trained = [d for d, g in eval_groups.items() if g == "trained"]
  held = [d for d, g in eval_groups.items() if g == "held-out"]
  extra = [d for d, g in eval_groups.items() if g == "eval-corpus"]
  out = []
  if trained:
    out.append((f"trained domains (mean of {len(trained)})", "trained-mean", trained))
  out += [(d, "held-out", [d]) for d in held]
  if len(extra) > 1:
    out.append((f"eval corpus (mean of {len(extra)})", "eval-corpus-mean", extra))
  out += [(d, "eval-corpus", [d]) for d in extra]
  out += [(d, "trained", [d]) for d in trained]
  out += [(d, BPB_GROUP, [d]) for d, g in eval_groups.items() if g == BPB_GROUP]
  return out


def build_rows(results: Mapping[str, Mapping[int, Mapping]], trained: Mapping[str, Sequence],
               eval_groups: Mapping[str, str], matched: Mapping[str, int]) -> list[dict]:
  """One row per model and domain group.

  results: label -> seed -> reproduction.measure_model output. trained: label -> list of
  reproduction.Trained (per seed). eval_groups: domain -> group. matched: label of a
  memory-matched model -> the subset size it matches.
  """
  rows = []
  ref = results.get(REFERENCE)
  for label, measures in results.items():
    num_experts = next(iter(measures.values()))["num_experts"]
    for name, group, domains in domain_groups(eval_groups):
      full = _per_seed(measures, domains, lambda r: r["full"])
      row = {"model": label, "domain": name, "group": group, "domains": domains,
             "checkpoints": [t.path for t in trained[label]],
             "params": trained[label][0].summary.get("total_params"),
             "active_params": trained[label][0].summary.get("active_params"),
             "full": stats(full), "subsets": {}}
      ref_full = _per_seed(ref, domains, lambda r: r["full"]) if ref else None
      if ref_full:
        row["vs_emo_full"] = stats(np.subtract(full, ref_full))
      first = next(iter(measures.values()))["domains"][domains[0]]
      for keep in (first["select"].get(MAIN_CALIBRATION) or {}):
        cell = {"fraction": int(keep) / num_experts, "calibration": {}}
        for calib in first["select"]:
          loss = _per_seed(measures, domains, lambda r, c=calib, k=keep: r["select"][c][k])
          cell["calibration"][calib] = {
              "documents": first["calibration_documents"][calib],
              "loss": stats(loss), "delta": stats(np.subtract(loss, full))}
        main = cell["calibration"][MAIN_CALIBRATION]
        cell["loss"], cell["delta"] = main["loss"], main["delta"]
        if first["random"]:
          loss = _per_seed(measures, domains, lambda r, k=keep: r["random"][k])
          cell["random_delta"] = stats(np.subtract(loss, full))
        if ref and label != REFERENCE:
          ref_cell = _per_seed(ref, domains, lambda r, k=keep: r["select"][MAIN_CALIBRATION][k])
          ref_delta = np.subtract(ref_cell, ref_full)
          cell["within_noise_of_emo"] = within_noise(cell["delta"]["values"], ref_delta)
        if ref_full:
          cell["vs_emo_full"] = stats(np.subtract(main["loss"]["values"], ref_full))
        row["subsets"][keep] = cell
      if label in matched and ref:
        keep = str(matched[label])
        ref_loss = _per_seed(ref, domains, lambda r, k=keep: r["select"][MAIN_CALIBRATION][k])
        row["matched_keep"] = matched[label]
        row["matched_fraction"] = matched[label] / next(iter(ref.values()))["num_experts"]
        row["vs_emo_subset"] = stats(np.subtract(full, ref_loss))
        row["emo_subset_loss"] = stats(ref_loss)
      rows.append(row)
  return rows


def _pm(s: Mapping | None, signed: bool = True) -> str:
  if s is None:
    return "-"
  text = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
  if s.get("std") is not None:
    text += f" ± {s['std']:.3f}"
  return text


def _percent(fraction: float) -> str:
  return f"{100 * fraction:.3g} %"


def results_table(rows: Sequence[Mapping], *, random_floor: bool = True,
                  groups: Sequence[str] | None = None, metric: str = "loss",
                  item: str = "domain") -> str:
  """`metric` (loss, or bits per byte) with all experts and its increase at each subset
  (experts selected from the main calibration set), per model and domain group (all, or those
  in `groups`; `item` names the column); "≈" marks a cell within noise of EMO's."""
  moe = [r for r in rows if r["subsets"] and (groups is None or r["group"] in groups)]
  if not moe:
    return ""
  keeps = list(moe[0]["subsets"])
  num = round(int(keeps[0]) / moe[0]["subsets"][keeps[0]]["fraction"])
  head = (f"| model | {item} | all experts: {metric} | " + " | ".join(
      f"{k}/{num} ({_percent(int(k) / num)})" for k in keeps) + " |")
  lines = [head, "|" + "---|" * (len(keeps) + 3)]
  order = list(dict.fromkeys(r["domain"] for r in moe))
  for domain in order:
    for r in (r for r in moe if r["domain"] == domain):
      cells = []
      for k in keeps:
        c = r["subsets"][k]
        mark = " ≈" if c.get("within_noise_of_emo") else ""
        cells.append(_pm(c["delta"]) + mark)
      lines.append(f"| {r['model']} | {domain} | {_pm(r['full'], False)} | "
                   + " | ".join(cells) + " |")
      if random_floor and all("random_delta" in r["subsets"][k] for k in keeps):
        lines.append(f"| {r['model']}, random experts | {domain} | {_pm(r['full'], False)} | "
                     + " | ".join(_pm(r["subsets"][k]["random_delta"]) for k in keeps) + " |")
  return "\n".join(lines)


def matched_table(rows: Sequence[Mapping]) -> str:
  """Memory-matched models against the EMO subset of equal parameter count."""
  matched = [r for r in rows if "matched_keep" in r]
  if not matched:
    return ""
  lines = ["| model | params | domain | loss | EMO subset of that size: loss | model - EMO subset |",
           "|---|---|---|---|---|---|"]
  for r in matched:
    lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['domain']} | "
                 f"{_pm(r['full'], False)} | {_pm(r['emo_subset_loss'], False)} | "
                 f"{_pm(r['vs_emo_subset'])} |")
  return "\n".join(lines)


def calibration_table(rows: Sequence[Mapping], groups=("trained-mean", "held-out",
                                                        "eval-corpus-mean")) -> str:
  """Loss increase with experts selected from 1, 5 or all calibration documents."""
  chosen = [r for r in rows if r["subsets"] and r["group"] in groups]
  if not chosen:
    return ""
  calibs = list(next(iter(chosen[0]["subsets"].values()))["calibration"])
  lines = ["| model | domain | subset | " + " | ".join(
      f"{c} documents" if c != "all" else "all documents" for c in calibs) + " |",
           "|" + "---|" * (len(calibs) + 3)]
  for r in chosen:
    for k, cell in r["subsets"].items():
      counts = [cell["calibration"][c]["documents"] for c in calibs]
      lines.append(f"| {r['model']} | {r['domain']} | {_percent(cell['fraction'])} | "
                   + " | ".join(f"{_pm(cell['calibration'][c]['delta'])} ({n})"
                                for c, n in zip(calibs, counts)) + " |")
  return "\n".join(lines)


def models_table(trained: Mapping[str, Sequence]) -> str:
  lines = ["| model | seeds | params (active) | steps | validation ppl | unigram ppl | train s |",
           "|---|---|---|---|---|---|---|"]
  for label, runs in trained.items():
    s = runs[0].summary
    ppl = [t.summary.get("val_perplexity") for t in runs]
    ppl_text = ", ".join(f"{p:.1f}" for p in ppl if p is not None) or "-"
    unigram = s.get("unigram_val_perplexity")
    seconds = " + ".join(f"{t.seconds:.0f}{' (cached)' if t.cached else ''}" for t in runs)
    lines.append(f"| {label} | {','.join(str(t.seed) for t in runs)} | "
                 f"{s['total_params'] / 1e6:.2f} M ({s['active_params'] / 1e6:.2f} M) | "
                 f"{s['steps']} | {ppl_text} | {f'{unigram:.1f}' if unigram else '-'} | "
                 f"{seconds} |")
  return "\n".join(lines)


def clustering_table(clusters: Mapping[str, Mapping] | None) -> str:
  if not clusters:
    return ""
  top = next((c["expert_share_top"] for c in clusters.values() if "expert_share_top" in c), 8)
  lines = [f"| model | concentration | purity | NMI | share in its top {top} experts |",
           "|---|---|---|---|---|"]
  for name, c in clusters.items():
    share = f"{c['expert_share']:.3f}" if "expert_share" in c else "-"  # older results lack it
    lines.append(f"| {name} | {c['concentration']:.3f} | {c['purity']:.3f} | {c['nmi']:.3f} | "
                 f"{share} |")
  return "\n".join(lines)
