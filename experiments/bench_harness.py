"""What the benchmarks share: the device they ran on, memory peaks, the matmul ceiling, the
code and library versions they measured, and their progress lines."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from emo_jax.train import metrics as metrics_lib
from emo_jax.config import DTYPES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def log(tool: str, message: str) -> None:
  """One progress line on stderr (children inherit it, so their lines show too)."""
  print(f"[{tool} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def device_info() -> dict:
  """The first JAX device and the host, as a reader of the JSON needs to trust a figure."""
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return {"platform": device.platform, "device_kind": device.device_kind, "cpu": cpu,
          "cpu_count": os.cpu_count(), "peak_bf16_flops": metrics_lib.device_peak_flops() or None}


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_device_bytes(device) -> int | None:
  stats = device.memory_stats()  # None on CPU
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_matmul(size: int | None, dtype: str, min_seconds: float = 0.5) -> dict:
  """FLOP/s of one dense size^3 matmul in `dtype` on the first device: the run's ceiling.

  `size` None picks 8192 on accelerators and 1024 on CPU (where 8192^3 takes seconds).
  """
  device = jax.devices()[0]
  size = size or (1024 if device.platform == "cpu" else 8192)
  log("bench", f"matmul ceiling: {size}^3 {dtype} on {device.device_kind}")
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), DTYPES[dtype]), device) for k in keys)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  reps, start = 0, time.perf_counter()
  while reps < 3 or time.perf_counter() - start < min_seconds:
    out = matmul(a, b)
    reps += 1
  out.block_until_ready()
  seconds = (time.perf_counter() - start) / reps
  return {"size": size, "dtype": dtype, "seconds": seconds, "flops_per_s": 2 * size**3 / seconds,
          "device": device_info()}


def timed_steps(run_step, steps: int, tokens_per_step: int) -> dict:
  """Runs `run_step()` (which must return only once its step is finished) `steps` times.

  The rate comes from the median step: on a CPU shared with other work a few steps take
  several times the rest, and a mean over all of them would measure the neighbours as much as
  the step. Both sides of a comparison are timed by this one function.
  """
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  ordered = sorted(times)
  median = (ordered[(steps - 1) // 2] + ordered[steps // 2]) / 2
  return {"step_s": median, "tokens_per_s": tokens_per_step / median,
          "step_s_mean": sum(times) / steps, "step_s_min": ordered[0],
          "step_s_max": ordered[-1]}


def git_commit() -> str | None:
  """The checkout's commit (with "+dirty" for local changes): the code moves under a benchmark."""
  try:
    def git(*args):
      return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                   "--untracked-files=no") else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def versions() -> dict:
  """Installed versions, read from package metadata so that nothing is imported for them."""
  found = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found
