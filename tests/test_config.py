"""ModelConfig validation, the shipped configs, and describe's parameter counts."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from emo_jax.config import ConfigError, ModelConfig, model_config_from
from emo_jax.model import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))


def load_config(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(top_k=128), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(pool_min=64, pool_max=32), "pool_max"),
        (dict(pool_min=4), "pool_min"),  # below top_k=7
        (dict(num_heads=16, num_kv_heads=3), "num_kv_heads"),
        (dict(param_dtype="float64"), "param_dtype"),
        (dict(compute_dtype="fp8"), "compute_dtype"),
        (dict(expert_backend="megablox"), "expert_backend"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(remat_policy="selective"), "remat_policy"),
        (dict(remat_policy=None), "remat_policy"),
        (dict(num_shared_experts=128), "num_shared_experts"),
        (dict(head_dim=7), "head_dim"),
        (dict(d_model=0), "d_model"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(eval_pool_size=3), "eval_pool_size"),
        (dict(num_experts=-1), "num_experts"),
        (dict(lb_loss_weight=-0.1), "lb_loss_weight"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
  with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}="):
    ModelConfig(**changes)


def test_error_lists_allowed_values():
  with pytest.raises(ConfigError, match=r"\['dense', 'capacity', 'ragged'\]"):
    ModelConfig(expert_backend="megablox")


def test_attention_and_remat_choices_validate_and_are_not_architecture():
  """Every listed kernel and policy is accepted, and none of them pins a checkpoint."""
  from emo_jax.checkpoint import ARCHITECTURE_FIELDS
  from emo_jax.config import ATTENTION_IMPLS, REMAT_POLICIES
  for impl in ATTENTION_IMPLS:
    ModelConfig(attention_impl=impl)
  for policy in REMAT_POLICIES:
    cfg = ModelConfig(remat_policy=policy)
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
  with pytest.raises(ConfigError, match=r"'dots_and_attention', 'none'\]"):
    ModelConfig(remat_policy="everything")
  assert not {"attention_impl", "remat", "remat_policy"} & set(ARCHITECTURE_FIELDS)
  # Configs saved before remat_policy existed still load (the field has a default).
  saved = {k: v for k, v in ModelConfig().to_dict().items() if k != "remat_policy"}
  assert ModelConfig.from_dict(saved).remat_policy == "full"


def test_unknown_field_is_an_error():
  with pytest.raises(ConfigError, match="topk"):
    ModelConfig.from_dict({"topk": 3})


def test_dense_config_ignores_expert_fields():
  cfg = ModelConfig(num_experts=0, num_shared_experts=0, top_k=0, pool=False)
  assert not cfg.is_moe


def test_round_trip_through_dict():
  cfg = ModelConfig(num_experts=32, pool=False, eval_pool_size=16)
  assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate_and_document_their_command(path):
  config = load_config(path)
  model_config_from(config)  # validates
  assert f"--config configs/{path.name}" in path.read_text()


def test_release_parameter_counts():
  counts = count_params(model_config_from(load_config(ROOT / "configs/emo_1b14b.py")))
  assert abs(counts["total_params"] - 13.6e9) / 13.6e9 < 0.01
  assert abs(counts["active_params"] - 1.5e9) / 1.5e9 < 0.02
  dense = count_params(model_config_from(load_config(ROOT / "configs/dense_1b.py")))
  assert dense["total_params"] == dense["active_params"]
  small = count_params(model_config_from(load_config(ROOT / "configs/stdmoe_1b4b.py")))
  assert 3.5e9 < small["total_params"] < 4.5e9  # "1b4b"


def test_describe_command():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.describe", "--config", "configs/emo_1b14b.py"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  described = json.loads(out)
  assert 13.5e9 < described["total_params"] < 13.7e9
  assert 1.45e9 < described["active_params"] < 1.55e9
  assert described["params"]["blocks.mlp.w_gate"]["shape"] == [16, 128, 2048, 1024]
  assert described["params"]["embed"]["shape"] == [100_352, 2048]
  override = subprocess.run(
      [sys.executable, "-m", "experiments.describe", "--config", "configs/tiny.py",
       "--config.model.top_k=99"], cwd=ROOT, capture_output=True, text=True)
  assert override.returncode != 0 and "ModelConfig.top_k=99" in override.stderr
