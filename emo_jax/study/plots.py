"""PNG figures of the routing analysis (analysis.py) and of training runs.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`, no pyplot), so
they render headless and never change the backend of a notebook that imports this module.
Every function takes one `analysis.Analysis` per model and puts the models side by side
(EMO beside its StdMoE baseline when both are given).
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

DPI = 110
# The largest number of layers drawn in one expert-usage figure; more layers go to more files.
LAYERS_PER_FIGURE = 8


def _colors(n: int) -> list:
  """n distinguishable colours: tab10 up to 10, then tab20 + tab20b (+ tab20c), then hsv."""
  if n <= 10:
    return [colormaps["tab10"](i) for i in range(n)]
  pool = ([colormaps["tab20"](i) for i in range(20)] + [colormaps["tab20b"](i) for i in range(20)]
          + [colormaps["tab20c"](i) for i in range(20)])
  if n <= len(pool):
    return pool[:n]
  return [colormaps["hsv"](i / n) for i in range(n)]


def percent(fraction: float) -> str:
  """0.125 -> '12.5%', 0.25 -> '25%', 2 / 17 -> '11.8%'."""
  return f"{100 * fraction:.3g}%"


def fraction_axis(ax, fractions: Sequence[float],
                  label: str = "experts kept (% of all experts)") -> None:
  """A log-2 x axis of the fraction of experts kept, ticked at the measured fractions and
  labelled in percent, as the tables print them (not 2^-3 ... 2^0)."""
  ax.set_xscale("log", base=2)
  ticks = sorted({float(f) for f in fractions})
  ax.set_xticks(ticks, [percent(f) for f in ticks])
  ax.xaxis.set_minor_locator(NullLocator())
  ax.set_xlabel(label)


# Long enough that a dashed line with a marker in the middle still shows its dashes.
LEGEND_HANDLE_LENGTH = 4.0


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return path


def plot_projection(results: Sequence, domains: Sequence[str], path: str | pathlib.Path):
  """Tokens in the first two principal components of their normalised routing vectors, coloured
  by domain (left) and by cluster (right, cluster ids written at their medians); one row per
  model."""
  fig = Figure(figsize=(12, 5.2 * len(results)), layout="constrained")
  axes = np.atleast_2d(fig.subplots(len(results), 2, squeeze=False))
  domain_colors = _colors(len(domains))
  for row, r in zip(axes, results):
    xy = r.projection
    dom = r.token_domain[r.projection_index]
    lab = r.labels[r.projection_index]
    size = 4 if len(xy) > 5000 else 8
    for d, name in enumerate(domains):
      m = dom == d
      row[0].scatter(xy[m, 0], xy[m, 1], s=size, alpha=0.5, color=domain_colors[d],
                     label=f"{name} ({int(m.sum())})", linewidths=0)
    row[0].legend(markerscale=3, fontsize=8, loc="best", framealpha=0.8)
    row[0].set_title(f"{r.name}: tokens by domain")
    k = r.cluster_domain.shape[0]
    cluster_colors = _colors(k)
    row[1].scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.5, linewidths=0,
                   c=[cluster_colors[c] for c in lab])
    for c in np.unique(lab):
      cx, cy = np.median(xy[lab == c], axis=0)
      row[1].text(cx, cy, str(c), fontsize=8 if k <= 12 else 6, ha="center", va="center",
                  weight="bold",
                  bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7, lw=0))
    s = r.summary
    row[1].set_title(f"{r.name}: {k} clusters (purity {s['purity']:.2f}, NMI {s['nmi']:.2f})")
    for ax in row:
      ax.set_xlabel("PC 1")
      ax.set_ylabel("PC 2")
  fig.suptitle(f"Routing vectors of {len(results[0].labels)} tokens (first two principal "
               "components; at most 20,000 tokens drawn)", fontsize=11)
  return _save(fig, pathlib.Path(path))


def plot_concentration(results: Sequence, path: str | pathlib.Path):
  """Histograms of per-document concentration (share of a document's tokens in its most common
  cluster), one panel per model on the same axes."""
  fig = Figure(figsize=(5.5 * len(results), 4), layout="constrained")
  axes = fig.subplots(1, len(results), squeeze=False, sharey=True)[0]
  bins = np.linspace(0.0, 1.0, 21)
  for ax, r, color in zip(axes, results, _colors(max(len(results), 2))):
    mean = float(r.doc_concentration.mean())
    ax.hist(r.doc_concentration, bins=bins, color=color, alpha=0.85, edgecolor="white")
    ax.axvline(mean, color="black", linestyle="--", linewidth=1)
    ax.set_title(f"{r.name}: mean concentration {mean:.2f}")
    ax.set_xlabel("share of a document's tokens in its most common cluster")
    ax.set_xlim(0, 1)
  axes[0].set_ylabel("documents")
  return _save(fig, pathlib.Path(path))


def _expert_order(usage_DxE: np.ndarray) -> np.ndarray:
  """Experts grouped by the domain that uses them most, heaviest first within a group."""
  favourite = usage_DxE.argmax(axis=0)
  return np.lexsort((-usage_DxE.max(axis=0), favourite))


def plot_expert_usage(results: Sequence, domains: Sequence[str], path: str | pathlib.Path,
                      layers: Sequence[int] | None = None):
  """Heatmaps domain x expert, one row per layer and one column per model: the share of a
  domain's tokens that pick the expert among their top-k. Experts are sorted by the domain
  that uses them most, so domain-specialised experts show as a block diagonal."""
  num_layers = results[0].usage.shape[0]
  layers = list(range(num_layers)) if layers is None else list(layers)
  num_experts = results[0].usage.shape[2]
  width = min(max(4.0, 0.09 * num_experts + 2.5), 14.0)
  height = (0.3 * len(domains) + 1.0) * len(layers) + 0.6
  fig = Figure(figsize=(width * len(results), height), layout="constrained")
  axes = fig.subplots(len(layers), len(results), squeeze=False)
  vmax = max(float(r.usage.max()) for r in results) or 1.0
  image = None
  for j, r in enumerate(results):
    for i, layer in enumerate(layers):
      ax = axes[i, j]
      u = r.usage[layer]
      order = _expert_order(u)
      image = ax.imshow(u[:, order], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                        interpolation="nearest")
      ax.set_yticks(range(len(domains)), domains, fontsize=7)
      if num_experts <= 32:
        ax.set_xticks(range(num_experts), [str(e) for e in order], fontsize=6)
      else:
        ax.set_xticks([])
      ax.set_title(f"{r.name}, layer {layer}", fontsize=9)
    axes[-1, j].set_xlabel("expert (sorted by the domain using it most)", fontsize=8)
  fig.colorbar(image, ax=axes, shrink=0.6, label="share of the domain's tokens routed there")
  return _save(fig, pathlib.Path(path))


def plot_cluster_domains(results: Sequence, domains: Sequence[str], path: str | pathlib.Path):
  """Per model: each cluster's tokens split by domain (rows sum to 1), clusters sorted by their
  main domain; a topical clustering shows one bright cell per row."""
  k = results[0].cluster_domain.shape[0]
  fig = Figure(figsize=(max(3.5, 0.5 * len(domains) + 2.5) * len(results), 0.28 * k + 1.8),
               layout="constrained")
  axes = fig.subplots(1, len(results), squeeze=False)[0]
  image = None
  for ax, r in zip(axes, results):
    table = r.cluster_domain.astype(float)
    share = table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)
    order = np.lexsort((-share.max(axis=1), share.argmax(axis=1)))
    image = ax.imshow(share[order], aspect="auto", cmap="magma", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), [f"{c} ({int(table[c].sum())})" for c in order], fontsize=7)
    ax.set_title(f"{r.name}: purity {r.summary['purity']:.2f}", fontsize=10)
    ax.set_ylabel("cluster (tokens)")
  fig.colorbar(image, ax=axes, shrink=0.8, label="share of the cluster's tokens")
  return _save(fig, pathlib.Path(path))


def plot_all(results: Sequence, domains: Sequence[str], out_dir: str | pathlib.Path):
  """Every figure of the analysis into out_dir; returns the paths written."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  out = [plot_projection(results, domains, out_dir / "projection.png"),
         plot_concentration(results, out_dir / "concentration.png"),
         plot_cluster_domains(results, domains, out_dir / "cluster_domains.png")]
  num_layers = results[0].usage.shape[0]
  for lo in range(0, num_layers, LAYERS_PER_FIGURE):
    hi = min(lo + LAYERS_PER_FIGURE, num_layers)
    name = ("expert_usage.png" if num_layers <= LAYERS_PER_FIGURE
            else f"expert_usage_layers_{lo}-{hi - 1}.png")
    out.append(plot_expert_usage(results, domains, out_dir / name, range(lo, hi)))
  return out


