"""The serving engine and expert bank without HTTP: per-row subsets, memory, equivalences."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax.train import checkpoint as ckpt_lib
from emo_jax.inference import generate
from emo_jax.study import selective
from emo_jax.config import ModelConfig
from emo_jax.data.tokenizer import ByteTokenizer
from emo_jax.inference.serve import bank as bank_lib
from emo_jax.inference.serve import engine as engine_lib
from emo_jax.convert import loading
from tests.random_model import random_params

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                  head_dim=16, num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=16,
                  mlp_hidden=64, max_segments=4, max_seq_len=64, compute_dtype="float32",
                  pool=False, init_std=0.3)
TOK = ByteTokenizer()
# Routed experts per layer of three subsets (7 routed experts per layer).
SUBSETS = {"a": ((0, 1, 2), (3, 4, 5)), "b": ((4, 5), (0, 6)), "c": ((2, 6), (2, 5))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("serve_ckpt")
  _, params = random_params(CFG, seed=3)
  ckpt_lib.save_params(path, params, CFG.to_dict())
  return path, params


@pytest.fixture(scope="module")
def engine(checkpoint):
  """Two decode slots over subsets a, b, c (not "all": the bank stays compact)."""
  bank = bank_lib.ExpertBank(checkpoint[0])
  subsets = {n: bank_lib.Subset(n, k, "explicit") for n, k in SUBSETS.items()}
  bank.commit(bank.prepare(subsets), subsets)
  eng = engine_lib.Engine(bank, TOK, slots=3, max_queue=8, shift_every=16).start()
  yield eng
  eng.stop()


def mask(name):
  return bank_lib.Subset(name, SUBSETS[name], "explicit").mask(CFG.num_routed_experts)


@pytest.mark.slow
def test_per_row_routing_mask_equals_each_row_alone():
  _, params = random_params(CFG, seed=1)
  model = nnx.merge(*loading.build_model(CFG, params))  # dropless: rows are independent
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, 258, (3, 12)), jnp.int32)
  masks = np.stack([mask("a"), mask("b"), mask("c")])
  batched, _ = model(tokens, keep_experts=jnp.asarray(masks))
  for row in range(3):
    alone, _ = model(tokens[row:row + 1], keep_experts=jnp.asarray(masks[row]))
    np.testing.assert_allclose(batched[row], alone[0], rtol=1e-5, atol=1e-5)
  # Different subsets really route differently (the test could fail).
  assert not np.allclose(batched[0], batched[1], atol=1e-3)
  with pytest.raises(ValueError, match="keep_experts must be"):
    model(tokens, keep_experts=jnp.asarray(masks[:2]))


def test_bank_holds_only_the_union_and_the_right_rows(engine, checkpoint):
  bank = engine.bank
  union = [sorted(set().union(*(SUBSETS[n][layer] for n in SUBSETS))) for layer in range(2)]
  assert bank.slots == union
  assert bank.resident_expert_bytes() == sum(len(u) + 1 for u in union) * bank.expert_bytes
  assert bank.resident_expert_bytes() < bank.full_expert_bytes()
  params = checkpoint[1]["blocks"]["mlp"]
  for name in bank_lib.EXPERT_WEIGHTS:
    for layer, ids in enumerate(union):
      np.testing.assert_array_equal(np.asarray(bank.bank[name][layer, :len(ids)]),
                                    params[name][layer, ids])
      np.testing.assert_array_equal(np.asarray(bank.bank[name][layer, -1]), params[name][layer, -1])


@pytest.mark.slow
def test_subset_equals_generate_on_the_physically_pruned_model(engine, checkpoint):
  prompt = TOK.encode("The patient was")
  for name in ("a",):  # "b" and "c" decode batched against "a" in the mixed test
    kept = np.asarray(SUBSETS[name])
    selection = selective.Selection(keep=kept.shape[1] + 1, kept_routed=kept,
                                    scores=np.zeros((2, 7)), num_routed=7, num_shared=1,
                                    greedy=True)
    pruned, pruned_cfg = selective.prune(checkpoint[1], CFG, selection)
    graphdef, params = loading.build_model(pruned_cfg, pruned)
    ref = generate.generate_ids(graphdef, params, [prompt],
                                generate.SamplingConfig(max_new_tokens=10), eos_id=TOK.eos_id,
                                return_logits=True)
    out = engine_lib.run_sync(engine, prompt, mask(name), max_tokens=10, logprobs=1, timeout=60)
    assert out.tokens == ref["tokens"][0], name
    logprobs = jax.nn.log_softmax(ref["logits"][0], axis=-1)
    expected = [float(logprobs[i, t]) for i, t in enumerate(ref["tokens"][0])]
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)
    # Sampled, the one sampler draws the same tokens in both: generate's row 0 and a request
    # share the seed's first key.
    settings = {"temperature": 0.8, "top_p": 0.9, "seed": 5}
    ref = generate.generate_ids(graphdef, params, [prompt],
                                generate.SamplingConfig(max_new_tokens=10, **settings),
                                eos_id=TOK.eos_id)
    out = engine_lib.run_sync(engine, prompt, mask(name), max_tokens=10, timeout=60, **settings)
    assert out.tokens == ref["tokens"][0], name
    assert out.tokens != engine_lib.run_sync(engine, prompt, mask(name), max_tokens=10,
                                             timeout=60, temperature=0.8, top_p=0.9,
                                             seed=6).tokens


def collector():
  """(events, done, on_event): on_event appends each event and sets `done` at the Done."""
  events = []
  done = threading.Event()

  def on_event(event):
    events.append(event)
    if isinstance(event, engine_lib.Done):
      done.set()
  return events, done, on_event


def test_events_are_deltas_then_one_done(engine):
  events, done, on_event = collector()
  engine.submit(engine_lib.Request(prompt_ids=TOK.encode("ab"), mask_LxR=mask("a"),
                                   max_tokens=5, on_event=on_event, logprobs=2))
  assert done.wait(60)
  *deltas, last = events
  assert deltas and all(isinstance(e, engine_lib.Delta) for e in deltas)
  assert last == engine_lib.Done(finish_reason=last.finish_reason, prompt_tokens=2,
                                 completion_tokens=sum(len(d.tokens) for d in deltas))
  assert all(len(t) == 2 for d in deltas for t in d.top_logprobs)


def test_mixed_subsets_batched_equal_each_alone(engine):
  prompts = {"a": TOK.encode("def main("), "b": TOK.encode("Once upon a time"),
             "c": TOK.encode("x")}
  alone = {n: engine_lib.run_sync(engine, p, mask(n), max_tokens=12, timeout=60).tokens
           for n, p in prompts.items()}
  batched = {}

  def run(n):
    batched[n] = engine_lib.run_sync(engine, prompts[n], mask(n), max_tokens=12,
                                     timeout=60).tokens
  threads = [threading.Thread(target=run, args=(n,)) for n in prompts]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert batched == alone
  assert len({tuple(v) for v in alone.values()}) > 1  # the subsets produce different text


@pytest.mark.slow
def test_generation_across_cache_shifts_matches_generate(engine, checkpoint):
  """A 50-token generation crosses the cache end (context 64 + 16) more than once."""
  prompt = TOK.encode("ab")
  graphdef, params = loading.build_model(CFG, checkpoint[1])
  ref = generate.generate_ids(graphdef, params, [prompt], generate.SamplingConfig(
      max_new_tokens=50), keep_experts=mask("b"))
  out = engine_lib.run_sync(engine, prompt, mask("b"), max_tokens=50, timeout=120)
  assert out.tokens == ref["tokens"][0]


@pytest.mark.slow
def test_register_and_delete_change_resident_bytes_by_the_new_experts(engine):
  bank = engine.bank
  before, width, slots = bank.resident_expert_bytes(), bank.width, [list(s) for s in bank.slots]
  new = bank_lib.Subset("d", ((3, 6), (1, 6)), "explicit")
  fresh = sum(len(set(k) - set(s)) for k, s in zip(new.kept_routed, slots))
  assert fresh == 2  # expert 3 of layer 0 and 1 of layer 1 are in none of a, b, c
  memory = engine.register(new)
  assert memory["resident_expert_bytes"] - before == fresh * bank.expert_bytes
  out = engine_lib.run_sync(engine, TOK.encode("hi"), new.mask(7), max_tokens=3, timeout=60)
  assert out.finish_reason in ("length", "stop")
  memory = engine.delete("d")
  assert memory["resident_expert_bytes"] == before
  assert bank.width == width and bank.slots == slots
  with pytest.raises(bank_lib.SubsetError, match="no subset named"):
    engine.delete("d")
  late = engine_lib.run_sync(engine, TOK.encode("hi"), new.mask(7), max_tokens=3, timeout=60)
  assert late.finish_reason == "error" and "no longer resident" in late.error


def test_sampled_requests_are_seeded_and_bad_requests_refused(engine):
  prompt = TOK.encode("seed")
  one = engine_lib.run_sync(engine, prompt, mask("a"), max_tokens=8, temperature=1.0,
                            top_p=0.9, seed=7, timeout=60)
  two = engine_lib.run_sync(engine, prompt, mask("a"), max_tokens=8, temperature=1.0,
                            top_p=0.9, seed=7, timeout=60)
  assert one.tokens == two.tokens
  late = engine_lib.run_sync(engine, prompt, mask("a"), max_tokens=8, timeout=60,
                            deadline=time.monotonic() - 1)
  assert late.finish_reason == "timeout" and late.tokens == []
  with pytest.raises(ValueError, match="exceeds the context"):
    engine_lib.run_sync(engine, prompt, mask("a"), max_tokens=64)
  with pytest.raises(ValueError, match="empty"):
    engine_lib.run_sync(engine, [], mask("a"), max_tokens=4)


def test_engine_reports_running_and_queue_bound_refuses_with_queue_full(checkpoint):
  bank = bank_lib.ExpertBank(checkpoint[0])
  subsets = {n: bank_lib.Subset(n, k, "explicit") for n, k in SUBSETS.items()}
  bank.commit(bank.prepare(subsets), subsets)  # the fixture's bank: its compiled functions
  # Not started, so nothing drains: the bound is the free slots plus max_queue (0).
  eng = engine_lib.Engine(bank, TOK, slots=3, max_queue=0, shift_every=16)
  assert not eng.running
  for _ in range(3):
    eng.submit(engine_lib.Request(prompt_ids=[5], mask_LxR=mask("a"), max_tokens=2,
                                  on_event=lambda e: None))
  with pytest.raises(engine_lib.QueueFull):
    eng.submit(engine_lib.Request(prompt_ids=[5], mask_LxR=mask("a"), max_tokens=2,
                                  on_event=lambda e: None))
  eng.start()
  assert eng.running
  eng.stop(drain_seconds=30)
  assert not eng.running
  assert eng.stats["finished_length"] + eng.stats["finished_stop"] == 3, eng.stats


def test_chat_template_renders_and_bad_templates_are_400s():
  from emo_jax.inference.serve import protocol
  template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  eos = TOK.decode([TOK.eos_id])
  assert (protocol.render_chat(template, messages, TOK)
          == f"<system>Be brief.{eos}<user>Hi{eos}<assistant>")
  with pytest.raises(protocol.ApiError, match="cannot render"):
    protocol.render_chat("{{ messages[0].content | nosuchfilter }}", messages, TOK)
  assert protocol.chat_template_of(TOK) is None


# ---- hardening (issue 27): subsets in use, clean slots, the queue bound, interleavings --------
def each_slot_alone(engine, prompt, name, max_tokens=10):
  """The greedy tokens of one request per slot, all admitted at one step boundary (so each
  lands in its own row), and of the same request alone."""
  alone = engine_lib.run_sync(engine, prompt, mask(name), max_tokens=max_tokens, timeout=60)
  results: list = [None] * engine.slots
  done = threading.Event()

  def submit_all():
    for i in range(engine.slots):
      def on_event(event, i=i):
        if isinstance(event, engine_lib.Done):
          results[i] = list(reqs[i].generated)
          if all(r is not None for r in results):
            done.set()
      reqs.append(engine_lib.Request(prompt_ids=prompt, mask_LxR=mask(name),
                                     max_tokens=max_tokens, on_event=on_event))
      engine.submit(reqs[-1])
  reqs: list = []
  engine.call(submit_all)
  assert done.wait(60)
  return alone.tokens, results


def test_a_row_poisoned_with_nan_is_clean_for_the_next_request(engine):
  prompt = TOK.encode("Hello")
  alone, before = each_slot_alone(engine, prompt, "a")
  assert before == [alone] * engine.slots

  def poison():  # what an all-False routing row used to leave behind
    engine._cache["k"] = engine._cache["k"].at[:, 1].set(jnp.nan)
    engine._cache["v"] = engine._cache["v"].at[:, 1].set(jnp.nan)
  engine.call(poison)
  _, after = each_slot_alone(engine, prompt, "a")
  assert after == [alone] * engine.slots


def test_replacing_a_subset_in_use_is_refused_and_every_slot_stays_clean(engine):
  version = engine.bank.version
  events, done, on_event = collector()
  engine.submit(engine_lib.Request(prompt_ids=TOK.encode("ab"), mask_LxR=mask("b"),
                                   max_tokens=50, on_event=on_event, subsets=("b",)))
  deadline = time.monotonic() + 30
  while not engine.active() and time.monotonic() < deadline:
    time.sleep(0.001)
  with pytest.raises(engine_lib.SubsetInUse, match="in use"):
    engine.register(bank_lib.Subset("b", ((1,), (1,)), "explicit"))
  assert done.wait(60) and events[-1].finish_reason == "length"
  assert engine.bank.version == version and engine.bank.subsets["b"].kept_routed == SUBSETS["b"]
  assert all(np.isfinite(e.logprobs).all() for e in events[:-1])
  alone, each = each_slot_alone(engine, TOK.encode("xyz"), "b")
  assert each == [alone] * engine.slots


def test_a_subset_with_an_empty_layer_is_refused():
  with pytest.raises(bank_lib.SubsetError, match="no routed expert in layer 1"):
    bank_lib.Subset("e", ((1, 2), ()), "explicit")


def test_the_queue_bound_counts_the_request_being_prefilled(checkpoint, monkeypatch):
  bank = bank_lib.ExpertBank(checkpoint[0])
  subsets = {n: bank_lib.Subset(n, k, "explicit") for n, k in SUBSETS.items()}
  bank.commit(bank.prepare(subsets), subsets)
  eng = engine_lib.Engine(bank, TOK, slots=1, max_queue=1, shift_every=16)
  entered, release = threading.Event(), threading.Event()
  real = eng._prefill_into

  def slow_prefill(row, req):
    entered.set()
    assert release.wait(30)
    real(row, req)
  monkeypatch.setattr(eng, "_prefill_into", slow_prefill)

  def request():
    return engine_lib.Request(prompt_ids=[5], mask_LxR=mask("a"), max_tokens=2,
                              on_event=lambda e: None)
  eng.start()
  try:
    eng.submit(request())  # taken off the queue: being prefilled into the only slot
    assert entered.wait(30)
    eng.submit(request())  # waits: 1 = max_queue
    with pytest.raises(engine_lib.QueueFull):
      eng.submit(request())
  finally:
    release.set()
    eng.stop(drain_seconds=30)
  assert eng.stats["finished_length"] + eng.stats["finished_stop"] == 2, eng.stats


def test_any_interleaving_of_submit_cancel_and_timeout_leaves_every_slot_free(engine):
  hypothesis = pytest.importorskip("hypothesis")
  st = hypothesis.strategies
  bank = engine.bank
  slots, version = [list(s) for s in bank.slots], bank.version
  op = st.one_of(
      st.tuples(st.just("submit"), st.sampled_from(sorted(SUBSETS)), st.integers(1, 12),
                st.integers(1, 20)),
      st.tuples(st.just("timeout"), st.floats(0.0, 0.05)),
      st.tuples(st.just("cancel"), st.integers(0, 20)),
      st.tuples(st.just("sleep"), st.floats(0.0, 0.02)))

  @hypothesis.settings(max_examples=12, derandomize=True, deadline=None, database=None,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(st.lists(op, min_size=1, max_size=12))
  def run(ops):
    requests, finishes = [], []

    def on_event(event, i):
      if isinstance(event, engine_lib.Done):
        finishes.append(i)
    for o in ops:
      if o[0] in ("submit", "timeout"):
        name, n, max_tokens = o[1:] if o[0] == "submit" else ("a", 3, 20)
        deadline = time.monotonic() + o[1] if o[0] == "timeout" else None
        req = engine_lib.Request(prompt_ids=[7] * n, mask_LxR=mask(name), max_tokens=max_tokens,
                                 on_event=lambda e, i=len(requests): on_event(e, i),
                                 deadline=deadline, subsets=(name,))
        try:
          engine.submit(req)
        except engine_lib.QueueFull:
          continue
        requests.append(req)
      elif o[0] == "cancel" and requests:
        requests[o[1] % len(requests)].cancel()
      elif o[0] == "sleep":
        time.sleep(o[1])
    end = time.monotonic() + 60
    while len(finishes) < len(requests) and time.monotonic() < end:
      time.sleep(0.005)
    assert sorted(finishes) == list(range(len(requests)))  # one Done each
    engine.call(lambda: None)  # a step boundary after the last release
    assert engine.active() == 0 and engine.queue_depth() == 0
    assert bank.slots == slots and bank.version == version
  run()
