"""Sharded safetensors written and read one tensor at a time, with errors that name the tensor.

The `safetensors` package's numpy API saves a whole dict at once and cannot read bfloat16, so
a 14B checkpoint would have to sit in memory. The format is simple enough to stream: an 8-byte
little-endian header length, a JSON header (dtype, shape and byte range of every tensor) padded
to 8 bytes, then the raw little-endian bytes. Writers here plan every shard's header from the
tensor shapes first, then append each tensor's bytes as it is produced; readers parse the
headers and read exactly one tensor's bytes per request. Files are the same as those written by
the `safetensors` package (transformers and vLLM read them), and `model.safetensors.index.json`
maps names to shards as transformers expects.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"),
          "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors checkpoint is missing, truncated, or lacks / misshapes a tensor."""


def dtype_name(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype not in NAMES:
    raise SafetensorsError(f"dtype {dtype} cannot be written to safetensors here; use one of "
                           f"{sorted(str(d) for d in NAMES)}")
  return NAMES[dtype]


def plan_shards(tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Groups tensors, in order, into shards of at most max_shard_bytes (one tensor may exceed)."""
  shards, current, size = [], [], 0
  for name, shape, dtype in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, tuple(shape), np.dtype(dtype)))
    size += nbytes
  if current:
    shards.append(current)
  return shards


class ShardedWriter:
  """Writes planned shards and the index into `directory`, tensor by tensor, in plan order.

  `write(name, array)` must be called for every planned tensor in the planned order; shape and
  dtype are checked against the plan, so a mapping bug cannot produce a corrupt file.
  """

  def __init__(self, directory: str | os.PathLike,
               tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]], *,
               max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None):
    self.directory = pathlib.Path(directory)
    self._shards = plan_shards(tensors, max_shard_bytes)
    n = len(self._shards)
    self._files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    self._metadata = {"format": "pt", **(metadata or {})}
    self._queue = [(s, j) for s, shard in enumerate(self._shards) for j in range(len(shard))]
    self._next = 0
    self._handle = None
    self.total_bytes = 0

  def _open_shard(self, s: int) -> None:
    header, offset = {"__metadata__": self._metadata}, 0
    for name, shape, dtype in self._shards[s]:
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # Stays open across write() calls until the shard's last tensor is in.
    self._handle = open(self.directory / self._files[s], "wb")  # pylint: disable=R1732
    self._handle.write(struct.pack("<Q", len(raw)) + raw)

  def write(self, name: str, array: np.ndarray) -> None:
    if self._next >= len(self._queue):
      raise SafetensorsError(f"tensor {name!r} was not planned (all planned tensors are written)")
    s, j = self._queue[self._next]
    want_name, shape, dtype = self._shards[s][j]
    array = np.asarray(array)
    if name != want_name or array.shape != shape or array.dtype != dtype:
      raise SafetensorsError(f"tensor {name!r} {array.shape} {array.dtype} does not match the "
                             f"plan: expected {want_name!r} {shape} {dtype} next")
    if j == 0:
      self._open_shard(s)
    # A byte view of the array: no second copy of a large tensor (hosts are little-endian).
    self._handle.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self.total_bytes += array.nbytes
    self._next += 1
    if j == len(self._shards[s]) - 1:
      self._handle.close()
      self._handle = None

  def close(self) -> None:
    """Writes the index; every planned tensor must have been written."""
    if self._handle is not None:
      self._handle.close()
    if self._next != len(self._queue):
      s, j = self._queue[self._next]
      left = len(self._queue) - self._next
      raise SafetensorsError(f"tensor {self._shards[s][j][0]!r} and {left - 1} more planned "
                             "tensors were never written")
    weight_map = {name: self._files[s] for s, shard in enumerate(self._shards)
                  for name, _, _ in shard}
    index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
    (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
  """(header without __metadata__, byte offset of the data) of one safetensors file."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{path} is truncated ({size} bytes): not a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 * 2**20:
      raise SafetensorsError(f"{path} has a header length of {n} bytes but the file has {size}: "
                             "truncated or not a safetensors file")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise SafetensorsError(f"{path} has an unreadable header ({e})") from e
  header.pop("__metadata__", None)
  data_start = 8 + n
  for name, info in header.items():
    begin, end = info["data_offsets"]
    if data_start + end > size:
      raise SafetensorsError(f"{path} is truncated: tensor {name!r} needs bytes up to "
                             f"{data_start + end} but the file has {size}")
  return header, data_start


class ShardedReader:
  """Reads tensors of a checkpoint folder (index + shards, or one model.safetensors) on demand.

  Only headers are read up front; `get(name)` reads that tensor's bytes and nothing else.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    index_path = self.directory / INDEX_FILE
    if index_path.is_file():
      try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise SafetensorsError(f"{index_path} is not a safetensors index ({e})") from e
      files = sorted(set(weight_map.values()))
    elif (self.directory / SINGLE_FILE).is_file():
      weight_map, files = None, [SINGLE_FILE]
    else:
      raise SafetensorsError(f"{self.directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}; "
                             "pass a Hugging Face checkpoint folder with safetensors weights")
    self._where: dict[str, tuple[pathlib.Path, dict, int]] = {}
    for file in files:
      path = self.directory / file
      if not path.is_file():
        needs = sorted(k for k, v in (weight_map or {}).items() if v == file)
        raise SafetensorsError(f"shard {file} is missing from {self.directory} (the index maps "
                               f"{len(needs)} tensors to it, e.g. {needs[:3]})")
      header, start = _read_header(path)
      for name, info in header.items():
        self._where[name] = (path, info, start)
    if weight_map is not None:
      for name, file in weight_map.items():
        if name not in self._where:
          raise SafetensorsError(f"tensor {name!r} is listed in {INDEX_FILE} under {file} but "
                                 "that shard does not hold it")

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info(name)[1]["shape"])

  def _info(self, name: str):
    if name not in self._where:
      raise SafetensorsError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
    return self._where[name]

  def get(self, name: str, shape: Iterable[int] | None = None) -> np.ndarray:
    """The tensor `name`; with `shape`, a mismatch is an error naming the tensor."""
    path, info, start = self._info(name)
    got = tuple(info["shape"])
    if shape is not None and got != tuple(shape):
      raise SafetensorsError(f"tensor {name!r} has shape {got} in {path.name}, but the config "
                             f"implies {tuple(shape)}")
    if info["dtype"] not in DTYPES:
      raise SafetensorsError(f"tensor {name!r} has dtype {info['dtype']}, which is not supported")
    dtype = DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    count = int(np.prod(got, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise SafetensorsError(f"tensor {name!r} in {path.name} has {end - begin} bytes for shape "
                             f"{got} {info['dtype']}")
    with open(path, "rb") as f:
      f.seek(start + begin)
      data = f.read(end - begin)
    return np.frombuffer(data, dtype=dtype, count=count).reshape(got)
