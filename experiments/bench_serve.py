"""Serving throughput and latency against concurrency, full model vs a 25 % expert subset.

  python -m experiments.bench_serve --checkpoint W --out bench_serve/ [--calibration C.jsonl]
      [--concurrency 1,2,4,8] [--requests 8] [--max_tokens 32] [--slots 4]

Starts `experiments.serve` twice on free 127.0.0.1 ports: once serving every expert ("all"),
once serving only a subset of a quarter of each layer's experts (shared included: keep =
round(E / 4), chosen from --calibration, or the lowest expert ids without one) with
--noserve_all, so that only the subset's experts are resident. At each concurrency level, that
many clients each send --requests greedy completions one after another (the openai-compatible
HTTP API; EOS is a normal stop, tokens are counted from `usage`). Reported per level: generated
tokens/s over the level's wall time, p50 / p95 request latency, and each server's resident
expert bytes against the full model's. Writes OUT/bench_serve.json, OUT/bench_serve.md (the
table) and OUT/bench_serve.png (tokens/s and latency against concurrency).
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from emo_jax.convert import orbax_io
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint.")
_OUT = flags.DEFINE_string("out", "bench_serve", "Output folder.")
_CALIBRATION = flags.DEFINE_string("calibration", None, "JSONL choosing the subset's experts.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Override the checkpoint's tokenizer.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "2", "4", "8"], "Concurrent clients.")
_REQUESTS = flags.DEFINE_integer("requests", 8, "Requests per client and level.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens per completion at most.")
_SLOTS = flags.DEFINE_integer("slots", 4, "Decode slots of the servers.")
_PROMPT = flags.DEFINE_string("prompt", "The patient was given", "Prompt of every request.")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(args: list[str], log: pathlib.Path):
  """(process, base url) of `experiments.serve` with args, once /health answers."""
  import httpx  # pylint: disable=import-outside-toplevel
  port = free_port()
  handle = open(log, "wb")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", f"--port={port}", *args],
                          cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                          env={**os.environ})
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 600
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      pass
    if time.time() > deadline:
      proc.terminate()
      raise RuntimeError(f"the server did not come up in 600 s; see {log}")
    time.sleep(0.5)


async def one_level(url: str, experts: str, clients: int, requests: int, max_tokens: int,
                    prompt: str) -> dict:
  import httpx  # pylint: disable=import-outside-toplevel
  latencies, tokens = [], 0

  async def client(http):
    nonlocal tokens
    for _ in range(requests):
      start = time.perf_counter()
      r = await http.post(url + "/v1/completions", json={
          "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "experts": experts})
      r.raise_for_status()
      latencies.append(time.perf_counter() - start)
      tokens += r.json()["usage"]["completion_tokens"]

  limits = httpx.Limits(max_connections=clients + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as http:
    start = time.perf_counter()
    await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
  return {"concurrency": clients, "requests": len(latencies), "tokens": tokens,
          "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
          "p50_latency_s": round(float(np.percentile(latencies, 50)), 3),
          "p95_latency_s": round(float(np.percentile(latencies, 95)), 3)}


def subset_experts(checkpoint: str, keep: int) -> list[list[int]]:
  """The lowest keep-1 routed ids per layer (the subset when no calibration file is given)."""
  config = orbax_io.ParamSource(checkpoint).model_config
  routed = keep - config["num_shared_experts"]
  return [list(range(routed)) for _ in range(config["num_layers"])]


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for name, run in results.items():
    c = [r["concurrency"] for r in run["levels"]]
    label = f"{name} ({run['resident_expert_bytes'] / 2**10:.0f} KiB experts resident)"
    left.plot(c, [r["tokens_per_s"] for r in run["levels"]], "o-", label=label)
    line, = right.plot(c, [r["p50_latency_s"] for r in run["levels"]], "o-", label=f"{name} p50")
    right.plot(c, [r["p95_latency_s"] for r in run["levels"]], "s--", color=line.get_color(),
               label=f"{name} p95")
  for ax, ylabel, title in ((left, "generated tokens / s", "throughput"),
                            (right, "request latency (s)", "latency")):
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set(xlabel="concurrent requests", ylabel=ylabel, xticks=c, xticklabels=c, title=title)
    ax.set_ylim(bottom=0)
  left.legend(fontsize=8)
  right.legend(fontsize=8)
  fig.suptitle(f"experiments.serve on CPU: {_SLOTS.value} slots, {_MAX_TOKENS.value} tokens "
               "per request")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  cli.start(argv)
  import httpx  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  num_experts = int(orbax_io.ParamSource(_CHECKPOINT.value).model_config["num_experts"])
  keep = max(2, round(num_experts / 4))
  common = [f"--checkpoint={_CHECKPOINT.value}", f"--slots={_SLOTS.value}", "--max_queue=1024"]
  if _TOKENIZER.value:
    common.append(f"--tokenizer={_TOKENIZER.value}")
  runs = {"all": (common, "all")}
  if _CALIBRATION.value:
    runs["q25"] = (common + ["--noserve_all", f"--subset=q25={_CALIBRATION.value}:{keep}"],
                   "q25")
  else:
    runs["q25"] = (common, "q25")  # registered over HTTP below, then "all" is deleted
  results = {}
  for name, (args, experts) in runs.items():
    proc, url = start_server(args, out / f"server_{name}.log")
    try:
      if name == "q25" and not _CALIBRATION.value:
        r = httpx.post(url + "/v1/subsets", json={
            "name": "q25", "experts": subset_experts(_CHECKPOINT.value, keep)}, timeout=600)
        r.raise_for_status()
        httpx.delete(url + "/v1/subsets/all", timeout=600).raise_for_status()
      health = httpx.get(url + "/health").json()
      asyncio.run(one_level(url, experts, 1, 1, _MAX_TOKENS.value, _PROMPT.value))  # warm
      levels = []
      for c in (int(x) for x in _CONCURRENCY.value):
        level = asyncio.run(one_level(url, experts, c, _REQUESTS.value, _MAX_TOKENS.value,
                                      _PROMPT.value))
        levels.append(level)
        print(json.dumps({"experts": name, **level}), flush=True)
      results[name] = {"keep": keep if name == "q25" else num_experts,
                       "resident_expert_bytes": health["resident_expert_bytes"],
                       "full_expert_bytes": health["full_expert_bytes"],
                       "non_expert_bytes": health["non_expert_bytes"], "levels": levels}
    finally:
      proc.terminate()
      proc.wait(timeout=60)
  (out / "bench_serve.json").write_text(json.dumps(results, indent=1))
  rows = ["| experts | resident expert bytes | concurrency | tokens/s | p50 latency (s) | "
          "p95 latency (s) |", "|---|---|---|---|---|---|"]
  for name, run in results.items():
    share = run["resident_expert_bytes"] / run["full_expert_bytes"]
    for level in run["levels"]:
      rows.append(f"| {name} ({run['keep']}/{num_experts} per layer) | "
                  f"{run['resident_expert_bytes']:,} ({share:.0%}) | {level['concurrency']} | "
                  f"{level['tokens_per_s']} | {level['p50_latency_s']} | "
                  f"{level['p95_latency_s']} |")
  (out / "bench_serve.md").write_text("\n".join(rows) + "\n")
  plot(results, out / "bench_serve.png")
  print("\n".join(rows))
  print(json.dumps({"out": str(out.absolute()), "png": str(out / "bench_serve.png")}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main)
