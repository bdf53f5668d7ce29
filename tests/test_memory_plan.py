"""The memory planner against parameter counts and sharding arithmetic."""

import pathlib
import subprocess
import sys

import pytest

from emo_jax.train import memory_plan
from emo_jax.config import ModelConfig
from emo_jax.model.transformer import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE = dict(data=1, fsdp=1, expert=1, tensor=1)


def test_single_device_bytes_are_the_parameter_count():
  cfg = ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                    head_dim=16, num_experts=8, top_k=2, expert_hidden=32, pool_min=2)
  plan = memory_plan.plan(cfg, ONE, micro_batch=2, seq_len=64)
  total = count_params(cfg)["total_params"]
  assert plan["params_bytes"] == total * 4
  assert plan["optimizer_bytes"] == 2 * total * 4 and plan["gradient_bytes"] == total * 4
  sharded = memory_plan.plan(cfg, dict(ONE, fsdp=2, expert=4), micro_batch=2, seq_len=64)
  # Everything big is split 2 or 8 ways; the small replicated norms keep it above total / 8.
  assert total * 4 / 8 < sharded["params_bytes"] < total * 4 / 2


def test_release_model_fits_eight_h100s_only_when_sharded():
  cfg = ModelConfig()
  alone = memory_plan.plan(cfg, ONE, micro_batch=1, seq_len=4096, chip="h100-80gb")
  eight = memory_plan.plan(cfg, dict(ONE, fsdp=8), micro_batch=1, seq_len=4096,
                           chip="h100-80gb")
  assert not alone["fits"] and eight["fits"]
  with pytest.raises(ValueError, match="unknown chip"):
    memory_plan.plan(cfg, ONE, micro_batch=1, seq_len=8, chip="tpu-v9")


@pytest.mark.slow
@pytest.mark.integration
def test_command_prints_the_plan():
  out = subprocess.run([sys.executable, "-m", "experiments.plan_memory", "--config",
                        "configs/emo_1b14b.py", "--mesh", "fsdp=16", "--chip", "h100-80gb"],
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "fits" in out and '"devices": 16' in out.splitlines()[-1]
