"""A model's parameters by component, as numbers and as the table `experiments.describe` prints.

A person sizing a model asks how much of it is embeddings, attention and experts, how much of
it one token uses, and how many bytes it takes; `model.describe` answers with every shape. This
module groups those shapes (from `nnx.eval_shape`, nothing allocated) into components:

  embeddings      the input embedding and the output head (one matrix when tied)
  attention       query, key, value and output projections (and QK norms when enabled)
  routed experts  the routed part of the expert bank (top_k of them per token)
  shared expert   the experts every token uses (weight 1.0, see docs/)
  router          the router matrix
  dense MLP       the feed-forward block of a dense model (num_experts = 0)
  norms           the RMSNorm scales

Every parameter is in exactly one component, so the components sum to the total; the active
count is the same sum with the routed experts scaled by top_k / routed.
"""

from __future__ import annotations

from typing import Any, Mapping

COMPONENTS = ("embeddings", "attention", "routed experts", "shared expert", "router",
              "dense MLP", "norms")
BYTES_PER_PARAM = {"bf16": 2, "fp32": 4}


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


def component_of(name: str) -> str:
  """The component of a parameter, by its dotted name (an expert bank is split elsewhere)."""
  if name in ("embed", "lm_head") or name.endswith((".embed", ".lm_head")):
    return "embeddings"
  if "norm" in name.rsplit(".", 1)[-1] or "norm." in name:
    return "norms"
  if ".attn." in f".{name}":
    return "attention"
  if "router" in name:
    return "router"
  if ".mlp." in f".{name}":
    return "dense MLP"
  raise ValueError(f"parameter {name!r} belongs to no known component; add it to "
                   "emo_jax/model/summary.component_of")


def parameter_summary(cfg, shapes: Mapping[str, Any]) -> dict[str, Any]:
  """Parameter counts by component, total and active, and bytes, from parameter shapes.

  cfg: the ModelConfig; shapes: {dotted name: {"shape": [...]}} as `model.describe` gives them.
  The expert bank (mlp weights with an expert axis, routed experts first, shared last) is split
  into routed and shared experts.
  """
  total = dict.fromkeys(COMPONENTS, 0)
  moe = cfg.num_experts > 0
  routed = cfg.num_experts - cfg.num_shared_experts if moe else 0
  for name, entry in shapes.items():
    shape = list(entry["shape"])
    component = component_of(name)
    if component == "dense MLP" and moe:
      # Scanned blocks: [layers, experts, ...]; the expert axis is the second.
      if len(shape) < 3 or shape[1] != cfg.num_experts:
        raise ValueError(f"expert weight {name} has shape {shape}; expected [layers, "
                         f"{cfg.num_experts}, ...]")
      per_expert = _size(shape) // cfg.num_experts
      total["routed experts"] += per_expert * routed
      total["shared expert"] += per_expert * cfg.num_shared_experts
      continue
    total[component] += _size(shape)
  active = dict(total)
  if moe and routed:
    active["routed experts"] = total["routed experts"] * cfg.top_k // routed
  all_params = sum(total.values())
  all_active = sum(active.values())
  return {
      "components": {c: {"params": total[c], "active": active[c]} for c in COMPONENTS
                     if total[c]},
      "total_params": all_params,
      "active_params": all_active,
      "active_params_without_embeddings": all_active - total["embeddings"],
      "bytes": {kind: all_params * n for kind, n in BYTES_PER_PARAM.items()},
  }


def _count(n: int) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return str(n)


def _bytes(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def format_table(summary: Mapping[str, Any], cfg, name: str = "") -> str:
  """The summary as an aligned text table (components, totals, bytes)."""
  moe = cfg.num_experts > 0
  routed = cfg.num_experts - cfg.num_shared_experts if moe else 0
  label = {
      "routed experts": f"routed experts ({routed} x {cfg.num_layers} layers, top-{cfg.top_k})",
      "shared expert": (f"shared expert{'s' if cfg.num_shared_experts != 1 else ''} "
                        f"({cfg.num_shared_experts} x {cfg.num_layers} layers)"),
      "embeddings": "embeddings (input + output)" if not cfg.tie_embeddings
                    else "embeddings (tied)",
  }
  rows = [(label.get(c, c), v["params"], v["active"])
          for c, v in summary["components"].items()]
  total = summary["total_params"]
  width = max(len(r[0]) for r in rows + [("active without embeddings", 0, 0)])
  head = f"{'component':<{width}}  {'parameters':>14}  {'share':>6}  {'active/token':>14}"
  lines = [f"{name}: " if name else ""]
  lines[0] += (f"{_count(total)} parameters, {_count(summary['active_params'])} active per "
               f"token ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size})")
  lines += [head, "-" * len(head)]
  for label_, params, active in rows:
    lines.append(f"{label_:<{width}}  {params:>14,}  {100 * params / total:>5.1f}%  "
                 f"{active:>14,}")
  lines.append("-" * len(head))
  lines.append(f"{'total':<{width}}  {total:>14,}  {100.0:>5.1f}%  "
               f"{summary['active_params']:>14,}")
  lines.append(f"{'active without embeddings':<{width}}  {'':>14}  {'':>6}  "
               f"{summary['active_params_without_embeddings']:>14,}")
  b = summary["bytes"]
  lines.append(f"weights: {_bytes(b['bf16'])} at bf16, {_bytes(b['fp32'])} at fp32 "
               "(parameters only; training adds gradients and optimizer state: see "
               "experiments.plan_memory)")
  return "\n".join(lines)
