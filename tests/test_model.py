"""The decoder: attention, RoPE and norms against NumPy; document isolation; pool behaviour."""

import enum
import functools
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.model import attention, transformer as model_lib
from emo_jax.config import ModelConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.sharding import MeshConfig, make_mesh

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, num_experts=7, num_shared_experts=1, top_k=2, expert_hidden=16,
                   pool_min=2, pool_max=7, max_segments=4, compute_dtype="float32",
                   init_std=0.1)
DENSE = ExecutionConfig(expert_backend="dense")


@functools.partial(nnx.jit, static_argnames="train")
def forward(model, tokens, segment_ids, positions, rng, train):
  return model(tokens, segment_ids, positions, train=train, rng=rng)


@functools.lru_cache(maxsize=None)
def make_model(cfg: ModelConfig, seed: int = 0, execution: ExecutionConfig = DENSE):
  return model_lib.Transformer(cfg, rngs=nnx.Rngs(seed), execution=execution)


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
  got = attention.dot_product_attention(q, k, v, attention.attention_mask(segment_ids))
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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    dict(compute_dtype="bfloat16"),
], ids=["dense", "qknorm-noshared-tied", "bf16-capacity"])
@pytest.mark.slow
def test_variants_train_with_finite_gradients(changes):
  cfg = TINY.replace(**changes)
  model = make_model(cfg, execution=ExecutionConfig() if "compute_dtype" in changes else DENSE)
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


@pytest.mark.slow
def test_expert_backends_agree_in_the_model():
  rng = np.random.default_rng(10)
  tokens, segment_ids, positions = packed_batch(rng, [9, 7], 16, TINY.vocab_size)
  reference = make_model(TINY)
  want, want_aux = forward(reference, tokens, segment_ids, positions, jax.random.key(2), True)
  for backend in ("capacity", "ragged"):
    # capacity_factor = routed / top_k leaves room for every assignment.
    other = make_model(TINY, execution=ExecutionConfig(expert_backend=backend,
                                                       capacity_factor=3.0))
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


