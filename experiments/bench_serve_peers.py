"""What a user would run instead of experiments.serve, timed the way bench_serve times it.

  python -m experiments.bench_serve_peers --peer transformers --model HF_DIR --spec SPEC.json
  python -m experiments.bench_serve_peers --peer llama_cpp --model MODEL.gguf --spec SPEC.json

bench_serve starts this once per peer, so each peer's resident memory is its own process's and
no JAX is loaded beside it. SPEC.json holds the levels ("concurrency"), "requests" per client
and level, "max_tokens", the "prompts" (text) and their token ids ("prompt_ids", from the
checkpoint's tokenizer). The last stdout line is the result as JSON: one row per level and the
process's resident bytes after the last level (VmRSS) and at its peak (VmHWM).

* transformers: concurrency N is one greedy `generate` call on a batch of N prompts, left
  padded, `requests` calls per level; every request's latency is its call's time. Generated
  tokens are counted up to and including a row's first EOS, as the server's `usage` counts them.
* llama_cpp (llama-cpp-python): its `Llama` object decodes one sequence at a time, so the N
  requests of a level arrive together and are served one after another; a request's latency
  runs from its round's start (the N arrive together, `requests` rounds a level) to its own
  end, as on a one-slot server.

The percentiles and the level rows are the ones bench_serve reports for its servers
(`level_summary`), and its table is written here (`markdown_rows`), so every row of the table
is computed alike.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json
import os
import time

import numpy as np
from absl import app, flags

# PyTorch's OpenMP threads spin at every barrier by default (experiments/bench_torch_peer.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PEERS = ("transformers", "llama_cpp")


def level_summary(concurrency: int, latencies: list[float], tokens: int, seconds: float) -> dict:
  """One row of the table: generated tokens over the level's wall time, request percentiles."""
  if not latencies:
    raise ValueError(f"level {concurrency} finished no request")
  return {"concurrency": concurrency, "requests": len(latencies), "tokens": tokens,
          "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
          "p50_latency_s": round(float(np.percentile(latencies, 50)), 3),
          "p95_latency_s": round(float(np.percentile(latencies, 95)), 3)}


def markdown_rows(runs: dict, num_experts: int) -> list[str]:
  """Markdown rows: one per run and level, tokens/s also as a multiple of transformers'."""
  base = {level["concurrency"]: level["tokens_per_s"]
          for level in runs.get("transformers", {}).get("levels", [])}
  rows = ["| run | resident (RSS; peak) | concurrency | tokens/s | x transformers | "
          "p50 latency (s) | p95 latency (s) |", "|---|---|---|---|---|---|---|"]
  for name, run in runs.items():
    if "skipped" in run:
      rows.append(f"| {name} | skipped: {run['skipped']} | | | | | |")
      continue
    label = name
    if "keep" in run:
      label += (f" ({run['keep']}/{num_experts} experts, "
                f"{run['resident_expert_bytes'] / run['full_expert_bytes']:.0%} of expert bytes)")
    memory = (f"{run['rss_bytes'] / 2**20:,.0f} MiB; {run['peak_rss_bytes'] / 2**20:,.0f} MiB"
              if "rss_bytes" in run else "?")
    for level in run["levels"]:
      ratio = base.get(level["concurrency"])
      ratio = f"{level['tokens_per_s'] / ratio:.2f}" if ratio else ""
      rows.append(f"| {label} | {memory} | {level['concurrency']} | {level['tokens_per_s']} | "
                  f"{ratio} | {level['p50_latency_s']} | {level['p95_latency_s']} |")
  return rows


def resident_bytes(pid: int | str = "self") -> dict:
  """VmRSS (now) and VmHWM (peak) of a process, in bytes (Linux; {} elsewhere)."""
  try:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      fields = dict(line.split(":", 1) for line in f if ":" in line)
  except OSError:
    return {}
  return {key: int(fields[name].split()[0]) * 1024
          for key, name in (("rss_bytes", "VmRSS"), ("peak_rss_bytes", "VmHWM")) if name in fields}


