"""The routing explorer's JSON endpoint (POST /v1/route) against the model's own routing, and
GET /explore, in process (FastAPI's TestClient; the engine is not started)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # pylint: disable=wrong-import-position

from emo_jax.config import ModelConfig  # pylint: disable=wrong-import-position
from emo_jax.convert import loading  # pylint: disable=wrong-import-position
from emo_jax.data.tokenizer import ByteTokenizer  # pylint: disable=wrong-import-position
from emo_jax.inference.serve import app as app_lib  # pylint: disable=wrong-import-position
from emo_jax.inference.serve import bank as bank_lib  # pylint: disable=wrong-import-position
from emo_jax.inference.serve import engine as engine_lib  # pylint: disable=wrong-import-position
from emo_jax.inference.serve import explore  # pylint: disable=wrong-import-position
from emo_jax.model import routing  # pylint: disable=wrong-import-position
from emo_jax.study import selective  # pylint: disable=wrong-import-position
from emo_jax.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from tests.random_model import random_params  # pylint: disable=wrong-import-position

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                  head_dim=16, num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=16,
                  mlp_hidden=64, max_segments=4, max_seq_len=64, compute_dtype="float32",
                  pool=False, init_std=0.3)
TOK = ByteTokenizer()
SUBSETS = {"a": ((0, 1, 2), (3, 4, 5)), "b": ((4, 5), (0, 6))}
TEXT = "def add(a, b):\n    return a + b"


def make_client(path, names):
  bank = bank_lib.ExpertBank(path)
  subsets = {n: bank_lib.Subset(n, SUBSETS[n], "explicit") for n in names if n != "all"}
  if "all" in names:
    subsets["all"] = bank_lib.all_experts(bank.cfg)
  bank.commit(bank.prepare(subsets), subsets)
  engine = engine_lib.Engine(bank, TOK, slots=1, max_queue=1)
  return TestClient(app_lib.create_app(engine, model_name="m", manage_engine=False))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = tmp_path_factory.mktemp("explore_ckpt")
  _, params = random_params(CFG, seed=3)
  ckpt_lib.save_params(path, params, CFG.to_dict())
  return path, params, make_client(path, ("all", "a", "b"))


def direct(cfg, params, tokens):
  """The routed softmax [layers, T, experts] of a plain forward pass of a checkpoint."""
  model = nnx.merge(*loading.build_model(cfg, params))
  _, aux = model(jnp.asarray([tokens]), collect_routing=True)
  return np.asarray(aux["routing_probs"])[:, 0]


def routed(body):
  ids = np.asarray([[layer["experts"] for layer in t["layers"]] for t in body["tokens"]])
  weights = np.asarray([[layer["weights"] for layer in t["layers"]] for t in body["tokens"]])
  return ids.transpose(1, 0, 2), weights.transpose(1, 0, 2)  # [layers, T, k]


@pytest.mark.slow
def test_route_equals_the_checkpoints_own_routing(setup):
  _, params, client = setup
  r = client.post("/v1/route", json={"text": TEXT, "pool_size": 3})
  assert r.status_code == 200, r.text
  body = r.json()
  tokens = TOK.encode(TEXT)
  assert [t["id"] for t in body["tokens"]] == tokens
  assert "".join(t["text"] for t in body["tokens"]) == TEXT
  assert body["experts"] == ["all"] and body["top_k"] == 2 and body["num_layers"] == 2
  probs = direct(CFG, params, tokens)  # [layers, T, 7]
  weights_ref, ids_ref = jax.lax.top_k(jnp.asarray(probs), 2)
  ids, weights = routed(body)
  np.testing.assert_array_equal(ids, np.asarray(ids_ref))
  np.testing.assert_allclose(weights, np.asarray(weights_ref), atol=1e-5)
  # The pool: the document pool mask of the routing code, the text taken as one document.
  keep = routing.document_pool_mask(jnp.asarray(probs),  # [layers as B, T, E]
                                    jnp.ones((2, len(tokens)), jnp.int32),
                                    jnp.full((2, 4), 3, jnp.int32), 4)
  for layer, pool in enumerate(body["pool"]):
    assert sorted(pool["experts"]) == np.flatnonzero(np.asarray(keep)[layer, 0]).tolist()
    assert pool["scores"] == sorted(pool["scores"], reverse=True)
  # Coverage: share of the routing weight on each subset's experts, best first.
  for c in body["coverage"]:
    mask = bank_lib.Subset(c["name"], SUBSETS[c["name"]], "").mask(7)
    held = mask[np.arange(2)[:, None, None], ids]
    assert c["coverage"] == pytest.approx((weights * held).sum() / weights.sum(), abs=1e-5)
  assert [c["name"] for c in body["coverage"]] == sorted(
      ["a", "b"], key=lambda n: -next(c["coverage"] for c in body["coverage"] if c["name"] == n))
  assert body["best_subset"] == body["coverage"][0]["name"]


@pytest.mark.slow
def test_route_on_a_subset_equals_the_pruned_checkpoint(setup):
  path, params, client = setup
  tokens = TOK.encode(TEXT)
  for name, c in (("a", client), ("b", make_client(path, ("b",)))):  # a compact bank too
    body = c.post("/v1/route", json={"tokens": tokens, "experts": name}).json()
    kept = np.asarray(SUBSETS[name])
    selection = selective.Selection(keep=kept.shape[1] + 1, kept_routed=kept,
                                    scores=np.zeros((2, 7)), num_routed=7, num_shared=1,
                                    greedy=True)
    pruned, pruned_cfg = selective.prune(params, CFG, selection)
    probs = direct(pruned_cfg, pruned, tokens)
    weights_ref, ids_ref = jax.lax.top_k(jnp.asarray(probs), 2)
    ids, weights = routed(body)
    expected = np.stack([kept[layer][np.asarray(ids_ref)[layer]] for layer in range(2)])
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(weights, np.asarray(weights_ref), atol=1e-5)
    assert set(ids[0].ravel()) <= set(SUBSETS[name][0])


def test_route_errors_clusters_and_the_page(setup, tmp_path):
  path, _, client = setup
  assert client.post("/v1/route", json={"text": "x", "tokens": [1]}).status_code == 400
  assert client.post("/v1/route", json={}).status_code == 400
  r = client.post("/v1/route", json={"text": "x", "experts": "nope"})
  assert r.status_code == 400 and "unknown expert subset" in r.json()["error"]["message"]
  assert client.post("/v1/route", json={"text": ""}).status_code == 400
  assert client.post("/v1/route", json={"text": "x", "pool_size": 0}).status_code == 400
  assert client.post("/v1/route", json={"text": "x"}).json()["pool"] is None  # no pool: StdMoE
  usage = np.zeros((2, 3, 7))
  usage[:, 0, :3] = 1.0
  usage[:, 1, 3:5] = 1.0
  usage[:, 2, 5:] = 1.0
  clusters = tmp_path / "clusters.json"
  clusters.write_text(json.dumps({"model": "m", "domains": ["code", "news", "stories"],
                                  "models": {"m": {"expert_usage": usage.tolist()}}}))
  explore.attach_clusters(client.app, clusters)
  body = client.post("/v1/route", json={"text": "x"}).json()
  assert body["domains"] == ["code", "news", "stories"]
  assert body["expert_domains"] == [[0, 0, 0, 1, 1, 2, 2]] * 2
  with pytest.raises(ValueError, match="expert_usage has shape"):
    explore.load_clusters(clusters, 3, 7)
  page = client.get("/explore")
  assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
  assert "/v1/route" in page.text and "<script" in page.text and "http" not in page.text.split(
      "<script", 1)[1].replace("http://127.0.0.1", "")
  spec = client.get("/openapi.json").json()
  assert {"RouteRequest", "RouteResponse"} <= set(spec["components"]["schemas"])
  assert "400" in spec["paths"]["/v1/route"]["post"]["responses"]