# ---- attention implementations ---------------------------------------------------------------
def random_packing(rng, B, L):
  """Segment ids of B rows with random document lengths and one stretch of padding each.

  Even rows end in padding (the packer), odd rows start with it (left-padded prompts); the last
  row is all padding, whose tokens must still get finite outputs.
  """
  segment_ids = np.zeros((B, L), np.int32)
  for b in range(B - 1):
    pos = int(rng.integers(1, L // 4)) if b % 2 else 0
    doc = 0
    while pos < L:
      n = min(int(rng.integers(1, L // 3)), L - pos)
      doc += 1
      segment_ids[b, pos:pos + n] = doc
      pos += n
      if b % 2 == 0 and rng.random() < 0.3:
        break
  return segment_ids


def attention_and_grads(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cotangent.astype(out.dtype)))


def assert_close(got, want, tol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got))
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert err < tol, f"relative error {err:.2e} >= {tol}"


@jax.jit
def reference_and_grads(q, k, v, cotangent, segment_ids):
  """The float32 reference output and gradients (one compiled call: eager ops compile each)."""
  mask = attention.attention_mask(segment_ids)
  return attention_and_grads(lambda q, k, v: attention.dot_product_attention(q, k, v, mask),
                             *(x.astype(jnp.float32) for x in (q, k, v, cotangent)))


def qkv_and_reference(B, L, H, G, K, dtype, seed):
  """Random q, k, v and cotangent in `dtype`, a packing, and the reference."""
  rng = np.random.default_rng(seed)
  segment_ids = random_packing(rng, B, L)
  args = tuple(jnp.asarray(rng.normal(size=(B, L, n, K)), dtype) for n in (H, G, G, H))
  return args, segment_ids, reference_and_grads(*args, segment_ids)


def test_segment_runs_cover_every_token():
  segment_ids = np.array([[1, 1, 2, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1], [3, 0, 0, 0, 0, 0, 0]])
  runs = jax.jit(attention.segment_runs, static_argnums=1)
  starts, lengths = runs(segment_ids, 3)
  np.testing.assert_array_equal(starts, [[0, 2, 5], [0, 2, -1], [0, 1, -1]])
  np.testing.assert_array_equal(lengths, [[2, 3, 2], [2, 5, -1], [1, 6, -1]])
  # More runs than slots: the surplus joins the last run, so no token is left out.
  starts, lengths = runs(segment_ids[:1], 2)
  np.testing.assert_array_equal(lengths, [[2, 5]])


# splash needs rows of a multiple of 128 tokens; it runs in Pallas interpret mode on CPU (a few
# seconds, hence float32 only: its bfloat16 numerics are the TPU's business), on a 2 x 2 mesh
# of rows and heads as in a sharded run.
@pytest.mark.parametrize("impl, dtype, tol", [("jax_xla", "float32", 1e-5),
                                              ("jax_xla", "bfloat16", 2e-2),
                                              ("chunked", "float32", 1e-5),
                                              ("chunked", "bfloat16", 2e-2),
                                              ("splash", "float32", 1e-5)])
def test_attention_impls_equal_the_reference(impl, dtype, tol):
  args, segment_ids, want = qkv_and_reference(4, 128, 4, 2, 8, jnp.dtype(dtype), seed=13)
  mesh = None
  if impl == "splash":
    mesh = make_mesh(MeshConfig(data=2, tensor=2), jax.devices()[:4])
  fn = lambda q, k, v: attention.segment_attention(q, k, v, segment_ids, impl, mesh=mesh,
                                                   interpret=True)
  got = jax.jit(lambda *a: attention_and_grads(fn, *a))(*args)
  assert got[0].dtype == jnp.dtype(dtype)
  for g, w in zip(got, want):  # output, dq, dk, dv
    assert_close(g, w, tol)


def whole_row_mask(segment_ids):
  """bool [B, 1, L, L] of attention without document boundaries, written out directly: causal,
  and a query and a key either both padding (0) or both not."""
  L = segment_ids.shape[1]
  real = np.asarray(segment_ids) > 0
  return (np.tril(np.ones((L, L), bool))[None] & (real[:, :, None] == real[:, None, :]))[:, None]


@pytest.mark.parametrize("document_attention", [False, True])
@pytest.mark.parametrize("impl", ["xla", "jax_xla", "chunked", "splash"])
def test_attention_impls_honour_document_attention(impl, document_attention):
  """Every CPU-runnable implementation, with the documents joined or apart, equals the
  reference under the mask that choice means (outputs and gradients, float32)."""
  rng = np.random.default_rng(21)
  B, L, H, G, K = 4, 128, 4, 2, 8
  segment_ids = random_packing(rng, B, L)
  args = tuple(jnp.asarray(rng.normal(size=(B, L, n, K)), jnp.float32) for n in (H, G, G, H))
  mask = (whole_row_mask(segment_ids) if not document_attention
          else attention.attention_mask(segment_ids))
  want = jax.jit(lambda *a: attention_and_grads(
      lambda q, k, v: attention.dot_product_attention(q, k, v, mask), *a))(*args)
  mesh = make_mesh(MeshConfig(data=2, tensor=2), jax.devices()[:4]) if impl == "splash" else None
  fn = lambda q, k, v: attention.segment_attention(
      q, k, v, segment_ids, impl, mesh=mesh, interpret=True,
      document_attention=document_attention)
  got = jax.jit(lambda *a: attention_and_grads(fn, *a))(*args)
  for g, w in zip(got, want):
    assert_close(g, w, 1e-5)


def test_document_attention_false_attends_across_documents():
  """On a row of 2 documents the second document's outputs change when the documents are
  joined, and the first document's (which sees nothing earlier) and padding's do not."""
  rng = np.random.default_rng(22)
  segment_ids = np.array([[1] * 10 + [2] * 14 + [0] * 8], np.int32)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 32, 2, 8)), jnp.float32) for _ in range(3))
  apart, joined = (np.asarray(attention.segment_attention(q, k, v, segment_ids,
                                                          document_attention=d))
                   for d in (True, False))
  np.testing.assert_allclose(joined[:, :10], apart[:, :10], rtol=1e-6)
  np.testing.assert_allclose(joined[:, 24:], apart[:, 24:], rtol=1e-6)
  assert np.min(np.abs(joined[:, 10:24] - apart[:, 10:24]).max(axis=(2, 3))) > 1e-3
  want = reference_attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                             (segment_ids > 0).astype(np.int32))
  np.testing.assert_allclose(joined, want, atol=1e-5)


