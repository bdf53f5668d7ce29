"""ModelConfig and ExecutionConfig validation, the shipped configs, describe's counts."""

import dataclasses
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

from emo_jax.train import checkpoint
from emo_jax.config import ConfigError, ModelConfig
from emo_jax.model.attention import ATTENTION_IMPLS
from emo_jax.model.execution import FIELD_CHOICES, ExecutionConfig, split_model_fields
from emo_jax.model.remat import REMAT_POLICIES
from emo_jax.train.experiment import Experiment
from emo_jax.model.transformer import count_params


def model_config_from(config):
  return Experiment.from_config(config).model

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
        (dict(num_shared_experts=128), "num_shared_experts"),
        (dict(head_dim=7), "head_dim"),
        (dict(d_model=0), "d_model"),
        (dict(max_segments=1), "max_segments"),
        (dict(eval_pool_size=3), "eval_pool_size"),
        (dict(document_attention="no"), "document_attention"),
        (dict(num_experts=-1), "num_experts"),
        (dict(lb_loss_weight=-0.1), "lb_loss_weight"),
        (dict(lb_scope_sequences=-4), "lb_scope_sequences"),
        (dict(lb_scope_sequences=2.5), "lb_scope_sequences"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
  with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}="):
    ModelConfig(**changes)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(expert_backend="megablox"), "expert_backend"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(remat_policy="selective"), "remat_policy"),
        (dict(remat_policy=None), "remat_policy"),
        (dict(ragged_dot_impl="cutlass"), "ragged_dot_impl"),
        (dict(expert_transport="carrier_pigeon"), "expert_transport"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=0.01), "capacity_factor"),
        (dict(expert_backend="ragged", capacity_factor=-1.0), "capacity_factor"),
    ],
)
def test_invalid_execution_names_the_field(changes, field):
  with pytest.raises(ConfigError, match=rf"ExecutionConfig\.{field}="):
    ExecutionConfig(**changes)


def test_error_lists_allowed_values():
  with pytest.raises(ConfigError, match=r"\['dense', 'capacity', 'ragged'\]"):
    ExecutionConfig(expert_backend="megablox")


def test_capacity_below_one_is_refused_for_the_capacity_backend_only():
  with pytest.raises(ConfigError, match=r"capacity_factor=0\.5 is invalid: below 1\.0 the "
                     r"capacity backend drops at least 50% .*use >= 1\.0 .*'ragged'"):
    ExecutionConfig(capacity_factor=0.5)
  # The dropless backend never reads it (the trainer's mesh test runs it at 0.5).
  assert ExecutionConfig(expert_backend="ragged", capacity_factor=0.5).capacity_factor == 0.5


def test_every_kernel_and_policy_validates_and_round_trips():
  for impl in ATTENTION_IMPLS:
    ExecutionConfig(attention_impl=impl)
  for policy in REMAT_POLICIES:
    run = ExecutionConfig(remat_policy=policy)
    assert ExecutionConfig.from_dict(json.loads(run.to_json())) == run
  with pytest.raises(ConfigError, match=r"'dots_and_attention', 'none'\]"):
    ExecutionConfig(remat_policy="everything")


def documented_choices() -> dict[str, list[str]]:
  """{setting: the backticked values of its row} from docs/accelerators.md's choices table."""
  text = (ROOT / "docs/accelerators.md").read_text()
  table = text.split("## The choices", 1)[1].split("\n## ", 1)[0]
  documented = {}
  for row in table.splitlines():
    cells = row.split("|")
    if len(cells) > 3 and "`" in cells[1]:
      for setting in re.findall(r"`(\w+)`", cells[1]):
        documented[setting] = re.findall(r"`([^`]+)`", cells[2])
  return documented


def test_docs_list_exactly_the_allowed_values_of_every_choice():
  """docs/accelerators.md names every value each choice's owning tuple allows, and no other,
  and every string field of ExecutionConfig is a choice with an owning tuple."""
  documented = documented_choices()
  for field, choices in FIELD_CHOICES.items():
    assert sorted(documented.get(field, [])) == sorted(choices), field
  string_fields = {f.name for f in dataclasses.fields(ExecutionConfig) if f.type == "str"}
  assert string_fields == set(FIELD_CHOICES)
  for field, choices in FIELD_CHOICES.items():  # and they are the ones the config accepts
    with pytest.raises(ConfigError, match=re.escape(str(list(choices)))):
      ExecutionConfig(**{field: "not_a_choice"})


# A value other than the default for every field of each config (the test fails when a field is
# added without one here, so that the restart rule below covers it).
OTHER_EXECUTION = dict(expert_backend="ragged", capacity_factor=2.0, ragged_dot_impl="xla",
                       expert_transport="all_gather", attention_impl="auto", remat=False,
                       remat_policy="dots", scan_layers=False,
                       head_chunk_tokens=256, decode_loop_tokens=0)


