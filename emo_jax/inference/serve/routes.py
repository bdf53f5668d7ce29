"""The HTTP endpoints, as FastAPI routes of one module-level router (`app.create_app` mounts it).

Every route reads the server's state from `request.app.state.server` (a `server.Server`) and
its body is a `schemas` model, so the OpenAPI schema is the contract. Completions and chat
completions differ only in how the prompt is made and how the output is spelled: both run
through `_generate` (parse, submit, then collect or stream), given an `_Output` that spells
their response and stream chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Callable

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from emo_jax.inference.serve import bank as bank_lib
from emo_jax.inference.serve import engine as engine_lib
from emo_jax.inference.serve import protocol
from emo_jax.inference.serve import schemas
from emo_jax.inference.serve.server import Server, path_label

router = APIRouter()
log = logging.getLogger(__name__)
ERRORS = {status: {"model": schemas.ErrorBody}
          for status in (400, 404, 409, 413, 429, 500, 503, 504)}
STREAMED = {200: {"content": {"text/event-stream": {}},
                  "description": "The response; with stream: true, server-sent events "
                                 "`data: CHUNK` (schemas.CompletionChunk or "
                                 "ChatCompletionChunk), then `data: [DONE]`."}}


def _server(request: Request) -> Server:
  return request.app.state.server


# ---- one generation, collected or streamed ----------------------------------------------------
@dataclasses.dataclass
class _Choice:
  """One prompt's output as its events arrive."""
  text: list[str] = dataclasses.field(default_factory=list)
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  top: list[dict[int, float]] = dataclasses.field(default_factory=list)
  done: engine_lib.Done | None = None

  def add(self, delta: engine_lib.Delta) -> None:
    self.text.append(delta.text)
    self.tokens += delta.tokens
    self.logprobs += delta.logprobs
    self.top += delta.top_logprobs or []


def _usage(prompt_tokens: int, completion_tokens: int) -> schemas.Usage:
  return schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)


class _Output:
  """How an endpoint spells a generation: its response, and the chunks of its stream."""
  prefix = ""

  def __init__(self, server: Server, body: schemas.GenerationRequest):
    self.server, self.body = server, body
    self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
    self.created = int(time.time())
    self.model = body.model or server.model_name

  def response(self, choices: list[_Choice], usage: schemas.Usage) -> BaseModel:
    raise NotImplementedError

  def chunk(self, index: int, delta: engine_lib.Delta | None,
            finish_reason: str | None) -> BaseModel:
    """A stream chunk: the delta's text, or (delta None) the choice's finish."""
    raise NotImplementedError

  def final_chunks(self, usage: schemas.Usage) -> list[BaseModel]:
    """The chunks after every choice finished: the usage, when include_usage asks for it."""
    options = self.body.stream_options
    if options is None or not options.include_usage:
      return []
    return [self.usage_chunk(usage)]

  def usage_chunk(self, usage: schemas.Usage) -> BaseModel:
    raise NotImplementedError


class _CompletionOutput(_Output):
  prefix = "cmpl"

  def _logprobs(self, tokens, logprobs, top) -> schemas.Logprobs | None:
    if not self.body.alternatives():
      return None
    return self.server.logprobs_body(tokens, logprobs, top)

  def response(self, choices, usage):
    return schemas.Completion(
        id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            schemas.CompletionChoice(index=i, text="".join(c.text),
                                     logprobs=self._logprobs(c.tokens, c.logprobs, c.top),
                                     finish_reason=c.done.finish_reason)
            for i, c in enumerate(choices)])

  def chunk(self, index, delta, finish_reason):
    logprobs = None if delta is None else self._logprobs(delta.tokens, delta.logprobs,
                                                         delta.top_logprobs)
    return schemas.CompletionChunk(
        id=self.id, created=self.created, model=self.model, choices=[
            schemas.CompletionChoice(index=index, text=delta.text if delta else "",
                                     logprobs=logprobs, finish_reason=finish_reason)])

  def usage_chunk(self, usage):
    return schemas.Completion(id=self.id, created=self.created, model=self.model, choices=[],
                              usage=usage)


