"""Hugging Face conversion, checked against PyTorch implementations nobody here wrote.

Tiny random models, no downloads: JAX logits against transformers' Qwen2MoeForCausalLM and our
modeling_emo.py on the two export layouts, greedy decoding, bit-exact round trips, an OLMoE
built by transformers, tokenizers through AutoTokenizer, and the errors bad input must raise.
Models and exports are built once per module.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorstore  # noqa: E402
from flax import nnx  # noqa: E402

from emo_jax.config import ModelConfig  # noqa: E402
from emo_jax.convert import hf, orbax_io, safetensors_io, tokenizer_hf  # noqa: E402
from emo_jax.convert.layouts import EXPORT_LAYOUTS, LAYOUTS, model_config_from_hf  # noqa: E402
from emo_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from emo_jax.model.execution import ExecutionConfig  # noqa: E402
from emo_jax.model.transformer import Transformer  # noqa: E402
from emo_jax.train import checkpoint as ckpt_lib  # noqa: E402
from emo_jax.train import trainer as train_lib  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOE = dict(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           num_experts=7, num_shared_experts=1, top_k=2, expert_hidden=16, pool_min=2,
           pool_max=7, max_segments=4, max_seq_len=64, compute_dtype="float32",
           init_std=0.1)
RUN = ExecutionConfig(expert_backend="dense", remat=False)
TOKENS = np.random.RandomState(1).randint(2, 258, size=(2, 16))


def random_params(cfg, seed=0):
  """Random parameters (numpy, no JAX init): norm weights around 1, the rest N(0, 0.1^2).

  Every norm weight differs from 1, so a norm mapped to the wrong place shows in the logits.
  """
  rng = np.random.RandomState(seed)
  params = {}
  for path, (shape, dtype) in hf.param_specs(cfg).items():
    value = (1 + 0.3 * rng.randn(*shape)) if "norm" in ".".join(path) else 0.1 * rng.randn(*shape)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.astype(dtype)
  return params


@functools.lru_cache
def _compiled_forward(cfg):
  """(graphdef, jitted forward) per config, so models of one config compile once."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), execution=RUN)))
  return graphdef, jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])


def jax_forward(cfg, params):
  graphdef, forward = _compiled_forward(cfg)
  _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), execution=RUN)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return lambda tokens: np.asarray(forward(state, jnp.asarray(tokens)))


def load_torch(directory, **kwargs):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, output_loading_info=True, **kwargs)
  assert not any(info.values()), f"loading {directory} reported {info}"
  return model.eval()


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def tensors_of(directory):
  reader = safetensors_io.ShardedReader(directory)
  return {k: reader.get(k) for k in reader.keys()}


def assert_bit_identical(a, b):
  ta, tb = tensors_of(a), tensors_of(b)
  assert sorted(ta) == sorted(tb)
  for name in ta:
    assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
    assert ta[name].tobytes() == tb[name].tobytes(), name


