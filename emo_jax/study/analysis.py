"""Routing analysis: cluster the routing vectors of tokens and ask what the clusters follow.

EMO's evidence that its experts are modular (docs/algorithm.md, "Clustering analysis"): take the
first 100 tokens of many documents; describe each token by the softmax over the routed experts of
every layer, concatenated ([layers * routed experts]); mean-centre, keep the principal components
that explain 95 % of the variance, L2-normalise, and run spherical k-means. EMO's clusters follow
topics and keep a document together; a standard MoE's follow word types and scatter it.

This module owns the numbers; `plots.py` draws them and `experiments/cluster.py` is the command:

* features: `document_windows` (first N non-pad tokens per document) -> `routing_features`
  (one jitted forward pass per batch, `collect_routing=True`);
* reduction and clustering: `pca`, `l2_normalize`, `spherical_kmeans` (k-means++ seeding,
  several seeded restarts, the best objective wins), all NumPy;
* measures: `concentration` (share of a document's tokens in its most common cluster),
  `purity` and `nmi` of clusters against domain labels, `cluster_tokens` (most frequent and
  most enriched tokens of each cluster, with samples in context), `expert_usage` (per layer,
  the share of a domain's tokens that pick each expert in their top-k), `document_expert_share`
  (share of a document's top-k assignments that land in its `top` most used experts per layer:
  the pool's footprint, read from routing alone, with no clustering in between);
* `analyse` runs the whole recipe on one model's features; `cluster_checkpoints` does it for a
  model and an optional baseline and writes `clusters.json` plus the plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from emo_jax.data import sources
from emo_jax.data.corpus import DataConfig, load_corpus
from emo_jax.data.tokenizer import load_tokenizer
from emo_jax.convert.loading import load_model
from emo_jax.model.execution import ExecutionConfig
from emo_jax.study import plots as plots_lib

log = logging.getLogger(__name__)

TOKENS_PER_DOCUMENT = 100
# Analysis routes as the released inference does (no pool: `eval_pool_size=None` when loading)
# and needs every token's routing to be independent of its batch, so it runs the dropless
# `ragged` expert backend: with `capacity`, dropped assignments would make one document's
# features depend on the others.
EXECUTION = ExecutionConfig(expert_backend="ragged", remat=False)


# ---- features ---------------------------------------------------------------------------------

def document_windows(token_lists: Sequence[Sequence[int]], *, pad_id: int,
                     num_tokens: int = TOKENS_PER_DOCUMENT) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_tokens` non-pad tokens of each document, right-padded with `pad_id`.

  Returns (tokens [N, num_tokens] int32, lengths [N]): row i holds document i's tokens in
  positions 0..lengths[i]-1.
  """
  tokens = np.full((len(token_lists), num_tokens), pad_id, np.int32)
  lengths = np.zeros(len(token_lists), np.int64)
  for i, ids in enumerate(token_lists):
    kept = [t for t in ids if t != pad_id][:num_tokens]
    tokens[i, :len(kept)] = kept
    lengths[i] = len(kept)
  return tokens, lengths


@dataclasses.dataclass
class RoutingFeatures:
  """Per-token routing vectors of a set of documents (real tokens only, document order)."""
  features: np.ndarray   # [T, layers * experts] float32: layer l's routed softmax at [l*E:(l+1)*E]
  token_ids: np.ndarray  # [T] token id
  document: np.ndarray   # [T] index of the token's document
  position: np.ndarray   # [T] position of the token in its document
  num_layers: int
  num_experts: int       # routed experts per layer
  top_k: int

  def per_layer(self) -> np.ndarray:
    """The features as [T, layers, experts]."""
    return self.features.reshape(-1, self.num_layers, self.num_experts)


@functools.partial(jax.jit, static_argnums=0)
def _routing_probs(graphdef, params, tokens_BxL, segment_ids_BxL, positions_BxL):
  model = nnx.merge(graphdef, params)
  _, aux = model(tokens_BxL, segment_ids_BxL, positions_BxL, train=False, collect_routing=True)
  return aux["routing_probs"]  # [layers, B, L, routed experts]; the logits are never computed


