"""The OpenAI-compatible HTTP layer over the engine (FastAPI).

Endpoints: POST /v1/completions, POST /v1/chat/completions (through the tokenizer's chat
template), GET /v1/models, GET /health, GET /metrics (Prometheus text), and the subset admin
API: GET / POST /v1/subsets, DELETE /v1/subsets/{name}.

The request field `experts` (an extension; the openai client sends it with `extra_body`) names
a registered subset, a union "a+b", or "all"; `model` may name a subset as BASE:NAME instead.
Every refusal is an OpenAI-style error body {"error": {"message", "type", "param", "code"}}
whose message names the field and the fix (`protocol` parses the fields). Differences from OpenAI's API: `temperature`
defaults to 0 (greedy, as `experiments.generate`), and settings this server cannot honour
(n > 1, best_of, echo, suffix, penalties, logit_bias) are refused with a 400 rather than
ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from emo_jax.inference.serve import bank as bank_lib
from emo_jax.inference.serve import engine as engine_lib
from emo_jax.inference.serve import protocol

class Server:
  """Request handling shared by the endpoints: subsets, prompts, submission, responses."""

  def __init__(self, engine: engine_lib.Engine, *, model_name: str,
               request_timeout: float = 600.0, chat_template: str | None = None):
    self.engine = engine
    self.bank = engine.bank
    self.tokenizer = engine.tokenizer
    self.model_name = model_name
    self.request_timeout = request_timeout
    self.chat_template = chat_template
    self.http_counts: dict[tuple[str, int], int] = {}
    self.started = time.time()

  # ---- which experts --------------------------------------------------------------------------
  def resolve_experts(self, body: dict) -> tuple[tuple[str, ...], np.ndarray]:
    model, experts = body.get("model"), body.get("experts")
    from_model = None
    if model is not None:
      if not isinstance(model, str):
        raise protocol.ApiError(400, "model must be a string", param="model")
      if model.startswith(self.model_name + ":"):
        from_model = model[len(self.model_name) + 1:]
      elif model != self.model_name:
        raise protocol.ApiError(404, f"model {model!r} is not served here; GET /v1/models lists "
                       f"{self.model_name!r} and {self.model_name}:SUBSET", param="model",
                       code="model_not_found")
    if experts is None:
      experts = from_model or bank_lib.ALL
    elif not isinstance(experts, str) or not experts:
      raise protocol.ApiError(400, "experts must be a subset name, names joined by '+', or 'all'",
                     param="experts")
    elif from_model is not None and experts != from_model:
      raise protocol.ApiError(400, f"model names subset {from_model!r} but experts names {experts!r}; "
                     "give one of them", param="experts")
    subsets = self.bank.subsets
    names = tuple(experts.split("+"))
    unknown = [n for n in names if n not in subsets]
    if unknown:
      raise protocol.ApiError(400, f"unknown expert subset {unknown[0]!r}; registered: "
                     f"{sorted(subsets)} (register one with POST /v1/subsets)",
                     param="experts")
    R = self.bank.cfg.num_routed_experts
    mask = np.zeros((self.bank.cfg.num_layers, R), bool)
    for n in names:
      mask |= subsets[n].mask(R)
    return names, mask

  # ---- prompts ---------------------------------------------------------------------------------
  def prompt_ids(self, prompt: Any, param: str = "prompt") -> list[list[int]]:
    vocab = self.bank.cfg.vocab_size
    if isinstance(prompt, str):
      prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
      prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
      prompts = prompt
    else:
      raise protocol.ApiError(400, f"{param} must be a string, a list of strings, or token ids",
                     param=param)
    out = []
    for p in prompts:
      if isinstance(p, str):
        ids = list(self.tokenizer.encode(p))
      elif all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
        ids = list(p)
      else:
        raise protocol.ApiError(400, f"{param} token ids must be integers in [0, {vocab})", param=param)
      if not ids:
        raise protocol.ApiError(400, f"{param} is empty; give at least one token", param=param)
      if len(ids) >= self.engine.context:
        raise protocol.ApiError(400, f"{param} is {len(ids)} tokens, the context is "
                       f"{self.engine.context}; shorten it", param=param)
      out.append(ids)
    return out

  def sampling(self, body: dict, prompts: list[list[int]]) -> dict:
    protocol.refuse_unsupported(body)
    longest = max(len(p) for p in prompts)
    room = self.engine.context - longest
    max_tokens = protocol.number(body, "max_tokens", None, int, 1, None)
    if max_tokens is None:
      max_tokens = protocol.number(body, "max_completion_tokens", 16, int, 1, None)
    if max_tokens > room:
      raise protocol.ApiError(400, f"max_tokens={max_tokens} does not fit: the prompt is {longest} "
                     f"tokens and the context {self.engine.context}; ask for at most {room}",
                     param="max_tokens")
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # the chat API's logprobs flag + top_logprobs
      logprobs = (protocol.number(body, "top_logprobs", 0, int, 0, engine_lib.TOP_LOGPROBS) or 1
                  ) if logprobs else 0
    else:
      logprobs = protocol.number(body, "logprobs", 0, int, 0, engine_lib.TOP_LOGPROBS)
    seed = protocol.number(body, "seed", None, int, 0, 2**31 - 1)
    return {"max_tokens": max_tokens,
            "temperature": protocol.number(body, "temperature", 0.0, float, 0.0, 2.0),
            "top_p": protocol.number(body, "top_p", 1.0, float, 1e-6, 1.0),
            "seed": seed if seed is not None else int(np.random.randint(0, 2**31 - 1)),
            "stop": protocol.parse_stop(body), "logprobs": logprobs}

  # ---- running ---------------------------------------------------------------------------------
  def submit(self, prompts, names, mask, sampling, events: asyncio.Queue):
    loop = asyncio.get_running_loop()
    requests = []
    deadline = time.monotonic() + self.request_timeout
    try:
      for index, ids in enumerate(prompts):
        def on_event(event, index=index):
          loop.call_soon_threadsafe(events.put_nowait, (index, event))
        req = engine_lib.Request(prompt_ids=ids, mask_LxR=mask, on_event=on_event,
                                 deadline=deadline, subsets=names, **sampling)
        self.engine.submit(req)
        requests.append(req)
    except engine_lib.QueueFull as e:
      for r in requests:
        r.cancel()
      raise protocol.ApiError(429, f"the server is busy: {e}", kind="rate_limit_error",
                     headers={"Retry-After": "1"}) from e
    except engine_lib.ShuttingDown as e:
      for r in requests:
        r.cancel()
      raise protocol.ApiError(503, str(e), kind="server_error") from e
    except ValueError as e:
      for r in requests:
        r.cancel()
      raise protocol.ApiError(400, str(e), param="prompt") from e
    return requests

  def token_string(self, token: int) -> str:
    """A token's text, or "token_id:N" when it is no whole character (a partial UTF-8 byte),
    so that distinct tokens stay distinct keys of top_logprobs."""
    text = self.tokenizer.decode([int(token)])
    return f"token_id:{int(token)}" if "\ufffd" in text else text

  def token_strings(self, ids) -> list[str]:
    return [self.token_string(t) for t in ids]

  def logprobs_body(self, tokens, logprobs, top) -> dict:
    strings = self.token_strings(tokens)
    eos = self.tokenizer.eos_id
    offsets = [len(self.tokenizer.decode([t for t in tokens[:i] if t != eos]))
               for i in range(len(tokens))]  # where each token starts in the text
    return {"tokens": strings, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": None if top is None else [
                {self.token_string(i): lp for i, lp in t.items()} for t in top]}

  def count(self, path: str, status: int) -> None:
    self.http_counts[(path, status)] = self.http_counts.get((path, status), 0) + 1

  def metrics(self) -> str:
    stats = self.engine.stats
    memory = self.bank.memory()
    lines = []

    def metric(name, kind, help_text, samples):
      lines.append(f"# HELP {name} {help_text}")
      lines.append(f"# TYPE {name} {kind}")
      for labels, value in samples:
        label = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

    finished = [({"finish_reason": k[len("finished_"):]}, v) for k, v in sorted(stats.items())
                if k.startswith("finished_")]
    metric("emo_requests_total", "counter", "Generations finished, by finish reason.",
           finished or [({"finish_reason": "stop"}, 0)])
    metric("emo_http_responses_total", "counter", "HTTP responses by path and status.",
           [({"path": p, "status": s}, v) for (p, s), v in sorted(self.http_counts.items())])
    metric("emo_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
           [({}, stats["prompt_tokens"])])
    metric("emo_generation_tokens_total", "counter", "Tokens generated.",
           [({}, stats["generation_tokens"])])
    metric("emo_tokens_per_second", "gauge", "Generated tokens per second, last 10 s.",
           [({}, round(self.engine.tokens_per_second(), 3))])
    metric("emo_queue_depth", "gauge", "Requests waiting for a decode slot.",
           [({}, self.engine.queue_depth())])
    metric("emo_active_slots", "gauge", "Decode slots in use.", [({}, self.engine.active())])
    metric("emo_decode_slots", "gauge", "Decode slots.", [({}, self.engine.slots)])
    metric("emo_resident_expert_bytes", "gauge",
           "Bytes of resident experts (union of the subsets plus shared).",
           [({}, memory["resident_expert_bytes"])])
    metric("emo_bank_bytes", "gauge", "Bytes of the device expert bank (with padding).",
           [({}, memory["bank_bytes"])])
    metric("emo_full_expert_bytes", "gauge", "Bytes of all experts of the checkpoint.",
           [({}, memory["full_expert_bytes"])])
    metric("emo_subset_expert_bytes", "gauge", "Bytes of the experts each subset uses.",
           [({"subset": n}, self.bank.subset_bytes(n)) for n in sorted(self.bank.subsets)])
    return "\n".join(lines) + "\n"


def _sse(payload: Any) -> str:
  return f"data: {json.dumps(payload)}\n\n"


def create_app(engine: engine_lib.Engine, *, model_name: str, request_timeout: float = 600.0,
               chat_template: str | None = None, drain_seconds: float = 5.0,
               manage_engine: bool = True):
  """The FastAPI app. With manage_engine the app starts the engine and stops it at shutdown
  (running requests get drain_seconds to finish, then are cancelled)."""
  server = Server(engine, model_name=model_name, request_timeout=request_timeout,
                  chat_template=chat_template)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    if manage_engine and engine._thread is None:  # pylint: disable=protected-access
      engine.start()
    yield
    if manage_engine:
      await asyncio.to_thread(engine.stop, drain_seconds=drain_seconds)

  app = FastAPI(title="emo_jax expert-subset server", lifespan=lifespan)
  app.state.server = server

  @app.exception_handler(protocol.ApiError)
  async def api_error(request: Request, e: protocol.ApiError):
    server.count(request.url.path, e.status)
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                   "code": e.code}}, status_code=e.status, headers=e.headers)

  @app.exception_handler(Exception)
  async def internal_error(request: Request, e: Exception):
    server.count(request.url.path, 500)
    return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                   "type": "server_error", "param": None, "code": None}},
                        status_code=500)

  async def wait_all(request: Request, requests, events: asyncio.Queue):
    """Collects every choice's text and tokens; cancels all if the client goes away."""
    results = [{"text": [], "tokens": [], "logprobs": [], "top": [], "done": None}
               for _ in requests]
    remaining = len(requests)
    try:
      while remaining:
        try:
          index, event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            raise asyncio.CancelledError() from None
          continue
        r = results[index]
        if event["type"] == "delta":
          r["text"].append(event["text"])
          r["tokens"] += event["tokens"]
          r["logprobs"] += event["logprobs"]
          r["top"] += event["top_logprobs"] or []
        else:
          r["done"] = event
          remaining -= 1
    except BaseException:
      for req in requests:
        req.cancel()
      raise
    for r in results:
      reason = r["done"]["finish_reason"]
      if reason == "timeout":
        raise protocol.ApiError(504, f"the request did not finish within {request_timeout} s",
                       kind="timeout_error")
      if reason == "error":
        raise protocol.ApiError(500, r["done"]["error"] or "generation failed", kind="server_error")
      if reason == "cancelled":
        raise protocol.ApiError(503, "the request was cancelled (the server is shutting down)",
                       kind="server_error")
    return results

  def usage(results):
    p = sum(r["done"]["prompt_tokens"] for r in results)
    c = sum(r["done"]["completion_tokens"] for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

  async def stream(request: Request, requests, events, make_chunk, final_chunks):
    usage_counts = {"prompt_tokens": 0, "completion_tokens": 0}
    try:
      remaining = len(requests)
      while remaining:
        index, event = await events.get()
        if event["type"] == "delta":
          yield _sse(make_chunk(index, event, None))
        else:
          remaining -= 1
          reason = event["finish_reason"]
          usage_counts["prompt_tokens"] += event["prompt_tokens"]
          usage_counts["completion_tokens"] += event["completion_tokens"]
          if reason in ("error", "timeout", "cancelled"):
            yield _sse({"error": {"message": event["error"] or f"generation {reason}",
                                  "type": "server_error", "param": None, "code": reason}})
            reason = "abort"
          yield _sse(make_chunk(index, None, reason))
      for chunk in final_chunks(usage_counts):
        yield _sse(chunk)
      yield "data: [DONE]\n\n"
    finally:
      for req in requests:
        req.cancel()  # no-op for finished ones; frees the slot when the client went away

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = protocol.json_object(await request.body())
    names, mask = server.resolve_experts(body)
    if "prompt" not in body:
      raise protocol.ApiError(400, "prompt is required", param="prompt")
    prompts = server.prompt_ids(body["prompt"])
    sampling = server.sampling(body, prompts)
    model = body.get("model") or model_name
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    events: asyncio.Queue = asyncio.Queue()
    requests = server.submit(prompts, names, mask, sampling, events)
    if body.get("stream"):
      include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

      def chunk(index, event, reason):
        text = event["text"] if event else ""
        lp = None
        if event and sampling["logprobs"]:
          lp = server.logprobs_body(event["tokens"], event["logprobs"], event["top_logprobs"])
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": lp,
                             "finish_reason": reason}]}

      def final(counts):
        if not include_usage:
          return []
        return [{"id": rid, "object": "text_completion", "created": created, "model": model,
                 "choices": [], "usage": {**counts, "total_tokens": sum(counts.values())}}]
      server.count(request.url.path, 200)
      return StreamingResponse(stream(request, requests, events, chunk, final),
                               media_type="text/event-stream")
    results = await wait_all(request, requests, events)
    choices = []
    for i, r in enumerate(results):
      lp = (server.logprobs_body(r["tokens"], r["logprobs"], r["top"])
            if sampling["logprobs"] else None)
      choices.append({"index": i, "text": "".join(r["text"]), "logprobs": lp,
                      "finish_reason": r["done"]["finish_reason"]})
    server.count(request.url.path, 200)
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(results)}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = protocol.json_object(await request.body())
    names, mask = server.resolve_experts(body)
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)):
      raise protocol.ApiError(400, "messages must be a non-empty list of {\"role\": str, \"content\": "
                     "str}", param="messages")
    if server.chat_template is None:
      raise protocol.ApiError(400, f"the model's tokenizer ({server.tokenizer!r}) has no chat template; "
                     "use /v1/completions with a plain prompt", param="messages")
    text = protocol.render_chat(server.chat_template, messages, server.tokenizer)
    prompts = server.prompt_ids(text, "messages")
    sampling = server.sampling(body, prompts)
    model = body.get("model") or model_name
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    events: asyncio.Queue = asyncio.Queue()
    requests = server.submit(prompts, names, mask, sampling, events)
    if body.get("stream"):
      def chunk(index, event, reason):
        delta = {"role": "assistant", "content": event["text"]} if event else {}
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": index, "delta": delta,
                                             "finish_reason": reason}]}
      server.count(request.url.path, 200)
      return StreamingResponse(stream(request, requests, events, chunk, lambda _: []),
                               media_type="text/event-stream")
    results = await wait_all(request, requests, events)
    r = results[0]
    server.count(request.url.path, 200)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": "".join(r["text"])},
                         "finish_reason": r["done"]["finish_reason"]}],
            "usage": usage(results)}

  @app.get("/v1/models")
  async def models():
    created = int(server.started)
    ids = [model_name] + [f"{model_name}:{n}" for n in sorted(server.bank.subsets)]
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created,
                                        "owned_by": "emo_jax"} for i in ids]}

  @app.get("/health")
  async def health():
    return {"status": "ok", "slots": engine.slots, "active": engine.active(),
            "queue_depth": engine.queue_depth(), "subsets": sorted(server.bank.subsets),
            **server.bank.memory()}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/subsets")
  async def list_subsets():
    return {"subsets": [subset_body(server, n) for n in sorted(server.bank.subsets)],
            "memory": server.bank.memory()}

  @app.post("/v1/subsets")
  async def register_subset(request: Request):
    body = protocol.json_object(await request.body())
    subset = await asyncio.to_thread(subset_from_body, server, body)
    try:
      memory = await asyncio.to_thread(engine.register, subset)
    except bank_lib.SubsetError as e:
      raise protocol.ApiError(400, str(e), param="name") from e
    server.count(request.url.path, 200)
    return {**subset_body(server, subset.name), "memory": memory}

  @app.delete("/v1/subsets/{name}")
  async def delete_subset(request: Request, name: str):
    if name not in server.bank.subsets:
      raise protocol.ApiError(404, f"no subset named {name!r}; registered: {sorted(server.bank.subsets)}",
                     param="name")
    try:
      memory = await asyncio.to_thread(engine.delete, name)
    except bank_lib.SubsetError as e:
      raise protocol.ApiError(409, str(e), param="name") from e
    server.count(request.url.path, 200)
    return {"deleted": name, "memory": memory}

  return app


