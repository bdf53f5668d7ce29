"""Tests for emo_jax.model.experts: every backend against the dense reference, drops against a
NumPy model of the GShard priority rule, masking, and errors.

Tiny shapes keep compiles fast; float32 on CPU keeps the tolerances tight.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax.model import expert_slots, experts

T, D, H, E, K = 24, 16, 8, 6, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed=0, skew=False):
  """Random activations, bank, distinct top-k ids and positive weights.

  skew=True sends most first choices to expert 0 so a small capacity must drop.
  """
  rng = np.random.default_rng(seed)
  x_TxD = rng.normal(size=(T, D)).astype(np.float32)
  logits_TxE = rng.normal(size=(T, E))
  if skew:
    logits_TxE[:, 0] += 3.0
  ids_TxK = np.argsort(-logits_TxE, axis=1)[:, :K].astype(np.int32)
  weights_TxK = rng.uniform(0.1, 1.0, size=(T, K)).astype(np.float32)
  w_gate = (rng.normal(size=(E, D, H)) / np.sqrt(D)).astype(np.float32)
  w_up = (rng.normal(size=(E, D, H)) / np.sqrt(D)).astype(np.float32)
  w_down = (rng.normal(size=(E, H, D)) / np.sqrt(H)).astype(np.float32)
  mask_T = rng.uniform(size=T) < 0.7
  mask_T[0] = False  # at least one padding token
  return dict(x=x_TxD, ids=ids_TxK, weights=weights_TxK, w_gate=w_gate, w_up=w_up,
              w_down=w_down, mask=mask_T)


def _split(backend):
  """"ragged:megablox" -> ("ragged", "megablox"): a backend and its grouped-matmul kernel."""
  name, _, impl = backend.partition(":")
  return name, impl or "xla"


@functools.lru_cache(maxsize=None)
def _jitted(backend, capacity_factor=1.25):
  name, impl = _split(backend)

  def f(x, ids, weights, w_gate, w_up, w_down, mask):
    return experts.routed_experts(x, ids, weights, w_gate, w_up, w_down, backend=name,
                                  token_mask_T=mask, capacity_factor=capacity_factor,
                                  ragged_dot_impl=impl)
  return jax.jit(f)


def _run(backend, inp, use_mask, capacity_factor=1.25, weights=None):
  weights = inp["weights"] if weights is None else weights
  mask = inp["mask"] if use_mask else None
  y, dropped = _jitted(backend, capacity_factor)(inp["x"], inp["ids"], weights, inp["w_gate"],
                                                 inp["w_up"], inp["w_down"], mask)
  return np.asarray(y), float(dropped)


def _numpy_reference(inp, use_mask, weights=None):
  """Per-token loop over the K choices with a NumPy SwiGLU: independent of the library."""
  weights = inp["weights"] if weights is None else weights
  y = np.zeros((T, D), np.float64)
  for t in range(T):
    if use_mask and not inp["mask"][t]:
      continue
    for k in range(K):
      e = inp["ids"][t, k]
      x = inp["x"][t].astype(np.float64)
      gate, up = x @ inp["w_gate"][e], x @ inp["w_up"][e]
      y[t] += weights[t, k] * ((gate / (1 + np.exp(-gate)) * up) @ inp["w_down"][e])
  return y


def _numpy_drops(inp, use_mask, capacity):
  """GShard priority: all k=0 choices in token order, then k=1, ...; overflow is dropped."""
  load = np.zeros(E, int)
  dropped_TxK = np.zeros((T, K), bool)
  for k in range(K):
    for t in range(T):
      if use_mask and not inp["mask"][t]:
        continue
      e = inp["ids"][t, k]
      if load[e] >= capacity:
        dropped_TxK[t, k] = True
      else:
        load[e] += 1
  return dropped_TxK


@pytest.mark.parametrize("use_mask", [False, True])
def test_dense_matches_numpy_reference(use_mask):
  inp = _inputs(1)
  y, dropped = _run("dense", inp, use_mask)
  np.testing.assert_allclose(y, _numpy_reference(inp, use_mask), **TOL)
  assert dropped == 0.0


# megablox runs in Pallas interpret mode off TPU: slow, so it gets one masked case.
FAST_PATHS = ["capacity", "ragged"]


@pytest.mark.parametrize("use_mask,backend", [(m, b) for m in (False, True)
                                               for b in FAST_PATHS + ["ragged:blocked"]]
                         + [(True, "ragged:megablox")])
def test_backend_matches_dense(backend, use_mask):
  inp = _inputs(2)
  # E / K leaves room for every assignment, so capacity must agree exactly with dense.
  y, dropped = _run(backend, inp, use_mask, capacity_factor=E / K)
  y_ref, _ = _run("dense", inp, use_mask)
  np.testing.assert_allclose(y, y_ref, **TOL)
  assert dropped == 0.0


def _expert_grads(backend, inp, capacity_factor, weights):
  """Gradients of a random projection of the output w.r.t. x, weights and the bank."""
  name, impl = _split(backend)
  proj_TxD = np.random.default_rng(4).normal(size=(T, D)).astype(np.float32)

  def loss(x, weights, w_gate, w_up, w_down):
    y, _ = experts.routed_experts(x, inp["ids"], weights, w_gate, w_up, w_down, backend=name,
                                  token_mask_T=inp["mask"], capacity_factor=capacity_factor,
                                  ragged_dot_impl=impl)
    return jnp.sum(y * proj_TxD)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(
      inp["x"], weights, inp["w_gate"], inp["w_up"], inp["w_down"])


GRAD_NAMES = ["x", "weights", "w_gate", "w_up", "w_down"]


@pytest.mark.parametrize("backend", FAST_PATHS + ["ragged:blocked", "ragged:megablox"])
def test_gradients_match_dense(backend):
  inp = _inputs(3)
  grads = _expert_grads(backend, inp, E / K, inp["weights"])
  grads_ref = _expert_grads("dense", inp, E / K, inp["weights"])
  for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
    assert np.abs(np.asarray(g_ref)).max() > 0, name  # the comparison must mean something
    np.testing.assert_allclose(g, g_ref, err_msg=name, **TOL)


def test_capacity_gradients_with_drops_match_dense_on_kept_choices():
  """With overflow, the custom gather VJPs must give dropped choices zero gradient and kept
  ones the dense gradient: compare with dense run on the kept weights only."""
  inp = _inputs(13, skew=True)
  capacity_factor = 0.5
  kept_TxK = ~_numpy_drops(inp, True, experts.expert_capacity(T, K, E, capacity_factor))
  assert not kept_TxK[inp["mask"]].all(), "test setup must produce drops"
  grads = _expert_grads("capacity", inp, capacity_factor, inp["weights"])
  kept_weights = np.where(kept_TxK, inp["weights"], 0.0).astype(np.float32)
  grads_ref = _expert_grads("dense", inp, E / K, kept_weights)
  for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
    if name == "weights":  # a dropped choice's weight has no effect, so zero gradient
      g_ref = np.where(kept_TxK, g_ref, 0.0)
    np.testing.assert_allclose(g, g_ref, err_msg=name, **TOL)


def _float_scatter_adds(jaxpr) -> list[str]:
  """Floating-point scatter-adds anywhere in a (closed) jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scatter-add" and jnp.issubdtype(eqn.outvars[0].aval.dtype,
                                                              jnp.floating):
      found.append(str(eqn.outvars[0].aval))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if hasattr(sub, "jaxpr"):
          found += _float_scatter_adds(getattr(sub.jaxpr, "jaxpr", sub.jaxpr))
        elif hasattr(sub, "eqns"):
          found += _float_scatter_adds(sub)
  return found


