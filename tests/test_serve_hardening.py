"""The HTTP server under a hostile client (issue 27): bounded bodies, bad strings and numbers,
500s that keep the connection, abandoned requests, subsets in use, calibration files, /metrics,
shutdown, and a schemathesis fuzz of the OpenAPI contract.

One in-process server per module: the tiny random MoE of test_serve_engine (2 decode slots, a
queue of 2) behind `app.uvicorn_server`, in a thread on a free 127.0.0.1 port. Tests that need
a request to outlive the client slow the engine's decode step down (`slow_steps`).
"""

import json
import os
import socket
import threading
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # one server per module (~20 s of compiling)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from emo_jax.config import ModelConfig  # pylint: disable=wrong-import-position
from experiments import server_process  # pylint: disable=wrong-import-position
from emo_jax.data.tokenizer import ByteTokenizer  # pylint: disable=wrong-import-position
from emo_jax.inference.serve import app as app_lib  # pylint: disable=wrong-import-position
from emo_jax.inference.serve import bank as bank_lib  # pylint: disable=wrong-import-position
from emo_jax.inference.serve import engine as engine_lib  # pylint: disable=wrong-import-position
from emo_jax.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from tests.random_model import random_params  # pylint: disable=wrong-import-position

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                  head_dim=16, num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=16,
                  mlp_hidden=64, max_segments=4, max_seq_len=64, compute_dtype="float32",
                  pool=False, init_std=0.3)
TOK = ByteTokenizer()
BASE = "tiny"
MAX_BODY = 64 * 1024
CODE = ((0, 1, 2), (3, 4, 5))


class Running:
  """A server in a thread: its url, app, engine and uvicorn server."""

  def __init__(self, checkpoint, *, drain_seconds=1.0, slots=2, max_queue=2):
    bank = bank_lib.ExpertBank(checkpoint)
    subsets = {bank_lib.ALL: bank_lib.all_experts(bank.cfg),
               "code": bank_lib.Subset("code", CODE, "explicit")}
    bank.commit(bank.prepare(subsets), subsets)
    self.engine = engine_lib.Engine(bank, TOK, slots=slots, max_queue=max_queue,
                                    shift_every=16)
    self.app = app_lib.create_app(self.engine, model_name=BASE, request_timeout=60,
                                  drain_seconds=drain_seconds, max_body_bytes=MAX_BODY)
    self.server = self.app.state.server
    port = server_process.free_port()
    self.url = f"http://127.0.0.1:{port}"
    self.uvicorn = app_lib.uvicorn_server(self.app, host="127.0.0.1", port=port)
    self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 60
    while not self.uvicorn.started:
      assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
      time.sleep(0.02)

  def stop(self, timeout=30.0):
    self.uvicorn.handle_exit(15, None)  # as SIGTERM does
    self.thread.join(timeout)
    assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("hardening_ckpt")
  _, params = random_params(CFG, seed=3)
  ckpt_lib.save_params(path, params, CFG.to_dict())
  return path


@pytest.fixture(scope="module")
def running(checkpoint):
  server = Running(checkpoint)
  yield server
  if server.thread.is_alive():
    server.stop()


@pytest.fixture
def url(running):
  return running.url


@pytest.fixture
def slow_steps(running, monkeypatch):
  """Every decode step takes at least 40 ms: a 60-token request then takes 2.4 s."""
  engine = running.engine
  real = engine._step

  def slow(*args):
    time.sleep(0.04)
    return real(*args)
  monkeypatch.setattr(engine, "_step", slow)
  yield
  deadline = time.time() + 30
  while (engine.active() or engine.queue_depth()) and time.time() < deadline:
    time.sleep(0.02)


def post(url, body, path="/v1/completions", client=None, timeout=60):
  content = body if isinstance(body, (bytes, str)) else json.dumps(body)
  return (client or httpx).post(url + path, content=content, timeout=timeout,
                                headers={"content-type": "application/json"})


def error_of(r, status=400):
  assert r.status_code == status, (r.status_code, r.text)
  return r.json()["error"]


