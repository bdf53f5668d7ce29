"""Training-step throughput of emo_jax next to its PyTorch peer, measured side by side in one run.

  python -m experiments.bench_step --config configs/tiny.py --json_out /tmp/bench_tiny.json
  python -m experiments.bench_step --config configs/demo.py --steps 10
  # the H100 comparison: EMO width, 4 layers, batch 2 x 4096, bf16 weights on both sides
  python -m experiments.bench_step --config configs/emo_1b14b.py --layers 4 --batch 2 \
      --seq_len 4096 --param_dtype bfloat16

One run measures, each in its own subprocess unless --noisolate (so every peak-memory figure
belongs to one measurement, and JAX's GPU preallocation cannot starve PyTorch):
* a dense matmul in the model's compute dtype: this chip's practical ceiling, in this run;
* emo_jax's real training step (`emo_jax.train.trainer.init_state` / `train_step`, jitted with the
  state donated) for each expert backend, on a random batch in the data pipeline's layout (a few
  documents per row, positions restarting per document) so the document pool does real work;
* the PyTorch peer: transformers' `Qwen2MoeForCausalLM` of the same shape (routed experts +
  shared expert, top-k, load-balancing loss), AdamW with the same hyper-parameters.
Both sides are timed step by step, each step waited for (bench_harness.timed_steps: tokens/s
from the median step), run with the same host allocator setting (emo_jax/host_memory.py),
count every position of the batch as a token and use one FLOP count
(`emo_jax.train.metrics.flops_per_token`), so tokens/s, MFU and the ratio compare like with like. Both
use a constant learning rate and no gradient accumulation: speed, not the schedule, is measured.
The peer lives in experiments/bench_torch_peer.py; what every benchmark records (device,
memory peaks, matmul ceiling, versions) in experiments/bench_harness.py.
"""

from __future__ import annotations

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

# Read when a JAX backend starts: without it the first JAX process on a GPU takes 75 % of its
# memory and PyTorch, measured later, would run out. An explicit user setting wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from emo_jax.model import experts as experts_lib  # noqa: E402
from emo_jax.train import metrics as metrics_lib  # noqa: E402
from emo_jax.train import trainer as train_lib  # noqa: E402
from emo_jax.config import ModelConfig  # noqa: E402
from emo_jax.data.pipeline import pack_rows  # noqa: E402
from emo_jax.model.execution import ExecutionConfig  # noqa: E402
from emo_jax.train.experiment import Experiment
from emo_jax.model.transformer import count_params  # noqa: E402
from experiments import cli  # noqa: E402
from experiments.bench_harness import (REPO_ROOT, device_info, git_commit, log,  # noqa: E402
                                       max_rss_bytes, measure_matmul, peak_device_bytes,
                                       timed_steps, versions)
from experiments.bench_torch_peer import measure_torch, torch_available  # noqa: E402

# Every expert on every token: the correctness reference, measured only when asked for.
REFERENCE_BACKEND = "dense"
DOCUMENTS_PER_ROW = 3


def _log(message: str) -> None:
  log("bench_step", message)


# ---- what to measure ------------------------------------------------------------------------
def load_config(path: str | os.PathLike):
  """The experiment config (ml_collections) of a config file, as --config would load it."""
  spec = importlib.util.spec_from_file_location(f"_bench_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_backends(names: Sequence[str] | None,
                   execution: ExecutionConfig) -> list[tuple[str, dict]]:
  """(label, ExecutionConfig changes) per requested backend, `name` or `name:ragged_dot_impl`.

  The allowed names are read from `emo_jax.model.experts.BACKENDS` at call time so that a backend
  added there is benchmarkable without touching this file. By default: the config's own
  backend, then every other one except the dense reference.
  """
  backends = tuple(experts_lib.BACKENDS)
  if not names:
    names = [execution.expert_backend] + [
        b for b in backends if b not in (REFERENCE_BACKEND, execution.expert_backend)]
  parsed, seen = [], set()
  for entry in names:
    entry = entry.strip()
    name, has_impl, impl = entry.partition(":")
    if name not in backends:
      raise ValueError(f"--backends: unknown expert backend {name!r} in {entry!r}; allowed names "
                       f"are {list(backends)} (emo_jax.model.experts.BACKENDS), each optionally as "
                       "name:ragged_dot_impl")
    changes = {"expert_backend": name}
    if has_impl:
      if not impl:
        raise ValueError(f"--backends: {entry!r} has an empty implementation after ':'")
      changes["ragged_dot_impl"] = impl
    if entry not in seen:
      seen.add(entry)
      parsed.append((entry, changes))
  return parsed


