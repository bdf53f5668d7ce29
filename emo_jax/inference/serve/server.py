"""The server's state and its translation between the HTTP bodies and the engine.

One `Server` lives in `app.state.server`; the routes (`routes`) read it from the request. It
resolves which experts a request routes into, turns prompts into token ids, checks what the
schemas cannot (the context, the vocabulary, the registered subsets), submits the engine
requests, spells tokens and log-probabilities the OpenAI way and writes /metrics. Every
refusal is a `protocol.ApiError` naming the field and the fix.
"""

from __future__ import annotations

import asyncio
import pathlib
import time

import numpy as np

from emo_jax.inference.serve import bank as bank_lib
from emo_jax.inference.serve import engine as engine_lib
from emo_jax.inference.serve import protocol
from emo_jax.inference.serve import schemas


# A prompt longer than context * MAX_CHARS_PER_TOKEN characters cannot fit in the context
# (no token of a usual vocabulary spells more characters): it is refused before tokenising.
MAX_CHARS_PER_TOKEN = 32
MAX_CALIBRATION_BYTES = 64 << 20  # the largest calibration file POST /v1/subsets reads


def path_label(scope) -> str:
  """The /metrics label of a request's path: its route's template (/v1/subsets/{name}), so
  that subset names and unknown paths add no series; "unmatched" for a path no route serves.
  Before routing (a refusal of the app's middleware) the template is looked up."""
  route = scope.get("route")
  if route is None and "app" in scope:
    route = _matching_route(scope["app"].router.routes, scope)
  return getattr(route, "path", None) or "unmatched"


def _matching_route(routes, scope):
  from starlette.routing import Match  # pylint: disable=import-outside-toplevel
  for route in routes:
    included = getattr(route, "original_router", None)  # FastAPI's include_router
    if included is not None:
      found = _matching_route(included.routes, scope)
    elif getattr(route, "path", None) and route.matches(scope)[0] == Match.FULL:
      found = route
    else:
      found = None
    if found is not None:
      return found
  return None


