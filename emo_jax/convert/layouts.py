"""Which Hugging Face tensors each emo_jax parameter becomes, per layout, and back.

One table, `tensor_groups`, serves export, import and the in-memory helpers: each group ties
one of our parameters (or one `[layer]` slice of a stacked block parameter) to the Hugging
Face tensors made from it, with the function each way. Groups come array-major (all layers of
`wq`, then of `wk`, ...), so a reader holds at most one stored chunk of one array and a writer
one layer slice at a time.

Layouts:
* `emo`: the release's `EmoForCausalLM` names (docs/algorithm.md): per-expert `gate/up/down_proj`,
  the router as `mlp.gate.weight` with a row for every expert (the shared rows unused).
* `qwen2_moe`: transformers' `Qwen2MoeForCausalLM`: the router over routed experts only; the
  shared expert(s) as Qwen's single shared expert (several are concatenated along the hidden
  axis, since SwiGLU sums over hidden units) whose sigmoid gate has zero weights, so it is
  scaled by sigmoid(0) = 1/2, undone by a down_proj scaled by 2; zero q/k/v biases. Both
  factors are powers of two, so the mapping is exact and reverses bit for bit.
* `olmoe` (import only): OLMoE's names, with QK-norm and no shared expert.
Experts may also arrive fused the way transformers 5 keeps them in memory
(`mlp.experts.gate_up_proj` [E, 2X, D], `mlp.experts.down_proj` [E, D, X]).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from emo_jax.config import ModelConfig

Path = tuple[str, ...]


class ConversionError(ValueError):
  """The input cannot be converted; the message names the tensor or config key and the fix."""


@dataclasses.dataclass
class Group:
  """Hugging Face tensors `names` (of `shapes`) made from our parameter `path` at `layer`.

  `to_hf(x)` yields the tensors, in order, from the parameter (or layer slice) `x`;
  `from_hf(get)` builds the parameter (float32) from `get(i)`, which reads `names[i]`: one
  tensor at a time, so importing 128 experts holds one layer slice plus one tensor.
  `path=None` marks tensors that are constant in the layout (Qwen's zero biases and shared
  gate): exported as zeros, checked on import.
  """
  path: Path | None
  layer: int | None
  names: list[str]
  shapes: list[tuple[int, ...]]
  to_hf: Callable[[np.ndarray | None], Iterator[np.ndarray]]
  from_hf: Callable[[Callable[[int], np.ndarray]], np.ndarray | None]


def _one(name, shape, to, back):
  return [name], [tuple(shape)], (lambda x: iter([to(x)])), (lambda get: back(get(0)))


def _stack(n: int, shape: tuple[int, ...], get, fill) -> np.ndarray:
  """[n, *shape] float32 with out[j] = fill(get(j)), filled in place, tensor by tensor."""
  out = np.empty((n, *shape), np.float32)
  for j in range(n):
    out[j] = fill(get(j))
  return out


def _zeros_group(names: list[str], shapes: list[tuple[int, ...]]) -> Group:
  def check(get):
    for i, name in enumerate(names):
      h = get(i)
      if np.any(h != 0):
        raise ConversionError(
            f"tensor {name!r} is not all zeros (max |x| = {float(np.max(np.abs(h))):.3g}); "
            "emo_jax has no attention biases and adds shared experts with a fixed weight, so a "
            "Qwen2-MoE model with learned biases or a learned shared_expert_gate cannot be "
            "imported")
  return Group(None, None, names, shapes,
               lambda _: (np.zeros(s, np.float32) for s in shapes), check)


def tensor_groups(cfg: ModelConfig, layout: str, *, fused_experts: bool = False) -> list[Group]:
  """The Hugging Face tensors of a model in `layout`, grouped by the parameter they come from.

  Args:
    cfg: the architecture.
    layout: "emo", "qwen2_moe" or "olmoe" (import only).
    fused_experts: experts stored as transformers 5 fused tensors (`mlp.experts.gate_up_proj`
      [E, 2X, D], `mlp.experts.down_proj` [E, D, X]); import only.
  """
  V, D, L = cfg.vocab_size, cfg.d_model, cfg.num_layers
  H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  E, S, X = cfg.num_experts, cfg.num_shared_experts, cfg.expert_hidden
  R = E - S
  norm1, norm2 = (("pre_attention_layernorm", "pre_feedforward_layernorm") if layout == "emo"
                  else ("input_layernorm", "post_attention_layernorm"))
  ident = lambda x: x  # noqa: E731
  f32 = lambda h: np.asarray(h, np.float32)  # noqa: E731

  # Per-layer rows: (our stacked path, make(prefix) -> (names, shapes, to_hf, from_hf)),
  # prefix = "model.layers.{layer}".
  rows: list[tuple[Path, Callable[[str], tuple]]] = [
      (("blocks", "attn_norm", "weight"),
       lambda p: _one(f"{p}.{norm1}.weight", (D,), ident, f32)),
      (("blocks", "attn", "wq"), lambda p: _one(
          f"{p}.self_attn.q_proj.weight", (H * K, D), lambda x: x.reshape(D, H * K).T,
          lambda h: f32(h).T.reshape(D, H, K))),
      (("blocks", "attn", "wk"), lambda p: _one(
          f"{p}.self_attn.k_proj.weight", (G * K, D), lambda x: x.reshape(D, G * K).T,
          lambda h: f32(h).T.reshape(D, G, K))),
      (("blocks", "attn", "wv"), lambda p: _one(
          f"{p}.self_attn.v_proj.weight", (G * K, D), lambda x: x.reshape(D, G * K).T,
          lambda h: f32(h).T.reshape(D, G, K))),
      (("blocks", "attn", "wo"), lambda p: _one(
          f"{p}.self_attn.o_proj.weight", (D, H * K), lambda x: x.reshape(H * K, D).T,
          lambda h: f32(h).T.reshape(H, K, D))),
  ]
  if cfg.qk_norm:
    rows += [(("blocks", "attn", "q_norm", "weight"),
              lambda p: _one(f"{p}.self_attn.q_norm.weight", (H * K,), ident, f32)),
             (("blocks", "attn", "k_norm", "weight"),
              lambda p: _one(f"{p}.self_attn.k_norm.weight", (G * K,), ident, f32))]
  rows.append((("blocks", "mlp_norm", "weight"),
               lambda p: _one(f"{p}.{norm2}.weight", (D,), ident, f32)))

  if not cfg.is_moe:
    M = cfg.mlp_hidden
    for w, proj, shape in (("w_gate", "gate_proj", (M, D)), ("w_up", "up_proj", (M, D)),
                           ("w_down", "down_proj", (D, M))):
      rows.append((("blocks", "mlp", w), lambda p, proj=proj, shape=shape: _one(
          f"{p}.mlp.{proj}.weight", shape, lambda x: x.T, lambda h: f32(h).T)))
  elif layout == "qwen2_moe":
    rows += _qwen_moe_rows(D, R, S, X, fused_experts)
  else:
    rows.append((("blocks", "mlp", "router"), lambda p: _one(
        f"{p}.mlp.gate.weight", (E, D), lambda x: x.T, lambda h: f32(h).T)))
    if fused_experts:
      rows += _fused_rows(D, E, X, shared=None)
    else:
      for w, proj, shape in (("w_gate", "gate_proj", (X, D)), ("w_up", "up_proj", (X, D)),
                             ("w_down", "down_proj", (D, X))):
        rows.append((("blocks", "mlp", w), lambda p, proj=proj, shape=shape: (
            [f"{p}.mlp.experts.{j}.{proj}.weight" for j in range(E)], [shape] * E,
            lambda x: (x[j].T for j in range(E)),
            lambda get, shape=shape: _stack(E, shape[::-1], get, lambda h: h.T))))

  groups = [Group(("embed",), None, *_one("model.embed_tokens.weight", (V, D), ident, f32))]
  for path, make in rows:
    for layer in range(L):
      groups.append(Group(path, layer, *make(f"model.layers.{layer}")))
  groups.append(Group(("final_norm", "weight"), None,
                      *_one("model.norm.weight", (D,), ident, f32)))
  if not cfg.tie_embeddings:
    groups.append(Group(("lm_head",), None,
                        *_one("lm_head.weight", (V, D), lambda x: x.T, lambda h: f32(h).T)))
  if layout == "qwen2_moe":
    for layer in range(L):
      p = f"model.layers.{layer}"
      names = [f"{p}.self_attn.{n}_proj.bias" for n in "qkv"]
      shapes = [(H * K,), (G * K,), (G * K,)]
      if cfg.is_moe:
        names.append(f"{p}.mlp.shared_expert_gate.weight")
        shapes.append((1, D))
      groups.append(_zeros_group(names, shapes))
  return groups


def _qwen_moe_rows(D, R, S, X, fused):
  """Qwen2-MoE: router rows of the routed experts, routed experts, one concatenated shared."""
  f32 = lambda h: np.asarray(h, np.float32)  # noqa: E731

  def router(p):
    return _one(f"{p}.mlp.gate.weight", (R, D), lambda x: x[:, :R].T,
                # The shared experts' router columns are never used; they come back as zeros.
                lambda h: np.concatenate([f32(h).T, np.zeros((D, S), np.float32)], axis=1))

  rows = [(("blocks", "mlp", "router"), router)]
  if fused:
    return rows + _fused_rows(D, R, X, shared=S)

  def gate_up(proj):
    def make(p):
      names = [f"{p}.mlp.experts.{j}.{proj}.weight" for j in range(R)]
      names.append(f"{p}.mlp.shared_expert.{proj}.weight")
      to = lambda x: iter([*(x[j].T for j in range(R)),  # noqa: E731
                           x[R:].transpose(0, 2, 1).reshape(S * X, D)])

      def back(get):
        out = np.empty((R + S, D, X), np.float32)
        for j in range(R):
          out[j] = get(j).T
        out[R:] = f32(get(R)).reshape(S, X, D).transpose(0, 2, 1)
        return out
      return names, [(X, D)] * R + [(S * X, D)], to, back
    return make

  def down(p):
    names = [f"{p}.mlp.experts.{j}.down_proj.weight" for j in range(R)]
    names.append(f"{p}.mlp.shared_expert.down_proj.weight")
    # x2 undoes the sigmoid(0) = 1/2 of the zero shared_expert_gate; exact in floating point.
    to = lambda x: iter([*(x[j].T for j in range(R)),  # noqa: E731
                         2 * x[R:].reshape(S * X, D).T])

    def back(get):
      out = np.empty((R + S, X, D), np.float32)
      for j in range(R):
        out[j] = get(j).T
      out[R:] = (f32(get(R)) / 2).T.reshape(S, X, D)
      return out
    return names, [(D, X)] * R + [(D, S * X)], to, back

  return rows + [(("blocks", "mlp", "w_gate"), gate_up("gate_proj")),
                 (("blocks", "mlp", "w_up"), gate_up("up_proj")),
                 (("blocks", "mlp", "w_down"), down)]


def _fused_rows(D, R, X, shared):
  """Import-only rows for transformers 5 fused expert tensors (+ Qwen's unfused shared)."""
  f32 = lambda h: np.asarray(h, np.float32)  # noqa: E731

  def no_export(_):
    raise ConversionError("fused expert tensors are an import format only")

  def make(w):
    def rows(p):
      name = f"{p}.mlp.experts.{'down_proj' if w == 'w_down' else 'gate_up_proj'}"
      names = [name]
      shapes = [(R, D, X) if w == "w_down" else (R, 2 * X, D)]
      if shared:
        proj = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[w]
        names.append(f"{p}.mlp.shared_expert.{proj}.weight")
        shapes.append((D, shared * X) if w == "w_down" else (shared * X, D))

      def back(get):
        h = f32(get(0))
        routed = (h.transpose(0, 2, 1) if w == "w_down" else
                  h[:, :X].transpose(0, 2, 1) if w == "w_gate" else h[:, X:].transpose(0, 2, 1))
        if not shared:
          return routed
        sh = f32(get(1))
        sh = ((sh / 2).T.reshape(shared, X, D) if w == "w_down"
              else sh.reshape(shared, X, D).transpose(0, 2, 1))
        return np.concatenate([routed, sh])
      return names, shapes, no_export, back
    return rows

  return [(("blocks", "mlp", w), make(w)) for w in ("w_gate", "w_up", "w_down")]


def param_specs(cfg: ModelConfig) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """Every parameter path of the model with its (shape, dtype), from shapes only."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from emo_jax.model.transformer import Transformer  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {tuple(str(k.key) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in leaves}