def idle(url, within: float) -> bool:
  deadline = time.time() + within
  while time.time() < deadline:
    health = httpx.get(url + "/health").json()
    if health["active"] == 0 and health["queue_depth"] == 0:
      return True
    time.sleep(0.02)
  return False


# ---- bodies -------------------------------------------------------------------------------------
def test_oversize_and_deeply_nested_bodies_are_4xx_and_the_connection_stays(url):
  with httpx.Client(timeout=60) as client:
    r = post(url, {"prompt": "x" * (MAX_BODY + 1)}, client=client)
    assert "--max_body_bytes" in error_of(r, 413)["message"]

    def chunks():  # no content-length: the streamed bytes are counted
      for _ in range(MAX_BODY // 1024 + 2):
        yield b" " * 1024
    r = client.post(url + "/v1/completions", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert post(url, b"[" * 100_000 + b"]" * 100_000, client=client).status_code == 413
    deep = b"[" * 30_000 + b"]" * 30_000  # under the bound: refused for its depth
    for body in (deep, b'{"prompt": "x", "stop": ' + deep + b"}", b'{"a": ' * 10_000):
      assert "deep" in error_of(post(url, body, client=client))["message"]
    brackets_in_a_string = json.dumps({"prompt": "x", "stop": ["[" * 1000], "max_tokens": 2})
    assert post(url, brackets_in_a_string, client=client).status_code == 200
    assert client.get(url + "/health").status_code == 200
  metrics = httpx.get(url + "/metrics").text
  assert 'emo_http_responses_total{path="/v1/completions",status="413"}' in metrics


def test_bad_strings_and_numbers_are_400s_naming_the_field(url):
  cases = [({"prompt": "\ud800"}, "prompt"), ({"prompt": ["ok", "a\udfffb"]}, "prompt"),
           ({"prompt": "x", "stop": ["\ud800"]}, "stop"),
           ({"prompt": "x", "stream_options": "x"}, "stream_options"),
           ({"prompt": "x", "stream_options": ["include_usage"]}, "stream_options"),
           ({"prompt": "x", "stream_options": 3}, "stream_options"),
           ({"prompt": "x", "temperature": float("nan")}, "temperature"),
           ({"prompt": "x", "top_p": float("nan")}, "top_p"),
           ({"prompt": "x", "temperature": float("inf")}, "temperature"),
           ({"prompt": "x", "presence_penalty": float("-inf")}, "presence_penalty"),
           ({"prompt": "x", "logit_bias": {"5": float("nan")}}, "logit_bias")]
  for body, field in cases:
    error = error_of(post(url, body))
    assert error["param"] == field and error["message"].startswith(field), (body, error)
    assert "\n" not in error["message"]
  error = error_of(post(url, {"messages": [{"role": "user", "content": "\ud800"}]},
                        "/v1/chat/completions"))
  assert error["param"] == "messages" and "surrogate" in error["message"]
  error = error_of(post(url, {"messages": [{"role": "user", "content": "hi"}],
                              "stream_options": "x"}, "/v1/chat/completions"))
  assert error["param"] == "stream_options" and "include_usage" in error["message"]
  error = error_of(post(url, {"name": "s\ud800", "experts": [[0], [0]]}, "/v1/subsets"))
  assert error["param"] == "name"
  ok = post(url, {"prompt": "x", "max_tokens": 2, "stream_options": {"include_usage": True}})
  assert ok.status_code == 200


def test_prompt_size_is_checked_before_tokenising_and_tokenising_is_off_the_loop(
    running, monkeypatch):
  calls = []
  real = running.server.tokenizer.encode

  def spy(text):
    calls.append(threading.current_thread())
    return real(text)
  monkeypatch.setattr(running.server.tokenizer, "encode", spy)
  # Under the body bound but over context * MAX_CHARS_PER_TOKEN characters.
  error = error_of(post(running.url, {"prompt": "y" * (64 * 32 + 1)}))
  assert error["param"] == "prompt" and "characters" in error["message"] and not calls
  assert post(running.url, {"prompt": "hello", "max_tokens": 2}).status_code == 200
  assert calls and running.thread not in calls  # not the event loop's thread


# ---- errors keep the connection -----------------------------------------------------------------
def test_a_500_is_json_and_keeps_the_keep_alive_connection(running, monkeypatch):
  def broken():
    raise RuntimeError("boom")
  monkeypatch.setattr(running.server, "metrics", broken)
  host, port = running.url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port)), timeout=10) as sock:
    reader = sock.makefile("rb")

    def get(path):
      sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
      status = reader.readline()
      headers = {}
      while (line := reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
      return status, headers, reader.read(int(headers.get("content-length", 0)))
    status, headers, body = get("/metrics")
    assert b" 500 " in status and headers.get("connection") != "close"
    assert "RuntimeError" in json.loads(body)["error"]["message"]
    status, _, body = get("/health")  # the same connection
    assert b" 200 " in status and json.loads(body)["status"] == "ok"


# ---- abandoned requests ---------------------------------------------------------------------------
def test_abandoned_non_streaming_requests_free_their_slots_within_a_step(url, slow_steps):
  failures = []

  def abandon():
    try:
      post(url, {"prompt": "abc", "max_tokens": 60}, timeout=1.0)
      failures.append("finished")
    except httpx.TimeoutException:
      pass
  threads = [threading.Thread(target=abandon) for _ in range(4)]  # 2 slots + 2 queued
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not failures  # 60 tokens at 40 ms a step outlive the 1 s timeout
  assert idle(url, within=1.0), httpx.get(url + "/health").json()


# ---- subsets --------------------------------------------------------------------------------------
def test_replacing_a_subset_in_use_is_409_and_the_stream_is_unharmed(url, slow_steps):
  with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
      "prompt": "abc", "max_tokens": 30, "stream": True, "experts": "code", "logprobs": 1}) as r:
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    error = error_of(post(url, {"name": "code", "experts": [[6], [6]]}, "/v1/subsets"), 409)
    assert error["param"] == "name" and "in use" in error["message"]
    rest = [first] + [line for line in lines if line.startswith("data: ")]
  assert rest[-1] == "data: [DONE]"
  chunks = [json.loads(line[6:]) for line in rest[:-1]]
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"
  assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks
             if c["choices"][0]["logprobs"]) == 30
  subsets = {s["name"]: s["experts"] for s in httpx.get(url + "/v1/subsets").json()["subsets"]}
  assert subsets["code"] == [list(k) for k in CODE]
  # Not in use any more: replacing it works (and putting it back).
  assert post(url, {"name": "code", "experts": [[6], [6]]}, "/v1/subsets").status_code == 200
  assert post(url, {"name": "code", "experts": CODE}, "/v1/subsets").status_code == 200


