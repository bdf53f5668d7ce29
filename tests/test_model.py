"""The decoder: attention, RoPE and norms against NumPy; document isolation; pool behaviour."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax import model as model_lib
from emo_jax.config import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, num_experts=7, num_shared_experts=1, top_k=2, expert_hidden=16,
                   pool_min=2, pool_max=7, max_segments=4, compute_dtype="float32",
                   expert_backend="dense", init_std=0.1)


@functools.partial(nnx.jit, static_argnames="train")
def forward(model, tokens, segment_ids, positions, rng, train):
  return model(tokens, segment_ids, positions, train=train, rng=rng)


@functools.lru_cache(maxsize=None)
def make_model(cfg: ModelConfig, seed: int = 0):
  return model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))


def packed_batch(rng, lengths, total, vocab):
  """One row holding documents of the given lengths, then padding."""
  tokens = rng.integers(1, vocab, size=(1, total)).astype(np.int32)
  segment_ids = np.zeros((1, total), np.int32)
  positions = np.zeros((1, total), np.int32)
  start = 0
  for i, n in enumerate(lengths):
    segment_ids[0, start:start + n] = i + 1
    positions[0, start:start + n] = np.arange(n)
    start += n
  return tokens, segment_ids, positions


# ---- components against NumPy ---------------------------------------------------------------
def reference_attention(q, k, v, segment_ids):
  B, L, H, K = q.shape
  G = k.shape[2]
  out = np.zeros((B, L, H, K))
  for b in range(B):
    for h in range(H):
      g = h // (H // G)
      logits = q[b, :, h] @ k[b, :, g].T / np.sqrt(K)
      allowed = np.tril(np.ones((L, L), bool)) & (segment_ids[b][:, None] == segment_ids[b][None])
      logits = np.where(allowed, logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
  return out


def test_attention_matches_numpy():
  rng = np.random.default_rng(0)
  B, L, H, G, K = 2, 12, 4, 2, 8
  q, k, v = (rng.normal(size=(B, L, n, K)).astype(np.float32) for n in (H, G, G))
  segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
  got = model_lib.dot_product_attention(q, k, v, model_lib.attention_mask(segment_ids))
  np.testing.assert_allclose(np.asarray(got), reference_attention(q, k, v, segment_ids),
                             atol=1e-5)


def test_rope_matches_rotate_half_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
  positions = np.array([[0, 1, 2, 7, 100]])
  theta = 500_000.0
  inv_freq = 1.0 / theta ** (np.arange(0, 8, 2) / 8)
  angles = positions[..., None] * inv_freq
  cos = np.cos(np.concatenate([angles, angles], -1))[:, :, None]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, :, None]
  rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  want = x * cos + rotate_half * sin
  np.testing.assert_allclose(np.asarray(model_lib.rope(x, positions, theta)), want, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(2)
  q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
  score = lambda i, j: float(jnp.sum(model_lib.rope(q, jnp.array([[i]]), 1e4)
                                     * model_lib.rope(k, jnp.array([[j]]), 1e4)))
  np.testing.assert_allclose(score(3, 1), score(40, 38), rtol=1e-4)
  assert abs(score(3, 1) - score(3, 2)) > 1e-3


def test_rms_norm_matches_numpy():
  x = np.random.default_rng(3).normal(size=(3, 16)).astype(np.float32)
  norm = model_lib.RMSNorm(16, 1e-6)
  norm.weight[...] = jnp.linspace(0.5, 1.5, 16)
  want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, 16)
  np.testing.assert_allclose(np.asarray(norm(x)), want, rtol=1e-5)


# ---- documents in packed rows ---------------------------------------------------------------
def test_packed_documents_equal_separate_runs():
  """Inference (no pool): a document's logits do not depend on its row neighbours or offset."""
  model = make_model(TINY)
  rng = np.random.default_rng(4)
  tokens, segment_ids, positions = packed_batch(rng, [7, 6], 16, TINY.vocab_size)
  logits, _ = forward(model, tokens, segment_ids, positions, None, False)
  for start, n in ((0, 7), (7, 6)):
    alone = np.zeros((1, 16), np.int32)
    alone[0, :n] = tokens[0, start:start + n]
    seg = (np.arange(16) < n).astype(np.int32)[None]
    pos = np.where(seg, np.arange(16), 0).astype(np.int32)
    single, _ = forward(model, alone, seg, pos, None, False)
    np.testing.assert_allclose(np.asarray(logits[0, start:start + n]),
                               np.asarray(single[0, :n]), atol=2e-5)


@pytest.mark.parametrize("pool", [True, False])
def test_other_document_cannot_change_a_documents_logits(pool):
  """Training mode: attention and the pool are both confined to the document."""
  model = make_model(TINY.replace(pool=pool))
  rng = np.random.default_rng(5)
  tokens, segment_ids, positions = packed_batch(rng, [8, 6], 16, TINY.vocab_size)
  key = jax.random.key(11)
  before, _ = forward(model, tokens, segment_ids, positions, key, True)
  for edited, kept in ((slice(8, 14), slice(0, 8)), (slice(0, 8), slice(8, 14))):
    changed = tokens.copy()
    changed[0, edited] = (changed[0, edited] + 17) % TINY.vocab_size
    after, _ = forward(model, changed, segment_ids, positions, key, True)
    np.testing.assert_array_equal(np.asarray(before[0, kept]), np.asarray(after[0, kept]))
    assert not np.allclose(before[0, edited], after[0, edited])  # the edit did take effect


def test_without_pool_a_token_ignores_later_tokens():
  model = make_model(TINY.replace(pool=False))
  rng = np.random.default_rng(6)
  tokens, segment_ids, positions = packed_batch(rng, [16], 16, TINY.vocab_size)
  before, _ = forward(model, tokens, segment_ids, positions, jax.random.key(0), True)
  changed = tokens.copy()
  changed[0, 10:] = (changed[0, 10:] + 5) % TINY.vocab_size
  after, _ = forward(model, changed, segment_ids, positions, jax.random.key(0), True)
  np.testing.assert_array_equal(np.asarray(before[0, :10]), np.asarray(after[0, :10]))


def test_pool_is_not_causal():
  """Spec step 5: an early token's pool depends on its document's later tokens."""
  cfg = TINY.replace(pool_min=2, pool_max=2)  # the tightest pool: top-2 of 6 routed
  model = make_model(cfg)
  rng = np.random.default_rng(7)
  tokens, segment_ids, positions = packed_batch(rng, [16], 16, cfg.vocab_size)
  key = jax.random.key(0)
  before, _ = forward(model, tokens, segment_ids, positions, key, True)
  changed = tokens.copy()
  changed[0, 4:] = rng.integers(1, cfg.vocab_size, size=12)
  after, _ = forward(model, changed, segment_ids, positions, key, True)
  assert not np.allclose(before[0, :4], after[0, :4])


def test_full_pool_and_eval_mode_route_over_all_experts():
  rng = np.random.default_rng(8)
  tokens, segment_ids, positions = packed_batch(rng, [9, 5], 16, TINY.vocab_size)
  model = make_model(TINY)
  inference, _ = forward(model, tokens, segment_ids, positions, None, False)
  # Same parameters as a StdMoE and with a pool that always holds every routed expert.
  for cfg in (TINY.replace(pool=False), TINY.replace(pool_min=6, pool_max=7)):
    other = make_model(cfg)
    nnx.update(other, nnx.state(model))
    trained, _ = forward(other, tokens, segment_ids, positions, jax.random.key(3), True)
    np.testing.assert_allclose(np.asarray(trained), np.asarray(inference), atol=1e-6)
  # A small training pool changes the output: the comparison above can fail.
  pooled, _ = forward(model, tokens, segment_ids, positions, jax.random.key(3), True)
  assert not np.allclose(pooled, inference, atol=1e-4)
  # A fixed evaluation pool (the reference's in-loop evaluation) also changes it.
  fixed = make_model(TINY.replace(eval_pool_size=2))
  nnx.update(fixed, nnx.state(model))
  evaluated, aux = forward(fixed, tokens, segment_ids, positions, None, False)
  assert not np.allclose(evaluated, inference, atol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["pool_size"]), 2.0)


# ---- variants ------------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [
    dict(num_experts=0, num_shared_experts=0, pool=False, mlp_hidden=24),  # dense baseline
    dict(qk_norm=True, num_shared_experts=0, top_k=3, pool_min=3, tie_embeddings=True),  # OLMoE-like
    dict(compute_dtype="bfloat16", expert_backend="capacity"),
], ids=["dense", "qknorm-noshared-tied", "bf16-capacity"])
def test_variants_train_with_finite_gradients(changes):
  cfg = TINY.replace(**changes)
  model = make_model(cfg)
  rng = np.random.default_rng(9)
  tokens, segment_ids, positions = packed_batch(rng, [10, 6], 16, cfg.vocab_size)

  def loss_fn(model):
    logits, aux = model(tokens, segment_ids, positions, train=True, rng=jax.random.key(1))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 16, cfg.vocab_size)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["aux_loss"]

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  leaves = jax.tree.leaves(grads)
  assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_expert_backends_agree_in_the_model():
  rng = np.random.default_rng(10)
  tokens, segment_ids, positions = packed_batch(rng, [9, 7], 16, TINY.vocab_size)
  reference = make_model(TINY)
  want, want_aux = forward(reference, tokens, segment_ids, positions, jax.random.key(2), True)
  for backend in ("capacity", "ragged"):
    # capacity_factor = routed / top_k leaves room for every assignment.
    other = make_model(TINY.replace(expert_backend=backend, capacity_factor=3.0))
    nnx.update(other, nnx.state(reference))
    got, aux = forward(other, tokens, segment_ids, positions, jax.random.key(2), True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(aux["dropped_fraction"]), 0.0)


def test_aux_losses_are_per_layer_and_weighted():
  cfg = TINY
  rng = np.random.default_rng(11)
  tokens, segment_ids, positions = packed_batch(rng, [16], 16, cfg.vocab_size)
  _, aux = forward(make_model(cfg), tokens, segment_ids, positions, jax.random.key(0), True)
  assert aux["lb_loss"].shape == (cfg.num_layers,)
  assert aux["expert_load"].shape == (cfg.num_layers, cfg.num_routed_experts)
  np.testing.assert_allclose(np.asarray(aux["expert_load"].sum(-1)), 1.0, rtol=1e-5)
  want = (cfg.lb_loss_weight * np.mean(aux["lb_loss"])
          + cfg.router_z_loss_weight * np.mean(aux["router_z_loss"]))
  np.testing.assert_allclose(float(aux["aux_loss"]), want, rtol=1e-6)
  assert np.all((aux["pool_size"] >= cfg.pool_min) & (aux["pool_size"] <= cfg.num_routed_experts))


def test_mismatched_input_shapes_are_named():
  model = make_model(TINY)
  tokens = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids"):
    model(tokens, jnp.ones((2, 7), jnp.int32))


def test_routing_probs_and_expert_subset_mask():
  model = make_model(TINY)
  rng = np.random.default_rng(12)
  tokens, segment_ids, positions = packed_batch(rng, [10, 6], 16, TINY.vocab_size)
  R = TINY.num_routed_experts
  keep = np.zeros((TINY.num_layers, R), bool)
  keep[:, [1, 4]] = True  # top_k=2 of exactly two experts: every token uses both

  @nnx.jit
  def run(model, keep):
    return model(tokens, segment_ids, positions, keep_experts=keep, collect_routing=True)

  full, aux_full = run(model, np.ones_like(keep))
  subset, aux = run(model, keep)
  probs = np.asarray(aux_full["routing_probs"])
  assert probs.shape == (TINY.num_layers, 1, 16, R)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(full, subset, atol=1e-4)
  load = np.asarray(aux["expert_load"])
  np.testing.assert_allclose(load[:, [1, 4]].sum(-1), 1.0, rtol=1e-6)  # nothing else is used
  plain, _ = forward(model, tokens, segment_ids, positions, None, False)
  np.testing.assert_allclose(np.asarray(full), np.asarray(plain), atol=1e-6)  # all kept = no mask