def test_execution_fields_may_change_on_restart_architecture_fields_may_not():
  """Both rules come from the split itself: every ExecutionConfig field is free, every
  ModelConfig field pins the checkpoint."""
  assert set(OTHER_EXECUTION) == {f.name for f in dataclasses.fields(ExecutionConfig)}
  saved = {"model": ModelConfig().to_dict(), "execution": ExecutionConfig().to_dict()}
  for name, value in OTHER_EXECUTION.items():
    changed = ExecutionConfig().replace(**{name: value}) if name != "expert_transport" else (
        ExecutionConfig(expert_backend="ragged", expert_transport=value))
    assert checkpoint.incompatible_fields(saved, {**saved, "execution": changed.to_dict()}) == []
  for field in dataclasses.fields(ModelConfig):
    old = getattr(ModelConfig(), field.name)
    new = (not old if isinstance(old, bool) else 32 if old is None
           else old + 1 if isinstance(old, (int, float)) else "float16")
    current = {**saved, "model": {**saved["model"], field.name: new}}
    [problem] = checkpoint.incompatible_fields(saved, current)
    assert problem.startswith(f"model.{field.name}: checkpoint has {old!r}")


def test_model_configs_saved_before_the_split_still_read():
  legacy = {**ModelConfig().to_dict(), **ExecutionConfig().to_dict()}
  model, execution = split_model_fields(legacy)
  assert ModelConfig.from_dict(model) == ModelConfig()
  assert execution == ExecutionConfig().to_dict()


def test_execution_field_in_the_model_section_names_where_it_belongs():
  config = load_config(ROOT / "configs/tiny.py")
  config.model.expert_backend = "ragged"
  with pytest.raises(ConfigError, match=r"model\.expert_backend is a run setting.*"
                     r"--config\.execution\.expert_backend"):
    Experiment.from_config(config)


def test_unknown_field_is_an_error():
  with pytest.raises(ConfigError, match=r"'topk'.*did you mean 'top_k'"):
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


@pytest.mark.parametrize("name, document_attention, eval_pool_size", [
    ("emo_1b14b", True, 32), ("emo_1b14b_130b", True, 32), ("stdmoe_1b14b", False, None),
    ("stdmoe_1b14b_130b", False, None), ("stdmoe_1b4b", False, None), ("dense_1b", False, None),
    ("repro", True, None), ("repro_stdmoe", False, None), ("demo", True, None),
    ("demo_stdmoe", False, None)])
def test_configs_take_the_release_attention_and_eval_pool(name, document_attention,
                                                          eval_pool_size):
  """Only the EMO launch scripts set generate_doc_lengths=true and an in-loop eval pool of 32."""
  cfg = model_config_from(load_config(ROOT / f"configs/{name}.py"))
  assert cfg.document_attention is document_attention
  assert cfg.eval_pool_size == eval_pool_size


@pytest.mark.parametrize("name, scope", [
    ("emo_1b14b", 512), ("emo_1b14b_130b", 256), ("stdmoe_1b14b", 512),
    ("stdmoe_1b14b_130b", 512), ("stdmoe_1b4b", 512), ("tiny", 0)])
def test_configs_take_the_release_load_balancing_scope(name, scope):
  """4 sequences per GPU x (16 nodes x 8 GPUs), or 8 nodes for the 130B EMO run; the release's
  1,024-row batch splits into whole groups."""
  config = load_config(ROOT / f"configs/{name}.py")
  assert model_config_from(config).lb_scope_sequences == scope
  assert not scope or config.data.batch_size % scope == 0


def test_release_parameter_counts():
  counts = count_params(model_config_from(load_config(ROOT / "configs/emo_1b14b.py")))
  assert abs(counts["total_params"] - 13.6e9) / 13.6e9 < 0.01
  assert abs(counts["active_params"] - 1.5e9) / 1.5e9 < 0.02
  dense = count_params(model_config_from(load_config(ROOT / "configs/dense_1b.py")))
  assert dense["total_params"] == dense["active_params"]
  small = count_params(model_config_from(load_config(ROOT / "configs/stdmoe_1b4b.py")))
  assert 3.5e9 < small["total_params"] < 4.5e9  # "1b4b"


@pytest.mark.slow
@pytest.mark.integration
def test_describe_command():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.describe", "--config", "configs/emo_1b14b.py",
       "--json"],
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


@pytest.mark.slow
@pytest.mark.integration
def test_unknown_override_key_is_one_line_naming_the_close_match():
  unknown = subprocess.run(
      [sys.executable, "-m", "experiments.describe", "--config", "configs/tiny.py",
       "--config.model.topk=2"], cwd=ROOT, capture_output=True, text=True)
  assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
  assert unknown.stderr.strip().splitlines()[-1] == (
      "error: unknown config key config.model.topk; did you mean config.model.top_k?")
  moved = subprocess.run(
      [sys.executable, "-m", "experiments.describe", "--config", "configs/tiny.py",
       "--config.model.expert_backend=ragged"], cwd=ROOT, capture_output=True, text=True)
  assert moved.stderr.strip().splitlines()[-1] == ("error: unknown config key "
                                                   "config.model.expert_backend; did you mean "
                                                   "config.execution.expert_backend?")


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_head_chunk_tokens_is_refused_naming_the_field(value):
  with pytest.raises(ConfigError, match="head_chunk_tokens"):
    ExecutionConfig(head_chunk_tokens=value)