def test_subset_all_cannot_be_deleted_and_models_stay_consistent(url):
  error = error_of(httpx.delete(url + "/v1/subsets/all"))
  assert error["param"] == "name" and "cannot be deleted" in error["message"]
  ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
  assert ids == [BASE, f"{BASE}:all", f"{BASE}:code"]
  assert post(url, {"prompt": "x", "max_tokens": 2, "model": BASE}).status_code == 200
  error = error_of(post(url, {"name": "two", "texts": ["a"], "keep": 1}, "/v1/subsets"))
  assert error["param"] == "keep"  # one expert in all is the shared one: no routed expert


def test_calibration_files_only_under_the_operators_directory(running, tmp_path, monkeypatch):
  url = running.url
  body = {"name": "cal", "keep": 4, "calibration": "docs.jsonl"}
  error = error_of(post(url, body, "/v1/subsets"))
  assert error["param"] == "calibration" and "--calibration_dir" in error["message"]
  allowed = tmp_path / "allowed"
  allowed.mkdir()
  (allowed / "docs.jsonl").write_text(json.dumps({"text": "def f(x):\n  return x\n"}) + "\n")
  (allowed / "bad.jsonl").write_text("SECRET-LINE-1 not json\n")
  secret = tmp_path / "secret.jsonl"
  secret.write_text(json.dumps({"text": "SECRET-LINE-2"}) + "\n")
  os.symlink(secret, allowed / "link.jsonl")
  monkeypatch.setattr(running.server, "calibration_dir", allowed.resolve())
  for name, reason in [("../secret.jsonl", "outside"), (str(secret), "outside"),
                       ("link.jsonl", "outside"), ("nope.jsonl", "no such file"),
                       ("/etc/passwd", ".jsonl"), ("bad.jsonl", "cannot be read")]:
    error = error_of(post(url, {**body, "calibration": name}, "/v1/subsets"))
    assert error["param"] == "calibration" and reason in error["message"], (name, error)
    assert "SECRET" not in error["message"]
  r = post(url, body, "/v1/subsets")
  assert r.status_code == 200, r.text
  assert httpx.delete(url + "/v1/subsets/cal").status_code == 200