@pytest.mark.parametrize("backend", FAST_PATHS)
def test_backward_pass_has_no_float_scatter_add(backend):
  """The point of the custom VJPs: dispatch/combine gradients are gathers, not scatter-adds
  (which serialise on GPU when a token's K copies collide). Integer scatters (counting) are
  fine. Checked on the traced gradient, so reverting to autodiff fails here."""
  inp = _inputs(14)

  def loss(x, weights, w_gate):
    y, _ = experts.routed_experts(x, inp["ids"], weights, w_gate, inp["w_up"], inp["w_down"],
                                  backend=backend, token_mask_T=inp["mask"],
                                  capacity_factor=1.0, ragged_dot_impl="xla")
    return jnp.sum(y)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(inp["x"], inp["weights"],
                                                           inp["w_gate"])
  assert _float_scatter_adds(jaxpr.jaxpr) == []
  # The checker itself must see a scatter-add where autodiff makes one.
  plain = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(x[jnp.array([0, 0, 1])])))(inp["x"])
  assert _float_scatter_adds(plain.jaxpr)


def test_permutation_vjps_match_autodiff():
  rng = np.random.default_rng(15)
  x_TxD = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  order_A = jnp.asarray(rng.permutation(T * K), jnp.int32)
  inverse_A = expert_slots.inverse_permutation(order_A)
  np.testing.assert_array_equal(np.asarray(order_A)[np.asarray(inverse_A)], np.arange(T * K))
  g_AxD = jnp.asarray(rng.normal(size=(T * K, D)), jnp.float32)

  out, vjp = jax.vjp(lambda x: expert_slots.take_sorted_copies(x, order_A, inverse_A, K), x_TxD)
  out_ref, vjp_ref = jax.vjp(lambda x: x[order_A // K], x_TxD)
  np.testing.assert_array_equal(out, out_ref)
  np.testing.assert_allclose(vjp(g_AxD)[0], vjp_ref(g_AxD)[0], **TOL)

  y_AxD = jnp.asarray(rng.normal(size=(T * K, D)), jnp.float32)
  out, vjp = jax.vjp(lambda y: expert_slots.permute_rows(y, order_A, inverse_A), y_AxD)
  out_ref, vjp_ref = jax.vjp(lambda y: y[order_A], y_AxD)
  np.testing.assert_array_equal(out, out_ref)
  np.testing.assert_array_equal(vjp(g_AxD)[0], vjp_ref(g_AxD)[0])


@pytest.mark.slow
@pytest.mark.parametrize("block", [4, 128])
def test_blocked_spans_many_blocks_per_expert_and_matches_dense(monkeypatch, block):
  """Blocks of 4 rows: experts span several blocks and many end mid-block (the padding), with
  skewed routing so one expert holds most rows; values and every gradient equal dense."""
  monkeypatch.setattr(experts, "GROUP_BLOCK_ROWS", block)
  inp = _inputs(21, skew=True)
  name_impl = "ragged:blocked"
  y, dropped = experts.routed_experts(inp["x"], inp["ids"], inp["weights"], inp["w_gate"],
                                      inp["w_up"], inp["w_down"], backend="ragged",
                                      token_mask_T=inp["mask"], ragged_dot_impl="blocked")
  y_ref, _ = _run("dense", inp, True)
  np.testing.assert_allclose(y, y_ref, **TOL)
  assert dropped == 0.0
  grads = _expert_grads(name_impl, inp, E / K, inp["weights"])
  grads_ref = _expert_grads("dense", inp, E / K, inp["weights"])
  for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, err_msg=name, **TOL)


def test_block_layout_gives_each_block_one_expert():
  """Slots are distinct, rows of one expert fill its blocks from the start, and no block
  mixes experts: checked against a direct NumPy construction."""
  rng = np.random.default_rng(22)
  group_A = rng.integers(0, E, size=50).astype(np.int32)
  valid_A = rng.uniform(size=50) < 0.8
  rank_A = np.zeros(50, np.int32)
  for g in range(E):
    rows = np.flatnonzero(valid_A & (group_A == g))
    rank_A[rows] = np.arange(len(rows))
  layout = expert_slots.block_layout(jnp.asarray(group_A), jnp.asarray(rank_A), jnp.asarray(valid_A),
                                E, block=4)
  slot_A, row_of_slot, expert_of_block = map(np.asarray, layout)
  num_slots = expert_slots.num_blocks_needed(50, E, 4) * 4
  assert (slot_A[~valid_A] == num_slots).all()
  kept = slot_A[valid_A]
  assert len(set(kept.tolist())) == len(kept) and kept.max() < num_slots
  np.testing.assert_array_equal(row_of_slot[kept], np.flatnonzero(valid_A))
  np.testing.assert_array_equal(expert_of_block[kept // 4], group_A[valid_A])


@pytest.mark.parametrize("impl", ["xla", "blocked", "megablox"])
def test_grouped_matmul_matches_per_group_numpy(impl):
  """Random group sizes including empty groups; every row in some group."""
  rng = np.random.default_rng(16)
  group_sizes = np.array([5, 0, 11, 1, 0, 13], np.int32)
  lhs = rng.normal(size=(group_sizes.sum(), D)).astype(np.float32)
  rhs = rng.normal(size=(len(group_sizes), D, H)).astype(np.float32)
  out = experts.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes),
                               impl=impl)
  expected = np.concatenate([lhs[a:b] @ rhs[g] for g, (a, b) in enumerate(
      zip(np.cumsum(group_sizes) - group_sizes, np.cumsum(group_sizes)))])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_ragged_dot_impl_resolution():
  assert experts.resolve_ragged_dot_impl("xla") == "xla"
  # CPU: no kernel library applies, "auto" is the blocked bank (XLA's ragged_dot computes
  # every expert on every row there).
  assert experts.resolve_ragged_dot_impl("auto") == "blocked"
  with pytest.raises(ValueError, match="allowed values.*auto.*xla.*blocked.*tokamax.*megablox"):
    experts.resolve_ragged_dot_impl("cutlass")
  try:
    import tokamax  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="pip install tokamax"):
      experts.grouped_matmul(jnp.ones((4, D)), jnp.ones((2, D, H)), jnp.array([2, 2]),
                             impl="tokamax")