class _ChatOutput(_Output):
  prefix = "chatcmpl"

  def response(self, choices, usage):
    first = choices[0]  # a chat request has one prompt
    return schemas.ChatCompletion(
        id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            schemas.ChatChoice(index=0, message=schemas.AssistantMessage(
                content="".join(first.text)), finish_reason=first.done.finish_reason)])

  def chunk(self, index, delta, finish_reason):
    message = (schemas.ChatDelta(role="assistant", content=delta.text) if delta
               else schemas.ChatDelta())
    return schemas.ChatCompletionChunk(
        id=self.id, created=self.created, model=self.model, choices=[
            schemas.ChatChunkChoice(index=index, delta=message, finish_reason=finish_reason)])

  def usage_chunk(self, usage):
    return schemas.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                       choices=[], usage=usage)


async def _generate(request: Request, body: schemas.GenerationRequest,
                    prompt_ids: Callable[[Server], list[list[int]]], output_type: type[_Output]):
  """Resolves the experts and prompts, submits one engine request per prompt, then returns the
  whole response or streams it."""
  server = _server(request)
  names, mask = server.resolve_experts(body.model, body.experts)
  prompts = await run_in_threadpool(prompt_ids, server)  # tokenising is off the event loop
  settings = server.sampling(body, prompts)
  output = output_type(server, body)
  events: asyncio.Queue = asyncio.Queue()
  requests = server.submit(prompts, names, mask, settings, events)
  if body.stream:
    server.count(path_label(request.scope), 200)
    return StreamingResponse(_stream(requests, events, output), media_type="text/event-stream")
  choices = await _collect(request, requests, events, server.request_timeout)
  server.count(path_label(request.scope), 200)
  return output.response(choices, _usage(sum(c.done.prompt_tokens for c in choices),
                                         sum(c.done.completion_tokens for c in choices)))


async def _cancel_on_disconnect(request: Request, requests) -> None:
  """Waits for the client to go away, then cancels its requests: the engine frees their slots
  at its next step (the body has been read, so the next ASGI message is the disconnect)."""
  while (await request.receive())["type"] != "http.disconnect":
    pass
  for req in requests:
    req.cancel()


async def _collect(request: Request, requests, events: asyncio.Queue,
                   timeout: float) -> list[_Choice]:
  """Every choice's text and tokens; cancels them all as soon as the client goes away."""
  choices = [_Choice() for _ in requests]
  remaining = len(requests)
  watcher = asyncio.create_task(_cancel_on_disconnect(request, requests))
  try:
    while remaining:
      index, event = await events.get()
      if isinstance(event, engine_lib.Done):
        choices[index].done = event
        remaining -= 1
      else:
        choices[index].add(event)
  except BaseException:
    for req in requests:
      req.cancel()
    raise
  finally:
    watcher.cancel()
  for choice in choices:
    reason = choice.done.finish_reason
    if reason == "timeout":
      raise protocol.ApiError(504, f"the request did not finish within {timeout} s",
                              kind="timeout_error")
    if reason == "error":
      raise protocol.ApiError(500, choice.done.error or "generation failed", kind="server_error")
    if reason == "cancelled":
      raise protocol.ApiError(503, "the request was cancelled (the server is shutting down)",
                              kind="server_error")
  return choices


def _sse(chunk: BaseModel) -> str:
  return f"data: {chunk.model_dump_json()}\n\n"


async def _stream(requests, events: asyncio.Queue, output: _Output):
  """The server-sent events of a stream; a failed choice sends an error event and finishes
  with "abort"."""
  prompt_tokens = completion_tokens = 0
  try:
    remaining = len(requests)
    while remaining:
      index, event = await events.get()
      if isinstance(event, engine_lib.Delta):
        yield _sse(output.chunk(index, event, None))
        continue
      remaining -= 1
      prompt_tokens += event.prompt_tokens
      completion_tokens += event.completion_tokens
      reason = event.finish_reason
      if reason in ("error", "timeout", "cancelled"):
        yield _sse(schemas.ErrorBody(error=schemas.ErrorDetail(
            message=event.error or f"generation {reason}", type="server_error", param=None,
            code=reason)))
        reason = "abort"
      yield _sse(output.chunk(index, None, reason))
    for chunk in output.final_chunks(_usage(prompt_tokens, completion_tokens)):
      yield _sse(chunk)
    yield "data: [DONE]\n\n"
  except Exception as e:  # pylint: disable=broad-except
    # The response is under way: the stream itself must say that it failed.
    log.exception("a stream failed")
    yield _sse(schemas.ErrorBody(error=schemas.ErrorDetail(
        message=f"internal error: {type(e).__name__}", type="server_error", param=None,
        code="error")))
    yield "data: [DONE]\n\n"
  finally:
    for req in requests:
      req.cancel()  # no-op for finished ones; frees the slot when the client went away


