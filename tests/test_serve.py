"""The HTTP server end to end: `python -m experiments.serve` answering the real openai client.

One server per module (a random tiny MoE, 2 decode slots, a queue of 1), started on a free
127.0.0.1 port and stopped by pid with SIGTERM (graceful shutdown must exit 0).
"""

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow, pytest.mark.integration]  # one server process per module

from emo_jax.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from emo_jax.config import ModelConfig  # pylint: disable=wrong-import-position
from experiments import server_process  # pylint: disable=wrong-import-position
from tests.random_model import random_params  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                  head_dim=16, num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=16,
                  mlp_hidden=64, max_segments=4, max_seq_len=64, compute_dtype="float32",
                  pool=False, init_std=0.3)
BASE = "served"
CODE_DOCS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
             "for i in range(10):\n    print(i * i)\n", "class Stack:\n    pass\n",
             "while True:\n    break\n"]


def run(*args, timeout=300) -> str:
  out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                       timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
  return out.stdout.decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_http")
  _, params = random_params(CFG, seed=5)
  ckpt_lib.save_params(root / BASE, params, CFG.to_dict())
  calibration = root / "code.jsonl"
  calibration.write_text("".join(json.dumps({"text": d}) + "\n" for d in CODE_DOCS))
  return root / BASE, calibration


@pytest.fixture(scope="module")
def server(files):
  checkpoint, calibration = files
  with serve_process([f"--checkpoint={checkpoint}", "--tokenizer=bytes",
                      f"--subset=code={calibration}:4", "--slots=2", "--max_queue=1",
                      "--request_timeout=60", "--drain_seconds=2"],
                     checkpoint.parent / "server.log") as url:
    yield url


@contextlib.contextmanager
def serve_process(args, log_path):
  """`experiments.serve ARGS` on a free 127.0.0.1 port (experiments.server_process): yields its
  URL once /health answers; its graceful stop (SIGTERM) must exit 0."""
  with server_process.serving(args, log_path, start_timeout_s=180,
                              env={"JAX_PLATFORMS": "cpu"}) as server:
    yield server.url
  assert server.exit_code == 0, server.log_tail()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, prompt, experts=None, model=BASE, max_tokens=12, **kw):
  extra = {"experts": experts} if experts else None
  return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                   temperature=0, extra_body=extra, **kw)


def test_completions_plain_and_streamed_through_the_openai_client(client):
  plain = complete(client, "def main(", "code")
  assert plain.choices[0].text and plain.usage.completion_tokens == 12
  assert plain.choices[0].finish_reason == "length"
  chunks = list(complete(client, "def main(", "code", stream=True))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
  assert chunks[-1].choices[0].finish_reason == "length"
  full = complete(client, "def main(", "all")
  assert full.choices[0].text
  with pytest.raises(openai.BadRequestError, match="unknown expert subset 'nope'"):
    complete(client, "def main(", "nope")


def test_greedy_text_equals_generate_on_the_pruned_checkpoint(client, files, tmp_path):
  checkpoint, calibration = files
  prompt = "for i in"
  served = complete(client, prompt, "code", max_tokens=10).choices[0].text
  run("experiments.select_experts", f"--checkpoint={checkpoint}",
      f"--calibration={calibration}", "--keep=4", f"--out={tmp_path / 'pruned'}",
      "--tokenizer=bytes")
  out = run("experiments.generate", f"--checkpoint={tmp_path / 'pruned'}", f"--prompt={prompt}",
            "--max_new_tokens=10", "--tokenizer=bytes", "--nowarmup")  # greedy by default
  body = out.split(f"--- {prompt!r}\n", 1)[1]
  body = body[:body.rindex('\n{"prompts"')]
  assert body == prompt + served
  assert served != complete(client, prompt, "all", max_tokens=10).choices[0].text


def test_stop_strings_logprobs_and_seeded_sampling(client):
  text = complete(client, "x = ", "code", max_tokens=16).choices[0].text
  stop = next(ch for ch in text[2:] if ch.isascii() and ch.isprintable())
  cut = complete(client, "x = ", "code", max_tokens=16, stop=[stop]).choices[0]
  assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
  scored = complete(client, "x = ", "code", max_tokens=6, logprobs=2).choices[0]
  assert len(scored.logprobs.token_logprobs) == 6
  assert all(len(t) <= 2 and max(t.values()) >= lp - 1e-6 for t, lp in
             zip(scored.logprobs.top_logprobs, scored.logprobs.token_logprobs))
  sampled = [client.completions.create(model=BASE, prompt="x = ", max_tokens=12, temperature=1.0,
                                       top_p=0.9, seed=11).choices[0].text for _ in range(2)]
  assert sampled[0] == sampled[1]


def test_model_may_name_a_subset(client):
  ids = [m.id for m in client.models.list().data]
  assert ids == [BASE, f"{BASE}:all", f"{BASE}:code"]
  by_model = complete(client, "import", model=f"{BASE}:code").choices[0].text
  assert by_model == complete(client, "import", "code").choices[0].text
  with pytest.raises(openai.NotFoundError, match="not served"):
    complete(client, "import", model="other")