@pytest.mark.parametrize("use_mask", [False, True])
def test_capacity_drops_follow_priority_rule(use_mask):
  inp = _inputs(5, skew=True)
  capacity_factor = 0.5
  capacity = experts.expert_capacity(T, K, E, capacity_factor)
  dropped_TxK = _numpy_drops(inp, use_mask, capacity)
  assert dropped_TxK.any(), "test setup must produce drops"
  num_dispatched = K * (inp["mask"].sum() if use_mask else T)

  y, dropped = _run("capacity", inp, use_mask, capacity_factor=capacity_factor)
  assert dropped == pytest.approx(dropped_TxK.sum() / num_dispatched, abs=1e-7)
  kept_weights = np.where(dropped_TxK, 0.0, inp["weights"]).astype(np.float32)
  y_ref, _ = _run("dense", inp, use_mask, weights=kept_weights)
  np.testing.assert_allclose(y, y_ref, **TOL)


def test_capacity_dispatch_pieces_roundtrip():
  """Dispatch -> identity 'experts' -> combine gives sum of kept weights times x."""
  inp = _inputs(6, skew=True)
  capacity = experts.expert_capacity(T, K, E, 0.5)
  buffers_ExCxD, info = jax.jit(experts.capacity_dispatch, static_argnums=(2, 3))(
      inp["x"], inp["ids"], E, capacity, inp["mask"])
  assert buffers_ExCxD.shape == (E, capacity, D)
  y = np.asarray(experts.capacity_combine(buffers_ExCxD, info, inp["weights"]))
  kept = ~_numpy_drops(inp, True, capacity) & inp["mask"][:, None]
  np.testing.assert_array_equal(np.asarray(info.keep_TxK), kept)
  expected = (inp["weights"] * kept).sum(1)[:, None] * inp["x"]
  np.testing.assert_allclose(y, expected, **TOL)