def routing_features(graphdef, params, cfg, tokens: np.ndarray, lengths: np.ndarray, *,
                     batch_size: int = 32, log_every_s: float = 10.0) -> RoutingFeatures:
  """Routing vectors of the real tokens of `document_windows` output.

  Each row is one document (segment id 1 on its tokens, 0 on the padding, positions from 0),
  so a token sees only its own document's first tokens; every batch has the same static shape
  (the last one is filled with empty rows), so the forward pass compiles once.
  """
  num_docs, width = tokens.shape
  params = jax.device_put(params)
  segments = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch_size, width))
  # Filled in place: at the paper's scale (1.2 M tokens x 2,032 dims) this is ~10 GB.
  features = np.empty((int(lengths.sum()), cfg.num_layers * cfg.num_routed_experts), np.float32)
  row = 0
  start = last_log = time.time()
  for lo in range(0, num_docs, batch_size):
    hi = min(lo + batch_size, num_docs)
    tok = np.zeros((batch_size, width), np.int32)
    seg = np.zeros((batch_size, width), np.int32)
    tok[:hi - lo], seg[:hi - lo] = tokens[lo:hi], segments[lo:hi]
    probs = np.asarray(_routing_probs(graphdef, params, tok, seg, positions))
    probs = probs.transpose(1, 2, 0, 3)[:hi - lo]  # [B, L, layers, E]
    real = probs[seg[:hi - lo] > 0]
    features[row:row + len(real)] = real.reshape(len(real), -1)
    row += len(real)
    if time.time() - last_log > log_every_s:
      last_log = time.time()
      log.info("routing features: %d/%d documents (%.0f s)", hi, num_docs, last_log - start)
  document = np.repeat(np.arange(num_docs), lengths)
  position = np.concatenate([np.arange(n) for n in lengths]) if num_docs else np.zeros(0, int)
  return RoutingFeatures(features, tokens[segments > 0].astype(np.int64), document, position,
                         cfg.num_layers, cfg.num_routed_experts, cfg.top_k)


# ---- reduction and clustering ---------------------------------------------------------------

_ROWS_PER_BLOCK = 65_536  # bounds the float32 temporaries of PCA to ~0.5 GB at 2,032 dims


@dataclasses.dataclass
class PCA:
  mean: np.ndarray          # [d]
  components: np.ndarray    # [k, d] principal directions, by decreasing variance
  explained: np.ndarray     # [d] explained-variance ratio of every direction
  kept_variance: float      # sum of `explained` over the kept k

  def transform(self, x: np.ndarray) -> np.ndarray:
    """Scores [n, k] float32 of rows of the fitted space."""
    components = self.components.T.astype(np.float32)
    out = np.empty((x.shape[0], components.shape[1]), np.float32)
    for lo in range(0, x.shape[0], _ROWS_PER_BLOCK):
      block = (x[lo:lo + _ROWS_PER_BLOCK] - self.mean).astype(np.float32)
      out[lo:lo + _ROWS_PER_BLOCK] = block @ components
    return out


def pca(x: np.ndarray, variance: float = 0.95) -> tuple[np.ndarray, PCA]:
  """Mean-centres `x` [n, d] and keeps the fewest principal components explaining `variance`.

  Returns (scores [n, k] float32, the fit); `fit_pca` fits without computing the scores.
  """
  fit = fit_pca(x, variance)
  return fit.transform(x), fit