def subset_body(server: Server, name: str) -> dict:
  subset = server.bank.subsets[name]
  return {"name": name, "model": f"{server.model_name}:{name}", "source": subset.source,
          "experts": [list(k) for k in subset.kept_routed],
          "expert_bytes": server.bank.subset_bytes(name)}


def subset_from_body(server: Server, body: dict) -> bank_lib.Subset:
  """A subset from {"name", "experts": [[ids] per layer]} or {"name", "keep", "calibration"
  (a JSONL path on the server) or "texts", "num_examples" (default 5)}."""
  name = body.get("name")
  if not isinstance(name, str) or not protocol.SUBSET_NAME.match(name) or name == bank_lib.ALL:
    raise protocol.ApiError(400, "name must be 1-64 letters, digits, '_', '.' or '-' (not 'all')",
                   param="name")
  if "experts" in body:
    try:
      return bank_lib.Subset(name, bank_lib.check_expert_lists(body["experts"], server.bank.cfg),
                             "explicit")
    except bank_lib.SubsetError as e:
      raise protocol.ApiError(400, str(e), param="experts") from e
  keep = protocol.number(body, "keep", None, int, 1, None)
  if keep is None:
    raise protocol.ApiError(400, "give experts (per-layer lists) or keep (experts per layer, shared "
                   "included) with calibration or texts", param="keep")
  num_examples = protocol.number(body, "num_examples", 5, int, 1, None)
  if "texts" in body:
    texts = body["texts"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
      raise protocol.ApiError(400, "texts must be a non-empty list of strings", param="texts")
    source = f"calibration texts ({min(len(texts), num_examples)}), keep {keep}"
  elif isinstance(body.get("calibration"), str):
    path = body["calibration"]
    try:
      texts = protocol.calibration_texts(path)
    except (OSError, ValueError) as e:
      raise protocol.ApiError(400, f"calibration {path!r} cannot be read: {e}",
                     param="calibration") from e
    source = f"calibration {path}, keep {keep}"
  else:
    raise protocol.ApiError(400, "give calibration (a JSONL path) or texts", param="calibration")
  try:
    return bank_lib.select_from_texts(server.bank, texts[:num_examples], keep,
                                      server.tokenizer, name=name, source=source)
  except ValueError as e:
    raise protocol.ApiError(400, str(e), param="keep") from e