def write_hf(directory, tensors, config):
  """A Hugging Face folder from tensors and a config (for crafting bad input)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True)
  plan = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  writer = safetensors_io.ShardedWriter(directory, plan, max_shard_bytes=40_000)
  for k, v in tensors.items():
    writer.write(k, v)
  writer.close()
  (directory / "config.json").write_text(json.dumps(config))
  return directory


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
  """A random MoE as a parameter checkpoint, its JAX forward, and both exports + models."""
  root = tmp_path_factory.mktemp("moe")
  cfg = ModelConfig(**MOE)
  params = random_params(cfg)
  ckpt_lib.save_params(root / "ckpt", params, cfg.to_dict())
  exports = {layout: hf.export_hf(root / "ckpt", root / layout, layout=layout, tokenizer="bytes",
                                  max_shard_bytes=60_000)
             for layout in hf.EXPORT_LAYOUTS}
  models = {"emo": load_torch(root / "emo", trust_remote_code=True),
            "qwen2_moe": load_torch(root / "qwen2_moe")}
  return dict(root=root, cfg=cfg, params=params, exports=exports, models=models,
              forward=jax_forward(cfg, params))


# ---- parity with PyTorch ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", hf.EXPORT_LAYOUTS)
def test_export_logits_match_jax(moe, layout):
  model = moe["models"][layout]
  want = {"emo": "EmoForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[layout]
  assert type(model).__name__ == want
  if layout == "qwen2_moe":
    assert type(model).__module__.startswith("transformers.models.qwen2_moe")
  expected = moe["forward"](TOKENS)
  got = torch_logits(model, TOKENS)
  assert np.abs(expected).max() > 1.0  # logits large enough for the tolerance to mean something
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_export_has_release_names_and_keys(moe):
  directory = moe["root"] / "emo"
  config = json.loads((directory / "config.json").read_text())
  assert config["model_type"] == "emo" and config["architectures"] == ["EmoForCausalLM"]
  assert config["num_experts"] == 7 and config["num_experts_per_tok"] == 3
  assert config["num_shared_experts"] == 1 and config["norm_topk_prob"] is False
  assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_emo.EmoForCausalLM"
  names = safetensors_io.ShardedReader(directory).keys()
  assert "model.layers.1.pre_feedforward_layernorm.weight" in names
  assert "model.layers.0.mlp.experts.6.down_proj.weight" in names
  assert safetensors_io.ShardedReader(directory).shape("model.layers.0.mlp.gate.weight") == (7, 32)
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1  # several shards
  generation = json.loads((directory / "generation_config.json").read_text())
  assert generation["eos_token_id"] == 1 and generation["pad_token_id"] == 0


def test_release_config_keys_load(moe, tmp_path):
  """A config.json with every key the release's EmoConfig writes (shrunk to this model)."""
  cfg = moe["cfg"]
  release = {
      "architectures": ["EmoForCausalLM"], "model_type": "emo",
      "auto_map": {"AutoConfig": "configuration_emo.EmoConfig",
                   "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"},
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": 16,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "max_position_embeddings": 4096, "hidden_act": "silu", "attention_bias": False,
      "attention_dropout": 0.0, "rope_theta": 500000, "rope_scaling": None, "rms_norm_eps": 1e-6,
      "tie_word_embeddings": False, "num_experts": 7, "num_experts_per_tok": 3,
      "num_shared_experts": 1, "norm_topk_prob": False, "router_aux_loss_coef": 0.01,
      "output_router_logits": False, "initializer_range": 0.02, "use_cache": True,
      "eos_token_id": 1, "pad_token_id": 0, "bos_token_id": None, "torch_dtype": "float32",
      "transformers_version": "4.57.1", "num_experts_per_layer": [7, 7],
      "num_shared_experts_per_layer": None, "always_active_experts": None,
      "always_active_experts_per_layer": None, "dense_intermediate_size": None,
      "dense_mlp_bias": False, "ghost_extend_eval": False, "ghost_extend_coeff_mode": "usage",
      "ghost_extend_random_k": 8}
  source = write_hf(tmp_path / "release", hf.to_hf_tensors(moe["params"], cfg, "emo"), release)
  for name in hf.LAYOUTS["emo"].remote_code:
    shutil.copyfile(moe["root"] / "emo" / name, source / name)
  model = load_torch(source, trust_remote_code=True)
  np.testing.assert_allclose(torch_logits(model, TOKENS), moe["forward"](TOKENS), atol=1e-4,
                             rtol=0)
  summary = hf.import_hf(source, tmp_path / "jax")
  assert summary["config"]["rope_theta"] == 500000 and summary["config"]["pool"]
  params, _ = ckpt_lib.load_params(tmp_path / "jax")
  jax.tree.map(np.testing.assert_array_equal, params, moe["params"])


TRANSFORMERS = f"transformers {transformers.__version__}"  # named in every generation failure


def hf_greedy(model, prompt_ids, steps, *, attention_mask=None, use_cache=True):
  with torch.no_grad():
    out = model.generate(torch.tensor(prompt_ids), attention_mask=attention_mask,
                         max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, use_cache=use_cache)
  return out.tolist()


def test_greedy_tokens_match(moe):
  prompt, steps = TOKENS[:1, :5], 20
  forward = moe["forward"]
  tokens = np.zeros((1, prompt.shape[1] + steps), np.int64)
  tokens[:, :prompt.shape[1]] = prompt
  for n in range(prompt.shape[1], tokens.shape[1]):  # fixed shape: one compile, causal model
    tokens[0, n] = forward(tokens)[0, n - 1].argmax()
  for layout, model in moe["models"].items():
    assert hf_greedy(model, prompt, steps)[0] == tokens[0].tolist(), f"{layout}, {TRANSFORMERS}"