def fit_pca(x: np.ndarray, variance: float = 0.95) -> PCA:
  """The PCA of `x` [n, d] that keeps the fewest components explaining `variance`.

  Works on the d x d scatter matrix (accumulated in float64 over float32 blocks of rows, then a
  float64 eigendecomposition), so the cost grows with n only through matmuls: the paper's
  1.2 M tokens x 2,032 dims fit in memory and time.
  """
  if not 0.0 < variance <= 1.0:
    raise ValueError(f"variance must be in (0, 1], got {variance}")
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"pca needs at least 2 rows of a [n, d] matrix, got shape {x.shape}")
  mean = x.mean(axis=0, dtype=np.float64)
  scatter = np.zeros((x.shape[1], x.shape[1]))
  for lo in range(0, x.shape[0], _ROWS_PER_BLOCK):
    block = (x[lo:lo + _ROWS_PER_BLOCK] - mean).astype(np.float32)
    scatter += block.T @ block
  eigval, eigvec = np.linalg.eigh(scatter)
  order = np.argsort(eigval)[::-1]
  eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
  total = eigval.sum()
  explained = eigval / total if total > 0 else np.zeros_like(eigval)
  # The fewest components reaching the target (a small tolerance absorbs rounding of sums).
  k = int(np.searchsorted(np.cumsum(explained), variance - 1e-9) + 1) if total > 0 else 1
  k = min(k, x.shape[1])
  return PCA(mean, eigvec[:, :k].T.copy(), explained, float(explained[:k].sum()))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows scaled to unit length (all-zero rows stay zero)."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclasses.dataclass
