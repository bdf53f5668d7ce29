"""A tiny model with random weights, shared by tests that need one without training."""

import jax
import numpy as np
from flax import nnx

from emo_jax.model import Transformer


def random_params(cfg, seed: int = 0):
  """(graphdef, NumPy params): norms 1, every other weight N(0, cfg.init_std^2), seeded."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, x.dtype) if "norm" in jax.tree_util.keystr(path)
                       else (cfg.init_std * rng.standard_normal(x.shape)).astype(x.dtype)),
      nnx.to_pure_dict(nnx.state(abstract)))
  return nnx.graphdef(abstract), params
