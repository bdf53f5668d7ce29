"""Checkpoints in and out: every kind loaded as one model, and Hugging Face both ways (hf.py).

  loading.py         load_model / load_checkpoint: a workdir, a parameter checkpoint or an
                     HF import as (ModelConfig, graphdef, params[, tokenizer]), for inference
  hf.py              export_hf / import_hf, streamed and atomic; in-memory helpers
  layouts.py         one Layout per model family (emo, qwen2_moe, olmoe), registered in LAYOUTS:
                     its config.json both ways and its tensor table
  tensors.py         the tensor table's rows every family shares: our parameters <-> HF tensors
  configs.py         the config.json keys every family shares, both ways
  orbax_io.py        parameter checkpoints read / written one layer slice at a time
  safetensors_io.py  sharded safetensors read / written one tensor at a time
  tokenizer_hf.py    tokenizer files for transformers.AutoTokenizer
  remote_code/       configuration_emo.py / modeling_emo.py shipped with `emo` exports
"""

from emo_jax.convert.hf import (EXPORT_LAYOUTS, LAYOUTS, ConversionError, export_hf,
                                from_hf_tensors, hf_config, import_hf, model_config_from_hf,
                                param_specs, read_hf_config, tensor_groups, to_hf_tensors)
from emo_jax.convert.layouts import Layout, get_layout

__all__ = ["EXPORT_LAYOUTS", "LAYOUTS", "ConversionError", "Layout", "export_hf",
           "from_hf_tensors", "get_layout", "hf_config", "import_hf", "model_config_from_hf",
           "param_specs", "read_hf_config", "tensor_groups", "to_hf_tensors"]
