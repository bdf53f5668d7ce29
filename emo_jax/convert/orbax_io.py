"""Parameter checkpoints read and written one layer slice at a time (tensorstore under Orbax).

`checkpoint.load_params` / `save_params` hold the whole parameter tree in memory, which a 14B
model in float32 (54 GB) does not fit on the machines that convert it. Orbax stores each array
as a zarr array inside an OCDBT key-value store, so tensorstore can read a slice of an array
and write a slice into one, and this module does exactly that:

* `ParamSource` reads `[layer]` slices from a training workdir (`W/checkpoints/<step>/state`,
  arrays under `params.`) or from a parameter checkpoint (`DIR/params`). An array that Orbax
  stored as one chunk is decoded once and served from a cache bounded by that chunk, so the
  peak is one chunk: one layer slice for checkpoints written here, a whole stacked array for
  a training checkpoint whose arrays were saved unsharded.
* `ParamWriter` writes a parameter checkpoint in the layout `save_params` produces for numpy
  leaves (zarr v2 arrays in OCDBT, `_METADATA` with the tree), with stacked block arrays
  chunked one layer per chunk. `load_params`, `train.init_from` and Orbax's own
  `StandardCheckpointer.restore` read it (tested in tests/test_convert.py).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.model.execution import split_model_fields

log = logging.getLogger(__name__)

Path = tuple[str, ...]
# Largest chunk the writer makes (see ParamWriter._chunks).
CHUNK_BYTES = 16 * 2**20


class CheckpointFormatError(ValueError):
  """A checkpoint folder is not in a layout this module can stream."""


def _file_kvstore(directory: pathlib.Path) -> dict:
  return {"driver": "file", "path": str(directory.absolute()) + "/"}


def _array_spec(base: pathlib.Path, name: str, zarr3: bool) -> dict:
  return {"driver": "zarr3" if zarr3 else "zarr",
          "kvstore": {"driver": "ocdbt", "base": _file_kvstore(base), "path": name + "/"}}


def _tree_paths(metadata: Mapping[str, Any]) -> list[Path]:
  return [tuple(k["key"] for k in entry["key_metadata"])
          for entry in metadata["tree_metadata"].values()]


def _training_step_dir(workdir: pathlib.Path, step: int | None) -> tuple[pathlib.Path, int]:
  checkpoints = workdir / "checkpoints" if (workdir / "checkpoints").is_dir() else workdir
  steps = sorted(int(p.name) for p in checkpoints.iterdir()
                 if p.name.isdigit() and (p / "state" / "_METADATA").is_file()
                 ) if checkpoints.is_dir() else []
  if not steps:
    raise FileNotFoundError(
        f"{workdir} holds neither a parameter checkpoint (params/ + model_config.json) nor "
        "training checkpoints (checkpoints/<step>/state); pass a training --workdir or the "
        "output of a converter")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {checkpoints}; available: {steps}")
  return checkpoints / str(step), step


def _saved_run_config(checkpoints: pathlib.Path, step: int) -> dict:
  """The experiment config ({"model", "data", "train"}) saved with a training checkpoint."""
  manager = ocp.CheckpointManager(checkpoints,
                                  item_handlers={"config": ocp.JsonCheckpointHandler()})
  try:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return dict(restored["config"])


class ParamSource:
  """Reads parameters of a training workdir or a parameter checkpoint, slice by slice.

  Attributes:
    model_config: the ModelConfig dict the parameters were written with.
    data_config: the run's data section (training workdirs only), for the tokenizer.
    step: the training step read (None for parameter checkpoints).
    paths: every parameter path, e.g. ("blocks", "attn", "wq").
  """

  def __init__(self, directory: str | pathlib.Path, *, step: int | None = None):
    self.directory = pathlib.Path(directory).absolute()
    self.data_config = None
    self.step = None
    if (self.directory / ckpt_lib.PARAMS_ITEM).is_dir() and (
        self.directory / ckpt_lib.MODEL_CONFIG_FILE).is_file():
      if step is not None:
        raise ValueError(f"{self.directory} is a parameter checkpoint (one set of parameters); "
                         "--step applies to training workdirs only")
      self._base = self.directory / ckpt_lib.PARAMS_ITEM
      self._prefix: Path = ()
      self.model_config = split_model_fields(
          json.loads((self.directory / ckpt_lib.MODEL_CONFIG_FILE).read_text()))[0]
    else:
      step_dir, self.step = _training_step_dir(self.directory, step)
      self._base = step_dir / "state"
      self._prefix = ("params",)
      config = _saved_run_config(step_dir.parent, self.step)
      self.model_config = split_model_fields(config["model"])[0]
      self.data_config = config.get("data")
    metadata = json.loads((self._base / "_METADATA").read_text())
    if not metadata.get("use_ocdbt", True):
      raise CheckpointFormatError(f"{self._base} was written without OCDBT, which is not "
                                  "supported here")
    self._zarr3 = bool(metadata.get("use_zarr3", False))
    n = len(self._prefix)
    self.paths = [p[n:] for p in _tree_paths(metadata) if p[:n] == self._prefix]
    self._open: tuple[Path, Any] | None = None

  def _array(self, path: Path):
    if self._open is None or self._open[0] != path:
      if path not in self.paths:
        raise KeyError(f"parameter {'.'.join(path)} is not in {self._base}")
      name = ".".join(self._prefix + path)
      spec = _array_spec(self._base, name, self._zarr3)
      array = ts.open(spec, open=True, read=True).result()
      chunk = array.chunk_layout.read_chunk.shape or array.shape
      chunk_bytes = int(np.prod(chunk, dtype=np.int64)) * array.dtype.numpy_dtype.itemsize
      # A chunk spanning several layers (an unsharded training checkpoint stores a stacked
      # array as one chunk) is cached, so consecutive layer slices decode it once; chunks of
      # one layer are not, so nothing but the requested slice stays in memory.
      spans_layers = path[0] == "blocks" and len(chunk) > 0 and chunk[0] > 1
      limit = chunk_bytes + 2**20 if spans_layers else 0
      context = ts.Context({"cache_pool": {"total_bytes_limit": limit}})
      self._open = (path, ts.open(spec, open=True, read=True, context=context).result())
    return self._open[1]

  def shape(self, path: Path) -> tuple[int, ...]:
    return tuple(self._array(path).shape)

  def read(self, path: Path, layer: int | None = None) -> np.ndarray:
    """The parameter at `path`, or its `[layer]` slice for stacked block parameters.

    Read one stored chunk row at a time into the result, so that tensorstore's decode
    buffers stay the size of a chunk rather than of the slice.
    """
    array = self._array(path)
    view = array if layer is None else array[layer]
    if view.ndim == 0:
      return np.asarray(view.read().result())
    chunk = array.chunk_layout.read_chunk.shape or array.shape
    step = chunk[0 if layer is None else 1]
    if step >= view.shape[0]:
      return np.asarray(view.read().result())
    n = view.shape[0]
    out = np.empty(view.shape, view.dtype.numpy_dtype)
    for start in range(0, n, step):
      stop = min(start + step, n)  # tensorstore does not clip slices like numpy
      out[start:stop] = view[start:stop].read().result()
    return out

  def close(self) -> None:
    self._open = None


class ParamWriter:
  """Writes a parameter checkpoint (`save_params` layout) slice by slice.

  Args:
    directory: the checkpoint folder to create (`params/` and `model_config.json` go in it).
    specs: every parameter path with its (shape, numpy dtype). Paths under "blocks" are stacked
      over layers and written one `[layer]` slice at a time; others in one piece.
  """

  def __init__(self, directory: str | pathlib.Path,
               specs: Mapping[Path, tuple[tuple[int, ...], np.dtype]]):
    self.directory = pathlib.Path(directory).absolute()
    self._base = self.directory / ckpt_lib.PARAMS_ITEM
    if self._base.exists():
      raise FileExistsError(f"{self._base} already exists")
    self._base.mkdir(parents=True)
    self._specs = {tuple(p): (tuple(s), np.dtype(d)) for p, (s, d) in specs.items()}
    self._arrays: dict[Path, Any] = {}
    self._todo = {p: set(range(s[0])) if p[0] == "blocks" else {None}
                  for p, (s, _) in self._specs.items()}
    self._started = time.time_ns()

  def _chunks(self, path: Path) -> list[int]:
    """One layer per chunk for stacked arrays, cut further along the next axis to <= CHUNK_BYTES.

    Small chunks, written one after the other, keep tensorstore's buffers small (OCDBT holds
    a whole write in memory before it lands in a data file).
    """
    shape, dtype = self._specs[path]
    chunks = [1, *shape[1:]] if path[0] == "blocks" else list(shape)
    axis = 1 if path[0] == "blocks" else 0
    if axis < len(shape):
      row = int(np.prod(chunks[axis + 1:], dtype=np.int64)) * dtype.itemsize
      chunks[axis] = int(max(1, min(shape[axis], CHUNK_BYTES // max(row, 1))))
    return chunks

  def _array(self, path: Path):
    if path not in self._arrays:
      shape, dtype = self._specs[path]
      chunks = self._chunks(path)
      spec = _array_spec(self._base, ".".join(path), zarr3=False)
      spec["metadata"] = {"shape": list(shape), "chunks": chunks, "dtype": _zarr_dtype(dtype),
                          "compressor": {"id": "zstd", "level": 1}}
      context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                            "data_copy_concurrency": {"limit": 1}})
      self._arrays[path] = ts.open(spec, create=True, open=False, context=context).result()
    return self._arrays[path]

  def write(self, path: Path, value: np.ndarray, layer: int | None = None) -> None:
    path = tuple(path)
    if path not in self._specs:
      raise KeyError(f"parameter {'.'.join(path)} is not part of this model")
    shape, dtype = self._specs[path]
    want = shape[1:] if layer is not None else shape
    value = np.asarray(value)
    if value.shape != want:
      raise ValueError(f"parameter {'.'.join(path)}{'' if layer is None else f'[{layer}]'} has "
                       f"shape {value.shape}, expected {want}")
    array = self._array(path)
    target = array if layer is None else array[layer]
    value = value.astype(dtype, copy=False)
    if value.ndim == 0:
      target.write(value).result()
    else:
      step = self._chunks(path)[1 if layer is not None else 0]
      n = value.shape[0]
      for start in range(0, n, step):  # one chunk row at a time (see _chunks)
        stop = min(start + step, n)  # tensorstore does not clip slices like numpy
        target[start:stop].write(value[start:stop]).result()
    self._todo[path].discard(layer)

  def close(self, model_config: Mapping[str, Any]) -> None:
    """Checks every slice was written, then writes the metadata that makes it a checkpoint."""
    missing = [f"{'.'.join(p)}{'' if s == {None} else f' layers {sorted(s)}'}"
               for p, s in self._todo.items() if s]
    if missing:
      raise ValueError(f"parameters never written: {missing[:5]}")
    self._arrays.clear()
    tree = {}
    for path in self._specs:
      tree[str(path)] = {"key_metadata": [{"key": k, "key_type": 2} for k in path],
                         "value_metadata": {"value_type": "np.ndarray",
                                            "skip_deserialize": False}}
    (self._base / "_METADATA").write_text(json.dumps({
        "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
    (self._base / "_CHECKPOINT_METADATA").write_text(json.dumps({
        "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
                         "StandardCheckpointHandler",
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": self._started,
        "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}))
    (self.directory / ckpt_lib.MODEL_CONFIG_FILE).write_text(
        json.dumps(dict(model_config), indent=2, sort_keys=True))


def _zarr_dtype(dtype: np.dtype) -> str:
  return "bfloat16" if dtype.name == "bfloat16" else dtype.str
