"""llama.cpp (through llama-cpp-python) runs our qwen2_moe export with our logits.

Skips unless llama-cpp-python is installed and its source archive, which carries llama.cpp's
GGUF converter, is found ($LLAMA_CPP_SDIST, or /tmp/llama_sdist/llama_cpp_python-*.tar.gz as
experiments/llama_cpp_check.py's docstring downloads it).
"""

import glob
import os

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from experiments import llama_cpp_check as check_lib  # pylint: disable=wrong-import-position


def sdist():
  found = sorted(glob.glob(os.environ.get("LLAMA_CPP_SDIST", "")) +
                 glob.glob("/tmp/llama_sdist/llama_cpp_python-*.tar.gz"))
  if not found:
    pytest.skip("no llama-cpp-python source archive (set LLAMA_CPP_SDIST)")
  return found[-1]


def test_gguf_of_the_qwen2_moe_export_matches_our_logits(tmp_path):
  converter = check_lib.unpack_converter(sdist(), tmp_path / "src")
  checkpoint = check_lib.random_checkpoint(tmp_path / "random")
  ids = list(np.random.default_rng(0).integers(2, 258, 16))
  result = check_lib.check("full", checkpoint, converter, tmp_path, ids)  # the export as written
  assert result.get("failed") is None, result
  assert result["shared_expert_gate"] == [check_lib.GATE_EPSILON], result
  assert result["nan_in_llama_cpp"] == 0 and result["top1_agreement"] == 1.0, result
  assert result["max_abs_diff"] < 1e-4 * result["logit_scale"], result