class KMeans:
  labels: np.ndarray     # [n] cluster of each row
  centroids: np.ndarray  # [k, d] unit vectors
  objective: float       # sum over rows of the cosine similarity to their centroid (maximised)
  iterations: int
  restart: int           # which restart won


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding under the cosine distance 1 - cos (= half the squared distance of unit
  vectors, so this is the usual D^2 sampling)."""
  n = x.shape[0]
  centroids = np.empty((k, x.shape[1]), x.dtype)
  centroids[0] = x[rng.integers(n)]
  dist = np.clip(1.0 - x @ centroids[0], 0.0, None)
  for j in range(1, k):
    total = dist.sum()
    i = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
    centroids[j] = x[i]
    dist = np.minimum(dist, np.clip(1.0 - x @ centroids[j], 0.0, None))
  return centroids


def spherical_kmeans(x: np.ndarray, k: int, *, restarts: int = 5, max_iter: int = 100,
                     seed: int = 0, tol: float = 1e-7) -> KMeans:
  """k-means on the unit sphere: assign by cosine similarity, centroids = normalised means.

  `x` should have unit rows (`l2_normalize`). Each restart seeds with k-means++ from one seeded
  generator and iterates until the objective improves by less than `tol` per row; the restart
  with the highest objective wins. A cluster that empties is re-seeded with the row farthest
  from its centroid.
  """
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} clusters need 1 <= k <= the number of rows ({n}); use fewer "
                     "clusters or more documents")
  rng = np.random.default_rng(seed)
  best = None
  for restart in range(max(restarts, 1)):
    centroids = _kmeans_pp(x, k, rng)
    previous = -np.inf
    for it in range(1, max_iter + 1):
      sims = x @ centroids.T
      labels = sims.argmax(axis=1)
      best_sim = sims[np.arange(n), labels]
      objective = float(best_sim.sum(dtype=np.float64))
      if objective - previous <= tol * n or it == max_iter:
        break
      previous = objective
      one_hot = np.zeros((n, k), np.float32)
      one_hot[np.arange(n), labels] = 1.0
      sums = one_hot.T @ x  # a matmul: np.add.at is ~100x slower at a million rows
      counts = np.bincount(labels, minlength=k)
      far = iter(np.argsort(best_sim))
      for j in np.flatnonzero(counts == 0):
        sums[j] = x[next(far)]
      centroids = l2_normalize(sums)
    if best is None or objective > best.objective:
      best = KMeans(labels, centroids, objective, it, restart)
    log.info("k-means restart %d/%d: objective %.1f after %d iterations", restart + 1,
             restarts, objective, it)
  return best


# ---- measures ---------------------------------------------------------------------------------

def concentration(labels: np.ndarray, document: np.ndarray) -> np.ndarray:
  """Per document: the share of its tokens in its most common cluster ([num documents], in
  document-index order; documents with no tokens are left out)."""
  table = _contingency(document, labels)
  return table.max(axis=1) / table.sum(axis=1)


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  _, ai = np.unique(a, return_inverse=True)
  _, bi = np.unique(b, return_inverse=True)
  rows, cols = ai.max() + 1, bi.max() + 1
  return np.bincount(ai * cols + bi, minlength=rows * cols).reshape(rows, cols)


def purity(clusters: np.ndarray, classes: np.ndarray) -> float:
  """Share of items whose class is the majority class of their cluster."""
  table = _contingency(clusters, classes)
  return float(table.max(axis=1).sum() / table.sum())


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def nmi(clusters: np.ndarray, classes: np.ndarray) -> float:
  """Normalised mutual information, I(U; V) / mean(H(U), H(V)) (scikit-learn's default,
  "arithmetic"); 1.0 when both labelings are a single group."""
  table = _contingency(clusters, classes).astype(np.float64)
  h_u, h_v = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
  if h_u == 0.0 and h_v == 0.0:
    return 1.0
  p = table / table.sum()
  outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
  nz = p > 0
  mi = float((p[nz] * np.log(p[nz] / outer[nz])).sum())
  return float(np.clip(mi / ((h_u + h_v) / 2.0), 0.0, 1.0))


def cluster_tokens(labels: np.ndarray, token_ids: np.ndarray, k: int, *, top: int = 10,
                   min_count: int = 3) -> list[dict[str, list]]:
  """Per cluster: its most frequent token ids ([id, count]) and its most enriched ones
  ([id, lift, count], lift = P(token | cluster) / P(token), among tokens seen at least
  `min_count` times in the cluster and over-represented in it, lift > 1)."""
  vocab, inverse = np.unique(token_ids, return_inverse=True)
  table = np.bincount(labels * len(vocab) + inverse,
                      minlength=k * len(vocab)).reshape(k, len(vocab))   # [cluster, token]
  overall = table.sum(axis=0) / max(len(token_ids), 1)
  out = []
  for c in range(k):
    counts, size = table[c], table[c].sum()
    # Ties go to the smaller token id (a stable sort over ids in increasing order).
    frequent = [i for i in np.argsort(-counts, kind="stable")[:top] if counts[i] > 0]
    lift = np.where(counts > 0, counts / max(size, 1) / overall, 0.0)
    eligible = np.flatnonzero((counts >= min_count) & (lift > 1.0))
    enriched = eligible[np.lexsort((-counts[eligible], -lift[eligible]))][:top]
    out.append({"frequent": [[int(vocab[i]), int(counts[i])] for i in frequent],
                "enriched": [[int(vocab[i]), round(float(lift[i]), 2), int(counts[i])]
                             for i in enriched]})
  return out


def top_k_counts(features: RoutingFeatures, group_T: np.ndarray, num_groups: int) -> np.ndarray:
  """[layers, groups, experts]: how many tokens of each group (group_T, ids < num_groups) have
  the expert among their top-k routed experts (by the unmasked softmax, i.e. the inference
  routing)."""
  probs = features.per_layer()
  E = features.num_experts
  k = min(features.top_k, E)
  counts = np.zeros((features.num_layers, num_groups, E))
  for layer in range(features.num_layers):
    for lo in range(0, probs.shape[0], _ROWS_PER_BLOCK):   # bounded temporaries
      block = probs[lo:lo + _ROWS_PER_BLOCK, layer]
      top = np.argpartition(block, E - k, axis=-1)[:, E - k:]    # [rows, k] the k largest
      index = np.repeat(group_T[lo:lo + _ROWS_PER_BLOCK], k) * E + top.reshape(-1)
      counts[layer] += np.bincount(index, minlength=num_groups * E).reshape(num_groups, E)
  return counts


def expert_usage(features: RoutingFeatures, token_domain: np.ndarray,
                 num_domains: int) -> np.ndarray:
  """[layers, domains, experts]: share of a domain's tokens whose top-k routed experts (by the
  unmasked softmax, i.e. the inference routing) include the expert. Rows sum to top_k."""
  usage = top_k_counts(features, token_domain, num_domains)
  per_domain = np.bincount(token_domain, minlength=num_domains).astype(np.float64)
  return usage / np.maximum(per_domain, 1.0)[None, :, None]


def document_expert_share(features: RoutingFeatures, top: int = 8) -> np.ndarray:
  """[documents]: per layer, the share of a document's top-k expert assignments (inference
  routing, as `expert_usage`) that fall into the document's `top` most used experts, averaged
  over layers.

  EMO trains every document inside a pool of experts, so its documents should keep to few
  experts; a router that ignores the document spreads them, and scores about top / experts
  on long documents (higher on short ones: a document of n tokens uses at most n * top_k).
  Documents without tokens are left out (rows in increasing document id, as `concentration`).
  """
  E = features.num_experts
  top = min(top, E)
  documents, document = np.unique(features.document, return_inverse=True)
  counts = top_k_counts(features, document, len(documents))   # [layers, documents, E]
  most_used = np.sort(counts, axis=-1)[..., E - top:].sum(-1)   # [layers, documents]
  return (most_used / np.maximum(counts.sum(-1), 1.0)).mean(0)


# ---- the whole recipe -------------------------------------------------------------------------

@dataclasses.dataclass
class Analysis:
  """Everything measured on one model: arrays for plots and a JSON summary."""
  name: str
  summary: dict[str, Any]
  labels: np.ndarray             # [T] cluster of each token
  token_domain: np.ndarray       # [T] domain index of each token
  doc_concentration: np.ndarray  # [documents]
  doc_domain: np.ndarray         # [documents] domain index
  projection: np.ndarray         # [P, 2] 2-D projection of a sample of tokens
  projection_index: np.ndarray   # [P] which tokens were projected
  usage: np.ndarray              # [layers, domains, experts]
  cluster_domain: np.ndarray     # [clusters, domains] token counts


def _readable(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> str:
  return decode([int(i) for i in ids]).replace("\n", "\\n")


def analyse(features: RoutingFeatures, doc_domains: Sequence[str], domains: Sequence[str], *,
            name: str = "model", clusters: int = 32, variance: float = 0.95, restarts: int = 5,
            seed: int = 0, decode: Callable[[Sequence[int]], str] | None = None,
            tokens: np.ndarray | None = None, top_tokens: int = 10, samples: int = 3,
            max_projected: int = 20_000, share_top: int = 8) -> Analysis:
  """The paper's recipe on one model's features, and every measure of this module.

  `doc_domains[i]` is the domain of document i, `domains` the sorted list of domains; `decode`
  and `tokens` (the `document_windows` rows) turn token ids into text for the summary;
  `share_top` is the number of experts `document_expert_share` counts.
  """
  if features.features.shape[0] < clusters:
    raise ValueError(f"{features.features.shape[0]} tokens cannot make {clusters} clusters; "
                     "use more documents or fewer clusters")
  domain_index = {d: i for i, d in enumerate(domains)}
  doc_domain = np.array([domain_index[d] for d in doc_domains], np.int64)
  token_domain = doc_domain[features.document]
  start = time.time()
  reduced, fit = pca(features.features, variance)
  unit = l2_normalize(reduced)
  log.info("%s: PCA keeps %d of %d dims (%.1f %% of the variance) in %.1f s", name,
           reduced.shape[1], features.features.shape[1], 100 * fit.kept_variance,
           time.time() - start)
  start = time.time()
  km = spherical_kmeans(unit, clusters, restarts=restarts, seed=seed)
  log.info("%s: spherical k-means (k=%d, %d restarts) in %.1f s", name, clusters, restarts,
           time.time() - start)
  labels = km.labels
  per_doc = concentration(labels, features.document)
  docs_with_tokens = np.unique(features.document)
  table = np.bincount(labels * len(domains) + token_domain,
                      minlength=clusters * len(domains)).reshape(clusters, len(domains))
  usage = expert_usage(features, token_domain, len(domains))

  rng = np.random.default_rng(seed)
  n = len(labels)
  index = (np.sort(rng.choice(n, max_projected, replace=False)) if n > max_projected
           else np.arange(n))
  projection = np.zeros((len(index), 2), np.float32)
  if len(index) > 2:
    plane = fit_pca(unit[index], 1.0)
    plane = dataclasses.replace(plane, components=plane.components[:2])
    projection[:, :plane.components.shape[0]] = plane.transform(unit[index])

  decode = decode or (lambda ids: " ".join(map(str, ids)))
  token_info = cluster_tokens(labels, features.token_ids, clusters, top=top_tokens)
  cluster_list = []
  for c in range(clusters):
    members = np.flatnonzero(labels == c)
    picks = rng.choice(members, min(samples, len(members)), replace=False) if len(members) else []
    contexts = []
    for t in sorted(picks):
      if tokens is None:
        break
      row, pos = tokens[features.document[t]], features.position[t]
      contexts.append(_readable(decode, row[max(0, pos - 8):pos]) + " [[" +
                      _readable(decode, [row[pos]]) + "]] " +
                      _readable(decode, row[pos + 1:min(pos + 4, len(row))]))
    by_domain = {domains[d]: int(table[c, d]) for d in np.argsort(-table[c]) if table[c, d]}
    cluster_list.append({
        "cluster": c, "size": int(len(members)),
        "top_domain": domains[int(table[c].argmax())] if len(members) else None,
        "domains": by_domain,
        "frequent_tokens": [[_readable(decode, [t]), m] for t, m in token_info[c]["frequent"]],
        "enriched_tokens": [[_readable(decode, [t]), lift, m]
                            for t, lift, m in token_info[c]["enriched"]],
        "samples": contexts})
  by_domain_conc = {domains[d]: float(per_doc[doc_domain[docs_with_tokens] == d].mean())
                    for d in range(len(domains)) if (doc_domain[docs_with_tokens] == d).any()}
  summary = {
      "name": name,
      "concentration": float(per_doc.mean()),
      "purity": purity(labels, token_domain),
      # Purity of putting every token in one cluster: the largest domain's share of tokens.
      "purity_one_cluster": float(np.bincount(token_domain).max() / max(n, 1)),
      "nmi": nmi(labels, token_domain),
      "concentration_by_domain": by_domain_conc,
      # document_expert_share: the mean share of a document's assignments in its top experts
      "expert_share": float(document_expert_share(features, share_top).mean()),
      "expert_share_top": int(min(share_top, features.num_experts)),
      "num_documents": int(len(docs_with_tokens)),
      "num_tokens": int(n),
      "feature_dims": int(features.features.shape[1]),
      "pca_components": int(reduced.shape[1]),
      "pca_variance": fit.kept_variance,
      "kmeans_objective": km.objective,
      "kmeans_iterations": km.iterations,
      "clusters": cluster_list,
      # usage[layer][domain][expert], rows in the order of the top-level "domains"
      "expert_usage": np.round(usage, 4).tolist(),
  }
  return Analysis(name, summary, labels, token_domain, per_doc, doc_domain[docs_with_tokens],
                  projection, index, usage, table)


# ---- checkpoints to clusters.json and plots ---------------------------------------------------

def model_name(cfg) -> str:
  """"EMO" for a pooled MoE, "StdMoE" for one without the document pool."""
  return "EMO" if cfg.pool else "StdMoE"


def checkpoint_tokenizer(path: str | pathlib.Path, tokenizer: str | None = None):
  """The tokenizer a model was trained with: `tokenizer` ("bytes" or a file) when given, else
  the one of the training run's `config.json` data settings."""
  if tokenizer:
    return load_tokenizer(tokenizer)
  config_file = pathlib.Path(path) / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(
        f"{path} has no config.json (it is not a training workdir), so its tokenizer is "
        "unknown; pass the tokenizer explicitly (--tokenizer=bytes or a tokenizer file)")
  config = json.loads(config_file.read_text())
  dc = DataConfig.from_dict(config["data"])
  if dc.tokenizer == "bytes":
    return load_tokenizer("bytes")
  return load_corpus(dc).tokenizer


