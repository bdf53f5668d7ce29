"""The routed experts of a decode step: few tokens, many experts, weights read where they lie.

A serving step runs one token per decode slot, a handful of tokens, each choosing top_k of
many experts. The training kernels (experts.py) are built for the opposite case: they lay
tokens out per expert and run the whole bank as one batched matmul, so every expert's weights
are streamed (and, for the bank's routed slice, copied) whether any token chose it or not. At
decode that traffic is the step: on a 2-core CPU, 4 layers of 32 experts of width 256 read and
copy about 100 MB per step for 8 tokens (BENCHMARKS.md, "Serving").

`chosen_experts_loop` instead visits only the experts some token chose, each once, in
increasing id: a `fori_loop` over the chosen count whose body slices that expert's three
matrices out of the layer's bank with `dynamic_slice` (which XLA reads in place) and runs it
on all T tokens, adding each token's combine weight (0 where the token did not choose it).
Its cost follows the experts chosen (top_k for one token, at most T * top_k), not the bank.

The loop's trip count is data dependent, so it has no reverse-mode gradient: it is an
inference kernel only, used by `Transformer.decode` when a call holds at most
`ExecutionConfig.decode_loop_tokens` tokens (docs/architecture.md, "After training"). Results equal
the other backends up to float rounding (the sum over a token's experts runs in another order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emo_jax.model.experts import swiglu

__all__ = ["chosen_experts_loop"]


def chosen_experts_loop(x_TxD, expert_ids_TxK, expert_weights_TxK, w_gate_LxExDxH, w_up_LxExDxH,
                        w_down_LxExHxD, layer, *, num_shared: int = 0, token_mask_T=None,
                        compute_dtype=jnp.float32):
  """``y[t] = sum_k w[t, k] * swiglu_{ids[t, k]}(x[t]) + sum_s swiglu_s(x[t])``, one chosen
  expert at a time, read from layer `layer` of the stacked banks (traced or static).

  Each layer's bank holds E experts, the last `num_shared` shared (every token uses them with
  weight 1) and the first E - num_shared routed, of which the ids choose. Only the chosen rows
  and the shared ones are ever read. Padding tokens (token_mask_T False) choose nothing and
  output exactly 0.
  """
  num_tokens, d_model = x_TxD.shape
  _, num_experts, _, hidden = w_gate_LxExDxH.shape
  num_routed = num_experts - num_shared
  valid_T = (jnp.ones((num_tokens,), bool) if token_mask_T is None
             else token_mask_T.astype(bool))
  weights_TxK = jnp.where(valid_T[:, None], expert_weights_TxK.astype(jnp.float32), 0.0)
  rows_Tx1 = jnp.arange(num_tokens)[:, None]
  combine_TxE = jnp.zeros((num_tokens, num_experts), jnp.float32)
  combine_TxE = combine_TxE.at[rows_Tx1, expert_ids_TxK].add(weights_TxK)
  chosen_TxE = jnp.zeros((num_tokens, num_experts), bool).at[rows_Tx1, expert_ids_TxK].set(
      jnp.broadcast_to(valid_T[:, None], expert_ids_TxK.shape))
  if num_shared:
    shared_TxS = jnp.broadcast_to(valid_T[:, None], (num_tokens, num_shared))
    combine_TxE = combine_TxE.at[:, num_routed:].set(shared_TxS.astype(jnp.float32))
    chosen_TxE = chosen_TxE.at[:, num_routed:].set(shared_TxS)
  chosen_E = jnp.any(chosen_TxE, axis=0)
  # The chosen experts first, in increasing id (the shared ones last); the loop runs over the
  # first `count`.
  order_E = jnp.argsort(~chosen_E, stable=True)
  count = jnp.sum(chosen_E)
  x_TxD = x_TxD.astype(compute_dtype)

  def read(bank, e, rows, cols):
    return jax.lax.dynamic_slice(bank, (layer, e, 0, 0), (1, 1, rows, cols))[0, 0]

  def one_expert(i, y_TxD):
    e = order_E[i]
    out_TxD = swiglu(x_TxD, read(w_gate_LxExDxH, e, d_model, hidden),
                     read(w_up_LxExDxH, e, d_model, hidden),
                     read(w_down_LxExHxD, e, hidden, d_model), compute_dtype)
    weight_Tx1 = jax.lax.dynamic_slice(combine_TxE, (0, e), (num_tokens, 1))
    return y_TxD + out_TxD.astype(jnp.float32) * weight_Tx1

  y_TxD = jax.lax.fori_loop(0, count, one_expert,
                            jnp.zeros((num_tokens, d_model), jnp.float32))
  y_TxD = jnp.where(valid_T[:, None], y_TxD, 0.0)
  return y_TxD.astype(compute_dtype)
