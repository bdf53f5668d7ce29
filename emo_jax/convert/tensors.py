"""The tensor table: which Hugging Face tensors each emo_jax parameter becomes, and back.

One table serves export, import and the in-memory helpers: each `Group` ties one of our
parameters (or one `[layer]` slice of a stacked block parameter) to the Hugging Face tensors
made from it, with the function each way. Groups come array-major (all layers of `wq`, then of
`wk`, ...), so a reader holds at most one stored chunk of one array and a writer one layer
slice at a time.

This module holds the rows every family shares (embedding, attention, QK-norm, dense MLP,
a router over every expert, per-expert and transformers-5 fused experts) and `table`, which
lays rows out as groups; each layout in layouts.py picks its rows and adds its own.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from emo_jax.config import ModelConfig
from emo_jax.convert.configs import ConversionError
from emo_jax.model.transformer import Transformer

Path = tuple[str, ...]
# (names, shapes, to_hf, from_hf) of the tensors of one parameter slice.
Tensors = tuple[list[str], list[tuple[int, ...]], Callable, Callable]
# (our stacked block parameter, make(prefix) -> Tensors), prefix = "model.layers.{layer}".
Row = tuple[Path, Callable[[str], Tensors]]


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


def f32(h) -> np.ndarray:
  return np.asarray(h, np.float32)


def identity(x):
  return x


def one(name: str, shape, to, back) -> Tensors:
  """A single tensor `name` of `shape`: to(x) makes it from our slice, back(h) undoes that."""
  return [name], [tuple(shape)], (lambda x: iter([to(x)])), (lambda get: back(get(0)))


def stack(n: int, shape: tuple[int, ...], get, fill) -> np.ndarray:
  """[n, *shape] float32 with out[j] = fill(get(j)), filled in place, tensor by tensor."""
  out = np.empty((n, *shape), np.float32)
  for j in range(n):
    out[j] = fill(get(j))
  return out


def zeros_group(names: list[str], shapes: list[tuple[int, ...]], why: str) -> Group:
  """Tensors that must be zero: written as zeros; on import, a nonzero one is refused (`why`)."""
  def check(get):
    for i, name in enumerate(names):
      h = get(i)
      if np.any(h != 0):
        raise ConversionError(f"tensor {name!r} is not all zeros (max |x| = "
                              f"{float(np.max(np.abs(h))):.3g}); {why}")
  return Group(None, None, names, shapes,
               lambda _: (np.zeros(s, np.float32) for s in shapes), check)


def constant_group(names: list[str], shapes: list[tuple[int, ...]], value: float,
                   accepted: tuple[float, ...], why: str) -> Group:
  """Tensors constant in the layout: written filled with `value`; on import, each must be
  filled with one of `accepted` (a tensor holding anything else is refused with `why`)."""
  def check(get):
    for i, name in enumerate(names):
      h = np.asarray(get(i), np.float32)
      if not any(np.all(h == np.float32(a)) for a in accepted):
        raise ConversionError(f"tensor {name!r} is not a constant the layout writes (one of "
                              f"{', '.join(f'{a:g}' for a in accepted)} everywhere; max |x| = "
                              f"{float(np.max(np.abs(h))):.3g}); {why}")
  return Group(None, None, names, shapes,
               lambda _: (np.full(s, value, np.float32) for s in shapes), check)


def attention_rows(cfg: ModelConfig, norm_names: tuple[str, str]) -> list[Row]:
  """Both norms (HF names `norm_names`), q/k/v/o and, with qk_norm, q_norm / k_norm."""
  D, H, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  norm1, norm2 = norm_names
  rows: list[Row] = [
      (("blocks", "attn_norm", "weight"),
       lambda p: one(f"{p}.{norm1}.weight", (D,), identity, f32)),
      (("blocks", "attn", "wq"), lambda p: one(
          f"{p}.self_attn.q_proj.weight", (H * K, D), lambda x: x.reshape(D, H * K).T,
          lambda h: f32(h).T.reshape(D, H, K))),
      (("blocks", "attn", "wk"), lambda p: one(
          f"{p}.self_attn.k_proj.weight", (G * K, D), lambda x: x.reshape(D, G * K).T,
          lambda h: f32(h).T.reshape(D, G, K))),
      (("blocks", "attn", "wv"), lambda p: one(
          f"{p}.self_attn.v_proj.weight", (G * K, D), lambda x: x.reshape(D, G * K).T,
          lambda h: f32(h).T.reshape(D, G, K))),
      (("blocks", "attn", "wo"), lambda p: one(
          f"{p}.self_attn.o_proj.weight", (D, H * K), lambda x: x.reshape(H * K, D).T,
          lambda h: f32(h).T.reshape(H, K, D))),
  ]
  if cfg.qk_norm:
    rows += [(("blocks", "attn", "q_norm", "weight"),
              lambda p: one(f"{p}.self_attn.q_norm.weight", (H * K,), identity, f32)),
             (("blocks", "attn", "k_norm", "weight"),
              lambda p: one(f"{p}.self_attn.k_norm.weight", (G * K,), identity, f32))]
  rows.append((("blocks", "mlp_norm", "weight"),
               lambda p: one(f"{p}.{norm2}.weight", (D,), identity, f32)))
  return rows


def dense_mlp_rows(cfg: ModelConfig) -> list[Row]:
  """The SwiGLU MLP of a dense model as `mlp.{gate,up,down}_proj`."""
  D, M = cfg.d_model, cfg.mlp_hidden
  return [(("blocks", "mlp", w), lambda p, proj=proj, shape=shape: one(
      f"{p}.mlp.{proj}.weight", shape, lambda x: x.T, lambda h: f32(h).T))
          for w, proj, shape in (("w_gate", "gate_proj", (M, D)), ("w_up", "up_proj", (M, D)),
                                 ("w_down", "down_proj", (D, M)))]


def full_router_row(D: int, E: int) -> Row:
  """The router as `mlp.gate.weight` with a row for every expert."""
  return (("blocks", "mlp", "router"), lambda p: one(
      f"{p}.mlp.gate.weight", (E, D), lambda x: x.T, lambda h: f32(h).T))


def expert_rows(D: int, E: int, X: int) -> list[Row]:
  """Every expert as its own `mlp.experts.{j}.{gate,up,down}_proj`."""
  return [(("blocks", "mlp", w), lambda p, proj=proj, shape=shape: (
      [f"{p}.mlp.experts.{j}.{proj}.weight" for j in range(E)], [shape] * E,
      lambda x: (x[j].T for j in range(E)),
      lambda get, shape=shape: stack(E, shape[::-1], get, lambda h: h.T)))
          for w, proj, shape in (("w_gate", "gate_proj", (X, D)), ("w_up", "up_proj", (X, D)),
                                 ("w_down", "down_proj", (D, X)))]


def fused_expert_rows(D: int, R: int, X: int, shared: int | None) -> list[Row]:
  """Import-only rows for transformers 5 fused expert tensors (+ Qwen's unfused shared).

  `mlp.experts.gate_up_proj` [R, 2X, D] and `mlp.experts.down_proj` [R, D, X]; with `shared`,
  also `mlp.shared_expert.*` holding `shared` experts concatenated along the hidden axis, its
  down projection doubled (see layouts.Qwen2MoeLayout).
  """
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


def table(cfg: ModelConfig, rows: list[Row]) -> list[Group]:
  """The groups of a model: embedding, each row over all layers, final norm, lm_head."""
  V, D = cfg.vocab_size, cfg.d_model
  groups = [Group(("embed",), None, *one("model.embed_tokens.weight", (V, D), identity, f32))]
  for path, make in rows:
    for layer in range(cfg.num_layers):
      groups.append(Group(path, layer, *make(f"model.layers.{layer}")))
  groups.append(Group(("final_norm", "weight"), None,
                      *one("model.norm.weight", (D,), identity, f32)))
  if not cfg.tie_embeddings:
    groups.append(Group(("lm_head",), None,
                        *one("lm_head.weight", (V, D), lambda x: x.T, lambda h: f32(h).T)))
  return groups


def param_specs(cfg: ModelConfig) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """Every parameter path of the model with its (shape, dtype), from shapes only."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {tuple(str(k.key) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in leaves}