# ---- the endpoints ------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=schemas.Completion,
             responses={**ERRORS, **STREAMED})
async def completions(request: Request, body: schemas.CompletionRequest):
  """Continues the prompt(s) on the experts the request names."""
  return await _generate(request, body, lambda server: server.prompt_ids(body.prompt),
                         _CompletionOutput)


@router.post("/v1/chat/completions", response_model=schemas.ChatCompletion,
             responses={**ERRORS, **STREAMED})
async def chat_completions(request: Request, body: schemas.ChatCompletionRequest):
  """Answers the messages, rendered through the tokenizer's chat template."""
  return await _generate(request, body, lambda server: server.chat_prompt_ids(body.messages),
                         _ChatOutput)


@router.get("/v1/models", response_model=schemas.ModelList)
async def models(request: Request):
  """The model ids a request may name: BASE:SUBSET for every subset, and BASE (which routes
  into 'all') while 'all' is registered."""
  server = _server(request)
  subsets = sorted(server.bank.subsets)
  ids = ([server.model_name] if bank_lib.ALL in subsets else []) + [
      f"{server.model_name}:{n}" for n in subsets]
  return schemas.ModelList(data=[schemas.ModelCard(id=i, created=int(server.started))
                                 for i in ids])


@router.get("/health", response_model=schemas.Health)
async def health(request: Request):
  server = _server(request)
  engine = server.engine
  return schemas.Health(slots=engine.slots, active=engine.active(),
                        queue_depth=engine.queue_depth(), subsets=sorted(server.bank.subsets),
                        **server.bank.memory())


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
  """Prometheus text."""
  return PlainTextResponse(_server(request).metrics(), media_type="text/plain; version=0.0.4")


@router.get("/v1/subsets", response_model=schemas.SubsetList)
async def list_subsets(request: Request):
  server = _server(request)
  return schemas.SubsetList(subsets=[server.subset_info(n) for n in sorted(server.bank.subsets)],
                            memory=server.memory())


@router.post("/v1/subsets", response_model=schemas.RegisteredSubset, responses=ERRORS)
async def register_subset(request: Request, body: schemas.SubsetRequest):
  """Registers a subset, or replaces one no request uses (409 while one does); only its
  experts not yet resident are read."""
  server = _server(request)
  subset = await run_in_threadpool(server.subset_from_request, body)
  try:
    memory = await run_in_threadpool(server.engine.register, subset)
  except engine_lib.SubsetInUse as e:
    raise protocol.ApiError(409, str(e), param="name") from e
  except bank_lib.SubsetError as e:
    raise protocol.ApiError(400, str(e), param="name") from e
  server.count(path_label(request.scope), 200)
  return schemas.RegisteredSubset(**server.subset_info(subset.name).model_dump(),
                                  memory=schemas.Memory(**memory))


@router.delete("/v1/subsets/{name}", response_model=schemas.DeletedSubset, responses=ERRORS)
async def delete_subset(request: Request, name: str):
  """Drops a subset and frees the experts no other subset uses (409 while it is in use)."""
  server = _server(request)
  if name == bank_lib.ALL and name in server.bank.subsets:
    raise protocol.ApiError(400, "subset 'all' cannot be deleted: requests without experts "
                            "route into it, and it cannot be registered again; delete the "
                            "other subsets, or start the server with --noserve_all",
                            param="name")
  if name not in server.bank.subsets:
    raise protocol.ApiError(404, f"no subset named {name!r}; registered: "
                            f"{sorted(server.bank.subsets)}", param="name")
  try:
    memory = await run_in_threadpool(server.engine.delete, name)
  except bank_lib.SubsetError as e:
    raise protocol.ApiError(409, str(e), param="name") from e
  server.count(path_label(request.scope), 200)
  return schemas.DeletedSubset(deleted=name, memory=schemas.Memory(**memory))