@pytest.mark.parametrize("layout", hf.EXPORT_LAYOUTS)
def test_generate_with_and_without_cache_batched_left_padded(moe, layout):
  """The KV cache changes nothing, and a left-padded row decodes as it would alone."""
  model, steps = moe["models"][layout], 12
  prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :3].tolist()]
  width = max(map(len, prompts))
  ids = np.array([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  cached = hf_greedy(model, ids, steps, attention_mask=mask)
  uncached = hf_greedy(model, ids, steps, attention_mask=mask, use_cache=False)
  assert cached == uncached, f"{layout}: the KV cache changes greedy tokens under {TRANSFORMERS}"
  for row, prompt in enumerate(prompts):
    alone = hf_greedy(model, [prompt], steps)[0]
    assert cached[row][width - len(prompt):] == alone, f"{layout} row {row}, {TRANSFORMERS}"


def test_emo_cache_is_returned_under_the_installed_name(moe):
  """forward hands the cache back where `generate` looks for it, under either input name."""
  model = moe["models"]["emo"]
  with torch.no_grad():
    first = model(torch.tensor(TOKENS[:1, :4]), use_cache=True)
  name = "cache" if "cache" in first.keys() else "past_key_values"
  cache = first[name]
  assert cache is not None and cache.get_seq_length() == 4, TRANSFORMERS
  with torch.no_grad():
    step = model(torch.tensor(TOKENS[:1, 4:5]), use_cache=True, **{name: cache})
    full = model(torch.tensor(TOKENS[:1, :5]), use_cache=False)
  np.testing.assert_allclose(step.logits[0, -1].numpy(), full.logits[0, -1].numpy(), atol=1e-5,
                             err_msg=TRANSFORMERS)
  with pytest.raises(ValueError, match="not both"):
    model(torch.tensor(TOKENS[:1, :2]), cache=cache, past_key_values=cache)


# ---- round trips ------------------------------------------------------------------------------
def test_import_restores_the_exact_parameters(moe, tmp_path):
  out = tmp_path / "imported"
  summary = hf.import_hf(moe["root"] / "emo", out)
  params, config = ckpt_lib.load_params(out)
  assert ModelConfig.from_dict(config) == moe["cfg"]
  jax.tree.map(np.testing.assert_array_equal, params, moe["params"])
  # Orbax's own reader and the trainer's init_from accept it.
  restored = ocp.StandardCheckpointer().restore(out / "params")
  np.testing.assert_array_equal(restored["embed"], moe["params"]["embed"])
  like = jax.tree.map(jnp.asarray, moe["params"])
  train_lib.initial_params(str(out), moe["cfg"], like)
  assert summary["tokenizer"] and (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_document_attention_travels_in_emo_jax_config(layout):
  """Hugging Face configs carry no document attention (their models see one sequence per row,
  where both choices compute the same): emo_jax_config.json beside an export carries it back,
  and a checkpoint without one imports with the EMO default."""
  cfg = ModelConfig(**MOE).replace(pool=False, document_attention=False)
  config = LAYOUTS[layout].to_hf_config(cfg)
  assert model_config_from_hf(config, base=cfg.to_dict())[0].document_attention is False
  assert model_config_from_hf(config)[0].document_attention is True


@pytest.mark.parametrize("layout,dtype", [("emo", "bfloat16"), ("qwen2_moe", "float32"),
                                          ("qwen2_moe", "bfloat16")])
def test_hf_jax_hf_round_trip_is_bit_identical(moe, tmp_path, layout, dtype):
  first = tmp_path / "first"
  hf.export_hf(moe["root"] / "ckpt", first, layout=layout, dtype=dtype, tokenizer="bytes")
  hf.import_hf(first, tmp_path / "jax")
  hf.export_hf(tmp_path / "jax", tmp_path / "second", layout=layout, dtype=dtype)
  assert_bit_identical(first, tmp_path / "second")
  for name in ("config.json", "tokenizer.json", "generation_config.json"):
    assert (first / name).read_text() == (tmp_path / "second" / name).read_text()


def test_training_workdir_exports_the_requested_step(moe, tmp_path):
  cfg, params = moe["cfg"], moe["params"]
  later = jax.tree.map(lambda x: x + 1, params)
  manager = ocp.CheckpointManager(tmp_path / "w" / "checkpoints", item_handlers={
      "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
  run = {"model": cfg.to_dict(), "data": {"corpus": "synthetic", "tokenizer": "bytes"}}
  for step, p in ((10, params), (20, later)):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.int32(step), "params": p}),
        config=ocp.args.JsonSave(run)))
  manager.wait_until_finished()
  manager.close()
  newest = hf.export_hf(tmp_path / "w", tmp_path / "newest", layout="qwen2_moe")
  hf.export_hf(tmp_path / "w", tmp_path / "step10", layout="qwen2_moe", step=10)
  assert newest["step"] == 20 and newest["tokenizer"]["kind"] == "bytes"
  assert_bit_identical(tmp_path / "step10", moe["root"] / "qwen2_moe")
  embed = safetensors_io.ShardedReader(tmp_path / "newest").get("model.embed_tokens.weight")
  np.testing.assert_array_equal(embed, later["embed"])


def test_small_chunks_stream_both_ways(moe, tmp_path, monkeypatch):
  """Several stored chunks per layer slice: chunk-row writes and reads reassemble exactly."""
  monkeypatch.setattr(orbax_io, "CHUNK_BYTES", 1000)
  hf.import_hf(moe["root"] / "emo", tmp_path / "jax")
  spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/jax/params/",
                                        "path": "blocks.mlp.w_gate/"}}
  chunk = tensorstore.open(spec).result().chunk_layout.read_chunk.shape
  assert chunk[0] == 1 and chunk[1] < moe["cfg"].num_experts
  params, _ = ckpt_lib.load_params(tmp_path / "jax")
  jax.tree.map(np.testing.assert_array_equal, params, moe["params"])
  hf.export_hf(tmp_path / "jax", tmp_path / "again", layout="emo", max_shard_bytes=60_000)
  assert_bit_identical(tmp_path / "again", moe["root"] / "emo")