def test_two_concurrent_requests_on_different_subsets(client):
  alone = {e: complete(client, "while", e, max_tokens=20).choices[0].text
           for e in ("code", "all")}
  together = {}

  def go(e):
    together[e] = complete(client, "while", e, max_tokens=20).choices[0].text
  threads = [threading.Thread(target=go, args=(e,)) for e in alone]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert together == alone and alone["code"] != alone["all"]


def test_bad_requests_get_the_right_codes_and_the_server_keeps_answering(server, client):
  def post(body, path="/v1/completions"):
    return httpx.post(server + path, content=body, timeout=60,
                      headers={"content-type": "application/json"})
  r = post(b'{"prompt": "x", "max_tokens": ')
  assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
  r = post(json.dumps({"prompt": "x" * 64}))
  assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
  r = post(json.dumps({"prompt": "x" * 40, "max_tokens": 30}))
  assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
  r = post(json.dumps({"prompt": "x", "n": 2}))
  assert r.status_code == 400 and r.json()["error"]["param"] == "n"
  r = post(json.dumps({"prompt": "x", "temperature": "hot"}))  # the schema refuses it
  assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
  assert "must be a number" in r.json()["error"]["message"]
  r = post(json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}))
  assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
  r = post(json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "/v1/chat/completions")
  assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
  # Queue full: 2 slots + 1 queued; a burst of 8 long requests gets some 429s.
  codes, headers = [], []

  def burst():
    r = post(json.dumps({"prompt": "abc", "max_tokens": 60}))
    codes.append(r.status_code)
    headers.append(r.headers.get("retry-after"))
  threads = [threading.Thread(target=burst) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
  assert all(h == "1" for c, h in zip(codes, headers) if c == 429)
  assert complete(client, "still there?", "code").choices[0].text


def test_openapi_schema_is_the_contract(server):
  spec = httpx.get(server + "/openapi.json").json()
  models = spec["components"]["schemas"]
  assert {"CompletionRequest", "ChatCompletionRequest", "Completion", "ChatCompletion",
          "SubsetRequest", "Health", "ErrorBody"} <= set(models)
  post = spec["paths"]["/v1/completions"]["post"]
  assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
      "/CompletionRequest")
  assert "experts" in models["CompletionRequest"]["properties"]
  assert "text/event-stream" in post["responses"]["200"]["content"]
  assert "429" in post["responses"]


def test_client_disconnect_frees_the_slot(server, client):
  with httpx.stream("POST", server + "/v1/completions", timeout=60, json={
      "prompt": "abc", "max_tokens": 60, "stream": True}) as r:
    next(r.iter_lines())
  deadline = time.time() + 10
  while httpx.get(server + "/health").json()["active"] and time.time() < deadline:
    time.sleep(0.05)
  assert httpx.get(server + "/health").json()["active"] == 0
  # The generation was cut short (60 tokens take far longer than noticing the disconnect).
  assert 'emo_requests_total{finish_reason="cancelled"} 1' in httpx.get(server + "/metrics").text
  assert complete(client, "next", "code").choices[0].text


def test_register_and_delete_a_subset_over_http(server, client):
  before = httpx.get(server + "/v1/subsets").json()
  assert before["memory"]["resident_expert_bytes"] == before["memory"]["full_expert_bytes"]
  per_expert = before["memory"]["full_expert_bytes"] // (CFG.num_layers * CFG.num_experts)
  r = httpx.post(server + "/v1/subsets", json={"name": "two", "experts": [[0, 1], [2, 3]]})
  assert r.status_code == 200, r.text
  assert r.json()["expert_bytes"] == 2 * 3 * per_expert
  assert complete(client, "x", "two+code").choices[0].text
  metrics = httpx.get(server + "/metrics").text
  assert f'emo_subset_expert_bytes{{subset="two"}} {6 * per_expert}' in metrics
  assert "emo_queue_depth 0" in metrics
  assert httpx.delete(server + "/v1/subsets/two").status_code == 200
  assert httpx.delete(server + "/v1/subsets/two").status_code == 404
  r = httpx.post(server + "/v1/subsets", json={"name": "bad", "experts": [[0, 9], [1]]})
  assert r.status_code == 400 and r.json()["error"]["param"] == "experts"
  r = httpx.post(server + "/v1/subsets", json={"name": "cal", "texts": CODE_DOCS, "keep": 4})
  assert r.status_code == 200, r.text
  code = next(s for s in httpx.get(server + "/v1/subsets").json()["subsets"]
              if s["name"] == "code")
  assert r.json()["experts"] == code["experts"]  # the same selection as --subset
  assert httpx.delete(server + "/v1/subsets/cal").status_code == 200
  assert np.isclose(httpx.get(server + "/health").json()["resident_expert_bytes"],
                    before["memory"]["resident_expert_bytes"])
