"""Routing analysis: k-means, PCA and the measures against known answers; features from exactly
the first 100 tokens; the cluster command end to end on tiny random models."""

import json
import math
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.study import analysis
from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.config import ModelConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.data import sources, synthetic
from emo_jax.model.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402


def tiny_model_config(**changes) -> ModelConfig:
  return ModelConfig.from_dict(tiny.get_config().model.to_dict()).replace(**changes)


def random_model(cfg: ModelConfig, seed: int = 0):
  run = ExecutionConfig(expert_backend="ragged", remat=False)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed), execution=run), nnx.Param)
  return graphdef, params


# ---- k-means and PCA --------------------------------------------------------------------------

def planted_clusters(rng, k=5, per=150, dim=24, noise=0.25):
  centres = analysis.l2_normalize(rng.normal(size=(k, dim)))
  truth = np.repeat(np.arange(k), per)
  noise_vectors = noise * rng.normal(size=(k * per, dim)) / math.sqrt(dim)
  x = analysis.l2_normalize(centres[truth] + noise_vectors)
  order = rng.permutation(len(truth))
  return x[order].astype(np.float32), truth[order]


def test_spherical_kmeans_recovers_planted_clusters():
  # Noisy enough that the k-means++ seeds alone assign only ~90 % of the points right.
  x, truth = planted_clusters(np.random.default_rng(0), noise=0.5)
  km = analysis.spherical_kmeans(x, 5, restarts=3, seed=1)
  assert analysis.purity(km.labels, truth) == 1.0
  assert analysis.nmi(km.labels, truth) == pytest.approx(1.0)
  np.testing.assert_allclose(np.linalg.norm(km.centroids, axis=1), 1.0, rtol=1e-5)
  # The reported objective is the labels' objective under the returned centroids.
  sims = x @ km.centroids.T
  assert km.objective == pytest.approx(float(sims[np.arange(len(x)), km.labels].sum()), rel=1e-5)
  np.testing.assert_array_equal(km.labels, sims.argmax(axis=1))
  # Converged: each centroid is the normalised mean of its members.
  means = analysis.l2_normalize(np.stack([x[km.labels == c].mean(0) for c in range(5)]))
  np.testing.assert_allclose(km.centroids, means, atol=1e-5)


def test_spherical_kmeans_is_seeded_and_keeps_the_best_restart():
  x, _ = planted_clusters(np.random.default_rng(1), k=8, per=40, noise=1.5)
  a = analysis.spherical_kmeans(x, 8, restarts=4, seed=2)
  b = analysis.spherical_kmeans(x, 8, restarts=4, seed=2)
  np.testing.assert_array_equal(a.labels, b.labels)
  # Restart 0 is the same draw whatever the number of restarts; on this data a later restart
  # finds a better local optimum, and the best one is kept.
  one = analysis.spherical_kmeans(x, 8, restarts=1, seed=2)
  assert a.objective > one.objective + 1.0 and a.restart > 0
  every_point = analysis.spherical_kmeans(x[:12], 12, restarts=1)
  assert sorted(every_point.labels.tolist()) == list(range(12))
  assert every_point.objective == pytest.approx(12.0, rel=1e-5)
  with pytest.raises(ValueError, match="clusters"):
    analysis.spherical_kmeans(x[:3], 4)


