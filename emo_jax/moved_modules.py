"""Import paths from before the package was grouped into wings, kept working.

Config files and scripts written against the flat layout import e.g. `emo_jax.execution` or
`emo_jax.serve.app`; a finder on `sys.meta_path` answers those names with the module at its
new place (the same module object, so isinstance checks and monkeypatches agree) and warns
once per name with the path to use instead.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# Old module name (under emo_jax.) -> its place now.
MOVED = {
    **{name: f"model.{name}" for name in (
        "attention", "moe", "routing", "experts", "expert_slots", "expert_parallel", "matmul",
        "remat", "layers", "losses", "execution", "sharding", "summary")},
    **{name: f"train.{name}" for name in (
        "checkpoint", "workdir", "metrics", "memory_plan", "evaluate")},
    **{name: f"study.{name}" for name in (
        "selective", "subset_methods", "subset_finetune", "reproduction",
        "reproduction_report", "analysis", "plots")},
    "generate": "inference.generate",
    "serve": "inference.serve",
}


class _Alias(importlib.abc.Loader):
  def __init__(self, target: str):
    self.target = target

  def create_module(self, spec):
    module = importlib.import_module(self.target)
    self.own_spec = module.__spec__
    return module

  def exec_module(self, module):
    module.__spec__ = self.own_spec  # the import system set the alias's spec on it


class MovedModuleFinder(importlib.abc.MetaPathFinder):
  """Resolves `emo_jax.<old>` and `emo_jax.<old>.<sub>` to their new modules."""

  def find_spec(self, fullname, path=None, target=None):
    parts = fullname.split(".")
    if len(parts) < 2 or parts[0] != "emo_jax" or parts[1] not in MOVED:
      return None
    new = ".".join(["emo_jax", MOVED[parts[1]], *parts[2:]])
    if importlib.util.find_spec(new) is None:
      return None
    warnings.warn(f"{fullname} moved to {new}; import it from there", DeprecationWarning,
                  stacklevel=3)
    return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
  if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
    # First in line: a submodule of a moved package (emo_jax.serve.app) would otherwise be found
    # by the path finder through its parent's __path__ and loaded a second time.
    sys.meta_path.insert(0, MovedModuleFinder())
