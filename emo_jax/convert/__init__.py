"""Conversion between emo_jax checkpoints and Hugging Face (see hf.py for the entry points).

  hf.py              export_hf / import_hf, streamed and atomic; in-memory helpers
  layouts.py         the tensor table: our parameters <-> HF tensors for emo, qwen2_moe, olmoe
  configs.py         HF config.json <-> ModelConfig
  orbax_io.py        parameter checkpoints read / written one layer slice at a time
  safetensors_io.py  sharded safetensors read / written one tensor at a time
  tokenizer_hf.py    tokenizer files for transformers.AutoTokenizer
  remote_code/       configuration_emo.py / modeling_emo.py shipped with `emo` exports
"""

from emo_jax.convert.hf import (LAYOUTS, ConversionError, export_hf, from_hf_tensors,
                                hf_config, import_hf, model_config_from_hf, param_specs,
                                read_hf_config, tensor_groups, to_hf_tensors)

__all__ = ["LAYOUTS", "ConversionError", "export_hf", "from_hf_tensors", "hf_config",
           "import_hf", "model_config_from_hf", "param_specs", "read_hf_config",
           "tensor_groups", "to_hf_tensors"]