def test_fused_qwen2_moe_experts_import(moe, tmp_path):
  """transformers 5 keeps Qwen2-MoE experts fused; a state_dict saved as is imports too."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  state = moe["models"]["qwen2_moe"].state_dict()
  assert "model.layers.0.mlp.experts.gate_up_proj" in state
  source = tmp_path / "fused"
  source.mkdir()
  shutil.copyfile(moe["root"] / "qwen2_moe" / "config.json", source / "config.json")
  save_file({k: v.contiguous() for k, v in state.items()}, str(source / "model.safetensors"),
            metadata={"format": "pt"})
  assert hf.import_hf(source, tmp_path / "jax")["fused_experts"]
  params, _ = ckpt_lib.load_params(tmp_path / "jax")
  for name in ("w_gate", "w_up", "w_down"):
    np.testing.assert_array_equal(params["blocks"]["mlp"][name],
                                  moe["params"]["blocks"]["mlp"][name])


def test_dolma2_vocabulary_rows(tmp_path):
  """The release pads 100,278 ids to 100,352 rows; either row count imports."""
  cfg = ModelConfig(**{**MOE, "vocab_size": 100_352, "d_model": 8, "head_dim": 2})
  tensors = hf.to_hf_tensors(random_params(cfg), cfg, "emo")
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    tensors[name] = tensors[name][:100_278]
  config = hf.hf_config(cfg, "emo", token_ids={"eos_token_id": 100257, "pad_token_id": 100277})
  write_hf(tmp_path / "hf", tensors, config)
  summary = hf.import_hf(tmp_path / "hf", tmp_path / "jax")
  assert summary["config"]["vocab_size"] == 100_278
  params, _ = ckpt_lib.load_params(tmp_path / "jax")
  np.testing.assert_array_equal(params["embed"], tensors["model.embed_tokens.weight"])


# ---- OLMoE ------------------------------------------------------------------------------------
def test_olmoe_imports_and_matches_its_logits(tmp_path):
  torch.manual_seed(0)
  config = transformers.OlmoeConfig(
      vocab_size=120, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
      max_position_embeddings=64, initializer_range=0.1, pad_token_id=0, eos_token_id=1,
      bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
  model = transformers.OlmoeForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.mul_(1 + 0.3 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "olmoe")
  # transformers 5 fuses experts in memory; a raw state_dict has the fused names.
  fused = tmp_path / "fused"
  fused.mkdir()
  shutil.copyfile(tmp_path / "olmoe" / "config.json", fused / "config.json")
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(fused / "model.safetensors"), metadata={"format": "pt"})
  tokens = TOKENS % 120
  expected = torch_logits(model, tokens)
  assert np.abs(expected).max() > 1.0
  for source in (tmp_path / "olmoe", fused):
    summary = hf.import_hf(source, tmp_path / f"jax_{source.name}")
    assert summary["layout"] == "olmoe" and summary["fused_experts"] == (source == fused)
    params, config_dict = ckpt_lib.load_params(tmp_path / f"jax_{source.name}")
    cfg = ModelConfig.from_dict(config_dict).replace(compute_dtype="float32")
    assert cfg.qk_norm and cfg.num_shared_experts == 0 and not cfg.pool
    np.testing.assert_allclose(jax_forward(cfg, params)(tokens), expected, atol=1e-4, rtol=0)


# ---- variants: dense, tied embeddings, head_dim != d_model / heads ------------------------------
def test_dense_tied_model_exports_both_layouts(tmp_path):
  cfg = ModelConfig(**{**MOE, "num_experts": 0, "mlp_hidden": 48, "tie_embeddings": True,
                       "head_dim": 16})
  params = random_params(cfg, seed=3)
  ckpt_lib.save_params(tmp_path / "ckpt", params, cfg.to_dict())
  expected = jax_forward(cfg, params)(TOKENS)
  assert np.abs(expected).max() > 1.0
  for layout in hf.EXPORT_LAYOUTS:
    hf.export_hf(tmp_path / "ckpt", tmp_path / layout, layout=layout, tokenizer="none")
    assert "lm_head.weight" not in safetensors_io.ShardedReader(tmp_path / layout).keys()
    model = load_torch(tmp_path / layout, trust_remote_code=bool(hf.LAYOUTS[layout].remote_code))
    np.testing.assert_allclose(torch_logits(model, TOKENS), expected, atol=1e-4, rtol=0)
    hf.import_hf(tmp_path / layout, tmp_path / f"back_{layout}")
    back, _ = ckpt_lib.load_params(tmp_path / f"back_{layout}")
    jax.tree.map(np.testing.assert_array_equal, back, params)


# ---- tokenizers -------------------------------------------------------------------------------
TEXTS = [*tokenizer_hf.SAMPLE_TEXTS, "", "x", "\n\n\tindented\n", "1/2 + 3.5e-7 = ?"]


@pytest.mark.parametrize("trust", [True, False])
def test_emo_export_tokenizer_needs_no_custom_code(moe, trust):
  """The tokenizer files name a stock class; only config.json points at our modeling code."""
  directory = moe["root"] / "emo"
  assert "auto_map" not in json.loads((directory / "tokenizer_config.json").read_text())
  tok = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=trust)
  assert tok("hi")["input_ids"] == tokenizer_lib.ByteTokenizer().encode("hi")


def test_byte_tokenizer_loads_in_auto_tokenizer(moe):
  tok = transformers.AutoTokenizer.from_pretrained(moe["root"] / "qwen2_moe")
  ours = tokenizer_lib.ByteTokenizer()
  assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (1, 0, None)
  for text in TEXTS:
    ids = tok(text)["input_ids"]
    assert ids == ours.encode(text), text
    assert tok.decode(ids) == ours.decode(ids)


def test_sentencepiece_tokenizer_round_trips(tmp_path):
  corpus = [(ROOT / "README.md").read_text(),
            (ROOT / "emo_jax" / "model" / "transformer.py").read_text(),
            "Ünïcödé 中文 русский 😀 " * 20]
  sp = tokenizer_lib.train_sentencepiece(corpus, tmp_path / "sp", vocab_size=600)
  info = tokenizer_hf.write_tokenizer(sp.path, tmp_path, model_max_length=64,
                                      check_texts=corpus)
  assert info["texts_encoded_differently"] == 0 and info["checked_texts"] == len(
      tokenizer_hf.SAMPLE_TEXTS) + len(corpus)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert (tok.eos_token_id, tok.pad_token_id) == (sp.eos_id, sp.pad_id)
  for text in TEXTS + corpus:
    ids = tok(text)["input_ids"]
    assert ids == sp.encode(text), text[:40]
    assert tok.decode(ids) == sp.decode(ids)


def test_unigram_sentencepiece_is_refused(tmp_path):
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50 + ["abc def"] * 50),
                                 model_prefix=str(tmp_path / "uni"), vocab_size=16,
                                 model_type="unigram", minloglevel=2, pad_id=0,
                                 unk_id=1, eos_id=2, bos_id=-1)
  with pytest.raises(tokenizer_hf.TokenizerExportError, match="UNIGRAM"):
    tokenizer_hf.write_tokenizer(str(tmp_path / "uni.model"), tmp_path, model_max_length=8)


# ---- bad input ----------------------------------------------------------------------------------
def bad_copy(moe, tmp_path, layout="emo"):
  target = tmp_path / "bad"
  shutil.copytree(moe["root"] / layout, target)
  return target


def assert_nothing_written(tmp_path, out):
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_missing_shard_is_named(moe, tmp_path):
  source = bad_copy(moe, tmp_path)
  shard = sorted(source.glob("model-*.safetensors"))[1]
  shard.unlink()
  out = tmp_path / "out"
  with pytest.raises(safetensors_io.SafetensorsError, match=f"shard {shard.name} is missing"):
    hf.import_hf(source, out)
  assert_nothing_written(tmp_path, out)


def test_wrong_shape_is_named(moe, tmp_path):
  tensors = tensors_of(moe["root"] / "emo")
  name = "model.layers.1.self_attn.k_proj.weight"
  tensors[name] = tensors[name][:8]
  source = write_hf(tmp_path / "bad", tensors,
                    json.loads((moe["root"] / "emo" / "config.json").read_text()))
  out = tmp_path / "out"
  with pytest.raises(hf.ConversionError, match=name.replace(".", r"\.") + r".*\(8, 32\)"):
    hf.import_hf(source, out)
  assert_nothing_written(tmp_path, out)


def test_unknown_model_type_is_named(moe, tmp_path):
  source = bad_copy(moe, tmp_path)
  config = json.loads((source / "config.json").read_text())
  (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
  out = tmp_path / "out"
  with pytest.raises(hf.ConversionError, match="unknown model_type 'llama'"):
    hf.import_hf(source, out)
  assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("key,value,match", [
    ("num_hidden_layers", 1, r"not part of the model.*model\.layers\.1\."),
    ("num_experts", 9, r"'model\.layers\.0\.mlp\.gate\.weight' has shape \(7, 32\).*\(9, 32\)"),
    ("num_experts", 5, r"'model\.layers\.0\.mlp\.gate\.weight' has shape \(7, 32\).*\(5, 32\)"),
    ("intermediate_size", 8, r"experts\.0\.gate_proj\.weight' has shape \(16, 32\)"),
    ("num_experts_per_layer", [7, 3], "num_experts_per_layer"),
    ("norm_topk_prob", True, "norm_topk_prob"),
])
def test_config_disagreeing_with_weights_is_named(moe, tmp_path, key, value, match):
  source = bad_copy(moe, tmp_path)
  config = json.loads((source / "config.json").read_text())
  (source / "config.json").write_text(json.dumps({**config, key: value}))
  out = tmp_path / "out"
  with pytest.raises(hf.ConversionError, match=match):
    hf.import_hf(source, out)
  assert_nothing_written(tmp_path, out)


def test_failure_midway_leaves_nothing(moe, tmp_path):
  """A Qwen2-MoE tensor that emo_jax cannot express fails after writing has begun."""
  tensors = tensors_of(moe["root"] / "qwen2_moe")
  tensors["model.layers.1.self_attn.v_proj.bias"] = np.ones(16, np.float32)
  source = write_hf(tmp_path / "bad", tensors,
                    json.loads((moe["root"] / "qwen2_moe" / "config.json").read_text()))
  out = tmp_path / "out"
  with pytest.raises(hf.ConversionError, match=r"v_proj\.bias' is not all zeros"):
    hf.import_hf(source, out)
  assert_nothing_written(tmp_path, out)


def test_export_refuses_a_used_out_and_an_impossible_layout(moe, tmp_path):
  with pytest.raises(FileExistsError):
    hf.export_hf(moe["root"] / "ckpt", moe["root"] / "emo", tokenizer="bytes")
  cfg = moe["cfg"].replace(qk_norm=True)
  with pytest.raises(hf.ConversionError, match="QK-norm"):
    hf.hf_config(cfg, "qwen2_moe")
  with pytest.raises(FileNotFoundError):
    hf.export_hf(tmp_path / "nowhere", tmp_path / "out", tokenizer="bytes")
  with pytest.raises(hf.ConversionError, match="olmoe layout is import only.*emo, qwen2_moe$"):
    hf.export_hf(moe["root"] / "ckpt", tmp_path / "olmoe", layout="olmoe", tokenizer="bytes")
  assert not (tmp_path / "olmoe").exists()


def test_unknown_layout_names_the_registered_ones():
  cfg = ModelConfig(**MOE)
  for call in (lambda: hf.tensor_groups(cfg, "llama"), lambda: hf.hf_config(cfg, "llama")):
    with pytest.raises(hf.ConversionError) as raised:
      call()
    message = str(raised.value)
    assert "\n" not in message and "unknown layout 'llama'" in message
    assert all(name in message for name in ("emo", "qwen2_moe", "olmoe")), message


@pytest.mark.slow
@pytest.mark.integration
def test_command_line(moe, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ok = subprocess.run([sys.executable, "-m", "experiments.convert", "--from_hf",
                       str(moe["root"] / "qwen2_moe"), "--out", str(tmp_path / "jax"),
                       "--set", "pool=false"], cwd=ROOT, env=env, capture_output=True,
                      text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)["config"]["pool"] is False
  bad = subprocess.run([sys.executable, "-m", "experiments.convert", "--from_hf",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "x")], cwd=ROOT,
                       env=env, capture_output=True, text=True, check=False)
  assert bad.returncode == 1 and "config.json" in bad.stderr


def test_qwen2_moe_shared_gate_is_nonzero_for_llama_cpp(moe, tmp_path):
  """The exported shared_expert_gate is 2^-24 everywhere (llama.cpp's silu(x)/x gate is NaN at
  an exactly-zero gate); transformers' logits differ from the exactly-zero gate's by <= 1e-6,
  a zero-gate folder (older exports) still imports to the same parameters, other gates are
  refused."""
  tensors = tensors_of(moe["root"] / "qwen2_moe")
  gates = [n for n in tensors if n.endswith("mlp.shared_expert_gate.weight")]
  assert len(gates) == moe["cfg"].num_layers
  for name in gates:
    assert np.all(tensors[name] == np.float32(2.0 ** -24)), name
  config = json.loads((moe["root"] / "qwen2_moe" / "config.json").read_text())
  zero = write_hf(tmp_path / "zero_gate", {**tensors, **{n: np.zeros_like(tensors[n])
                                                          for n in gates}}, config)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (moe["root"] / "qwen2_moe" / name).is_file():
      shutil.copyfile(moe["root"] / "qwen2_moe" / name, zero / name)
  exact = torch_logits(load_torch(zero), TOKENS)
  assert np.abs(torch_logits(moe["models"]["qwen2_moe"], TOKENS) - exact).max() <= 1e-6
  hf.import_hf(zero, tmp_path / "imported_zero")
  hf.import_hf(moe["root"] / "qwen2_moe", tmp_path / "imported")
  jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_params(tmp_path / "imported_zero")[0],
               ckpt_lib.load_params(tmp_path / "imported")[0])
  half = write_hf(tmp_path / "half_gate", {**tensors, gates[0]: np.full_like(
      tensors[gates[0]], 0.5)}, config)
  with pytest.raises(hf.ConversionError, match="shared_expert_gate.weight' is not a constant"):
    hf.import_hf(half, tmp_path / "refused")
