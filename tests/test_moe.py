"""Tests of the router, document pool, top-k and auxiliary losses against plain NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from emo_jax.model import moe, routing
from emo_jax.config import ModelConfig
from emo_jax.model.execution import ExecutionConfig


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _silu(x):
  return x / (1 + np.exp(-x))


def reference_pool_mask(probs_BxLxE, segment_ids_BxL, pool_sizes_BxS):
  """Spec steps 2-4, one document at a time: sum scores, keep the P best, mask the rest."""
  probs = np.asarray(probs_BxLxE, np.float64)
  segment_ids = np.asarray(segment_ids_BxL)
  keep = np.ones(probs.shape, bool)
  for b in range(probs.shape[0]):
    for s in np.unique(segment_ids[b]):
      if s == 0:
        continue
      tokens = segment_ids[b] == s
      score = probs[b, tokens].sum(0)
      order = np.argsort(-score, kind="stable")
      masked = order[pool_sizes_BxS[b, s - 1]:]
      rows = np.where(tokens)[0]
      keep[b][np.ix_(rows, masked)] = False
  return keep


def random_packing(rng, batch, length, max_segments):
  """Rows of several documents of random lengths, some rows ending in padding."""
  segment_ids = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cursor, segment = 0, 1
    fill = length if b % 2 == 0 else rng.integers(length // 2, length)
    while cursor < fill and segment <= max_segments:
      n = int(rng.integers(1, max(2, length // 3)))
      n = min(n, fill - cursor)
      if segment == max_segments:
        n = fill - cursor
      segment_ids[b, cursor:cursor + n] = segment
      cursor, segment = cursor + n, segment + 1
  return segment_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pool_mask_matches_per_document_numpy(seed):
  rng = np.random.default_rng(seed)
  B, L, E, S = 4, 48, 12, 6
  logits = rng.normal(size=(B, L, E)).astype(np.float32) * 2
  segment_ids = random_packing(rng, B, L, S)
  assert (segment_ids == 0).any() and segment_ids.max() >= 3  # padding and several documents
  pool_sizes = rng.integers(2, E + 3, size=(B, S)).astype(np.int32)  # includes P >= E
  probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
  got = jax.jit(routing.document_pool_mask, static_argnums=3)(probs, segment_ids, pool_sizes, S)
  want = reference_pool_mask(np.asarray(probs), segment_ids, pool_sizes)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Tokens of one document share one pool, of exactly min(P, E) experts.
  got = np.asarray(got)
  for b in range(B):
    for s in np.unique(segment_ids[b][segment_ids[b] > 0]):
      rows = got[b, segment_ids[b] == s]
      assert (rows == rows[0]).all()
      assert rows[0].sum() == min(pool_sizes[b, s - 1], E)


def test_pool_then_topk_matches_numpy():
  """Masked softmax over routed experts, top-k, no renormalisation (weights sum below 1)."""
  rng = np.random.default_rng(3)
  B, L, E, S, K = 2, 20, 10, 4, 3
  logits = rng.normal(size=(B, L, E)).astype(np.float32)
  segment_ids = random_packing(rng, B, L, S)
  pool_sizes = rng.integers(K, E, size=(B, S)).astype(np.int32)
  keep = routing.document_pool_mask(jax.nn.softmax(jnp.asarray(logits)), segment_ids, pool_sizes, S)
  probs, ids, weights = routing.route(jnp.asarray(logits).reshape(B * L, E), keep.reshape(B * L, E), K)
  ref_keep = reference_pool_mask(_softmax(logits), segment_ids, pool_sizes).reshape(B * L, E)
  ref_probs = _softmax(np.where(ref_keep, logits.reshape(B * L, E), -np.inf))
  ref_ids = np.argsort(-ref_probs, axis=-1, kind="stable")[:, :K]
  np.testing.assert_allclose(np.asarray(probs), ref_probs, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(ids), ref_ids)
  np.testing.assert_allclose(np.asarray(weights), np.take_along_axis(ref_probs, ref_ids, -1),
                             atol=1e-6)
  assert np.all(np.asarray(weights).sum(-1) < 1.0)
  assert np.all(ref_keep[np.arange(B * L)[:, None], np.asarray(ids)])  # top-k inside the pool


@pytest.mark.slow
def test_pool_sizes_uniform_and_independent():
  cfg = ModelConfig(vocab_size=32, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, num_experts=13, top_k=2, expert_hidden=4, pool_min=3,
                    pool_max=14, max_segments=4)
  layer = moe.MoE(cfg, ExecutionConfig(), rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(0), 4000)
  sizes = np.asarray(jax.vmap(lambda k: layer.pool_sizes(8, pool_rng=k, train=True))(keys))
  assert sizes.shape == (4000, 8, 4)
  values, counts = np.unique(sizes, return_counts=True)
  np.testing.assert_array_equal(values, np.arange(3, 15))  # every size in [min, max]
  expected = sizes.size / 12
  assert np.all(np.abs(counts - expected) < 0.08 * expected), counts
  flat = sizes.reshape(4000, -1).astype(np.float64)
  corr = np.corrcoef(flat, rowvar=False)
  off_diagonal = corr[~np.eye(corr.shape[0], dtype=bool)]
  assert np.abs(off_diagonal).max() < 0.1  # documents draw independently
  # Layers draw independently: the model gives each layer its own split of the step key.
  layer_keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys[:2000])
  per_layer = np.asarray(jax.vmap(jax.vmap(
      lambda k: layer.pool_sizes(1, pool_rng=k, train=True)))(layer_keys))[:, :, 0, 0]
  assert abs(np.corrcoef(per_layer[:, 0], per_layer[:, 1])[0, 1]) < 0.1
  # Evaluation: no pool unless a fixed eval pool is configured.
  assert layer.pool_sizes(8, pool_rng=keys[0], train=False) is None
  fixed = moe.MoE(cfg.replace(eval_pool_size=5), ExecutionConfig(), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(fixed.pool_sizes(2, pool_rng=None, train=False), 5)


def test_full_pool_masks_nothing():
  rng = np.random.default_rng(4)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 16, 7)), jnp.float32))
  segment_ids = random_packing(rng, 2, 16, 4)
  for size in (7, 8, 100):
    keep = routing.document_pool_mask(probs, segment_ids, jnp.full((2, 4), size), 4)
    assert bool(jnp.all(keep))


@pytest.mark.slow
def test_training_a_pooled_model_needs_a_key():
  cfg = ModelConfig(vocab_size=32, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, num_experts=5, top_k=2, expert_hidden=4, pool_min=2,
                    pool_max=4, max_segments=2)
  with pytest.raises(ValueError, match="pool_rng"):
    moe.MoE(cfg, ExecutionConfig(), rngs=nnx.Rngs(0)).pool_sizes(1, pool_rng=None, train=True)


@pytest.mark.slow
def test_moe_layer_matches_numpy():
  """Router -> pool -> softmax -> top-k -> routed experts + shared expert at weight 1.0."""
  cfg = ModelConfig(vocab_size=32, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, num_experts=7, num_shared_experts=1, top_k=2, expert_hidden=4,
                    pool_min=2, pool_max=5, max_segments=3, compute_dtype="float32",
                    init_std=0.5)
  layer = moe.MoE(cfg, ExecutionConfig(expert_backend="dense"), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(5)
  B, L, R, S = 2, 9, 6, 3
  x = rng.normal(size=(B, L, 8)).astype(np.float32)
  segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
  key = jax.random.key(7)
  y, aux = layer(jnp.asarray(x), segment_ids, pool_rng=key, train=True)

  router = np.asarray(layer.router[...], np.float64)
  wg, wu, wd = (np.asarray(w[...], np.float64) for w in (layer.w_gate, layer.w_up, layer.w_down))
  pool_sizes = np.asarray(routing.draw_pool_sizes(key, (B, S), cfg.pool_min, cfg.pool_max))
  logits = x.astype(np.float64) @ router[:, :R]
  keep = reference_pool_mask(_softmax(logits), segment_ids, pool_sizes)
  probs = _softmax(np.where(keep, logits, -np.inf))
  expert = lambda e, v: (_silu(v @ wg[e]) * (v @ wu[e])) @ wd[e]
  want = np.zeros_like(x, np.float64)
  for b in range(B):
    for t in range(L):
      top = np.argsort(-probs[b, t], kind="stable")[:2]
      want[b, t] = sum(probs[b, t, e] * expert(e, x[b, t]) for e in top) + expert(R, x[b, t])
  real = segment_ids > 0  # padding outputs are never used; only documents are compared
  np.testing.assert_allclose(np.asarray(y)[real], want[real], rtol=2e-4, atol=2e-5)
  # The router z-loss sums over each token's pool only (the release masks the logits first).
  assert not keep[real].all()
  mask = segment_ids.reshape(-1) > 0
  lse = np.log((np.exp(logits) * keep).sum(-1)).reshape(-1)
  np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(lse[mask] ** 2), rtol=1e-5)
  lse_all = np.log(np.exp(logits).sum(-1)).reshape(-1)
  assert abs(float(aux["router_z_loss"]) - np.mean(lse_all[mask] ** 2)) > 1e-3


@pytest.mark.parametrize("eval_pool_size", [2, None])
@pytest.mark.slow
def test_router_z_loss_gradient_reaches_in_pool_experts_only(eval_pool_size):
  """One document under a fixed pool of 2 of 6 routed experts: the z-loss gradient of every
  out-of-pool expert's router row is exactly zero, of every in-pool row not; no pool: all
  rows get one."""
  cfg = ModelConfig(vocab_size=32, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, num_experts=7, num_shared_experts=1, top_k=2, expert_hidden=4,
                    pool=False, eval_pool_size=eval_pool_size, max_segments=2,
                    compute_dtype="float32", init_std=0.5)
  layer = moe.MoE(cfg, ExecutionConfig(expert_backend="dense"), rngs=nnx.Rngs(2))
  x = jnp.asarray(np.random.default_rng(8).normal(size=(1, 6, 8)), jnp.float32)
  segment_ids = np.array([[1, 1, 1, 1, 1, 0]], np.int32)
  graphdef, params = nnx.split(layer)

  def z_loss(params):
    return nnx.merge(graphdef, params)(x, segment_ids, train=False)[1]["router_z_loss"]

  grad_DxE = np.asarray(jax.grad(z_loss)(params)["router"][...])
  logits = np.asarray(x[0, :5] @ layer.router[...][:, :6], np.float64)
  scores = _softmax(logits).sum(0)
  in_pool = np.argsort(-scores, kind="stable")[:eval_pool_size or 6]
  out_pool = np.setdiff1d(np.arange(6), in_pool)
  assert np.all(grad_DxE[:, out_pool] == 0.0)
  assert np.all(np.abs(grad_DxE[:, in_pool]).max(axis=0) > 0)
  lse = np.log(np.exp(logits[:, in_pool]).sum(-1))
  np.testing.assert_allclose(float(z_loss(params)), np.mean(lse ** 2), rtol=1e-5)


def test_load_balancing_loss_hand_checked():
  probs = jnp.array([[0.4, 0.3, 0.2, 0.1],
                     [0.1, 0.2, 0.3, 0.4],
                     [0.7, 0.1, 0.1, 0.1],
                     [0.9, 0.05, 0.03, 0.02]])  # padding: must not count
  ids = jnp.array([[0, 1], [3, 2], [0, 1], [0, 1]])
  mask = jnp.array([True, True, True, False])
  loss, load = routing.load_balancing_loss(probs, ids, mask)
  # counts = [2, 2, 1, 1], n = 3, mean scores = [0.4, 0.2, 0.2, 0.2]:
  # (4 / 2) * (2 * 0.4 + 2 * 0.2 + 0.2 + 0.2) / 3 = 16 / 15.
  np.testing.assert_allclose(float(loss), 16 / 15, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(load), np.array([2, 2, 1, 1]) / 6, rtol=1e-6)
  uniform, _ = routing.load_balancing_loss(jnp.full((6, 3), 1 / 3),
                                       jnp.array([[0], [1], [2], [0], [1], [2]]),
                                       jnp.ones(6, bool))
  np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)  # balanced routing scores 1


def test_global_load_balancing_under_shard_map():
  """Counts and token totals psum-ed over 8 replicas reproduce the whole-batch loss."""
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(6)
  T, E, K = 8 * 12, 10, 3
  logits = rng.normal(size=(T, E)).astype(np.float32) * 3
  probs = jax.nn.softmax(jnp.asarray(logits), -1)
  _, ids = jax.lax.top_k(probs, K)
  mask = jnp.ones((T,), bool)
  whole_loss, whole_load = routing.load_balancing_loss(probs, ids, mask)

  def per_replica(p, i, m):
    loss, load = routing.load_balancing_loss(p, i, m, data_axes=("data",))
    local, _ = routing.load_balancing_loss(p, i, m)
    return jax.lax.pmean(loss, "data"), load, jax.lax.pmean(local, "data")

  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  fn = jax.jit(jax.shard_map(per_replica, mesh=mesh, in_specs=(P("data"),) * 3,
                             out_specs=(P(), P(), P())))
  loss, load, local_only = fn(shard(probs), shard(ids), shard(mask))
  np.testing.assert_allclose(float(loss), float(whole_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(load), np.asarray(whole_load), rtol=1e-6)
  # Without the psum the loss is a different (per-replica) quantity: the test can fail.
  assert abs(float(local_only) - float(whole_loss)) > 1e-4


def numpy_lb_per_group(probs_TxE, ids_TxK, mask_T, group_of_T):
  """The release's loss balanced within each group of tokens, averaged over the groups."""
  probs, ids, mask = (np.asarray(probs_TxE, np.float64), np.asarray(ids_TxK),
                      np.asarray(mask_T, bool))
  E, K = probs.shape[1], ids.shape[1]
  losses = []
  for g in np.unique(group_of_T):
    sel = (group_of_T == g) & mask
    counts = np.bincount(ids[sel].ravel(), minlength=E)
    mean_score = probs[sel].mean(0)
    losses.append(E / K * np.sum(counts * mean_score) / sel.sum())
  return float(np.mean(losses))


