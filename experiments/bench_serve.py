"""Serving throughput, latency and memory against concurrency: our server with every expert and
with a 25 % subset, next to transformers `generate` and llama.cpp on the same exported model.

  python -m experiments.bench_serve --out bench_serve/ [--checkpoint W | --shape tiny|wide]
      [--calibration C.jsonl] [--concurrency 1,4,8,16] [--requests 4] [--max_tokens 32]
      [--slots 8] [--runs all,q25,transformers,llama_cpp] [--sdist llama_cpp_python-*.tar.gz]

Without --checkpoint a freshly initialised model of --shape is written to OUT/model (the
weights do not change what a step costs; EOS may end a request early and is counted as the
servers count it). The checkpoint is exported once (`convert.hf.export_hf`, layout qwen2_moe,
float32) to OUT/hf_qwen2_moe, which every peer loads, so all runs compute the same model on the
same token ids.

Runs (--runs):
* all: `experiments.serve` on a free 127.0.0.1 port serving every expert;
* q25: a server started with --noserve_all and one subset of a quarter of each layer's experts
  (shared included: keep = round(E / 4)) selected from --calibration, or without it from the
  prompts themselves, so only the subset's experts are resident;
* transformers: the export in `Qwen2MoeForCausalLM` (no remote code), batched greedy
  `generate` (experiments/bench_serve_peers.py says how a level maps to a batch);
* llama_cpp: the export converted to GGUF (float32) with the converter of --sdist, run by
  llama-cpp-python; skipped with its reason printed when either is missing.

At each concurrency level N the servers get N clients, each sending --requests greedy
completions one after another (the openai-compatible HTTP API; tokens counted from `usage`).
Reported per run and level: generated tokens/s over the level's wall time, p50 / p95 request
latency, the process's resident bytes (VmRSS after the last level, and its peak) and for the
servers the resident expert bytes. Peers run each in their own process, one run at a time.
Writes OUT/bench_serve.json (rows, versions, machine, commit, date), OUT/bench_serve.md (the
table, with each run's tokens/s over transformers' at the same level) and OUT/bench_serve.png.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import asyncio
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from emo_jax.convert import orbax_io
from experiments import bench_harness
from experiments import cli
from experiments import server_process
from experiments.bench_serve_peers import level_summary, markdown_rows, resident_bytes

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint "
                                  "(default: a fresh model of --shape in OUT/model).")
_SHAPE = flags.DEFINE_enum("shape", "wide", ["tiny", "wide"], "Model written without "
                           "--checkpoint: configs/tiny.py's, or the wider tiny of BENCHMARKS.md "
                           "(d_model 256, 4 layers, 32 experts, top-4).")
_OUT = flags.DEFINE_string("out", "bench_serve", "Output folder.")
_CALIBRATION = flags.DEFINE_string("calibration", None, "JSONL choosing the subset's experts.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Override the checkpoint's tokenizer.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4", "8", "16"], "Concurrent requests.")
_REQUESTS = flags.DEFINE_integer("requests", 4, "Requests per client and level.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens per completion at most.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Decode slots of the servers.")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", ["The patient was given", "def add(a, b):", "In 1905 the physicist",
               "Once upon a time, in a small village by the sea,"],
    "Prompts, taken in turn by a level's requests (repeatable).")
_RUNS = flags.DEFINE_list("runs", ["all", "q25", "transformers", "llama_cpp"], "What to time.")
_SDIST = flags.DEFINE_string("sdist", None, "llama-cpp-python source archive, whose converter "
                             "writes the GGUF of the llama_cpp run.")

RUNS = ("all", "q25", "transformers", "llama_cpp")
WIDE = {"d_model": 256, "expert_hidden": 256, "num_experts": 32, "top_k": 4, "num_layers": 4,
        "head_dim": 64, "pool_max": 32, "pool_min": 4}
ROOT = pathlib.Path(__file__).resolve().parents[1]


async def one_level(url: str, experts: str, clients: int, requests: int, max_tokens: int,
                    prompts: list[str]) -> dict:
  """`clients` clients sending `requests` completions each; request k of the level takes
  prompt k (in turn), as the peers' batches do."""
  import httpx  # pylint: disable=import-outside-toplevel
  latencies, tokens = [], 0

  async def client(http, index):
    nonlocal tokens
    for r in range(requests):
      start = time.perf_counter()
      prompt = prompts[(r * clients + index) % len(prompts)]
      reply = await http.post(url + "/v1/completions", json={
          "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "experts": experts})
      reply.raise_for_status()
      latencies.append(time.perf_counter() - start)
      tokens += reply.json()["usage"]["completion_tokens"]

  limits = httpx.Limits(max_connections=clients + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as http:
    start = time.perf_counter()
    await asyncio.gather(*(client(http, i) for i in range(clients)))
    wall = time.perf_counter() - start
  return level_summary(clients, latencies, tokens, wall)


def fresh_checkpoint(path: pathlib.Path, shape: str) -> pathlib.Path:
  """A freshly initialised model of configs/tiny.py's shape (or WIDE over it), byte tokenizer."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from emo_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from emo_jax.convert import loading  # pylint: disable=import-outside-toplevel
  from emo_jax.model.transformer import Transformer  # pylint: disable=import-outside-toplevel
  from emo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  source = path / loading.SOURCE_FILE
  if source.is_file():
    if json.loads(source.read_text()).get("init") != shape:
      raise app.UsageError(f"{path} holds a model of another --shape; choose another --out")
    return path  # written by an earlier run into the same --out
  cfg = ModelConfig(**{**tiny.get_config().model.to_dict(), **(WIDE if shape == "wide" else {})})
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  ckpt_lib.save_params(path, params, cfg.to_dict())
  (path / loading.SOURCE_FILE).write_text(json.dumps({"tokenizer": "bytes", "init": shape}))
  return path


def calibration(out: pathlib.Path, prompts: list[str]) -> str:
  """--calibration, or a JSONL of the prompts (the subset then fits what it is asked)."""
  if _CALIBRATION.value:
    return _CALIBRATION.value
  path = out / "calibration.jsonl"
  path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
  return str(path)


def serve_run(name: str, checkpoint: str, keep: int, out: pathlib.Path, prompts: list[str]) -> dict:
  """One server ("all" or "q25") through every level, with its memory at the end."""
  import httpx  # pylint: disable=import-outside-toplevel
  args = [f"--checkpoint={checkpoint}", f"--slots={_SLOTS.value}", "--max_queue=1024"]
  if _TOKENIZER.value:
    args.append(f"--tokenizer={_TOKENIZER.value}")
  if name == "q25":
    args += ["--noserve_all", f"--subset=q25={calibration(out, prompts)}:{keep}"]
  experts = "all" if name == "all" else "q25"
  with server_process.serving(args, out / f"server_{name}.log") as server:
    url = server.url
    health = httpx.get(url + "/health").json()
    asyncio.run(one_level(url, experts, 1, 1, _MAX_TOKENS.value, prompts))  # warm-up
    levels = []
    for c in (int(x) for x in _CONCURRENCY.value):
      levels.append(asyncio.run(one_level(url, experts, c, _REQUESTS.value, _MAX_TOKENS.value,
                                          prompts)))
      print(json.dumps({"run": name, **levels[-1]}), flush=True)
    memory = resident_bytes(server.process.pid)
  return {"keep": keep, "slots": _SLOTS.value, "levels": levels, **memory,
          **{k: health[k] for k in ("resident_expert_bytes", "full_expert_bytes",
                                    "non_expert_bytes")}}


def peer_run(peer: str, model: pathlib.Path, spec: dict, out: pathlib.Path) -> dict:
  """experiments.bench_serve_peers in its own process; its last stdout line is the result."""
  spec_file = out / "peer_spec.json"
  spec_file.write_text(json.dumps(spec))
  log = out / f"peer_{peer}.log"
  with open(log, "w", encoding="utf-8") as handle:
    done = subprocess.run([sys.executable, "-m", "experiments.bench_serve_peers", f"--peer={peer}",
                           f"--model={model}", f"--spec={spec_file}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=handle, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"the {peer} peer exited ({done.returncode}); see {log}")
  lines = done.stdout.strip().splitlines()
  for line in lines[:-1]:
    print(line, flush=True)
  return json.loads(lines[-1])


def llama_cpp_skip_reason() -> str | None:
  if importlib.util.find_spec("llama_cpp") is None:
    return "llama-cpp-python is not importable (experiments/llama_cpp_check.py says how to build it)"
  if not _SDIST.value:
    return "no --sdist: the GGUF converter comes from the llama-cpp-python source archive"
  return None


def make_gguf(hf_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  from experiments import llama_cpp_check  # pylint: disable=import-outside-toplevel
  gguf = out / "model_f32.gguf"
  if not gguf.is_file():
    converter = llama_cpp_check.unpack_converter(_SDIST.value, pathlib.Path(tempfile.mkdtemp()))
    done = llama_cpp_check.to_gguf(converter, hf_dir, gguf)
    if done.returncode:
      raise RuntimeError(f"convert_hf_to_gguf failed: {done.stderr.strip()[-600:]}")
  return gguf


def plot(runs: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for name, run in runs.items():
    if "skipped" in run:
      continue
    c = [r["concurrency"] for r in run["levels"]]
    label = f"{name} ({run.get('rss_bytes', 0) / 2**20:.0f} MiB resident)"
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
  fig.suptitle(f"CPU: servers with {_SLOTS.value} slots, {_MAX_TOKENS.value} tokens per request")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  cli.start(argv)
  from emo_jax.convert import hf, loading  # pylint: disable=import-outside-toplevel
  unknown = sorted(set(_RUNS.value) - set(RUNS))
  if unknown:
    raise app.UsageError(f"--runs {unknown} unknown; choose from {list(RUNS)}")
  out = pathlib.Path(_OUT.value).absolute()
  out.mkdir(parents=True, exist_ok=True)
  checkpoint = _CHECKPOINT.value or str(fresh_checkpoint(out / "model", _SHAPE.value))
  tok_spec = _TOKENIZER.value or loading.tokenizer_spec(checkpoint)
  if not tok_spec or tok_spec == "none":
    raise app.UsageError("cannot tell which tokenizer the checkpoint uses; pass --tokenizer")
  tokenizer = loading.load_tokenizer(tok_spec)
  prompts = list(_PROMPTS.value)
  num_experts = int(orbax_io.ParamSource(checkpoint).model_config["num_experts"])
  keep = max(2, round(num_experts / 4))
  spec = {"concurrency": [int(x) for x in _CONCURRENCY.value], "requests": _REQUESTS.value,
          "max_tokens": _MAX_TOKENS.value, "prompts": prompts,
          "prompt_ids": [tokenizer.encode(p) for p in prompts]}
  hf_dir = out / "hf_qwen2_moe"
  if {"transformers", "llama_cpp"} & set(_RUNS.value) and not (hf_dir / "config.json").is_file():
    hf.export_hf(checkpoint, hf_dir, layout="qwen2_moe", tokenizer=tok_spec)
  runs = {}
  for name in _RUNS.value:
    bench_harness.log("bench_serve", f"run {name}")
    if name in ("all", "q25"):
      runs[name] = serve_run(name, checkpoint, keep if name == "q25" else num_experts, out,
                             prompts)
    elif name == "transformers":
      runs[name] = peer_run(name, hf_dir, spec, out)
    else:
      reason = llama_cpp_skip_reason()
      if reason:
        print(json.dumps({"run": name, "skipped": reason}), flush=True)
        runs[name] = {"skipped": reason}
      else:
        runs[name] = peer_run(name, make_gguf(hf_dir, out), spec, out)
  result = {"runs": runs, "checkpoint": checkpoint, "num_experts": num_experts,
            "settings": {k: v for k, v in spec.items() if k != "prompt_ids"} | {
                "slots": _SLOTS.value},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": bench_harness.git_commit(), "machine": bench_harness.device_info(),
            "load_average": os.getloadavg(), "versions": bench_harness.versions()}
  (out / "bench_serve.json").write_text(json.dumps(result, indent=1))
  rows = markdown_rows(runs, num_experts)
  (out / "bench_serve.md").write_text("\n".join(rows) + "\n")
  plot(runs, out / "bench_serve.png")
  print("\n".join(rows))
  print(json.dumps({"out": str(out), "png": str(out / "bench_serve.png")}))


if __name__ == "__main__":
  app.run(main)
