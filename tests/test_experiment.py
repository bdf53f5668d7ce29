"""The typed Experiment: parsed once from a config, every problem one ConfigError, and config
files written against the flat package layout still load."""

import importlib.util
import pathlib
import subprocess
import sys
import warnings

import pytest

from configs import demo, tiny
from emo_jax import moved_modules
from emo_jax.config import ConfigError, ModelConfig
from emo_jax.data.corpus import DataConfig
from emo_jax.model.execution import ExecutionConfig
from emo_jax.model.sharding import MeshConfig
from emo_jax.train import TrainConfig
from emo_jax.train.experiment import Experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[a-z]*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_parses_and_round_trips(path):
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  experiment = Experiment.from_config(module.get_config())
  assert experiment.name and isinstance(experiment.model, ModelConfig)
  assert Experiment.from_config(experiment.to_config_dict()) == experiment
  assert Experiment.from_config(experiment.to_dict()) == experiment
  assert Experiment.from_config(experiment) is experiment


def test_sections_are_typed_and_overrides_apply():
  config = tiny.get_config()
  config.model.top_k = 1
  config.execution.expert_backend = "ragged"
  e = Experiment.from_config(config)
  assert (e.model.top_k, e.execution.expert_backend) == (1, "ragged")
  assert isinstance(e.data, DataConfig) and isinstance(e.train, TrainConfig)
  assert isinstance(e.mesh, MeshConfig) and isinstance(e.execution, ExecutionConfig)
  assert e.replace(train=e.train.replace(steps=7)).train.steps == 7


def test_execution_and_mesh_default_when_a_config_leaves_them_out():
  config = tiny.get_config()
  del config["execution"], config["mesh"]
  e = Experiment.from_config(config)
  assert e.execution == ExecutionConfig() and e.mesh == MeshConfig()


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update({"modle": {}}), r"unknown config section 'modle' \(did you mean 'model'\?\)"),
    (lambda c: c.__delitem__("train"), r"no 'train' section"),
    (lambda c: c.model.update({"expert_backend": "ragged"}),
     r"model\.expert_backend is a run setting.*--config\.execution\.expert_backend"),
    (lambda c: c.model.update({"topk": 2}), r"topk.*top_k"),
    (lambda c: c.data.update({"seq_len": 1000}), r"data\.seq_len=1000 exceeds model\.max_seq_len=128"),
    (lambda c: c.train.update({"grad_accum_steps": 3}),
     r"data\.batch_size=8 must be a multiple of train\.grad_accum_steps=3"),
    (lambda c: c.model.update({"lb_scope_sequences": 3}),
     r"data\.batch_size=8 is not a multiple of model\.lb_scope_sequences=3.*make "
     r"data\.batch_size a multiple of 3"),
    (lambda c: (c.model.update({"lb_scope_sequences": 8}), c.train.update({"grad_accum_steps": 2})),
     r"data\.batch_size=8 / train\.grad_accum_steps=2 = 4 sequences per micro-batch is not a "
     r"multiple of model\.lb_scope_sequences=8"),
])
def test_every_problem_is_one_config_error_naming_the_field(change, message):
  config = tiny.get_config()
  change(config)
  with pytest.raises(ConfigError, match=message):
    Experiment.from_config(config)


def test_a_section_of_the_wrong_type_is_refused():
  e = Experiment.from_config(demo.get_config())
  with pytest.raises(ConfigError, match="Experiment.train must be a TrainConfig"):
    Experiment(model=e.model, data=e.data, train=e.train.to_dict())


def test_a_config_file_written_against_the_flat_layout_still_loads():
  """tests/data/flat_layout_config.py imports emo_jax.execution, emo_jax.sharding and
  emo_jax.train.TrainConfig, as configs did before the wings; it loads, warns with the new
  path, and describes the same experiment as configs/tiny.py."""
  path = ROOT / "tests" / "data" / "flat_layout_config.py"
  assert "from emo_jax.execution import" in path.read_text()  # really an old one
  for name in ("emo_jax.execution", "emo_jax.sharding"):
    sys.modules.pop(name, None)
  spec = importlib.util.spec_from_file_location("_flat_layout_config", path)
  module = importlib.util.module_from_spec(spec)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    spec.loader.exec_module(module)
  moved = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
  assert any("emo_jax.execution moved to emo_jax.model.execution" in m for m in moved), moved
  assert Experiment.from_config(module.get_config()) == Experiment.from_config(tiny.get_config())


def test_an_old_module_path_is_the_same_module_object():
  from emo_jax.model import execution  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    old = importlib.import_module("emo_jax.execution")
    old_app = importlib.import_module("emo_jax.serve.protocol")
  assert old is execution and old.ExecutionConfig is ExecutionConfig
  assert old.__spec__.name == "emo_jax.model.execution"  # the alias leaves the module's own spec
  assert old_app.__name__ == "emo_jax.inference.serve.protocol"
  for name, place in moved_modules.MOVED.items():
    assert importlib.util.find_spec(f"emo_jax.{place}") is not None, (name, place)
  assert importlib.util.find_spec("emo_jax.no_such_module") is None


def test_importing_emo_jax_starts_no_library_and_exports_load_on_use():
  code = ("import sys, emo_jax; print('jax' in sys.modules); "
          "print(emo_jax.Experiment.__module__, emo_jax.load_model.__module__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  assert out == ["False", "emo_jax.train.experiment", "emo_jax.convert.loading"]