def test_load_balancing_per_group_of_sequences_matches_numpy():
  rng = np.random.default_rng(3)
  B, L, E, K = 6, 5, 7, 2
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(B * L, E)) * 3, jnp.float32), -1)
  _, ids = jax.lax.top_k(probs, K)
  mask = jnp.asarray(rng.random(B * L) > 0.2)
  rows = np.repeat(np.arange(B), L)
  for groups in (1, 2, 3, 6):
    loss, load = routing.load_balancing_loss(probs, ids, mask, num_groups=groups)
    want = numpy_lb_per_group(probs, ids, mask, rows // (B // groups))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=f"{groups} groups")
    np.testing.assert_allclose(np.asarray(load).sum(), 1.0, rtol=1e-6)
  # Groups of sequences are a different quantity from the whole batch: the test can fail.
  whole, _ = routing.load_balancing_loss(probs, ids, mask)
  assert abs(float(routing.load_balancing_loss(probs, ids, mask, num_groups=3)[0])
             - float(whole)) > 1e-3
  with pytest.raises(ValueError, match="num_groups=4"):
    routing.load_balancing_loss(probs, ids, mask, num_groups=4)


def test_load_balancing_groups_under_shard_map_are_micro_batches_of_every_replica():
  """The release's scope: group g = the g-th micro-batch of every data-parallel rank."""
  if len(jax.devices()) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(8)
  T, E, K, G = 8 * 12, 10, 3, 2
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(T, E)) * 3, jnp.float32), -1)
  _, ids = jax.lax.top_k(probs, K)
  mask = jnp.ones((T,), bool)
  fn = jax.jit(jax.shard_map(
      lambda p, i, m: jax.lax.pmean(routing.load_balancing_loss(
          p, i, m, data_axes=("data",), num_groups=G)[0], "data"),
      mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P()))
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  # Each replica holds 12 tokens; its first 6 are group 0, its last 6 group 1.
  group = (np.arange(T) % 12) // 6
  np.testing.assert_allclose(float(fn(shard(probs), shard(ids), shard(mask))),
                             numpy_lb_per_group(probs, ids, mask, group), rtol=1e-5)


def _scoped_model(scope):
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                    head_dim=16, num_experts=8, top_k=2, expert_hidden=16, pool=False,
                    max_segments=4, max_seq_len=16, compute_dtype="float32",
                    lb_scope_sequences=scope)
  from emo_jax.model.transformer import Transformer
  return cfg, Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_model_balances_per_scope_of_sequences_and_a_mesh_agrees():
  """lb_scope_sequences=2 on 8 rows: per layer, the NumPy loss of four 2-row groups, from the
  model's own routing probabilities; the same on an 8-device mesh as on one device."""
  cfg, model = _scoped_model(2)
  B, L = 8, 8
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 64, (B, L)), jnp.int32)
  segments = jnp.asarray(np.where(rng.random((B, L)) < 0.1, 0, 1), jnp.int32)
  _, aux = model(tokens, segments, train=True, collect_routing=True)
  rows = np.repeat(np.arange(B), L)
  mask = np.asarray(segments).reshape(-1) > 0
  for layer in range(cfg.num_layers):
    probs = np.asarray(aux["routing_probs"][layer]).reshape(B * L, -1)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :cfg.top_k]
    want = numpy_lb_per_group(probs, ids, mask, rows // 2)
    np.testing.assert_allclose(float(aux["lb_loss"][layer]), want, rtol=1e-5)
    assert abs(want - numpy_lb_per_group(probs, ids, mask, rows * 0)) > 1e-4
  with pytest.raises(ValueError, match="lb_scope_sequences=2"):
    model(tokens[:3], segments[:3], train=True)
  if len(jax.devices()) < 8:
    pytest.skip("the mesh half needs 8 (fake) devices")
  from emo_jax.model import sharding
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, expert=2))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  forward = jax.jit(lambda st, t, s: nnx.merge(graphdef, st)(t, s, train=True, mesh=mesh)[1][
      "lb_loss"])
  batch = sharding.batch_sharding(mesh)
  on_mesh = forward(state, jax.device_put(tokens, batch), jax.device_put(segments, batch))
  np.testing.assert_allclose(np.asarray(on_mesh), np.asarray(aux["lb_loss"]), rtol=1e-5)


def test_segment_id_check():
  routing.check_segment_ids(np.array([[0, 1, 2, 4]]), 4)
  with pytest.raises(ValueError, match="max_segments=3"):
    routing.check_segment_ids(np.array([[1, 2, 4]]), 3)
