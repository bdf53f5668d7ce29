"""Ways to choose an expert subset, next to the routing-mass ranking of selective.py.

All return a `selective.Selection` (routed experts kept per layer; the shared expert always
stays), so every method is applied, pruned and evaluated the same way (docs/selective_eval.md);
the calibration batches they read come from `calibration.calibration_batches`:

* `greedy` / `global`: selective.select_experts, the mean routed softmax over the calibration
  tokens, layer by layer with earlier layers restricted, or all layers in one pass;
* `random`: each layer's routed experts drawn uniformly, seeded; no calibration data;
* `easy_ep`: EASY-EP (arXiv 2504.06792), one pass on the full model; expert i of a layer
  scores sum_t g_{i,t} * ||E_i(h_t)|| * s_t over the calibration tokens routed to it, with
  g the routing weight, E_i(h_t) the expert's output on the layer's MoE input h_t and
  s_t = 1 - cos(h_t, h_t + y_t) how much the whole MoE output y_t turns the token.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.model import moe as moe_lib
from emo_jax.study import selective

METHODS = ("greedy", "global", "random", "easy_ep")
_EASY_EP = "easy_ep_scores"


def random_selection(cfg, keep: int, seed: int) -> selective.Selection:
  """Each layer keeps `keep - shared` routed experts drawn without replacement, seeded."""
  n = selective.routed_to_keep(cfg, keep)
  R = cfg.num_routed_experts
  rng = np.random.default_rng(seed)
  kept = np.stack([np.sort(rng.permutation(R)[:n]) for _ in range(cfg.num_layers)])
  return selective.Selection(keep=keep, kept_routed=kept.astype(np.int64),
                             scores=np.zeros((cfg.num_layers, R)), num_routed=R,
                             num_shared=cfg.num_shared_experts, greedy=False)


# ---- EASY-EP -----------------------------------------------------------------------------------
def _expert_norms_RxT(x_TxD, w_gate_RxDxH, w_up_RxDxH, w_down_RxHxD):
  """||E_i(x_t)|| for every routed expert i and token t, one expert at a time (no [R, T, D])."""
  def one(weights):
    wg, wu, wd = weights
    y = (jax.nn.silu(x_TxD @ wg) * (x_TxD @ wu)) @ wd
    return jnp.linalg.norm(y, axis=-1)
  return jax.lax.map(one, (w_gate_RxDxH, w_up_RxDxH, w_down_RxHxD))


@contextlib.contextmanager
def _scoring_moe_layers():
  """While active, every traced MoE layer also returns aux["easy_ep_scores"] [routed].

  The score needs each layer's MoE input and output, which live inside the scanned layer
  stack; computing it in the layer itself and returning it through the per-layer statistics
  (which the model stacks over layers) keeps the model's code untouched. Only functions traced
  inside this context see it (`_easy_ep_sums`, jitted on its own).
  """
  original = moe_lib.MoE.__call__

  @functools.wraps(original)
  def scoring_call(self, x_BxLxD, segment_ids_BxL, *args, **kwargs):
    y_BxLxD, aux = original(self, x_BxLxD, segment_ids_BxL, *args, **kwargs)
    cfg = self.cfg
    R, D = cfg.num_routed_experts, x_BxLxD.shape[-1]
    x_TxD = x_BxLxD.reshape(-1, D).astype(jnp.float32)
    y_TxD = y_BxLxD.reshape(-1, D).astype(jnp.float32)
    probs_TxR = jax.nn.softmax(jnp.dot(x_TxD, self.router[...][:, :R].astype(jnp.float32),
                                       precision=jax.lax.Precision.HIGHEST), axis=-1)
    weights_TxK, ids_TxK = jax.lax.top_k(probs_TxR, cfg.top_k)  # EMO: no renormalisation
    gate_TxR = jnp.einsum("tk,tkr->tr", weights_TxK, jax.nn.one_hot(ids_TxK, R))
    w = lambda p: p[...][:R].astype(jnp.float32)
    norms_RxT = _expert_norms_RxT(x_TxD, w(self.w_gate), w(self.w_up), w(self.w_down))
    out_TxD = x_TxD + y_TxD
    cos_T = jnp.sum(x_TxD * out_TxD, -1) / jnp.maximum(
        jnp.linalg.norm(x_TxD, axis=-1) * jnp.linalg.norm(out_TxD, axis=-1), 1e-12)
    s_T = jnp.maximum(1.0 - cos_T, 0.0) * (segment_ids_BxL.reshape(-1) > 0)
    aux = dict(aux)
    aux[_EASY_EP] = jnp.einsum("tr,rt,t->r", gate_TxR, norms_RxT, s_T,
                               precision=jax.lax.Precision.HIGHEST)
    return y_BxLxD, aux

  moe_lib.MoE.__call__ = scoring_call
  try:
    yield
  finally:
    moe_lib.MoE.__call__ = original


@functools.partial(jax.jit, static_argnums=(0,))
def _easy_ep_sums(graphdef, params, tokens, segment_ids, positions):
  model = nnx.merge(graphdef, params)
  _, aux = model(tokens, segment_ids, positions, train=False)
  if _EASY_EP not in aux:
    raise RuntimeError("the model's per-layer statistics did not carry the EASY-EP scores")
  return aux[_EASY_EP]  # [layers, routed]


def easy_ep_scores(graphdef, params, batches: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
  """EASY-EP score of every routed expert, summed over the batches: float64 [layers, routed]."""
  total = None
  with _scoring_moe_layers():
    for b in batches:
      s = np.asarray(jax.device_get(_easy_ep_sums(
          graphdef, params, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]),
          jnp.asarray(b["positions"]))), np.float64)
      total = s if total is None else total + s
  if total is None:
    raise ValueError("no calibration batches given")
  return total


def easy_ep_selection(graphdef, params, cfg, batches, keep: int) -> selective.Selection:
  n = selective.routed_to_keep(cfg, keep)
  scores = easy_ep_scores(graphdef, params, batches)
  kept = np.stack([selective.top_experts(s, n) for s in scores])
  return selective.Selection(keep=keep, kept_routed=kept, scores=scores,
                             num_routed=cfg.num_routed_experts,
                             num_shared=cfg.num_shared_experts, greedy=False)


def select(method: str, graphdef, params, cfg, batches, keep: int, *,
           seed: int = 0) -> selective.Selection:
  """The subset of `keep` experts per layer (shared included) chosen by `method`."""
  if method in ("greedy", "global"):
    return selective.select_experts(graphdef, params, cfg, batches, keep,
                                    greedy=method == "greedy")
  if method == "random":
    return random_selection(cfg, keep, seed)
  if method == "easy_ep":
    return easy_ep_selection(graphdef, params, cfg, batches, keep)
  raise ValueError(f"unknown selection method {method!r}; choose from {list(METHODS)}")
