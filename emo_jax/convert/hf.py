"""Hugging Face <-> emo_jax conversion, both ways, streamed one tensor (layer slice) at a time.

`export_hf` writes a training workdir or parameter checkpoint as a Hugging Face folder in one of
the exportable layouts of layouts.LAYOUTS (docs/algorithm.md, "Hugging Face layouts"):

* `emo`: the release's `EmoForCausalLM` names and config keys, with this project's own
  `configuration_emo.py` / `modeling_emo.py` copied beside the weights (trust_remote_code);
* `qwen2_moe`: transformers' built-in `Qwen2MoeForCausalLM` (also native in vLLM and
  llama.cpp), which expresses EMO inference exactly (see layouts.py), with no remote code.

`import_hf` reads the `emo` layout (released checkpoints with 100,352 or 100,278 vocabulary
rows), the `qwen2_moe` layout written here, and OLMoE into a parameter checkpoint that
`train.init_from` and evaluation read; config.json's model_type picks the layout.

Both walk the layout's tensor table (tensors.py) array-major, reading and writing one layer
slice at a time (orbax_io.py, safetensors_io.py): peak host memory grows with a layer, not with
the model.
Output goes to a temporary folder beside `out` that is renamed when complete, so a failed
conversion leaves nothing at `out`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import resource
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from emo_jax.config import ModelConfig
from emo_jax.convert import orbax_io, safetensors_io, tokenizer_hf
from emo_jax.convert.configs import ConversionError
from emo_jax.convert.layouts import (EXPORT_LAYOUTS, LAYOUTS, get_layout, hf_config,
                                     model_config_from_hf, tensor_groups)
from emo_jax.convert.tensors import Path, param_specs
from emo_jax.data import corpus, sources
from emo_jax.model.execution import saved_model_config

__all__ = ["EXPORT_LAYOUTS", "LAYOUTS", "ConversionError", "export_hf", "from_hf_tensors",
           "hf_config", "import_hf", "model_config_from_hf", "param_specs", "read_hf_config",
           "resolve_tokenizer", "tensor_groups", "to_hf_tensors"]

log = logging.getLogger(__name__)

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
REMOTE_CODE_DIR = pathlib.Path(__file__).parent / "remote_code"
EMO_JAX_CONFIG = "emo_jax_config.json"   # our full ModelConfig, beside an export
HF_CONFIG_COPY = "hf_config.json"        # the source config.json, beside an import
TOKENIZER_DIR = "tokenizer"              # tokenizer files, beside an import


# ---- files -------------------------------------------------------------------------------------
def _prepare_out(out: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(final path, temporary folder beside it); refuses an existing non-empty `out`."""
  out = pathlib.Path(out).absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"--out {out} already exists and is not empty; choose a new folder")
  out.parent.mkdir(parents=True, exist_ok=True)
  return out, pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _commit(tmp: pathlib.Path, out: pathlib.Path) -> None:
  if out.exists():
    out.rmdir()  # empty (checked in _prepare_out)
  os.replace(tmp, out)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_tokenizer(source: orbax_io.ParamSource) -> str | None:
  """The tokenizer a checkpoint was trained with: "bytes", a file path, or None if unknown."""
  if (source.directory / TOKENIZER_DIR / "tokenizer.json").is_file():
    return str(source.directory / TOKENIZER_DIR)
  data = source.data_config
  if not data:
    return None
  tok = data.get("tokenizer", "")
  if tok == "bytes" or (data.get("corpus") == "synthetic" and not tok):
    return "bytes"
  if tok:
    return tok
  dc = corpus.DataConfig.from_dict(data)
  data_dir = pathlib.Path(dc.data_dir) if dc.data_dir else corpus.default_data_dir(dc)
  try:
    prepared = json.loads((data_dir / corpus.RESULT_FILE).read_text())
  except (OSError, ValueError):
    return None
  return prepared.get("tokenizer")


def _validation_texts(source: orbax_io.ParamSource, limit: int = 200) -> list[str]:
  """Up to `limit` validation documents of the run, to check a converted tokenizer on."""
  data = source.data_config or {}
  if data.get("corpus") in (None, "synthetic"):
    return []
  dc = corpus.DataConfig.from_dict(data)
  path = (pathlib.Path(dc.data_dir) if dc.data_dir else corpus.default_data_dir(dc))
  path = path / "validation.jsonl"
  if not path.is_file():
    return []
  texts = []
  for doc in sources.read_jsonl(path):
    texts.append(doc["text"])
    if len(texts) >= limit:
      break
  return texts