def generated_count(row, eos: int) -> int:
  """Tokens of one generated row up to and including its first EOS (all of them without)."""
  row = list(row)
  return row.index(eos) + 1 if eos in row else len(row)


def batch_prompts(prompts: list, call: int, size: int) -> list:
  """The prompts of one batch: the level's requests take the prompts in turn."""
  return [prompts[(call * size + j) % len(prompts)] for j in range(size)]


def run_transformers(hf_dir: str, spec: dict) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
  got = [tok(p)["input_ids"] for p in spec["prompts"]]
  if got != spec["prompt_ids"]:
    raise ValueError(f"the export's tokenizer encodes the prompts as {got}, the checkpoint's "
                     f"as {spec['prompt_ids']}; the peers would not see the same tokens")
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

  def call(texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
      out = model.generate(**enc, max_new_tokens=spec["max_tokens"], do_sample=False,
                           pad_token_id=pad, eos_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    return seconds, sum(generated_count(row, tok.eos_token_id) for row in new)

  call(spec["prompts"][:1])  # warm-up
  levels = []
  for n in spec["concurrency"]:
    latencies, tokens, wall = [], 0, 0.0
    for c in range(spec["requests"]):
      seconds, count = call(batch_prompts(spec["prompts"], c, n))
      latencies += [seconds] * n
      tokens += count
      wall += seconds
    levels.append(level_summary(n, latencies, tokens, wall))
    print(json.dumps({"peer": "transformers", **levels[-1]}), flush=True)
  return {"levels": levels, "threads": torch.get_num_threads(),
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def run_llama_cpp(gguf: str, spec: dict) -> dict:
  import llama_cpp  # pylint: disable=import-outside-toplevel
  context = max(len(p) for p in spec["prompt_ids"]) + spec["max_tokens"] + 8
  # type_k / type_v 0: a float32 KV cache, the precision of the other peers.
  llm = llama_cpp.Llama(model_path=gguf, n_ctx=context, n_threads=os.cpu_count(), verbose=False,
                        type_k=0, type_v=0)

  def request(ids):
    out = llm.create_completion(prompt=list(ids), max_tokens=spec["max_tokens"], temperature=0.0)
    return out["usage"]["completion_tokens"]

  request(spec["prompt_ids"][0])  # warm-up
  levels = []
  for n in spec["concurrency"]:
    latencies, tokens = [], 0
    start = time.perf_counter()
    for c in range(spec["requests"]):
      arrived = time.perf_counter()  # the round's n requests arrive together
      for ids in batch_prompts(spec["prompt_ids"], c, n):
        tokens += request(ids)
        latencies.append(time.perf_counter() - arrived)
    levels.append(level_summary(n, latencies, tokens, time.perf_counter() - start))
    print(json.dumps({"peer": "llama_cpp", **levels[-1]}), flush=True)
  memory = resident_bytes()  # while the model is mapped: its weights are file pages of the RSS
  llm.close()
  return {"levels": levels, "threads": os.cpu_count(), **memory,
          "versions": {"llama_cpp_python": llama_cpp.__version__}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with open(flags.FLAGS.spec, encoding="utf-8") as f:
    spec = json.load(f)
  run = {"transformers": run_transformers, "llama_cpp": run_llama_cpp}[flags.FLAGS.peer]
  result = run(flags.FLAGS.model, spec)
  print(json.dumps({**resident_bytes(), **result}), flush=True)


if __name__ == "__main__":
  flags.DEFINE_enum("peer", None, list(PEERS), "Which peer to time.")
  flags.DEFINE_string("model", None, "Hugging Face folder (transformers) or .gguf (llama_cpp).")
  flags.DEFINE_string("spec", None, "JSON file of levels, requests, max_tokens and prompts.")
  flags.mark_flags_as_required(["peer", "model", "spec"])
  app.run(main)
