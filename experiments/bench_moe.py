"""The routed-expert layer alone: forward+backward TFLOP/s per backend next to dense ceilings.

  python -m experiments.bench_moe --shapes demo,emo --json_out bench_moe.json
  python -m experiments.bench_moe --shapes emo --tokens 16384 --dtype bfloat16     # on a GPU

For each shape preset and each expert backend (``capacity``, ``ragged`` with each grouped-matmul
kernel this platform has), one jitted step computes the routed experts on random top-k routing
and their gradients with respect to the activations, the combine weights and the whole bank.
Two ceilings are measured in the same run, in the same dtype:

* ``matmul``: one square dense matmul (--matmul_size), the chip's practical peak;
* ``dense_swiglu``: the same useful work as one dense SwiGLU over T * K rows with a single
  D x H expert (no routing, no gathers): what a perfect grouped kernel would reach.

Useful FLOPs count only the assignments' work: 3 matmuls of 2 * D * H FLOPs per assignment
forward, twice that backward. The capacity backend computes padded slots on top (its
``computed_flops`` says how many) and drops overflow (``dropped_fraction``).
"""

from __future__ import annotations

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import datetime
import json
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from emo_jax.model import experts
from experiments.bench_harness import measure_matmul

# Routed experts only (the shared expert is a plain dense SwiGLU, not part of this kernel).
SHAPES = {
    # The release: d_model 2048, 127 routed experts of width 1024, top-7.
    "emo": dict(d_model=2048, expert_hidden=1024, num_experts=127, top_k=7),
    # configs/demo.py
    "demo": dict(d_model=128, expert_hidden=128, num_experts=16, top_k=2),
    # configs/tiny.py
    "tiny": dict(d_model=64, expert_hidden=32, num_experts=7, top_k=2),
}

def on_accelerator() -> bool:
  return jax.default_backend() != "cpu"


def default_backends() -> list[str]:
  """capacity, plus ragged with XLA and with every real grouped kernel this platform has."""
  names = ["capacity", "ragged:xla"]
  best = experts.resolve_ragged_dot_impl("auto")
  if best != "xla":
    names.append(f"ragged:{best}")
  return names


def time_fn(fn: Callable, args, steps: int) -> float:
  """Seconds per call of a jitted fn, after one untimed warm-up call (the compile)."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def random_routing(tokens: int, num_experts: int, top_k: int, seed: int = 0):
  """Distinct top-k experts per token from random logits (a balanced router on average) and
  softmax weights, as the MoE layer would produce them."""
  logits = jax.random.normal(jax.random.key(seed), (tokens, num_experts), jnp.float32)
  weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
  return ids, weights


def make_inputs(shape: dict, tokens: int, dtype, seed: int = 0) -> dict:
  D, H, E, K = (shape[k] for k in ("d_model", "expert_hidden", "num_experts", "top_k"))
  keys = jax.random.split(jax.random.key(seed), 5)
  ids, weights = random_routing(tokens, E, K, seed)
  scale_in, scale_out = D**-0.5, H**-0.5
  return dict(
      x=jax.random.normal(keys[0], (tokens, D), dtype),
      ids=ids, weights=weights,
      w_gate=(jax.random.normal(keys[1], (E, D, H)) * scale_in).astype(dtype),
      w_up=(jax.random.normal(keys[2], (E, D, H)) * scale_in).astype(dtype),
      w_down=(jax.random.normal(keys[3], (E, H, D)) * scale_out).astype(dtype),
  )


def expert_step(backend: str, capacity_factor: float, dtype) -> Callable:
  """jit(forward + gradients w.r.t. x, weights and the bank) of the routed experts."""
  name, _, impl = backend.partition(":")

  def loss(x, weights, w_gate, w_up, w_down, ids):
    y, dropped = experts.routed_experts(
        x, ids, weights, w_gate, w_up, w_down, backend=name, capacity_factor=capacity_factor,
        compute_dtype=dtype, ragged_dot_impl=impl or "auto")
    return jnp.sum(y.astype(jnp.float32) ** 2) * 1e-3, dropped

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
  return jax.jit(lambda inp: grad(inp["x"], inp["weights"], inp["w_gate"], inp["w_up"],
                                  inp["w_down"], inp["ids"]))


def dense_swiglu_step(dtype) -> Callable:
  """The same useful FLOPs with one expert and no routing: x [T*K, D] through one SwiGLU."""
  def loss(x, w_gate, w_up, w_down):
    y = experts.swiglu(x, w_gate, w_up, w_down, compute_dtype=dtype)
    return jnp.sum(y.astype(jnp.float32) ** 2) * 1e-3
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def useful_flops(shape: dict, tokens: int) -> float:
  """Forward + backward FLOPs of the assignments' SwiGLUs (3 matmuls, backward = 2x forward)."""
  return 3 * (3 * 2 * shape["d_model"] * shape["expert_hidden"]) * tokens * shape["top_k"]


def measure_shape(name: str, tokens: int, backends: list[str], dtype, capacity_factor: float,
                  steps: int, matmul_flops: float) -> dict:
  shape = SHAPES[name]
  inp = make_inputs(shape, tokens, dtype)
  flops = useful_flops(shape, tokens)
  D, H, K = shape["d_model"], shape["expert_hidden"], shape["top_k"]
  rows = jax.random.normal(jax.random.key(9), (tokens * K, D), dtype)
  dense_args = (rows, inp["w_gate"][0], inp["w_up"][0], inp["w_down"][0])
  dense_seconds = time_fn(dense_swiglu_step(dtype), dense_args, steps)
  result = {"shape": name, **shape, "tokens": tokens, "useful_flops": flops,
            "dense_swiglu": {"seconds": dense_seconds, "tflops": flops / dense_seconds / 1e12},
            "backends": []}
  print(f"[{name}] dense SwiGLU ceiling: {flops / dense_seconds / 1e12:.3f} TFLOP/s", flush=True)
  for backend in backends:
    step = expert_step(backend, capacity_factor, dtype)
    try:
      (_, dropped), _ = step(inp)
      seconds = time_fn(step, (inp,), steps)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # XLA expands jax.lax.ragged_dot to a dense [rows, experts, ...] product, which runs out
      # of memory at EMO shapes: reported as a row, the other backends still run.
      result["backends"].append({"backend": backend, "error": "out of memory"})
      print(f"[{name}] {backend:<16} out of memory", flush=True)
      continue
    tflops = flops / seconds / 1e12
    row = {"backend": backend, "seconds": seconds, "tflops": tflops,
           "fraction_of_matmul": tflops * 1e12 / matmul_flops,
           "fraction_of_dense_swiglu": dense_seconds / seconds,
           "dropped_fraction": float(dropped)}
    if backend.startswith("capacity"):
      capacity = experts.expert_capacity(tokens, K, shape["num_experts"], capacity_factor)
      row["computed_flops"] = 3 * 3 * 2 * D * H * capacity * shape["num_experts"]
    result["backends"].append(row)
    print(f"[{name}] {backend:<16} {seconds * 1e3:9.2f} ms  {tflops:8.3f} TFLOP/s  "
          f"{row['fraction_of_matmul']:6.1%} of matmul  dropped {row['dropped_fraction']:.2%}",
          flush=True)
  return result


def run(shapes: list[str], tokens: int = 0, backends: list[str] | None = None,
        dtype_name: str = "", capacity_factor: float = 1.25, steps: int = 5,
        matmul_size: int = 0) -> dict:
  unknown = [s for s in shapes if s not in SHAPES]
  if unknown:
    raise ValueError(f"unknown shape preset(s) {unknown}; choose from {sorted(SHAPES)}")
  backends = backends or default_backends()
  for backend in backends:
    name, _, impl = backend.partition(":")
    if name not in experts.BACKENDS or (impl and impl not in experts.RAGGED_DOT_IMPLS):
      raise ValueError(f"unknown backend {backend!r}: use one of {list(experts.BACKENDS)}, "
                       f"optionally ragged:IMPL with IMPL in {list(experts.RAGGED_DOT_IMPLS)}")
  accel = on_accelerator()
  dtype_name = dtype_name or ("bfloat16" if accel else "float32")
  dtype = jnp.dtype(dtype_name)
  tokens = tokens or (16384 if accel else 2048)
  matmul = measure_matmul(matmul_size or None, dtype_name)
  matmul_size, matmul_flops = matmul["size"], matmul["flops_per_s"]
  print(f"device {jax.devices()[0].device_kind}: {matmul_size}^3 matmul "
        f"{matmul_flops / 1e12:.3f} TFLOP/s ({dtype_name})", flush=True)
  results = [measure_shape(s, tokens, backends, dtype, capacity_factor, steps, matmul_flops)
             for s in shapes]
  return {
      "date": datetime.date.today().isoformat(),
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "jax": jax.__version__, "dtype": dtype_name, "capacity_factor": capacity_factor,
      "matmul": {"size": matmul_size, "tflops": matmul_flops / 1e12},
      "results": results,
  }


def print_table(report: dict) -> None:
  print(f"\nrouted experts fwd+bwd, {report['dtype']}, {report['device']}; "
        f"matmul ceiling {report['matmul']['tflops']:.3f} TFLOP/s")
  print(f"{'shape':<6} {'tokens':>7} {'backend':<16} {'ms':>9} {'TFLOP/s':>9} "
        f"{'%matmul':>8} {'%dense':>7} {'dropped':>8}")
  for r in report["results"]:
    d = r["dense_swiglu"]
    print(f"{r['shape']:<6} {r['tokens']:>7} {'dense_swiglu':<16} {d['seconds'] * 1e3:>9.2f} "
          f"{d['tflops']:>9.3f} {d['tflops'] / report['matmul']['tflops']:>8.1%} {'':>7} {'':>8}")
    for b in r["backends"]:
      if "error" in b:
        print(f"{'':<6} {'':>7} {b['backend']:<16} {b['error']}")
        continue
      print(f"{'':<6} {'':>7} {b['backend']:<16} {b['seconds'] * 1e3:>9.2f} {b['tflops']:>9.3f} "
            f"{b['fraction_of_matmul']:>8.1%} {b['fraction_of_dense_swiglu']:>7.1%} "
            f"{b['dropped_fraction']:>8.2%}")


def _define_flags():
  """Flags exist only when this runs as a command: importing the module (tests) must not
  register `--steps` next to another entry point's."""
  flags.DEFINE_list("shapes", ["demo", "emo"], f"Shape presets: {sorted(SHAPES)}.")
  flags.DEFINE_integer("tokens", 0, "Tokens per step (0: 16384 on GPU/TPU, 2048 on CPU).")
  flags.DEFINE_list("backends", [], "Backends as name or name:ragged_dot_impl (default: "
                    "capacity and ragged with every kernel available).")
  flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"],
                    "Compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU).")
  flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor of `capacity`.")
  flags.DEFINE_integer("steps", 5, "Timed steps per measurement (after a warm-up).")
  flags.DEFINE_integer("matmul_size", 0, "Square matmul ceiling size (0: 8192 on GPU/TPU, "
                       "1024 on CPU).")
  flags.DEFINE_string("json_out", "bench_moe.json", "Where to write the results.")


def main(argv):
  del argv
  f = flags.FLAGS
  report = run(f.shapes, f.tokens, f.backends, f.dtype, f.capacity_factor, f.steps,
               f.matmul_size)
  print_table(report)
  with open(f.json_out, "w") as out:
    json.dump(report, out, indent=2)
  print(f"wrote {f.json_out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