class Server:
  """What the endpoints share: the engine, its bank and tokenizer, and the HTTP counts."""

  def __init__(self, engine: engine_lib.Engine, *, model_name: str,
               request_timeout: float = 600.0, chat_template: str | None = None,
               calibration_dir: str | None = None):
    self.engine = engine
    self.bank = engine.bank
    self.tokenizer = engine.tokenizer
    self.model_name = model_name
    self.request_timeout = request_timeout
    self.chat_template = chat_template
    self.calibration_dir = (None if calibration_dir is None
                            else pathlib.Path(calibration_dir).resolve())
    if self.calibration_dir is not None and not self.calibration_dir.is_dir():
      raise ValueError(f"calibration_dir {calibration_dir} is not a directory")
    self.http_counts: dict[tuple[str, int], int] = {}
    self.started = time.time()

  # ---- which experts --------------------------------------------------------------------------
  def resolve_experts(self, model: str | None, experts: str | None
                      ) -> tuple[tuple[str, ...], np.ndarray]:
    """(subset names, routing mask [layers, routed]) of a request's `model` and `experts`."""
    from_model = None
    if model is not None:
      if model.startswith(self.model_name + ":"):
        from_model = model[len(self.model_name) + 1:]
      elif model != self.model_name:
        raise protocol.ApiError(404, f"model {model!r} is not served here; GET /v1/models "
                                f"lists {self.model_name!r} and {self.model_name}:SUBSET",
                                param="model", code="model_not_found")
    if experts is None:
      experts = from_model or bank_lib.ALL
    elif from_model is not None and experts != from_model:
      raise protocol.ApiError(400, f"model names subset {from_model!r} but experts names "
                              f"{experts!r}; give one of them", param="experts")
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
  def prompt_ids(self, prompt, param: str = "prompt") -> list[list[int]]:
    """Token ids of every prompt of a request (a string, token ids, or a list of either)."""
    vocab = self.bank.cfg.vocab_size
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
      prompt = [prompt]
    out = []
    for p in prompt:
      if isinstance(p, str):
        longest = self.engine.context * MAX_CHARS_PER_TOKEN
        if len(p) > longest:  # before tokenising it: that alone would take seconds
          raise protocol.ApiError(400, f"{param} is {len(p)} characters, more than the context "
                                  f"of {self.engine.context} tokens can hold; shorten it",
                                  param=param)
        ids = list(self.tokenizer.encode(p))
      elif all(0 <= t < vocab for t in p):
        ids = list(p)
      else:
        raise protocol.ApiError(400, f"{param} token ids must be integers in [0, {vocab})",
                                param=param)
      if not ids:
        raise protocol.ApiError(400, f"{param} is empty; give at least one token", param=param)
      if len(ids) >= self.engine.context:
        raise protocol.ApiError(400, f"{param} is {len(ids)} tokens, the context is "
                                f"{self.engine.context}; shorten it", param=param)
      out.append(ids)
    return out

  def chat_prompt_ids(self, messages: list[schemas.ChatMessage]) -> list[list[int]]:
    if self.chat_template is None:
      raise protocol.ApiError(400, f"the model's tokenizer ({self.tokenizer!r}) has no chat "
                              "template; use /v1/completions with a plain prompt",
                              param="messages")
    text = protocol.render_chat(self.chat_template, [m.model_dump() for m in messages],
                                self.tokenizer)
    return self.prompt_ids(text, "messages")

  def sampling(self, body: schemas.GenerationRequest, prompts: list[list[int]]) -> dict:
    """The `engine.Request` fields of a request's sampling settings."""
    longest = max(len(p) for p in prompts)
    room = self.engine.context - longest
    max_tokens = body.max_tokens or body.max_completion_tokens or 16
    if max_tokens > room:
      raise protocol.ApiError(400, f"max_tokens={max_tokens} does not fit: the prompt is "
                              f"{longest} tokens and the context {self.engine.context}; ask "
                              f"for at most {room}", param="max_tokens")
    seed = body.seed if body.seed is not None else int(np.random.randint(0, 2**31 - 1))
    return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "seed": seed, "stop": tuple(body.stop or ()), "logprobs": body.alternatives()}

  # ---- running ---------------------------------------------------------------------------------
  def submit(self, prompts, names, mask, sampling: dict,
             events: asyncio.Queue) -> list[engine_lib.Request]:
    """One engine request per prompt; their events arrive on `events` as (index, event)."""
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

  # ---- spelling tokens -------------------------------------------------------------------------
  def token_string(self, token: int) -> str:
    """A token's text, or "token_id:N" when it is no whole character (a partial UTF-8 byte),
    so that distinct tokens stay distinct keys of top_logprobs."""
    text = self.tokenizer.decode([int(token)])
    return f"token_id:{int(token)}" if "\ufffd" in text else text

  def logprobs_body(self, tokens, logprobs, top) -> schemas.Logprobs:
    eos = self.tokenizer.eos_id
    offsets = [len(self.tokenizer.decode([t for t in tokens[:i] if t != eos]))
               for i in range(len(tokens))]  # where each token starts in the text
    return schemas.Logprobs(
        tokens=[self.token_string(t) for t in tokens], token_logprobs=logprobs,
        text_offset=offsets, top_logprobs=None if top is None else [
            {self.token_string(i): lp for i, lp in t.items()} for t in top])

  # ---- state for the admin endpoints -------------------------------------------------------------
  def memory(self) -> schemas.Memory:
    return schemas.Memory(**self.bank.memory())

  def subset_info(self, name: str) -> schemas.SubsetInfo:
    subset = self.bank.subsets[name]
    return schemas.SubsetInfo(name=name, model=f"{self.model_name}:{name}",
                              source=subset.source,
                              experts=[list(k) for k in subset.kept_routed],
                              expert_bytes=self.bank.subset_bytes(name))

  def subset_from_request(self, body: schemas.SubsetRequest) -> bank_lib.Subset:
    """The subset a registration asks for: its explicit experts, or the calibration selection
    (`bank.select_from_texts`). Reads files and may run the model: call it off the event loop."""
    name = body.name
    if not protocol.SUBSET_NAME.match(name) or name == bank_lib.ALL:
      raise protocol.ApiError(400, "name must be 1-64 letters, digits, '_', '.' or '-' (not "
                              "'all')", param="name")
    if body.experts is not None:
      try:
        return bank_lib.Subset(name, bank_lib.check_expert_lists(body.experts, self.bank.cfg),
                               "explicit")
      except bank_lib.SubsetError as e:
        raise protocol.ApiError(400, str(e), param="experts") from e
    if body.keep is None:
      raise protocol.ApiError(400, "give experts (per-layer lists) or keep (experts per layer, "
                              "shared included) with calibration or texts", param="keep")
    keep, num_examples = body.keep, body.num_examples
    if body.texts is not None:
      texts = body.texts
      source = f"calibration texts ({min(len(texts), num_examples)}), keep {keep}"
    elif body.calibration is not None:
      texts = self.calibration_texts(body.calibration)
      source = f"calibration {body.calibration}, keep {keep}"
    else:
      raise protocol.ApiError(400, "give calibration (a JSONL path) or texts",
                              param="calibration")
    try:
      return bank_lib.select_from_texts(self.bank, texts[:num_examples], keep, self.tokenizer,
                                        name=name, source=source)
    except ValueError as e:
      raise protocol.ApiError(400, str(e), param="keep") from e

  def calibration_texts(self, name: str) -> list[str]:
    """The texts of calibration file `name`, a .jsonl path relative to calibration_dir that
    resolves (symlinks and '..' followed) inside it. Errors never quote the file."""
    def refuse(reason):
      raise protocol.ApiError(400, f"calibration {name!r}: {reason}", param="calibration")
    if self.calibration_dir is None:
      refuse("this server reads no calibration files (the operator starts it with "
             "--calibration_dir DIR to allow files under DIR); send texts or experts instead")
    if "\x00" in name or not name.endswith(".jsonl"):
      refuse("must name a .jsonl file under the server's --calibration_dir")
    path = (self.calibration_dir / name).resolve()
    if not path.is_relative_to(self.calibration_dir):
      refuse("is outside the server's --calibration_dir; name a .jsonl file relative to it")
    if not path.is_file():
      refuse("no such file under the server's --calibration_dir")
    if path.stat().st_size > MAX_CALIBRATION_BYTES:
      refuse(f"the file is over {MAX_CALIBRATION_BYTES} bytes; use a shorter one")
    try:
      return protocol.calibration_texts(str(path))
    except Exception as e:  # pylint: disable=broad-except
      refuse(f"cannot be read as JSONL with a \"text\" field on every line "
             f"({type(e).__name__}); fix the file")

  # ---- metrics ---------------------------------------------------------------------------------
  def count(self, path: str, status: int) -> None:
    self.http_counts[(path, status)] = self.http_counts.get((path, status), 0) + 1

  def metrics(self) -> str:
    """The Prometheus text of GET /metrics."""
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
