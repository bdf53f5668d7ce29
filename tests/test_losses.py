"""fused_head_loss: the chunked LM head + cross-entropy against full logits + token_losses."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model.losses import chunk_length, fused_head_loss, token_losses
from emo_jax.model.matmul import flat_matmul

B, L, D, V = 3, 12, 16, 40
Z = 0.1  # large, so a wrong z-loss term shows at float32 tolerance (training uses 1e-5)
# chunk_tokens -> C: one chunk; exactly B*L; 20//3 = 6 divides 12; 16//3 = 5 does not (-> 4);
# 14//3 = 4; smaller than B (-> 1, twelve chunks).
CHUNKS = {10**6: 12, 36: 12, 20: 6, 16: 4, 14: 4, 2: 1}


def reference(h, head, targets, weights, z=Z):
  logits = flat_matmul(h, head, preferred_element_type=jnp.float32)
  ce, lse = token_losses(logits, targets)
  w = weights.astype(jnp.float32)
  return jnp.sum(w * (ce + z * lse**2)), jnp.sum(w * ce), jnp.sum(w * lse**2)


def fused(h, head, targets, weights, chunk_tokens, compute_dtype=jnp.float32, z=Z):
  return fused_head_loss(h, head, targets, weights, z_loss_weight=z, chunk_tokens=chunk_tokens,
                         compute_dtype=compute_dtype)


fused_jit = jax.jit(fused, static_argnames=("chunk_tokens", "compute_dtype", "z"))
reference_jit = jax.jit(reference, static_argnames=("z",))


def _loss_grad(fn):
  """grad of 3*loss w.r.t. (h, head, weights), and the three values, from value_and_grad."""
  def scaled(h, head, targets, weights, *args):
    loss, ce, zs = fn(h, head, targets, weights, *args)
    return 3.0 * loss, (loss, ce, zs)
  return jax.value_and_grad(scaled, argnums=(0, 1, 3), has_aux=True)


fused_grad = jax.jit(_loss_grad(fused), static_argnums=(4, 5))
reference_grad = jax.jit(_loss_grad(reference))


@pytest.fixture(scope="module")
def data():
  kh, kw, kt, km = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(kh, (B, L, D), jnp.float32)
  head = 2.0 * jax.random.normal(kw, (D, V), jnp.float32) / math.sqrt(D)
  targets = jax.random.randint(kt, (B, L), 0, V)
  weights = jax.random.bernoulli(km, 0.7, (B, L)).astype(jnp.float32)
  weights = weights.at[1].set(0.0)  # a fully masked row
  assert 0 < float(weights.sum()) < B * L
  return h, head, targets, weights


def close(actual, expected, rtol):
  """Elementwise, relative to the array's scale (gradients have entries near zero)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def test_chunk_length_is_the_largest_divisor_that_fits():
  for chunk_tokens, c in CHUNKS.items():
    assert chunk_length(B, L, chunk_tokens) == c, chunk_tokens
  assert chunk_length(2, 7, 12) == 1  # prime length: only 1 divides it below 6
  assert chunk_length(2, 7, 14) == 7
  assert chunk_length(1, 12, 1) == 1


@pytest.mark.parametrize("chunk_tokens", list(CHUNKS))
def test_values_match_full_logits(data, chunk_tokens):
  want = reference_jit(*data)
  got = fused_jit(*data, chunk_tokens)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32 and g.shape == ()
    np.testing.assert_allclose(float(g), float(w), rtol=1e-5)
  # the sums are not degenerate: the z term is a visible part of the loss
  assert float(want[0]) - float(want[1]) > 1e-3 * float(want[0])


@pytest.mark.parametrize("chunk_tokens", [10**6, 16, 2])
def test_gradients_match_autodiff_with_a_non_unit_cotangent(data, chunk_tokens):
  (_, got_vals), got = fused_grad(*data, chunk_tokens, jnp.float32)
  (_, want_vals), want = reference_grad(*data)
  for g, w in zip(got_vals, want_vals):
    np.testing.assert_allclose(float(g), float(w), rtol=1e-5)
  for name, g, w in zip(("h", "head", "weights"), got, want):
    assert g.dtype == w.dtype and g.shape == w.shape, name
    close(g, w, 1e-5)
  # The weights' gradient is the per-token loss: zero nowhere, also on the masked row.
  assert np.all(np.asarray(got[2]) > 0)