def load_documents(corpus: str, *, num_documents: int | None = None, split: str = "test",
                   seed: int = 0) -> list[dict]:
  """Documents to analyse: "demo" or "synthetic" (that corpus's `split`), or a JSONL file,
  text folder or ArrayRecord file. More than `num_documents` are subsampled (seeded, order
  kept)."""
  if corpus in ("demo", "synthetic"):
    dc = (DataConfig(corpus="demo") if corpus == "demo"
          else DataConfig(corpus="synthetic", tokenizer="bytes"))
    docs = list(load_corpus(dc).splits[split])
  else:
    docs = list(sources.load_documents(corpus))
  if not docs:
    raise ValueError(f"no documents in {corpus!r} (split {split!r})")
  if num_documents is not None and len(docs) > num_documents:
    keep = np.sort(np.random.default_rng(seed).choice(len(docs), num_documents, replace=False))
    docs = [docs[i] for i in keep]
  elif num_documents is not None and len(docs) < num_documents:
    log.warning("%s has only %d documents (asked for %d); using all", corpus, len(docs),
                num_documents)
  return docs


def cluster_checkpoints(checkpoints: Sequence[str | pathlib.Path],
                        documents: Sequence[Mapping[str, Any]], out_dir: str | pathlib.Path, *,
                        names: Sequence[str] | None = None, clusters: int = 32,
                        num_tokens: int = TOKENS_PER_DOCUMENT, variance: float = 0.95,
                        restarts: int = 5, seed: int = 0, batch_size: int = 32,
                        tokenizer: str | None = None, plot: bool = True,
                        step: int | None = None) -> dict[str, Any]:
  """Runs the analysis on each checkpoint (a training workdir or a parameter checkpoint; the
  first is the model, a second one its baseline; `step` picks that training step's checkpoint
  of every workdir, default the newest), writes `out_dir/clusters.json` and the plots,
  and returns the JSON object. Its top-level `concentration`, `purity` and `nmi` are the first
  model's; `models` maps each model's name (default "EMO" or "StdMoE" from its config) to its
  full section.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  domains = sorted({d.get("domain", "") for d in documents})
  results: list[Analysis] = []
  for i, path in enumerate(checkpoints):
    start = time.time()
    cfg, graphdef, params = load_model(path, execution=EXECUTION, step=step,
                                       eval_pool_size=None)
    if not cfg.is_moe:
      raise ValueError(f"{path} holds a dense model (num_experts=0): it has no routing to "
                       "analyse; pass a mixture-of-experts checkpoint")
    name = names[i] if names else model_name(cfg)
    if name in {r.name for r in results}:
      name = f"{name} (baseline)"
    tok = checkpoint_tokenizer(path, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model only "
                       f"{cfg.vocab_size}; pass the tokenizer the model was trained with")
    windows, lengths = document_windows(tok.encode_batch([d["text"] for d in documents]),
                                        pad_id=tok.pad_id, num_tokens=num_tokens)
    keep = lengths > 0
    if not keep.all():
      log.warning("%s: %d documents have no tokens and are left out", name, int((~keep).sum()))
    feats = routing_features(graphdef, params, cfg, windows[keep], lengths[keep],
                             batch_size=batch_size)
    log.info("%s: routing features of %d tokens (%d documents) in %.1f s", name,
             feats.features.shape[0], int(keep.sum()), time.time() - start)
    doc_domains = [d.get("domain", "") for d, k in zip(documents, keep) if k]
    result = analyse(feats, doc_domains, domains, name=name, clusters=clusters,
                     variance=variance, restarts=restarts, seed=seed, decode=tok.decode,
                     tokens=windows[keep])
    result.summary.update(checkpoint=str(path), step=step, pool=bool(cfg.pool),
                          seconds=round(time.time() - start, 1))
    results.append(result)
  plots = []
  if plot:
    plots = [p.name for p in plots_lib.plot_all(results, domains, out_dir)]
  main = results[0].summary
  report = {"concentration": main["concentration"], "purity": main["purity"], "nmi": main["nmi"],
            "expert_share": main["expert_share"], "expert_share_top": main["expert_share_top"],
            "model": main["name"], "domains": domains, "num_documents": len(documents),
            "tokens_per_document": num_tokens, "clusters": clusters, "variance": variance,
            "restarts": restarts, "seed": seed, "plots": plots,
            "models": {r.name: r.summary for r in results}}
  (out_dir / "clusters.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
  return report