# ---- export ------------------------------------------------------------------------------------
def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, layout: str = "emo",
              dtype: str = "float32", step: int | None = None, tokenizer: str | None = None,
              max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
  """Writes a Hugging Face checkpoint of a training workdir or parameter checkpoint.

  Args:
    checkpoint: a training workdir (its newest checkpoint, or `step`) or a parameter checkpoint
      (`params/` + `model_config.json`, e.g. written by `import_hf` or by expert pruning).
    out: the folder to create; written completely or not at all.
    layout: a name in EXPORT_LAYOUTS: "emo" (release names, trust_remote_code) or
      "qwen2_moe" (built-in transformers); see layouts.py.
    dtype: "float32" or "bfloat16" for the weights.
    step: training step to export (training workdirs only).
    tokenizer: "bytes", a SentencePiece .model, a tokenizer.json (or a folder with one), or
      "none"; default: the one the run was trained with (or that an import stored).
    max_shard_bytes: size bound of one safetensors shard.

  Returns:
    A summary: out, layout, dtype, tensors, bytes, shards, tokenizer, seconds, peak_rss_mb.
  """
  start = time.time()
  if dtype not in DTYPES:
    raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
  out_dtype = DTYPES[dtype]
  family = get_layout(layout)
  source = orbax_io.ParamSource(checkpoint, step=step)
  cfg = saved_model_config(source.model_config)
  family.check_exportable(cfg)
  specs = param_specs(cfg)
  for path, (shape, _) in specs.items():
    if path not in source.paths:
      raise ConversionError(f"parameter {'.'.join(path)} is missing from {source.directory}")
    if source.shape(path) != shape:
      raise ConversionError(f"parameter {'.'.join(path)} has shape {source.shape(path)} in "
                            f"{source.directory}, but its model config implies {shape}")
  if tokenizer is None:
    tokenizer = resolve_tokenizer(source)
    if tokenizer is None:
      raise ConversionError(f"cannot tell which tokenizer {source.directory} uses; pass "
                            "--tokenizer=PATH (a .model or tokenizer.json), or --tokenizer=none "
                            "to export the weights without one")
  groups = family.tensor_groups(cfg)
  out, tmp = _prepare_out(out)
  try:
    token_info = None
    if tokenizer != "none":
      token_info = tokenizer_hf.write_tokenizer(tokenizer, tmp, model_max_length=cfg.max_seq_len,
                                                check_texts=_validation_texts(source))
      if token_info["vocab_size"] > cfg.vocab_size:
        raise ConversionError(f"tokenizer {tokenizer} has {token_info['vocab_size']} ids but the "
                              f"model's embedding has {cfg.vocab_size} rows; pass the tokenizer "
                              "the model was trained with (--tokenizer)")
      token_ids = {k: token_info[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:
      token_ids = _stored_token_ids(source.directory)
    plan = [(n, s, out_dtype) for g in groups for n, s in zip(g.names, g.shapes)]
    writer = safetensors_io.ShardedWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
    for g in groups:
      x = source.read(g.path, g.layer) if g.path is not None else None
      for name, tensor in zip(g.names, g.to_hf(x)):
        writer.write(name, np.asarray(tensor).astype(out_dtype, copy=False))
      del x
    writer.close()
    source.close()
    config = family.to_hf_config(cfg, dtype=dtype, token_ids=token_ids)
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", {
        "_from_model_config": True, **token_ids})
    _write_json(tmp / EMO_JAX_CONFIG, cfg.to_dict())
    for name in family.remote_code:
      shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
    _commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shards = len({f for f in json.loads((out / safetensors_io.INDEX_FILE).read_text())
                ["weight_map"].values()})
  return {"out": str(out), "layout": family.name, "dtype": dtype, "step": source.step,
          "tensors": len(plan), "bytes": writer.total_bytes, "shards": shards,
          "tokenizer": token_info, "seconds": round(time.time() - start, 2),
          "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _stored_token_ids(directory: pathlib.Path) -> dict[str, int | None]:
  try:
    config = json.loads((directory / HF_CONFIG_COPY).read_text())
  except (OSError, ValueError):
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _write_json(path: pathlib.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2) + "\n")