@pytest.mark.slow
def test_model_document_attention_false_differs_on_two_documents():
  """The whole model: joining 2 packed documents changes the second one's logits only."""
  rng = np.random.default_rng(23)
  tokens, segment_ids, positions = packed_batch(rng, [9, 7], 20, TINY.vocab_size)
  apart = make_model(TINY)
  joined = make_model(TINY.replace(document_attention=False))
  la, lj = (np.asarray(forward(m, tokens, segment_ids, positions, None, False)[0])
            for m in (apart, joined))
  np.testing.assert_allclose(lj[:, :9], la[:, :9], rtol=1e-5, atol=1e-6)
  assert np.abs(lj[:, 9:16] - la[:, 9:16]).max() > 1e-3
  # Across documents RoPE counts over the row, as attention does: the packer's restarting
  # positions give what positions 0..15 over the row's tokens give (were the restarting ones
  # used, the second document would see the first at other offsets).
  row = np.where(segment_ids > 0, np.arange(segment_ids.shape[1]), 0).astype(np.int32)
  np.testing.assert_allclose(np.asarray(forward(joined, tokens, segment_ids, row, None, False)[0]),
                             lj, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [32, 48, 128, 200])
def test_chunked_attention_any_chunk_equals_the_reference(chunk):
  """Chunks that do not divide the row (a short last chunk), single-query chunks and one chunk
  covering the whole row all give the reference output and gradients."""
  args, segment_ids, want = qkv_and_reference(2, 128, 4, 2, 8, jnp.float32, seed=14)
  fn = lambda q, k, v: attention.chunked_attention(q, k, v, segment_ids, chunk)
  got = jax.jit(lambda *a: attention_and_grads(fn, *a))(*args)
  for g, w in zip(got, want):
    assert_close(g, w, 1e-5)


def emulate_cudnn_packed(q, k, v, seqlens, q_offsets, kv_offsets):
  """cuDNN's packed-layout attention in NumPy, from the flat arguments its kernel receives.

  Sequence s starts at element q_offsets[s] of the flattened BTNH query (kv_offsets[s] of the
  keys) and spans seqlens[s] tokens; a padding-causal mask applies inside it. Outputs outside
  every sequence stay NaN, so a token left out shows up.
  """
  B, L, H, K = q.shape
  G = k.shape[2]
  q_flat, k_flat, v_flat = (np.asarray(x, np.float64).reshape(-1) for x in (q, k, v))
  out = np.full(q.size, np.nan)
  for n, qo, ko in zip(seqlens, q_offsets, kv_offsets):
    if n <= 0:
      continue
    qs = q_flat[qo:qo + n * H * K].reshape(n, H, K)
    ks = k_flat[ko:ko + n * G * K].reshape(n, G, K)
    vs = v_flat[ko:ko + n * G * K].reshape(n, G, K)
    for h in range(H):
      logits = qs[:, h] @ ks[:, h // (H // G)].T / np.sqrt(K)
      logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      o = (p / p.sum(-1, keepdims=True)) @ vs[:, h // (H // G)]
      for i in range(n):
        start = qo + (i * H + h) * K
        out[start:start + K] = o[i]
  return out.reshape(q.shape)


@pytest.mark.parametrize("document_attention", [True, False])
def test_cudnn_packed_layout_equals_the_reference(document_attention):
  """Our runs, through jax's own offset conversion, give the reference under cuDNN's rules,
  with the documents apart and joined (`attention_segment_ids`, as `segment_attention` does)."""
  cudnn_fa = attention.jax_cudnn_attention()
  (q, k, v, _), segment_ids, want = qkv_and_reference(4, 32, 4, 2, 8, jnp.float32, seed=14)
  if not document_attention:
    want = (attention.dot_product_attention(q, k, v, whole_row_mask(segment_ids)),)
    segment_ids = attention.attention_segment_ids(jnp.asarray(segment_ids), False)

  @jax.jit
  def cudnn_arguments(q, k, v, segment_ids):
    q, k, v, seqlens, offsets = attention.cudnn_packed_arguments(q, k, v, segment_ids, 12)
    seqlens, _, q_offsets, kv_offsets = cudnn_fa._fix_seqlen_offsets(seqlens, seqlens, offsets,
                                                                     offsets, q, k)
    return q, k, v, seqlens, q_offsets, kv_offsets

  q, k, v, seqlens, q_offsets, kv_offsets = cudnn_arguments(q, k, v, segment_ids)
  flat = lambda x: np.asarray(x).reshape(-1)
  got = emulate_cudnn_packed(q, k, v, flat(seqlens), flat(q_offsets), flat(kv_offsets))
  np.testing.assert_allclose(got, np.asarray(want[0]), atol=1e-5)


def test_fast_paths_off_their_hardware_are_clear_errors():
  q = jnp.zeros((1, 128, 2, 8), jnp.bfloat16)
  segment_ids = jnp.ones((1, 128), jnp.int32)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match=re.escape(
        "attention_impl='cudnn' needs an NVIDIA GPU with cuDNN; use 'xla' or 'auto'")):
      attention.segment_attention(q, q, q, segment_ids, "cudnn")
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match=r"attention_impl='splash' needs a TPU"):
      attention.segment_attention(q, q, q, segment_ids, "splash")
  if jax.default_backend() == "cpu":
    assert attention.resolve_attention_impl("auto", jnp.bfloat16, 128, 4096) == "xla"


