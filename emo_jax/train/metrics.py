"""Training metrics: per-layer routing summaries, throughput, MFU, and where they are written.

Every logged step goes three places: a console line a person can follow (step, the last batch's
loss and the mean since the previous line, tokens/s, ETA; at an evaluation a table of the
perplexity per domain beside the unigram baseline and the change since the last one),
`metrics.jsonl` (one JSON object per logged step, for scripts and plots) and TensorBoard
event files. On resume, JSONL rows past the restored step are dropped so the file reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from emo_jax.config import ModelConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, by jax `device_kind` prefix.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def device_peak_flops() -> float:
  """Peak bf16 FLOP/s of the first device, or 0 when unknown (e.g. a CPU)."""
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return 0.0


def flops_per_token(cfg: ModelConfig, counts: Mapping[str, int], seq_len: int) -> float:
  """Training FLOPs per token: 6 x active matmul parameters + causal-free attention term.

  The input embedding is a lookup, not a matmul, so it is left out; attention adds
  12 * layers * heads * head_dim * seq_len (PaLM's convention).
  """
  matmul_params = counts["active_params"] - cfg.vocab_size * cfg.d_model
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params + attention


def summarize(stats: Mapping[str, Any], cfg: ModelConfig,
              window: Sequence[tuple[int, Mapping[str, Any]]] = ()) -> dict[str, float]:
  """Flattens one step's statistics into scalars (per-layer routing figures included).

  `loss` is that one step's batch loss, which jumps with the batch's mix of domains; with
  `window` (the (step, stats) since the last logged line) `loss_mean` is the mean over them.
  """
  row = {
      "loss": float(stats["loss"]),
      "perplexity": float(math.exp(min(float(stats["loss"]), 50.0))),
      "total_loss": float(stats["total_loss"]),
      "output_z_loss": float(stats["output_z_loss"]),
      "grad_norm": float(stats["grad_norm"]),
      "learning_rate": float(stats["learning_rate"]),
  }
  if window:
    row["loss_mean"] = float(np.mean([float(w["loss"]) for _, w in window]))
  if "expert_load" in stats:
    load = np.asarray(stats["expert_load"], np.float64)  # [layers, routed experts]
    E = load.shape[-1]
    entropy = -np.sum(np.where(load > 0, load * np.log(np.maximum(load, 1e-30)), 0), -1)
    row["lb_loss"] = float(np.mean(stats["lb_loss"]))
    row["router_z_loss"] = float(np.mean(stats["router_z_loss"]))
    row["dropped_fraction"] = float(np.mean(stats["dropped_fraction"]))
    row["pool_size"] = float(np.mean(stats["pool_size"]))
    # Load as a multiple of perfect balance (1.0 everywhere when balanced).
    row["load_entropy"] = float(np.mean(entropy / np.log(E)))
    for layer in range(load.shape[0]):
      row[f"layer{layer}/load_entropy"] = float(entropy[layer] / np.log(E))
      row[f"layer{layer}/max_load"] = float(load[layer].max() * E)
      row[f"layer{layer}/min_load"] = float(load[layer].min() * E)
      row[f"layer{layer}/lb_loss"] = float(stats["lb_loss"][layer])
      row[f"layer{layer}/dropped_fraction"] = float(stats["dropped_fraction"][layer])
      row[f"layer{layer}/pool_size"] = float(stats["pool_size"][layer])
  return row


class Progress:
  """Tokens/s and ETA between successive logged steps."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.start_step = start_step
    self.start_time = time.perf_counter()
    self.last_step, self.last_time = start_step, self.start_time

  def update(self, step: int, tokens: float) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self.last_time, 1e-9)
    steps = max(step - self.last_step, 1)
    self.last_step, self.last_time = step, now
    per_step = (now - self.start_time) / max(step - self.start_step, 1)
    return {"tokens_per_s": tokens / elapsed, "step_time_s": elapsed / steps,
            "eta_s": per_step * (self.total - step)}


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