@jax.jit
def _tied_grads(embed, ids, targets, weights):
  def model(embed, loss_fn):
    h = jnp.tanh(embed[ids]) * 1.5  # the embedding is used twice: input lookup and tied head
    return loss_fn(h, embed.T, targets, weights)[0] / 7.0
  fused_fn = functools.partial(fused, chunk_tokens=8)
  return (jax.grad(model)(embed, fused_fn), jax.grad(model)(embed, reference),
          model(embed, fused_fn), model(embed, reference))


def test_tied_head_gradient(data):
  _, _, targets, weights = data
  embed = jax.random.normal(jax.random.key(1), (V, D), jnp.float32)
  ids = jax.random.randint(jax.random.key(2), (B, L), 0, V)
  got, want, got_loss, want_loss = _tied_grads(embed, ids, targets, weights)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  close(got, want, 1e-5)


def test_bfloat16_compute_agrees_to_bf16_tolerance(data):
  (_, got_vals), got = fused_grad(*data, 16, jnp.bfloat16)
  (_, want_vals), want = reference_grad(*data)
  for g, w in zip(got_vals, want_vals):
    np.testing.assert_allclose(float(g), float(w), rtol=2e-2)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32  # cast back to the inputs' dtypes
    close(g, w, 3e-2)
  # ... and bfloat16 really was used: not bit-equal to float32 compute.
  (_, f32_vals), _ = fused_grad(*data, 16, jnp.float32)
  assert float(got_vals[0]) != float(f32_vals[0])


def test_logging_outputs_have_no_gradient_and_int_weights_work(data):
  h, head, targets, weights = data
  g_ce = jax.grad(lambda h: fused(h, head, targets, weights, 16)[1])(h)
  assert not np.any(np.asarray(g_ce))
  int_w = weights.astype(jnp.int32)
  g_int = jax.grad(lambda h: fused(h, head, targets, int_w, 16)[0])(h)
  g_f = jax.grad(lambda h: fused(h, head, targets, weights, 16)[0])(h)
  np.testing.assert_array_equal(np.asarray(g_int), np.asarray(g_f))


def _shapes_in(text):
  """Element counts of every array shape in StableHLO (tensor<3x12x40xf32>) or HLO (f32[3,12,40])."""
  dims = re.findall(r"tensor<((?:\d+x)+)[a-z]", text)
  counts = [math.prod(int(d) for d in s.rstrip("x").split("x")) for s in dims]
  for s in re.findall(r"\b(?:f|bf|s|u|pred)\d*\[([\d,]+)\]", text):
    counts.append(math.prod(int(d) for d in s.split(",")))
  return counts


def test_full_logits_are_never_materialised(data):
  h, head, targets, weights = data
  full = B * L * V
  assert full not in (B * L * D, D * V, B * L)  # the check below can tell the logits apart

  def program(fn):
    return jax.jit(jax.value_and_grad(lambda h, head: fn(h, head, targets, weights)[0],
                                      argnums=(0, 1)))

  fused_program = program(functools.partial(fused, chunk_tokens=12))
  lowered = fused_program.lower(h, head)
  jaxpr = str(jax.make_jaxpr(fused_program)(h, head))
  for text in (lowered.as_text(), lowered.compile().as_text()):
    counts = _shapes_in(text)
    assert B * L * D in counts and D * V in counts  # the parser sees the arrays that do exist
    assert full not in counts
  assert f"{B},{L},{V}" not in jaxpr and f"{B * L},{V}" not in jaxpr
  # The same check flags the reference, which does build [B, L, V] logits.
  ref_text = program(reference).lower(h, head).as_text()
  assert full in _shapes_in(ref_text)


@pytest.mark.parametrize("change, message", [
    (lambda h, w, t, m: (h[0], w, t, m), "h must be"),
    (lambda h, w, t, m: (h, w[:-1], t, m), "same D"),
    (lambda h, w, t, m: (h, w, t[:, :-1], m), "targets"),
    (lambda h, w, t, m: (h, w, t, m[None]), "weights"),
    (lambda h, w, t, m: (h, w, t.astype(jnp.float32), m), "integer"),
    (lambda h, w, t, m: (h.astype(jnp.int32), w, t, m), "floating"),
])
def test_bad_shapes_raise_one_line_value_errors(data, change, message):
  args = change(*data)
  with pytest.raises(ValueError, match=message) as info:
    fused(*args, 16)
  text = str(info.value)
  assert "\n" not in text and re.search(r"\(\d+(, \d+)*\)", text)  # names the shapes


def test_bad_chunk_tokens_raise(data):
  for bad in (0, -4, 2.5, True):
    with pytest.raises(ValueError, match="chunk_tokens"):
      fused(*data, bad)