@pytest.mark.parametrize("use_mask", [False, True])
def test_capacity_enough_room_drops_nothing(use_mask):
  inp = _inputs(7, skew=True)  # skewed load: a smaller factor would drop
  assert experts.expert_capacity(T, K, E, E / K) == T
  _, dropped = _run("capacity", inp, use_mask, capacity_factor=E / K)
  assert dropped == 0.0
  _, dropped_small = _run("capacity", inp, use_mask, capacity_factor=1.0)
  assert dropped_small > 0.0


@pytest.mark.parametrize("backend", experts.BACKENDS)
def test_masked_tokens_output_exactly_zero(backend):
  inp = _inputs(8)
  inp["x"][~inp["mask"]] = np.nan  # padding garbage must not leak
  y, _ = _run(backend, inp, use_mask=True, capacity_factor=E / K)
  assert np.all(y[~inp["mask"]] == 0.0)
  assert np.all(np.isfinite(y[inp["mask"]]))
  assert np.abs(y[inp["mask"]]).min() > 0.0


def test_unknown_backend_raises():
  inp = _inputs(9)
  with pytest.raises(ValueError, match="allowed values.*dense.*capacity.*ragged"):
    experts.routed_experts(inp["x"], inp["ids"], inp["weights"], inp["w_gate"], inp["w_up"],
                           inp["w_down"], backend="megablox")


def test_bad_shapes_raise():
  inp = _inputs(10)
  with pytest.raises(ValueError, match="w_down_ExHxD"):
    experts.routed_experts(inp["x"], inp["ids"], inp["weights"], inp["w_gate"], inp["w_up"],
                           inp["w_gate"], backend="dense")


def test_swiglu_compute_dtype():
  inp = _inputs(11)
  y = experts.swiglu(inp["x"], inp["w_gate"][0], inp["w_up"][0], inp["w_down"][0],
                     compute_dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  y32 = experts.swiglu(inp["x"], inp["w_gate"][0], inp["w_up"][0], inp["w_down"][0])
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", experts.BACKENDS)
def test_bfloat16_eager_numpy_inputs(backend):
  """Un-jitted, NumPy inputs, bfloat16 compute: right dtype, close to the float32 result."""
  inp = _inputs(12)
  y, dropped = experts.routed_experts(
      inp["x"], inp["ids"], inp["weights"], inp["w_gate"], inp["w_up"], inp["w_down"],
      backend=backend, token_mask_T=inp["mask"], capacity_factor=E / K,
      compute_dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and dropped.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), _numpy_reference(inp, True),
                             rtol=0.05, atol=0.05)


def test_auto_on_a_gpu_without_tokamax_warns_about_the_xla_fallback(monkeypatch, caplog):
  try:
    import tokamax  # noqa: F401
    pytest.skip("tokamax is installed: auto picks it")
  except ImportError:
    pass
  monkeypatch.setattr(experts.jax, "default_backend", lambda: "gpu")
  experts._warn_slow_ragged_dot.cache_clear()
  with caplog.at_level("WARNING"):
    assert experts.resolve_ragged_dot_impl("auto") == "xla"
  assert "pip install tokamax" in caplog.text and "capacity" in caplog.text

