"""Conversion between emo_jax checkpoints and other formats (Hugging Face: `hf`)."""

from emo_jax.convert.hf import (ConversionError, export_hf, from_hf_tensors, hf_config,
                                import_hf, model_config_from_hf, read_hf_config, tensor_groups,
                                to_hf_tensors)

__all__ = ["ConversionError", "export_hf", "from_hf_tensors", "hf_config", "import_hf",
           "model_config_from_hf", "read_hf_config", "tensor_groups", "to_hf_tensors"]