def test_jax_cudnn_attention_that_does_not_fit_is_a_clear_error(monkeypatch):
  """A jax whose private cuDNN module is gone or changed: "cudnn" says which jax it needs,
  "auto" on a GPU falls back to the reference, and the installed jax passes the check."""
  assert attention.jax_cudnn_attention().MaskType.PADDING_CAUSAL is not None
  changed = types.ModuleType("changed_cudnn_attention")
  changed.dot_product_attention = lambda query, key, value, q_seqlen=None, kv_seqlen=None: None
  changed.MaskType = enum.Enum("MaskType", "NO_MASK CAUSAL")
  changed.check_cudnn_version = changed.check_compute_capability = lambda *_: None
  monkeypatch.setitem(sys.modules, changed.__name__, changed)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  needs = ("attention_impl='cudnn' needs jax's cuDNN packed-document attention as in "
           f"{attention.JAX_CUDNN_ATTENTION_VERSIONS}, but jax {jax.__version__} ")
  for module, lacks in (
      ("jax.no_cudnn_attention_here", "has no module jax.no_cudnn_attention_here"),
      (changed.__name__, "has no dot_product_attention(q_offsets=...), "
       "dot_product_attention(kv_offsets=...), MaskType.PADDING_CAUSAL in changed_cudnn")):
    monkeypatch.setattr(attention, "JAX_CUDNN_ATTENTION_MODULE", module)
    with pytest.raises(RuntimeError, match=re.escape(needs + lacks)):
      attention.jax_cudnn_attention()
    with pytest.raises(ValueError, match=re.escape(
        "attention_impl='cudnn' needs jax's cuDNN packed-document attention (jax >= 0.10.2, "
        f"< 0.13); use 'xla' or 'auto' (jax {jax.__version__} {lacks}")):
      attention.resolve_attention_impl("cudnn", jnp.bfloat16, 128, 4096)
    assert attention.resolve_attention_impl("auto", jnp.bfloat16, 128, 4096) == "xla"


def test_cudnn_path_lowers_for_gpu_without_a_mask(monkeypatch):
  """The whole model's gradient lowers to cuDNN flash attention for a CUDA target, from CPU.

  No bias operand (no [B, 1, L, L] mask in memory), the padding-causal mask over packed
  sequences, and remat policies that keep the attention kernel's outputs run it once.
  """
  cudnn_fa = attention.jax_cudnn_attention()
  monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(attention, "_cudnn_problem", lambda dtype, head_dim: None)
  rng = np.random.default_rng(15)
  tokens, segment_ids, positions = packed_batch(rng, [9, 5], 16, TINY.vocab_size)
  params = nnx.state(make_model(TINY))
  for policy, forward_calls in (("full", 2), ("save_attention_and_moe_input", 1)):
    cfg = TINY.replace(compute_dtype="bfloat16")
    graphdef = abstract_graphdef(cfg, DENSE.replace(attention_impl="cudnn", remat_policy=policy))

    def loss(params):
      logits, aux = nnx.merge(graphdef, params)(tokens, segment_ids, positions, train=True,
                                                rng=jax.random.key(0))
      return jnp.mean(logits) + aux["aux_loss"]

    hlo = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("custom_call @__cudnn$fmhaSoftmax(") == forward_calls, policy
    assert hlo.count("custom_call @__cudnn$fmhaSoftmaxBackward(") == 1
    assert "Bias" not in hlo and "PADDING_CAUSAL" in hlo


