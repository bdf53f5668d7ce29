"""A tiny model with random weights, shared by tests that need one without training."""

import jax
import numpy as np
from flax import nnx

from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.transformer import Transformer


def random_params(cfg, seed: int = 0, execution=None):
  """(graphdef, NumPy params): norms 1, every other weight N(0, cfg.init_std^2), seeded.

  The graph runs under `execution` (default: the dense reference backend, which drops nothing,
  so no row's output depends on the others)."""
  if execution is None:
    execution = ExecutionConfig(expert_backend="dense")
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), execution=execution))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, x.dtype) if "norm" in jax.tree_util.keystr(path)
                       else (cfg.init_std * rng.standard_normal(x.shape)).astype(x.dtype)),
      nnx.to_pure_dict(nnx.state(abstract)))
  return nnx.graphdef(abstract), params
