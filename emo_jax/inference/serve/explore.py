"""The routing explorer: POST /v1/route (which experts each token routes to) and GET /explore.

`POST /v1/route` runs the served model's own forward pass (the compact bank of
`bank.ExpertBank`, the engine's execution settings, the request's subset as the routing mask,
exactly as a completion on that subset runs its prompt) with `collect_routing=True`, and reads
what every MoE layer routed (`model/moe.py`: aux["routing_ids"], aux["routing_weights"],
aux["router_logits"]). Bank slots are mapped back to the checkpoint's routed expert ids, so the
ids equal those of a forward pass of the checkpoint itself (on "all") or of the physically
pruned checkpoint of the subset. The response also holds

* `pool`: per layer, the document pool EMO's router picks for the text taken as one document
  (docs/algorithm.md, "The document pool"): the P experts with the highest document score (the
  sum over the text's tokens of the routed softmax over the request's experts). P is the
  request's `pool_size`, else the model's `eval_pool_size`, else `pool_min` of an EMO model
  (pool=True); a standard MoE without either has no pool (null). The pool is reported, not
  applied, unless the model applies `eval_pool_size` itself;
* `coverage`: every registered subset (but "all") by the share of the text's routing weight
  (over all tokens and layers) that falls on experts it holds, best first;
* `domains` / `expert_domains`: when the server was given a cluster file of
  `experiments.cluster` (clusters.json), each expert's domain: the domain whose tokens use it
  most often in that analysis (`expert_usage`), per layer.

`GET /explore` is a static page (static/explore.html: HTML, CSS and JS in one file, no CDN, no
build step) over these endpoints, /v1/subsets and /v1/completions.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from emo_jax.convert import loading
from emo_jax.inference.serve import bank as bank_lib
from emo_jax.inference.serve import protocol
from emo_jax.inference.serve import schemas

router = APIRouter()
STATIC = pathlib.Path(__file__).resolve().parent / "static"
_GRAPHDEFS: dict = {}  # (engine, bank width, execution) -> graphdef of the compact model
ERRORS = {status: {"model": schemas.ErrorBody} for status in (400, 404, 500)}


# ---- the contract -----------------------------------------------------------------------------
class RouteRequest(BaseModel):
  """POST /v1/route: a text (or its token ids), and optionally which experts to route over."""
  model_config = ConfigDict(extra="ignore")
  text: str | None = Field(None, description="The text to route (tokenised by the server).")
  tokens: list[StrictInt] | None = Field(None, description="Token ids instead of a text.")
  experts: str | None = Field(None, description="A registered subset, a union 'a+b', or 'all' "
                              "(the default), as in /v1/completions.")
  model: str | None = Field(None, description="The model, or MODEL:SUBSET.")
  pool_size: StrictInt | None = Field(None, ge=1, description="P of the reported document "
                                      "pool (default: the model's eval_pool_size, else pool_min "
                                      "of an EMO model).")


class LayerRouting(BaseModel):
  experts: list[int] = Field(description="Routed expert ids (checkpoint numbering), by weight.")
  weights: list[float] = Field(description="Their routing weights (softmax, top-k, no "
                               "renormalisation).")


class TokenRouting(BaseModel):
  id: int
  text: str = Field(description="The token's text, or token_id:N for a partial character.")
  layers: list[LayerRouting]


class LayerPool(BaseModel):
  layer: int
  experts: list[int] = Field(description="The pool's experts, highest document score first.")
  scores: list[float] = Field(description="Their document scores divided by the token count.")


class Coverage(BaseModel):
  name: str
  coverage: float = Field(description="Share of the text's routing weight on the subset's "
                          "experts.")
  experts: int = Field(description="Routed experts the subset holds over all layers.")


class RouteResponse(BaseModel):
  model: str
  experts: list[str] = Field(description="The subsets routed over.")
  num_layers: int
  num_routed_experts: int
  top_k: int
  tokens: list[TokenRouting]
  pool_size: int | None
  pool: list[LayerPool] | None
  coverage: list[Coverage]
  best_subset: str | None
  domains: list[str] | None = None
  expert_domains: list[list[int]] | None = Field(
      None, description="Per layer and expert, the index into `domains` of its domain.")


# ---- cluster files ----------------------------------------------------------------------------
def load_clusters(path: str | pathlib.Path, num_layers: int, num_routed: int) -> dict:
  """{"domains", "expert_domains"} from `experiments.cluster`'s clusters.json: each expert's
  domain is the one whose tokens route to it most often (`expert_usage` of the main model)."""
  report = json.loads(pathlib.Path(path).read_text())
  models = report.get("models") or {}
  section = models.get(report.get("model")) or next(iter(models.values()), None)
  if not section or "expert_usage" not in section or "domains" not in report:
    raise ValueError(f"{path} is not a clusters.json of experiments.cluster (it needs "
                     "'domains' and models.MODEL.expert_usage)")
  usage = np.asarray(section["expert_usage"], np.float64)  # [layers, domains, experts]
  if usage.ndim != 3 or usage.shape[0] != num_layers or usage.shape[2] != num_routed:
    raise ValueError(f"{path}: expert_usage has shape {usage.shape}, the model has "
                     f"{num_layers} layers of {num_routed} routed experts")
  return {"domains": [str(d) for d in report["domains"]],
          "expert_domains": usage.argmax(axis=1).tolist()}


# ---- the forward pass -------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _routing(graphdef, params, tokens_1xT, segment_ids_1xT, positions_1xT, keep_LxC):
  model = nnx.merge(graphdef, params)
  _, aux = model(tokens_1xT, segment_ids_1xT, positions_1xT, keep_experts=keep_LxC,
                 collect_routing=True)
  return aux["routing_ids"][:, 0], aux["routing_weights"][:, 0], aux["router_logits"][:, 0]


def _bucket(n: int, context: int) -> int:
  size = 16
  while size < n:
    size *= 2
  return min(size, max(context, n))


def route_tokens(engine, tokens: list[int], mask_LxR: np.ndarray, graphdefs: dict):
  """(ids [layers, T, k] checkpoint expert ids (-1: no expert), weights, in-mask softmax
  [layers, T, routed]) of `tokens` on the served bank under the routing mask."""
  bank = engine.bank

  def snapshot():  # on the engine thread: the bank does not change under it
    return bank.compact_config(), bank.compact_params(), [list(s) for s in bank.slots]

  cfg, params, slots = engine.call(snapshot)
  L, R, width = bank.cfg.num_layers, bank.cfg.num_routed_experts, cfg.num_routed_experts
  slot_ids = np.full((L, width), -1, np.int64)
  keep = np.zeros((L, width), bool)
  for layer, ids in enumerate(slots):
    slot_ids[layer, :len(ids)] = ids
    keep[layer, :len(ids)] = mask_LxR[layer, ids]
  if not keep.any(axis=1).all():
    raise protocol.ApiError(400, "the experts are not resident on this server",
                            param="experts")
  key = (id(engine), width, repr(engine.execution))
  if key not in graphdefs:
    graphdefs[key] = loading.build_model(cfg, {}, engine.execution)[0]
  T = len(tokens)
  P = _bucket(T, bank.cfg.max_seq_len)
  tok = np.zeros((1, P), np.int32)
  tok[0, :T] = tokens
  seg = np.zeros((1, P), np.int32)
  seg[0, :T] = 1
  pos = np.arange(P, dtype=np.int32)[None]
  ids, weights, logits = jax.device_get(_routing(graphdefs[key], params, jnp.asarray(tok),
                                                 jnp.asarray(seg), jnp.asarray(pos),
                                                 jnp.asarray(keep)))
  ids, weights, logits = ids[:, :T], weights[:, :T].astype(np.float64), logits[:, :T]
  layer_index = np.arange(L)[:, None, None]
  chosen = keep[layer_index, ids]  # a top-k pick outside the mask has weight 0: drop it
  expert_ids = np.where(chosen, slot_ids[layer_index, ids], -1)
  # The softmax over the request's experts, in checkpoint numbering (0 outside the mask).
  masked = np.where(keep[:, None, :], logits.astype(np.float64), -np.inf)
  masked = np.exp(masked - masked.max(axis=-1, keepdims=True))
  masked /= masked.sum(axis=-1, keepdims=True)
  probs = np.zeros((L, T, R))
  for layer, ids_of_layer in enumerate(slots):
    probs[layer][:, ids_of_layer] = masked[layer][:, :len(ids_of_layer)]
  return expert_ids, np.where(chosen, weights, 0.0), probs


def pool_size_of(cfg, requested: int | None) -> int | None:
  if requested is not None:
    return requested
  if cfg.eval_pool_size is not None:
    return cfg.eval_pool_size
  return cfg.pool_min if cfg.pool else None


def document_pool(probs_LxTxR: np.ndarray, size: int) -> list[LayerPool]:
  """Per layer the `size` experts of highest document score (ties: the lower id, as
  routing.document_pool_mask), with their scores over the token count."""
  scores = probs_LxTxR.sum(axis=1) / probs_LxTxR.shape[1]  # [L, R]
  out = []
  for layer, row in enumerate(scores):
    order = np.argsort(-row, kind="stable")[:size]
    order = order[row[order] > 0]
    out.append(LayerPool(layer=layer, experts=order.tolist(),
                         scores=[round(float(s), 6) for s in row[order]]))
  return out


def coverage(subsets: dict, ids: np.ndarray, weights: np.ndarray, num_routed: int
             ) -> list[Coverage]:
  total = float(weights.sum())
  out = []
  for name, subset in subsets.items():
    if name == bank_lib.ALL:
      continue
    mask = subset.mask(num_routed)
    held = mask[np.arange(ids.shape[0])[:, None, None], np.maximum(ids, 0)] & (ids >= 0)
    share = float((weights * held).sum()) / total if total > 0 else 0.0
    out.append(Coverage(name=name, coverage=round(share, 6), experts=int(mask.sum())))
  return sorted(out, key=lambda c: (-c.coverage, c.experts, c.name))


# ---- endpoints --------------------------------------------------------------------------------
@router.post("/v1/route", response_model=RouteResponse, responses=ERRORS)
async def route(request: Request, body: RouteRequest) -> RouteResponse:
  """Per token and layer, the experts the served model routes the text to (and its pool)."""
  server = request.app.state.server
  if (body.text is None) == (body.tokens is None):
    raise protocol.ApiError(400, "give exactly one of text (a string) and tokens (token ids)",
                            param="text")
  names, mask = server.resolve_experts(body.model, body.experts)
  prompt = body.text if body.text is not None else body.tokens
  param = "text" if body.text is not None else "tokens"
  tokens = (await run_in_threadpool(server.prompt_ids, prompt, param))[0]
  cfg = server.bank.cfg
  ids, weights, probs = await run_in_threadpool(route_tokens, server.engine, tokens, mask,
                                                _GRAPHDEFS)
  rows = []
  for t, token in enumerate(tokens):
    layers = []
    for layer in range(cfg.num_layers):
      keep = ids[layer, t] >= 0
      layers.append(LayerRouting(experts=ids[layer, t][keep].tolist(),
                                 weights=[round(float(w), 6) for w in weights[layer, t][keep]]))
    rows.append(TokenRouting(id=int(token), text=server.token_string(token), layers=layers))
  size = pool_size_of(cfg, body.pool_size)
  covered = coverage(dict(server.bank.subsets), ids, weights, cfg.num_routed_experts)
  clusters = getattr(request.app.state, "expert_clusters", None) or {}
  return RouteResponse(
      model=body.model or server.model_name, experts=list(names), num_layers=cfg.num_layers,
      num_routed_experts=cfg.num_routed_experts, top_k=cfg.top_k, tokens=rows,
      pool_size=size, pool=None if size is None else document_pool(probs, size),
      coverage=covered, best_subset=covered[0].name if covered else None,
      domains=clusters.get("domains"), expert_domains=clusters.get("expert_domains"))


@router.get("/explore", response_class=HTMLResponse)
async def explore() -> HTMLResponse:
  """The routing explorer page."""
  return HTMLResponse((STATIC / "explore.html").read_text(encoding="utf-8"))


def attach_clusters(app, path: str | pathlib.Path) -> None:
  """Colours the explorer's experts by the domains of a clusters.json (experiments.cluster)."""
  cfg = app.state.server.bank.cfg
  app.state.expert_clusters = load_clusters(path, cfg.num_layers, cfg.num_routed_experts)