# ---- rematerialisation ---------------------------------------------------------------------
def abstract_graphdef(cfg: ModelConfig, execution: ExecutionConfig = DENSE):
  """The graph of a model with `cfg`, from shapes only (no initialisation)."""
  return nnx.graphdef(nnx.eval_shape(
      lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0), execution=execution)))


@pytest.mark.slow
def test_remat_policies_and_unrolled_layers_equal_no_remat():
  """Loss, per-layer routing statistics and gradients of every remat policy, and of the layers
  unrolled instead of scanned (with and without remat), equal the scanned remat=False model
  (float32, tight tolerance).

  All variants run in one compiled program at XLA optimisation level 0: compiling seven
  gradients one by one would take most of a minute on two cores.
  """
  rng = np.random.default_rng(16)
  tokens, segment_ids, positions = packed_batch(rng, [9, 7], 16, TINY.vocab_size)
  params = nnx.state(make_model(TINY))
  variants = {p: DENSE.replace(remat_policy=p)
              for p in ("full", "dots", "save_attention_and_moe_input", "dots_and_attention",
                        "none")}
  variants["unrolled"] = DENSE.replace(remat=False, scan_layers=False)
  variants["unrolled, remat full"] = DENSE.replace(scan_layers=False)
  graphdefs = [abstract_graphdef(TINY, DENSE.replace(remat=False))]
  graphdefs += [abstract_graphdef(TINY, run) for run in variants.values()]

  def all_losses_and_grads(params):
    results = []
    for graphdef in graphdefs:
      def loss_fn(params):
        logits, aux = nnx.merge(graphdef, params)(tokens, segment_ids, positions, train=True,
                                                  rng=jax.random.key(4))
        return jnp.mean(logits * jnp.cos(logits)) + aux["aux_loss"], aux["expert_load"]
      results.append(jax.value_and_grad(loss_fn, has_aux=True)(params))
    return results

  compiled = jax.jit(all_losses_and_grads).trace(params).lower().compile(
      compiler_options={"xla_backend_optimization_level": 0})
  ((want_loss, want_load), want_grads), *results = compiled(params)
  assert want_load.shape == (TINY.num_layers, TINY.num_routed_experts)
  for name, ((loss, load), grads) in zip(variants, results):
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(load), np.asarray(want_load), rtol=1e-6, err_msg=name)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7,
                                 err_msg=name)


# ---- GPU checks (skipped elsewhere): run `python -m pytest tests/test_model.py -k gpu` -------
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@on_gpu
@pytest.mark.parametrize("document_attention", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_equals_the_reference_on_gpu(kv_heads, document_attention):
  args, segment_ids, want = qkv_and_reference(2, 1024, 4, kv_heads, 128, jnp.bfloat16, seed=17)
  if not document_attention:
    mask = whole_row_mask(segment_ids)
    want = jax.jit(lambda *a: attention_and_grads(
        lambda q, k, v: attention.dot_product_attention(q, k, v, mask),
        *(x.astype(jnp.float32) for x in a)))(*args)
  fn = lambda q, k, v: attention.segment_attention(q, k, v, segment_ids, "cudnn", max_runs=64,
                                                   document_attention=document_attention)
  got = jax.jit(lambda *a: attention_and_grads(fn, *a))(*args)
  for g, w in zip(got, want):
    assert_close(g, w, 2e-2)


@on_gpu
def test_cudnn_model_equals_xla_on_gpu():
  rng = np.random.default_rng(18)
  tokens, segment_ids, positions = packed_batch(rng, [40, 30, 20], 128, TINY.vocab_size)
  cfg = TINY.replace(compute_dtype="bfloat16", head_dim=64)
  run = DENSE.replace(remat_policy="dots_and_attention")
  results = []
  for impl in ("xla", "auto", "cudnn"):
    model = make_model(cfg, execution=run.replace(attention_impl=impl))
    if results:
      nnx.update(model, nnx.state(make_model(cfg, execution=run.replace(attention_impl="xla"))))
    results.append(nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(
        m(tokens, segment_ids, positions, train=True, rng=jax.random.key(0))[0])))(model))
  for loss, grads in results[1:]:
    np.testing.assert_allclose(float(loss), float(results[0][0]), rtol=2e-2)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
      assert_close(g, w, 5e-2)