def test_pca_keeps_the_requested_variance():
  rng = np.random.default_rng(0)
  scales = np.array([10.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
  rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  x = (rng.normal(size=(4000, 8)) * scales) @ rotation + 5.0
  centred = x - x.mean(axis=0)
  singular = np.linalg.svd(centred, compute_uv=False)
  ratios = singular ** 2 / (singular ** 2).sum()
  for target in (0.5, 0.9, 0.95, 0.99):
    scores, fit = analysis.pca(x, target)
    k = scores.shape[1]
    assert ratios[:k].sum() >= target - 1e-9 and ratios[:k - 1].sum() < target
    assert fit.kept_variance == pytest.approx(ratios[:k].sum(), rel=1e-6)
    np.testing.assert_allclose(fit.explained, ratios, atol=1e-6)  # float32 blocks
    # Scores are the centred data in orthonormal directions: same variance, mean zero.
    np.testing.assert_allclose(scores.var(axis=0), singular[:k] ** 2 / len(x), rtol=1e-4)
    np.testing.assert_allclose(scores.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(fit.transform(x), scores, rtol=1e-4, atol=1e-3)
  # Variances 100, 36, 9, 4, 1, ...: 145 / 150.3 = 96.5 % in three directions, 96.0 % needs 4.
  assert analysis.pca(x, 0.95)[0].shape[1] == 3
  assert analysis.pca(x, 0.97)[0].shape[1] == 4
  assert analysis.pca(x, 1.0)[0].shape[1] == 8


# ---- measures ---------------------------------------------------------------------------------

def test_concentration_purity_and_nmi_match_hand_computed_values():
  labels = np.array([0, 0, 1, 1, 1, 1, 2, 0])
  document = np.array([0, 0, 0, 1, 1, 1, 2, 2])
  classes = np.array(["a", "a", "a", "b", "b", "b", "a", "b"])
  # doc 0: clusters (0, 0, 1) -> 2/3; doc 1: (1, 1, 1) -> 1; doc 2: (2, 0) -> 1/2.
  np.testing.assert_allclose(analysis.concentration(labels, document), [2 / 3, 1.0, 0.5])
  # cluster 0 = {a, a, b}, cluster 1 = {a, b, b, b}, cluster 2 = {a}: (2 + 3 + 1) / 8.
  assert analysis.purity(labels, classes) == pytest.approx(6 / 8)
  # Contingency (rows clusters, columns a, b): [[2, 1], [1, 3], [1, 0]], n = 8.
  h_clusters = -(3 / 8 * math.log(3 / 8) + 4 / 8 * math.log(4 / 8) + 1 / 8 * math.log(1 / 8))
  h_classes = math.log(2)
  mi = (2 / 8 * math.log((2 / 8) / (3 / 8 * 4 / 8)) + 1 / 8 * math.log((1 / 8) / (3 / 8 * 4 / 8))
        + 1 / 8 * math.log((1 / 8) / (4 / 8 * 4 / 8)) + 3 / 8 * math.log((3 / 8) / (4 / 8 * 4 / 8))
        + 1 / 8 * math.log((1 / 8) / (1 / 8 * 4 / 8)))
  assert analysis.nmi(labels, classes) == pytest.approx(mi / ((h_clusters + h_classes) / 2))
  # Renamed clusters change nothing; clusters independent of the classes share no information.
  assert analysis.nmi(np.array([5, 5, 9, 9]), np.array(["x", "x", "y", "y"])) == pytest.approx(1.0)
  assert analysis.nmi(np.array([0, 0, 1, 1]), np.array(["x", "y", "x", "y"])) == pytest.approx(0.0)
  assert analysis.purity(np.array([0, 0, 1, 1]), np.array(["x", "y", "x", "y"])) == 0.5


def test_cluster_tokens_and_expert_usage():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  token_ids = np.array([7, 7, 7, 3, 3, 3, 3, 9])
  info = analysis.cluster_tokens(labels, token_ids, 2, min_count=2)
  assert info[0]["frequent"] == [[7, 3], [3, 1]]
  assert info[0]["enriched"] == [[7, 2.0, 3]]     # 3/4 of cluster 0 vs 3/8 overall
  assert info[1]["enriched"] == [[3, 1.5, 3]]     # 3/4 vs 4/8 (9 is seen only once)
  # Two layers, three experts, top-1: a token of domain 0 picks (0, 2), one of domain 1 (1, 1).
  probs = np.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
                    [[0.2, 0.6, 0.2], [0.3, 0.5, 0.2]],
                    [[0.5, 0.4, 0.1], [0.0, 0.1, 0.9]]], np.float32)
  feats = analysis.RoutingFeatures(probs.reshape(3, 6), np.zeros(3, int), np.arange(3),
                                   np.zeros(3, int), num_layers=2, num_experts=3, top_k=1)
  usage = analysis.expert_usage(feats, np.array([0, 1, 0]), 2)
  np.testing.assert_allclose(usage[0], [[1, 0, 0], [0, 1, 0]])
  np.testing.assert_allclose(usage[1], [[0, 0, 1], [0, 1, 0]])


def test_document_expert_share_equals_counting_by_hand():
  rng = np.random.default_rng(0)
  layers, experts, top_k, top = 3, 10, 2, 3
  document = np.repeat([0, 2, 5], [7, 1, 12])       # document ids with gaps, one of one token
  probs = rng.random((len(document), layers, experts)).astype(np.float32)
  feats = analysis.RoutingFeatures(probs.reshape(len(document), -1), np.zeros(len(document), int),
                                   document, np.zeros(len(document), int), num_layers=layers,
                                   num_experts=experts, top_k=top_k)
  want = []
  for d in (0, 2, 5):
    per_layer = []
    for layer in range(layers):
      counts = np.zeros(experts)
      for p in probs[document == d, layer]:
        counts[np.argsort(-p)[:top_k]] += 1
      per_layer.append(np.sort(counts)[-top:].sum() / counts.sum())
    want.append(np.mean(per_layer))
  np.testing.assert_allclose(analysis.document_expert_share(feats, top), want)
  assert analysis.document_expert_share(feats, top)[1] == 1.0  # 2 assignments, both in its top 3
  # A document that always routes to the same experts keeps all of its routing in its top_k.
  same = np.broadcast_to(probs[:1], probs.shape)
  feats.features = same.reshape(len(document), -1)
  np.testing.assert_allclose(analysis.document_expert_share(feats, top_k), 1.0)


# ---- features ---------------------------------------------------------------------------------

def test_document_windows_take_the_first_non_pad_tokens():
  pad = 0
  docs = [list(range(1, 31)), [5, 0, 6, 0, 7] + list(range(10, 200)), [0, 0], list(range(1, 101))]
  tokens, lengths = analysis.document_windows(docs, pad_id=pad, num_tokens=100)
  assert tokens.shape == (4, 100)
  np.testing.assert_array_equal(lengths, [30, 100, 0, 100])
  np.testing.assert_array_equal(tokens[0, :30], range(1, 31))
  assert (tokens[0, 30:] == pad).all()
  np.testing.assert_array_equal(tokens[1, :5], [5, 6, 7, 10, 11])
  assert tokens[1, -1] == 106


@pytest.mark.slow
def test_routing_features_come_from_exactly_the_first_100_tokens():
  cfg = tiny_model_config()
  graphdef, params = random_model(cfg)
  rng = np.random.default_rng(0)
  short = rng.integers(2, 258, size=40).tolist()
  long = rng.integers(2, 258, size=250).tolist()
  tokens, lengths = analysis.document_windows([short, long], pad_id=0)
  feats = analysis.routing_features(graphdef, params, cfg, tokens, lengths, batch_size=4)
  assert feats.features.shape == (140, cfg.num_layers * cfg.num_routed_experts)
  np.testing.assert_array_equal(np.bincount(feats.document), [40, 100])
  np.testing.assert_array_equal(feats.token_ids, short + long[:100])
  np.testing.assert_array_equal(feats.position, list(range(40)) + list(range(100)))
  np.testing.assert_allclose(feats.per_layer().sum(-1), 1.0, rtol=1e-5)
  # The layer-major concatenation of the model's own routing softmax on the document alone.
  _, aux = nnx.merge(graphdef, params)(jnp.asarray([long[:100]]), collect_routing=True)
  expected = np.asarray(aux["routing_probs"])[:, 0].transpose(1, 0, 2).reshape(100, -1)
  np.testing.assert_allclose(feats.features[40:], expected, rtol=1e-5, atol=1e-6)

  def features_of(docs):
    t, n = analysis.document_windows(docs, pad_id=0)
    return analysis.routing_features(graphdef, params, cfg, t, n, batch_size=4).features

  changed_late = long[:100] + [(t + 1) % 250 + 2 for t in long[100:]]
  np.testing.assert_array_equal(features_of([short, changed_late]), feats.features)
  # A change inside the window does change the features from that token on (so the check
  # above could fail), and a document's features do not depend on its batch companions.
  changed_early = long[:50] + [(long[50] + 1) % 250 + 2] + long[51:]
  moved = features_of([short, changed_early])
  assert not np.allclose(moved[40 + 50:], feats.features[40 + 50:])
  np.testing.assert_allclose(moved[:40 + 50], feats.features[:40 + 50], rtol=1e-5, atol=1e-6)
  alone_in_other_rows = features_of([long, long[:7], changed_early])[:100]
  np.testing.assert_allclose(alone_in_other_rows, feats.features[40:], rtol=1e-5, atol=1e-6)


# ---- the command ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_cluster_command_end_to_end(tmp_path):
  emo_cfg = tiny_model_config()
  for name, cfg, seed in (("emo", emo_cfg, 0), ("std", emo_cfg.replace(pool=False), 1)):
    _, params = random_model(cfg, seed)
    ckpt_lib.save_params(tmp_path / name, nnx.to_pure_dict(params), cfg.to_dict())
  docs = synthetic.synthetic_corpus(40, seed=5)
  sources.write_jsonl(docs, tmp_path / "docs.jsonl")
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.cluster", f"--checkpoint={tmp_path / 'emo'}",
       f"--baseline={tmp_path / 'std'}", f"--corpus={tmp_path / 'docs.jsonl'}",
       "--num_documents=30", "--clusters=4", "--restarts=2", "--tokenizer=bytes",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  report = json.loads((out / "clusters.json").read_text())
  for key in ("concentration", "purity", "nmi", "expert_share"):
    assert 0.0 <= report[key] <= 1.0
    assert last[key] == report[key]
  assert report["expert_share_top"] == 7    # 8 capped at the model's 7 routed experts
  assert report["model"] == "EMO" and set(report["models"]) == {"EMO", "StdMoE"}
  assert last["baseline"]["name"] == "StdMoE"
  assert report["num_documents"] == 30 and report["domains"] == ["alpha", "beta", "delta", "gamma"]
  emo = report["models"]["EMO"]
  assert emo["num_tokens"] == 30 * 100      # every synthetic document has > 100 bytes
  assert len(emo["clusters"]) == 4 and sum(c["size"] for c in emo["clusters"]) == 3000
  assert np.array(emo["expert_usage"]).shape == (2, 4, 7)
  np.testing.assert_allclose(np.array(emo["expert_usage"]).sum(-1), emo_cfg.top_k, atol=1e-3)
  for png in report["plots"]:
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert {"projection.png", "concentration.png", "expert_usage.png"} <= set(report["plots"])


def test_the_command_refuses_a_missing_corpus_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.cluster", f"--checkpoint={tmp_path}",
       f"--corpus={tmp_path / 'missing.jsonl'}", f"--out={tmp_path / 'out'}"], cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "--corpus=" in proc.stderr and "no such file" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_dense_model_is_refused_by_name(tmp_path):
  cfg = tiny_model_config(num_experts=0, pool=False, mlp_hidden=16)
  _, params = random_model(cfg)
  ckpt_lib.save_params(tmp_path / "dense", nnx.to_pure_dict(params), cfg.to_dict())
  with pytest.raises(ValueError, match="dense model.*no routing"):
    analysis.cluster_checkpoints([tmp_path / "dense"], [{"text": "abc", "domain": "x"}],
                                 tmp_path / "out", tokenizer="bytes", plot=False)


def test_parameter_checkpoint_without_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="--tokenizer"):
    analysis.checkpoint_tokenizer(tmp_path)