# ---- import ------------------------------------------------------------------------------------
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_config_json(hf_dir: pathlib.Path) -> dict:
  try:
    return json.loads((hf_dir / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f"{hf_dir} has no readable config.json ({e})") from e


def read_hf_config(hf_dir: str | os.PathLike,
                   overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, str, bool]:
  """(ModelConfig, layout, fused_experts) of a Hugging Face checkpoint folder, headers only."""
  hf_dir = pathlib.Path(hf_dir)
  config = _read_config_json(hf_dir)
  return _config_for(config, safetensors_io.ShardedReader(hf_dir), hf_dir, overrides)


def _config_for(config, reader, hf_dir, overrides):
  rows = reader.shape("model.embed_tokens.weight")[0] if (
      "model.embed_tokens.weight" in reader) else None
  fused = "model.layers.0.mlp.experts.gate_up_proj" in reader
  base = None
  if (hf_dir / EMO_JAX_CONFIG).is_file():
    base = json.loads((hf_dir / EMO_JAX_CONFIG).read_text())
  cfg, layout = model_config_from_hf(config, vocab_rows=rows, base=base, overrides=overrides)
  return cfg, layout, fused


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *,
              overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes a parameter checkpoint (for `train.init_from` and evaluation) from a HF checkpoint.

  Args:
    hf_dir: a folder with config.json and safetensors weights in the emo layout, the qwen2_moe
      layout written by `export_hf`, or OLMoE.
    out: the folder to create (`params/`, `model_config.json`, and `tokenizer/` + a copy of the
      source config.json when present); written completely or not at all.
    overrides: ModelConfig fields to set on the imported config, e.g. {"pool": False}.

  Returns:
    A summary: out, layout, model_type, config, tensors, seconds, peak_rss_mb.
  """
  start = time.time()
  hf_dir = pathlib.Path(hf_dir)
  config = _read_config_json(hf_dir)
  reader = safetensors_io.ShardedReader(hf_dir)
  cfg, layout, fused = _config_for(config, reader, hf_dir, overrides)
  groups = tensor_groups(cfg, layout, fused_experts=fused)
  used = set()
  for g in groups:  # every shape is checked before anything is written
    for name, shape in zip(g.names, g.shapes):
      if name not in reader:
        raise safetensors_io.SafetensorsError(
            f"tensor {name!r} is missing from the checkpoint in {hf_dir} (config.json: "
            f"model_type={config.get('model_type')}, {cfg.num_layers} layers, "
            f"{cfg.num_experts} experts)")
      if reader.shape(name) != shape:
        raise ConversionError(f"tensor {name!r} has shape {reader.shape(name)}, but config.json "
                              f"implies {shape}")
      used.add(name)
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unused = sorted(n for n in reader.keys() if n not in used and n not in ignorable
                  and not n.endswith(IGNORED_SUFFIXES))
  if unused:
    raise ConversionError(f"config.json disagrees with the weights: {len(unused)} tensors are not "
                          f"part of the model it describes, e.g. {unused[:4]} (config: "
                          f"{cfg.num_layers} layers, {cfg.num_experts} experts)")
  specs = param_specs(cfg)
  out, tmp = _prepare_out(out)
  try:
    writer = orbax_io.ParamWriter(tmp, specs)
    for g in groups:
      value = g.from_hf(lambda i, g=g: reader.get(g.names[i]))
      if g.path is not None:
        writer.write(g.path, value, g.layer)
      del value
    writer.close(cfg.to_dict())
    shutil.copyfile(hf_dir / "config.json", tmp / HF_CONFIG_COPY)
    if (hf_dir / "tokenizer.json").is_file():
      (tmp / TOKENIZER_DIR).mkdir()
      for name in tokenizer_hf.TOKENIZER_FILES:
        if (hf_dir / name).is_file():
          shutil.copyfile(hf_dir / name, tmp / TOKENIZER_DIR / name)
    _commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"out": str(out), "layout": layout, "model_type": config.get("model_type"),
          "fused_experts": fused, "tensors": len(used), "config": cfg.to_dict(),
          "tokenizer": str(out / TOKENIZER_DIR) if (out / TOKENIZER_DIR).is_dir() else None,
          "seconds": round(time.time() - start, 2), "peak_rss_mb": round(_peak_rss_mb(), 1)}


# ---- in memory (tests, notebooks, small models) -------------------------------------------------
def to_hf_tensors(params: Mapping[str, Any], cfg: ModelConfig, layout: str,
                  dtype: str = "float32") -> dict[str, np.ndarray]:
  """The Hugging Face tensors of a nested parameter dict (`nnx.to_pure_dict` form)."""
  out = {}
  for g in tensor_groups(cfg, layout):
    x = None
    if g.path is not None:
      x = _lookup(params, g.path)
      x = np.asarray(x if g.layer is None else x[g.layer], np.float32)
    for name, tensor in zip(g.names, g.to_hf(x)):
      out[name] = np.asarray(tensor).astype(DTYPES[dtype])
  return out


def from_hf_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, layout: str, *,
                    fused_experts: bool = False) -> dict[str, Any]:
  """A nested parameter dict from Hugging Face tensors (inverse of `to_hf_tensors`)."""
  specs = param_specs(cfg)
  params: dict[Path, np.ndarray] = {p: np.zeros(s, d) for p, (s, d) in specs.items()}
  for g in tensor_groups(cfg, layout, fused_experts=fused_experts):
    value = g.from_hf(lambda i, g=g: np.asarray(tensors[g.names[i]]))
    if g.path is not None:
      target = params[g.path]
      if g.layer is None:
        params[g.path] = value.astype(target.dtype)
      else:
        target[g.layer] = value
  nested: dict[str, Any] = {}
  for path, value in params.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested


def _lookup(tree: Mapping[str, Any], path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree
