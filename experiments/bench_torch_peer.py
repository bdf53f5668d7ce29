"""The PyTorch peer of experiments/bench_step.py: transformers' Qwen2MoeForCausalLM of the same
shape as the emo_jax model, trained with AdamW at the same hyper-parameters on a batch of the
same shape. torch is imported only inside a measurement, never by the parent of isolated runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from emo_jax.train import trainer as train_lib
from emo_jax.config import ModelConfig
from emo_jax.convert.layouts import hf_config
from experiments.bench_harness import log, max_rss_bytes, timed_steps


def _log(message: str) -> None:
  log("bench_step", message)


def torch_available() -> bool:
  """Whether the peer can run, without importing torch (the parent of isolated runs never does)."""
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _import_torch():
  """(torch, transformers, OpenMP wait policy in effect).

  PyTorch's CPU kernels use OpenMP, whose threads spin at every barrier by default. On a CPU
  shared with other work (the 2-core machines this project tests on) a spinning thread waits
  for a descheduled sibling and steps slow down 10-100x at random (measured here: 25 ms to 5 s
  per step for the tiny model). Passive waiting removes that and costs little, so it is the
  default unless the user set OMP_WAIT_POLICY; it only takes effect if torch is not yet loaded.
  """
  preloaded = "torch" in sys.modules
  if not preloaded:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch
  import transformers
  policy = os.environ.get("OMP_WAIT_POLICY", "default")
  return torch, transformers, policy + (" (torch was already loaded)" if preloaded else "")


def torch_peer_config(cfg: ModelConfig) -> dict:
  """Qwen2MoeConfig keyword arguments of the peer: our qwen2_moe export, trained with aux loss.

  The export (emo_jax.convert.layouts.hf_config) is the same architecture EMO's inference
  reduces to; the peer adds the load-balancing loss at our weight and drops the KV cache.
  """
  values = hf_config(cfg, "qwen2_moe")
  for key in ("architectures", "model_type", "torch_dtype"):
    values.pop(key, None)
  values.update(output_router_logits=True, router_aux_loss_coef=cfg.lb_loss_weight,
                use_cache=False)
  return values


def _grouped_mm_kernel(torch, device, dtype) -> str:
  """Which kernel transformers' grouped_mm experts call on this device and dtype."""
  try:
    from transformers.integrations import moe as hf_moe
    x = torch.zeros(4, 16, device=device, dtype=dtype)
    w = torch.zeros(2, 16, 16, device=device, dtype=dtype)
    offs = torch.tensor([2, 4], device=device, dtype=torch.int32)
    if not hf_moe._can_use_grouped_mm(x, w, offs):
      return "transformers grouped_mm_fallback"
  except Exception:  # a private helper: its absence must not break the benchmark
    return "unknown"
  if hasattr(torch.nn.functional, "grouped_mm"):
    return "torch.nn.functional.grouped_mm"
  return "torch._grouped_mm"


def measure_torch(cfg: ModelConfig, tc: train_lib.TrainConfig, batch: int, seq_len: int, *,
                  steps: int, warmup: int, seed: int = 0) -> dict:
  """The PyTorch peer's training step: Qwen2MoeForCausalLM, AdamW, same batch shape.

  Weights in bf16 when emo_jax's are; otherwise float32 master weights, under bf16 autocast when
  emo_jax computes in bf16. Experts run through transformers' grouped_mm implementation where
  the model accepts it (recorded, with the kernel it reaches), else its default.
  """
  if not torch_available():
    raise ImportError("torch and transformers are needed for the PyTorch peer")
  torch, transformers, omp_policy = _import_torch()
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cpu":
    torch.set_num_threads(os.cpu_count())
  else:
    torch.cuda.reset_peak_memory_stats(device)
  torch.manual_seed(seed)
  _log(f"torch: building Qwen2MoeForCausalLM on {device.type} ({batch} x {seq_len})")
  values = torch_peer_config(cfg)
  with torch.device(device):
    try:
      model = transformers.Qwen2MoeForCausalLM(
          transformers.Qwen2MoeConfig(**values, experts_implementation="grouped_mm"))
    except (ValueError, ImportError) as e:
      _log(f"torch: grouped_mm experts refused ({e}); using transformers' default")
      model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**values))
  weights_bf16 = cfg.param_dtype == "bfloat16"
  if weights_bf16:
    model.to(torch.bfloat16)
  autocast = not weights_bf16 and cfg.compute_dtype == "bfloat16"
  weight_dtype = torch.bfloat16 if weights_bf16 else torch.float32
  experts_impl = model.config._experts_implementation
  kernel = _grouped_mm_kernel(torch, device, weight_dtype) if experts_impl == "grouped_mm" else None
  model.train()

  # emo_jax's default decays every weight but the embedding and the norm scales
  # (train.decay_mask under TrainConfig.weight_decay_exempt="embedding_and_norms").
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if "embed_tokens" in name or "norm" in name or name.endswith(".bias")
     else decay).append(p)
  fused = device.type == "cuda"
  optimizer = torch.optim.AdamW(
      [{"params": decay, "weight_decay": tc.weight_decay},
       {"params": no_decay, "weight_decay": 0.0}],
      lr=tc.learning_rate, betas=(tc.b1, tc.b2), eps=tc.eps, fused=fused or None)
  generator = torch.Generator().manual_seed(seed)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=generator).to(device)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      out = model(input_ids=ids, labels=ids)  # the model shifts labels itself
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    return out.loss

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize(device)

  _log(f"torch: experts_implementation={experts_impl} ({kernel}); {max(warmup, 1)} warm-up + "
       f"{steps} timed steps")
  start = time.perf_counter()
  for _ in range(max(warmup, 1)):  # the first step allocates optimiser state: never timed
    loss = step()
  sync()
  first_steps_s = time.perf_counter() - start
  last = {}

  def timed_step():
    last["loss"] = step().detach()
    sync()

  timing = timed_steps(timed_step, steps, batch * seq_len)
  loss = last["loss"]
  return {"implementation": "torch", **timing, "warmup_s": first_steps_s,
          "loss": float(loss.item()), "dropped_fraction": 0.0,  # grouped / eager experts: dropless
          "peak_device_bytes": (int(torch.cuda.max_memory_allocated(device))
                                if device.type == "cuda" else None),
          "max_rss_bytes": max_rss_bytes(),
          "experts_implementation": experts_impl, "grouped_mm_kernel": kernel,
          "attn_implementation": model.config._attn_implementation,
          "weights": "bfloat16" if weights_bf16 else "float32",
          "autocast_bf16": autocast, "optimizer": "AdamW(fused)" if fused else "AdamW(foreach)",
          "omp_wait_policy": omp_policy,
          "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"cpu, {torch.get_num_threads()} threads")}