# ---- training runs ----------------------------------------------------------------------------

def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The logged steps of a training run (`workdir/metrics.jsonl`)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir?")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(workdirs: Mapping[str, str | pathlib.Path], path: str | pathlib.Path):
  """Training loss (the mean since the previous logged step) and validation perplexity of
  several runs on shared axes."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  loss_ax, ppl_ax = fig.subplots(1, 2)
  for (name, workdir), color in zip(workdirs.items(), _colors(max(len(workdirs), 2))):
    rows = read_metrics(workdir)
    # The mean since the previous logged step when the run logged it; else that step's batch.
    loss_ax.plot([r["step"] for r in rows], [r.get("loss_mean", r["loss"]) for r in rows],
                 color=color, label=name)
    val = [r for r in rows if "val_perplexity" in r]
    ppl_ax.plot([r["step"] for r in val], [r["val_perplexity"] for r in val], "o-",
                color=color, label=name)
  loss_ax.set(xlabel="step", ylabel="training loss (nats per token)",
              title="training loss (mean over each logging interval)")
  ppl_ax.set(xlabel="step", ylabel="validation perplexity (all domains)",
             title="validation perplexity")
  for ax in (loss_ax, ppl_ax):
    ax.legend()
  return _save(fig, pathlib.Path(path))


def plot_selective_eval(rows: Sequence[Mapping], path: str | pathlib.Path, *,
                        dashed: Sequence[str] = ()):
  """Benchmark accuracy (each task's primary metric) against the fraction of experts kept: one
  panel per task plus their average, one colour per selection method, one line style per model
  (models named in `dashed` dashed, e.g. a StdMoE baseline next to EMO). Every method's line
  ends at its model's full-model score; rows are experiments/selective_eval.py's."""
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  models = list(dict.fromkeys(r["model"] for r in rows))
  methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "full"]
  panels = tasks + (["average"] if len(tasks) > 1 else [])
  fig = Figure(figsize=(4.6 * len(panels), 3.8), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
  colors = dict(zip(methods, _colors(max(len(methods), 2))))

  def points(model, method, task):
    got = {}
    for r in rows:
      if r["model"] != model or (task != "average" and r["task"] != task):
        continue
      if r["method"] == method or r["method"] == "full":
        n_cal = str(r.get("num_calibration"))
        got.setdefault((r["fraction"], n_cal if r["method"] != "full" else ""), {})[
            r["task"]] = r["primary"]
    by_fraction: dict = {}
    for (fraction, _), scores in got.items():  # the first calibration size per fraction
      if task == "average" and len(scores) < len(tasks):
        continue
      by_fraction.setdefault(fraction, float(np.mean(list(scores.values()))))
    return sorted(by_fraction.items())

  for ax, task in zip(axes, panels):
    for model in models:
      style = "--" if model in dashed else "-"
      for method in methods:
        pts = points(model, method, task)
        if len(pts) > 0:
          ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                  color=colors[method], label=f"{model} {method}")
    fraction_axis(ax, [r["fraction"] for r in rows])
    ax.set(ylabel="accuracy (primary metric)", title=pathlib.Path(task).name)  # JSONL tasks: a path
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=7, handlelength=LEGEND_HANDLE_LENGTH)
  fig.suptitle("Benchmark accuracy on expert subsets: selection method by colour"
               + (", model by line style" if len(models) > 1 else ""), fontsize=10)
  return _save(fig, pathlib.Path(path))


# ---- the selective-expert study ----------------------------------------------------------------

REPRODUCTION_STYLES = {"EMO": {"color": "tab:blue", "linestyle": "-"},
                       "StdMoE": {"color": "tab:red", "linestyle": "--"},
                       "EMO-anneal": {"color": "tab:green", "linestyle": "-."}}


def plot_reproduction(rows: Sequence[Mapping], path: str | pathlib.Path,
                      groups: Sequence[str] = ("trained-mean", "held-out", "eval-corpus-mean",
                                               "eval-corpus")):
  """The paper's figure at small scale: per domain group, loss against the fraction of experts
  kept, each point minus the full EMO's loss on the same text (so every model shares one zero).
  EMO, StdMoE and EMO-anneal with selected experts are lines, EMO with random experts a dotted
  line, the memory-matched models trained from scratch single points. Rows are
  reproduction_report.build_rows's; error bars are standard deviations over seeds."""
  panels = [d for d in dict.fromkeys(r["domain"] for r in rows if r["group"] in groups)]
  fig = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
  fractions = set()
  point_markers = iter(["s", "D", "^", "v", "P", "X", "*", "h"])
  markers = {}
  for ax, domain in zip(axes, panels):
    for r in (r for r in rows if r["domain"] == domain):
      if r["subsets"] and "vs_emo_full" in r:
        style = REPRODUCTION_STYLES.get(r["model"], {"color": "tab:gray", "linestyle": ":"})
        xs = [1.0] + [c["fraction"] for c in r["subsets"].values()]
        ys = [r["vs_emo_full"]] + [c["vs_emo_full"] for c in r["subsets"].values()]
        ax.errorbar(xs, [y["mean"] for y in ys], yerr=[y["std"] or 0 for y in ys], marker="o",
                    capsize=2, label=f"{r['model']}, selected experts", **style)
        fractions.update(xs)
        if r["model"] == "EMO" and all("random_delta" in c for c in r["subsets"].values()):
          rand = [r["vs_emo_full"]["mean"]] + [
              c["random_delta"]["mean"] + r["vs_emo_full"]["mean"] for c in r["subsets"].values()]
          ax.plot(xs, rand, marker=".", color="tab:blue", linestyle=":",
                  label="EMO, random experts (floor)")
      elif "matched_keep" in r and "vs_emo_full" in r:
        marker = markers.setdefault(r["model"], next(point_markers, "o"))
        frac = r["matched_fraction"]
        ax.errorbar([frac], [r["vs_emo_full"]["mean"]], yerr=[r["vs_emo_full"]["std"] or 0],
                    marker=marker, markersize=8, linestyle="none", color="black",
                    label=f"{r['model']} (from scratch)")
        fractions.add(frac)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    held = any(r["domain"] == domain and r["group"] == "held-out" for r in rows)
    ax.set_title(f"{domain} (held out of training)" if held else domain)
    ax.set_ylabel("loss - full EMO's loss (nats per token)")
    ax.grid(True, alpha=0.3)
  for ax in axes:
    fraction_axis(ax, sorted(fractions))
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8,
             handlelength=LEGEND_HANDLE_LENGTH)
  return _save(fig, pathlib.Path(path))