def baseline_fields(baseline: Mapping[str, float], prefix: str = "unigram_val_") -> dict:
  """The unigram baseline's perplexities (overall and per domain) as logged row fields."""
  return {f"{prefix}{k}": float(v) for k, v in baseline.items() if k.startswith("perplexity")}


def console_line(step: int, total: int, row: Mapping[str, float]) -> str:
  """One line per logged step. `loss` is the last step's batch; `mean` averages the steps
  since the previous line, which is the figure to follow."""
  parts = [f"step {step}/{total}", f"loss {row['loss']:.4f}"]
  if "loss_mean" in row:
    parts[-1] += f" (mean {row['loss_mean']:.4f})"
  if "lb_loss" in row:
    parts.append(f"lb {row['lb_loss']:.3f}")
  if "val_perplexity" in row:
    parts.append(f"val ppl {row['val_perplexity']:.2f}")
  if "tokens_per_s" in row:
    parts.append(f"{row['tokens_per_s'] / 1e3:.1f}k tok/s")
  if "mfu" in row:
    parts.append(f"MFU {100 * row['mfu']:.1f}%")
  if "eta_s" in row:
    parts.append(f"ETA {_duration(row['eta_s'])}")
  return " | ".join(parts)


def evaluation_table(row: Mapping[str, float], previous: Mapping[str, float] | None = None,
                     previous_step: int | None = None, prefix: str = "val_") -> str:
  """The evaluation of a logged row as a small table: one line per domain and one for all.

  Columns: the model's perplexity, the unigram baseline's (the bar of token frequencies
  alone), and the change since the previous evaluation (`previous`, an earlier row).
  """
  key = f"{prefix}perplexity"
  domains = sorted(k.split("/", 1)[1] for k in row if k.startswith(key + "/"))
  names = ["all"] + domains
  since = f"change since step {previous_step}" if previous is not None else "change"
  width = max(len(n) for n in names + ["domain"])
  lines = [f"  {'domain':<{width}}  {'perplexity':>10}  {'unigram':>9}  {since}"]
  for name in names:
    field = key if name == "all" else f"{key}/{name}"
    value = row.get(field)
    if value is None:
      continue
    unigram = row.get(f"unigram_{field}")
    cells = [f"  {name:<{width}}", f"{value:>10.2f}",
             f"{unigram:>9.2f}" if unigram is not None else f"{'-':>9}"]
    if previous is not None and previous.get(field):
      before = previous[field]
      cells.append(f"{value - before:+.2f} ({100 * (value - before) / before:+.1f}%)")
    else:
      cells.append("-")
    lines.append("  ".join(cells))
  return "\n".join(lines)


class MetricsWriter:
  """Console + `metrics.jsonl` + TensorBoard events in the workdir."""

  def __init__(self, workdir: str | pathlib.Path, *, resume_step: int = 0, total_steps: int = 0):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.total = total_steps
    # In a multi-host run every host computes the same (global) metrics; host 0 writes them.
    self.enabled = jax.process_index() == 0
    self._file = self._tb = None
    # The last evaluation written (step, row), for the change column of the next one.
    self._last_eval: tuple[int, dict] | None = None
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=resume_step + 1)
    except ImportError:  # pragma: no cover - tensorboardX is a declared dependency
      log.warning("tensorboardX is not installed: no TensorBoard events are written")

  def _truncate_after(self, step: int) -> None:
    """Drops rows logged after `step` by a run that died before its next checkpoint."""
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
        if record["step"] <= step:
          kept.append(line)
          if "val_perplexity" in record:
            self._last_eval = (record["step"], record)
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by a kill
    self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

  def write(self, step: int, row: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in row.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        self._tb.add_scalar(key, float(value), step)
    print(console_line(step, self.total, row), flush=True)
    if "val_perplexity" in row:
      before = self._last_eval
      print(evaluation_table(row, before[1] if before else None,
                             before[0] if before else None), flush=True)
      self._last_eval = (int(step), dict(row))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