def test_metrics_grow_no_series_per_deleted_subset_or_unknown_path(url):
  def series():
    return [line for line in httpx.get(url + "/metrics").text.splitlines()
            if not line.startswith("#")]
  for i in range(2):  # every route has answered once
    assert post(url, {"name": f"tmp{i}", "experts": [[0], [1]]}, "/v1/subsets").status_code == 200
    assert httpx.delete(url + f"/v1/subsets/tmp{i}").status_code == 200
    assert httpx.delete(url + f"/v1/subsets/gone{i}").status_code == 404
    httpx.get(url + f"/nowhere/{i}")
  before = series()
  for i in range(2, 7):
    assert post(url, {"name": f"tmp{i}", "experts": [[0], [1]]}, "/v1/subsets").status_code == 200
    assert httpx.delete(url + f"/v1/subsets/tmp{i}").status_code == 200
    assert httpx.delete(url + f"/v1/subsets/gone{i}").status_code == 404
    httpx.get(url + f"/nowhere/{i}")
  after = series()
  assert len(after) == len(before), set(after) - set(before)
  assert not any("tmp" in line or "gone" in line or "nowhere" in line for line in after)
  assert any('path="/v1/subsets/{name}"' in line for line in after)


# ---- the contract, fuzzed ---------------------------------------------------------------------
def test_schemathesis_finds_no_5xx_and_no_schema_violation(url):
  schemathesis = pytest.importorskip("schemathesis")
  from hypothesis import HealthCheck, given, settings  # pylint: disable=import-outside-toplevel
  from schemathesis.checks import not_a_server_error  # pylint: disable=import-outside-toplevel
  from schemathesis.specs.openapi import checks  # pylint: disable=import-outside-toplevel
  schema = schemathesis.openapi.from_url(url + "/openapi.json")
  validate = [not_a_server_error, checks.status_code_conformance,
              checks.content_type_conformance, checks.response_schema_conformance]
  tried = []
  for result in schema.get_all_operations():
    operation = result.ok()

    @settings(max_examples=8, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case):
      if isinstance(case.body, dict) and "max_tokens" in case.body:
        case.body["max_tokens"] = 2  # keep generations short; the rest stays fuzzed
      response = case.call(base_url=url, timeout=60)
      case.validate_response(response, checks=validate)
    fuzz()
    tried.append(operation.label)
  assert len(tried) >= 8, tried
  assert idle(url, within=10)


# ---- shutdown (last: it stops the module's server) ----------------------------------------------
def test_shutdown_sends_requests_past_the_drain_a_proper_error(running, slow_steps):
  url = running.url
  outcome = {}

  def plain():
    outcome["plain"] = post(url, {"prompt": "abc", "max_tokens": 60})
  with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
      "prompt": "abc", "max_tokens": 60, "stream": True}) as r:
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))
    worker = threading.Thread(target=plain)
    worker.start()
    time.sleep(0.2)
    stopper = threading.Thread(target=running.stop)  # drain_seconds = 1: 60 tokens need 2.4 s
    stopper.start()
    rest = [line for line in lines if line.startswith("data: ")]
  worker.join(30)
  stopper.join(30)
  assert rest[-1] == "data: [DONE]", rest[-3:]
  events = [json.loads(line[6:]) for line in rest[:-1]]
  assert any(e.get("error", {}).get("code") == "cancelled" for e in events), events[-3:]
  assert events[-1]["choices"][0]["finish_reason"] == "abort"
  error = error_of(outcome["plain"], 503)
  assert "shutting down" in error["message"]