def random_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> dict:
  """A packed batch in the data pipeline's layout (emo_jax/data/pipeline.py), random tokens.

  Each row holds a few documents of random lengths, so attention masks and the document pool
  see several segments; targets are the next token of the same document and the last token of
  each document has no target, as the packer writes them.
  """
  rng = np.random.default_rng(seed)
  docs = max(1, min(DOCUMENTS_PER_ROW, cfg.max_segments, seq_len))
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len), dtype=np.int32)
  rows = []
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq_len), docs - 1, replace=False)) if docs > 1 else []
    rows.append(np.split(tokens[row], cuts))
  packed = pack_rows(rows, pad_id=0, seq_len=seq_len)
  return {k: packed[k] for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}


def bench_train_config(train: Mapping[str, Any] | None) -> train_lib.TrainConfig:
  """The experiment's optimiser at a constant learning rate, one micro-batch per step.

  Warm-up would make the first steps' updates near zero and accumulation would change what a
  "step" is; the PyTorch peer gets exactly these hyper-parameters.
  """
  tc = train_lib.TrainConfig.from_dict(train or {})
  return tc.replace(schedule="constant", warmup_steps=0, grad_accum_steps=1)


# ---- measurements (each runs in-process, or in a child with --isolate) ------------------------
def measure_emo_jax(cfg: ModelConfig, tc: train_lib.TrainConfig, batch: int, seq_len: int, *,
                    steps: int, warmup: int, seed: int = 0,
                    execution: ExecutionConfig | None = None) -> dict:
  """emo_jax's training step on one device: compile, `warmup` steps, then `steps` timed."""
  device = jax.devices()[0]
  execution = ExecutionConfig() if execution is None else execution
  name = f"emo_jax[{execution.expert_backend}]"
  _log(f"{name}: init and compile ({batch} x {seq_len}, {cfg.num_layers} layers)")
  data = jax.device_put(random_batch(cfg, batch, seq_len, seed), device)
  graphdef, optimizer, state = train_lib.init_state(cfg, tc, execution=execution)
  step_fn = jax.jit(lambda s, b: train_lib.train_step(s, b, graphdef=graphdef,
                                                      optimizer=optimizer, cfg=cfg, tc=tc),
                    donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  _log(f"{name}: compiled in {compile_s:.1f} s; {warmup} warm-up + {steps} timed steps")
  stats = None
  for _ in range(warmup):
    state, stats = compiled(state, data)
  jax.block_until_ready((state, stats))
  # Each step is waited for before the next is dispatched, as the peer's eager steps are: on
  # XLA:CPU a step dispatched ahead starts its data-only work beside the running step and the
  # two compete for the cores.
  result = {"state": state}

  def timed_step():
    result["state"], result["stats"] = compiled(result["state"], data)
    jax.block_until_ready(result["state"])

  timing = timed_steps(timed_step, steps, batch * seq_len)
  stats = jax.device_get(result["stats"])
  dropped = stats.get("dropped_fraction")
  return {"implementation": "emo_jax", **timing, "compile_s": compile_s,
          "loss": float(stats["loss"]), "total_loss": float(stats["total_loss"]),
          "dropped_fraction": None if dropped is None else float(np.mean(dropped)),
          "peak_device_bytes": peak_device_bytes(device), "max_rss_bytes": max_rss_bytes(),
          "device": device_info()}


def measure(spec: Mapping[str, Any]) -> dict:
  """Runs the one measurement a spec describes (the unit a child process runs)."""
  if spec["what"] == "matmul":
    return measure_matmul(spec["size"], spec["dtype"])
  cfg = ModelConfig.from_dict(spec["model"])
  tc = train_lib.TrainConfig.from_dict(spec["train"])
  common = dict(steps=spec["steps"], warmup=spec["warmup"], seed=spec.get("seed", 0))
  if spec["what"] == "emo_jax":
    return measure_emo_jax(cfg, tc, spec["batch"], spec["seq_len"],
                           execution=ExecutionConfig.from_dict(spec["execution"]), **common)
  return measure_torch(cfg, tc, spec["batch"], spec["seq_len"], **common)


def child_main(spec_path: str, out_path: str) -> None:
  """Entry point of an isolated measurement: spec JSON in, result (or its error) JSON out."""
  spec = json.loads(pathlib.Path(spec_path).read_text())
  allocator = host_memory.in_effect()
  try:
    result = measure(spec)
    result["host_allocator"] = allocator
  except Exception as e:  # reported in the parent's table, not lost in a traceback
    import traceback
    traceback.print_exc()
    result = {"error": f"{type(e).__name__}: {e}"}
  pathlib.Path(out_path).write_text(json.dumps(result))


def measure_isolated(spec: Mapping[str, Any]) -> dict:
  """`measure(spec)` in a fresh Python process: its own peak memory, its own device memory."""
  with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
    spec_path, out_path = pathlib.Path(tmp, "spec.json"), pathlib.Path(tmp, "out.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)  # XLA_PYTHON_CLIENT_PREALLOCATE included (set at import)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = ("import sys; from experiments.bench_step import child_main; "
            "child_main(sys.argv[1], sys.argv[2])")
    # The child sets the allocator in bench_step's first statement (host_memory.py).
    env[host_memory.ENV_VAR] = spec.get("host_allocator", "system")
    proc = subprocess.run([sys.executable, "-c", code, str(spec_path), str(out_path)],
                          cwd=REPO_ROOT, env=env, check=False)
    if out_path.exists():
      return json.loads(out_path.read_text())
    return {"error": f"the measurement process exited with code {proc.returncode} and no result "
                     "(killed for memory?); its log is above"}


def _guarded(spec: Mapping[str, Any], isolate: bool) -> dict:
  if isolate:
    return measure_isolated(spec)
  try:
    return measure(spec)
  except Exception as e:  # one failing backend must not lose the others' figures
    _log(f"{spec['what']} failed: {type(e).__name__}: {e}")
    return {"error": f"{type(e).__name__}: {e}"}


# ---- the whole comparison ---------------------------------------------------------------------
def _add_rates(row: dict, flops_per_token: float, peak: float | None, ceiling: float | None,
               torch_tps: float | None) -> None:
  """Model FLOP/s, MFU against the bf16 peak and the measured matmul, and the ratio to torch."""
  if "tokens_per_s" not in row:
    return
  achieved = row["tokens_per_s"] * flops_per_token
  row["model_flops_per_s"] = achieved
  row["mfu_vs_peak"] = achieved / peak if peak else None
  row["mfu_vs_matmul"] = achieved / ceiling if ceiling else None
  row["ratio_vs_torch"] = row["tokens_per_s"] / torch_tps if torch_tps else None


def run(config, *, batch: int | None = None, seq_len: int | None = None,
        layers: int | None = None, param_dtype: str | None = None,
        backends: Sequence[str] | None = None, steps: int = 20, warmup: int = 3,
        torch: bool = True, isolate: bool = True, matmul_size: int | None = None,
        seed: int = 0, host_allocator: str | None = None) -> dict:
  """Measures the matmul ceiling, emo_jax per backend and the PyTorch peer; returns the JSON.

  `config` is an experiment config (ml_collections, with `.model` and optionally `.data`,
  `.train`); only the model's shape and the optimiser are used, never the corpus.
  `host_allocator` ("retain" or "system", default EMO_JAX_HOST_ALLOCATOR's: host_memory.py)
  is set in every measurement process alike, the peer's included; each row records what took
  effect. Without --isolate every measurement shares this process's setting.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
  experiment = Experiment.from_config(config)
  cfg, execution = experiment.model, experiment.execution
  data = config.get("data", None) or {}
  batch = batch or data.get("batch_size", 8)
  seq_len = seq_len or data.get("seq_len", 256)
  changes = {}
  if layers:
    changes["num_layers"] = layers
  if param_dtype:
    changes["param_dtype"] = param_dtype
  if seq_len > cfg.max_seq_len:
    changes["max_seq_len"] = seq_len  # RoPE has no table to outgrow; the field only validates
  if cfg.lb_scope_sequences and batch % cfg.lb_scope_sequences:
    changes["lb_scope_sequences"] = 0  # a few rows cannot form the release's 512-row groups
  cfg = cfg.replace(**changes)
  tc = bench_train_config(config.get("train", None))
  # Validate every backend (and its config) before spending minutes on the first.
  variants = [(label, execution.replace(**c)) for label, c in parse_backends(backends, execution)]
  counts = count_params(cfg)
  flops_per_token = metrics_lib.flops_per_token(cfg, counts, seq_len)
  host_allocator = host_memory.checked(host_allocator or host_memory.requested(),
                                       "host_allocator")
  common = {"train": tc.to_dict(), "batch": batch, "seq_len": seq_len, "steps": steps,
            "warmup": warmup, "seed": seed, "host_allocator": host_allocator}
  if not isolate and host_allocator != host_memory.in_effect():
    raise ValueError(f"host_allocator={host_allocator!r} cannot be honoured with --noisolate: "
                     f"this process runs with {host_memory.in_effect()!r}; set "
                     f"{host_memory.ENV_VAR}={host_allocator} before starting it, or isolate")

  matmul = _guarded({"what": "matmul", "size": matmul_size, "dtype": cfg.compute_dtype,
                     "host_allocator": host_allocator}, isolate)
  device = matmul.pop("device", None) or {}
  rows = []
  for label, variant in variants:
    row = _guarded({"what": "emo_jax", "model": cfg.to_dict(), "execution": variant.to_dict(),
                    **common}, isolate)
    device = device or row.get("device", {})
    row.pop("device", None)
    rows.append({"backend": label, **row})
  torch_row, torch_skipped = None, None
  if not torch:
    torch_skipped = "--notorch"
  elif not torch_available():
    torch_skipped = "torch or transformers is not installed"
    _log(f"torch: skipped ({torch_skipped}); pip install torch transformers to compare")
  else:
    torch_row = _guarded({"what": "torch", "model": cfg.to_dict(), **common}, isolate)

  torch_tps = (torch_row or {}).get("tokens_per_s")
  for row in [*rows, *([torch_row] if torch_row else [])]:
    _add_rates(row, flops_per_token, device.get("peak_bf16_flops"), matmul.get("flops_per_s"),
               torch_tps)
  best = max((r for r in rows if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"],
             default=None)
  emo_tps = best["tokens_per_s"] if best else None
  ratio = emo_tps / torch_tps if emo_tps and torch_tps else None
  return {
      "config": config.get("name", None), "date": datetime.date.today().isoformat(),
      "device": device, "versions": versions(), "git_commit": git_commit(), "isolate": isolate,
      "host_allocator": host_allocator,
      "shapes": {"batch": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
                 "num_layers": cfg.num_layers, "d_model": cfg.d_model,
                 "num_heads": cfg.num_heads, "num_experts": cfg.num_experts,
                 "num_shared_experts": cfg.num_shared_experts, "top_k": cfg.top_k,
                 "expert_hidden": cfg.expert_hidden, "vocab_size": cfg.vocab_size,
                 "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
                 "total_params": counts["total_params"], "active_params": counts["active_params"],
                 "flops_per_token": flops_per_token},
      "model": cfg.to_dict(), "steps": steps, "warmup": warmup, "matmul": matmul,
      "emo_jax": rows, "torch": torch_row, "torch_skipped": torch_skipped,
      "emo_jax_tokens_per_s": emo_tps, "emo_jax_backend": best["backend"] if best else None,
      "torch_tokens_per_s": torch_tps, "ratio": ratio,
  }


# ---- the table ---------------------------------------------------------------------------------
def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
  return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def _memory(row: Mapping[str, Any]) -> str:
  if row.get("peak_device_bytes") is not None:
    return f"{row['peak_device_bytes'] / 2**30:.2f} GiB"
  if row.get("max_rss_bytes") is not None:
    return f"{row['max_rss_bytes'] / 2**30:.2f} GiB RSS"
  return "-"


def format_table(result: Mapping[str, Any]) -> str:
  """One row per implementation: tokens/s, step time, MFU (peak, matmul), memory, vs torch."""
  s = result["shapes"]
  matmul = result["matmul"]
  lines = [f"{result['config']}: {s['num_layers']} layers, d={s['d_model']}, "
           f"{s['num_experts']} experts (top-{s['top_k']}), batch {s['batch']} x {s['seq_len']}, "
           f"weights {s['param_dtype']}, compute {s['compute_dtype']} on "
           f"{result['device'].get('device_kind', '?')}",
           f"matmul ceiling {matmul.get('size', '?')}^3 {matmul.get('dtype', '?')}: "
           + (f"{matmul['flops_per_s'] / 1e12:.3f} TFLOP/s" if "flops_per_s" in matmul
              else matmul.get("error", "-"))]
  header = (f"{'implementation':<26}{'tokens/s':>12}{'step ms':>10}{'MFU peak':>10}"
            f"{'MFU mm':>9}{'peak memory':>16}{'dropped':>9}{'loss':>8}{'vs torch':>10}")
  lines += [header, "-" * len(header)]
  rows = [(f"emo_jax {r['backend']}", r) for r in result["emo_jax"]]
  if result["torch"]:
    t = result["torch"]
    rows.append((f"torch {t.get('experts_implementation', '')}", t))
  for name, r in rows:
    if "error" in r:
      lines.append(f"{name:<26}  failed: {r['error'][:120]}")
      continue
    lines.append(f"{name:<26}{r['tokens_per_s']:>12,.0f}{r['step_s'] * 1e3:>10.1f}"
                 f"{_fmt(r.get('mfu_vs_peak'), '.1%'):>10}{_fmt(r.get('mfu_vs_matmul'), '.1%'):>9}"
                 f"{_memory(r):>16}{_fmt(r.get('dropped_fraction'), '.3f'):>9}"
                 f"{r['loss']:>8.3f}{_fmt(r.get('ratio_vs_torch'), '.2f', suffix='x'):>10}")
  if result["torch_skipped"]:
    lines.append(f"torch: skipped ({result['torch_skipped']})")
  lines.append(f"emo_jax ({result['emo_jax_backend']}) / torch: "
               + (f"{result['ratio']:.2f}x" if result["ratio"] else "-"))
  return "\n".join(lines)


# ---- the command line --------------------------------------------------------------------------
def _define_flags():
  """Flags are defined only when run as a command: importing this module (tests, children)
  must not register a second `--config` next to another entry point's."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file (its .model shape and "
                                  ".train optimiser are used; no data).")
  flags.DEFINE_integer("batch", None, "Rows per step (default: the config's data.batch_size).")
  flags.DEFINE_integer("seq_len", None, "Tokens per row (default: the config's data.seq_len).")
  flags.DEFINE_integer("layers", None, "Override model.num_layers (e.g. 4 or 2 at EMO width).")
  flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"],
                    "Override the weights' dtype on both sides (bfloat16: bf16 weights, as the "
                    "PyTorch peer's in the H100 comparison of BENCHMARKS.md).")
  flags.DEFINE_list("backends", None, "Expert backends to measure, each `name` (from "
                    "emo_jax.model.experts.BACKENDS) or `name:ragged_dot_impl`; default: the config's "
                    "own, then every other but the dense reference.")
  flags.DEFINE_integer("steps", 20, "Timed training steps per measurement.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_bool("torch", True, "Measure the PyTorch peer (skipped if not installed).")
  flags.DEFINE_bool("isolate", True, "Each measurement in its own process (per-measurement "
                    "peak memory; JAX cannot hold GPU memory PyTorch needs).")
  flags.DEFINE_string("json_out", None, "Where to write the JSON results.")
  flags.DEFINE_enum("host_allocator", None, list(host_memory.CHOICES),
                    "Host malloc settings of every measurement process, the peer's included "
                    "(emo_jax/host_memory.py; default: $EMO_JAX_HOST_ALLOCATOR, else retain).")
  flags.DEFINE_integer("matmul_size", None, "Side of the ceiling matmul (default 8192 on "
                       "accelerators, 1024 on CPU).")
  flags.mark_flags_as_required(["config"])


def main(argv):
  from absl import flags
  cli.start(argv)
  f = flags.FLAGS
  result = run(f.config, batch=f.batch, seq_len=f.seq_len, layers=f.layers,
               param_dtype=f.param_dtype, backends=f.backends, steps=f.steps, warmup=f.warmup,
               torch=f.torch, isolate=f.isolate, matmul_size=f.matmul_size,
               host_allocator=f.host_allocator)
  print(format_table(result))
  if f.json_out:
    pathlib.Path(f.json_out).write_text(json.dumps(result, indent=1))
    _log(f"wrote {f.json_out}")
  if any("error" in r for r in [*result["emo_jax"], result["torch"] or {}]):
    sys.exit(1)  # after writing: the JSON keeps the figures that were measured


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
