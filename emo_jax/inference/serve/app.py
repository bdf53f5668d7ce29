"""The OpenAI-compatible HTTP layer over the engine (FastAPI): `create_app`.

Endpoints (`routes`): POST /v1/completions, POST /v1/chat/completions (through the tokenizer's
chat template), GET /v1/models, GET /health, GET /metrics (Prometheus text), and the subset
admin API: GET / POST /v1/subsets, DELETE /v1/subsets/{name}. Their bodies are the `schemas`
models, published as the OpenAPI schema (GET /openapi.json, /docs).

The request field `experts` (an extension; the openai client sends it with `extra_body`) names
a registered subset, a union "a+b", or "all"; `model` may name a subset as BASE:NAME instead.
Every refusal is an OpenAI-style error body {"error": {"message", "type", "param", "code"}}
whose message names the field and the fix: a body that does not fit its schema is a 400
naming the field, like every check of `server.Server`. Differences from OpenAI's API:
`temperature` defaults to 0 (greedy, as `experiments.generate`), and settings this server
cannot honour (n > 1, best_of, echo, suffix, penalties, logit_bias) are refused with a 400
rather than ignored. A busy engine answers 429 with Retry-After.

Under a hostile client (`_Guard`, an ASGI middleware around every route): a body over
`max_body_bytes` (--max_body_bytes) is a 413, refused from its content-length or as soon as
the bytes streamed in pass the bound, before it is decoded; a JSON body nesting deeper than
`MAX_JSON_DEPTH` is a 400 before it is decoded; any unexpected exception is a JSON 500 that
keeps the keep-alive connection open. Non-finite numbers and strings that are no Unicode text
(a lone surrogate) are 400s naming the field (`schemas`). A client that goes away frees its
requests' slots within one decode step, streaming or not. `serve` runs the app under uvicorn
so that on SIGTERM the engine drains for drain_seconds and then cancels what is left while
the connections are still open: a cut-off request gets a JSON 503, a cut-off stream an error
event, its finish chunk and `data: [DONE]`. Calibration files (`"calibration"` of POST
/v1/subsets) are read only under the operator's `calibration_dir` (--calibration_dir; none
by default, then only `texts` and `experts` are accepted). /metrics labels HTTP responses by
route template, so deleted subsets and unknown paths add no series.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from emo_jax.inference.serve import engine as engine_lib
from emo_jax.inference.serve import explore
from emo_jax.inference.serve import protocol
from emo_jax.inference.serve import routes
from emo_jax.inference.serve.server import Server, path_label

__all__ = ["Server", "create_app", "serve"]
log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20  # the default --max_body_bytes
MAX_JSON_DEPTH = 64  # arrays and objects inside one another a body may hold


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
  """With manage_engine, starts the engine and at shutdown stops it: running requests get
  drain_seconds to finish, then are cancelled."""
  engine = app.state.server.engine
  manage = app.state.manage_engine
  if manage and not engine.running:
    engine.start()
  yield
  if manage:
    await run_in_threadpool(engine.stop, drain_seconds=app.state.drain_seconds)


def _error(request: Request, status: int, message: str, *, kind: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
  request.app.state.server.count(path_label(request.scope), status)
  return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                 "code": code}}, status_code=status, headers=headers)


async def api_error(request: Request, e: protocol.ApiError) -> JSONResponse:
  return _error(request, e.status, e.message, kind=e.kind, param=e.param, code=e.code,
                headers=e.headers)


def _shown(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
  """A body that does not fit its schema: a 400 naming the first field that does not."""
  error = e.errors()[0]
  loc = [part for part in error["loc"] if part != "body"]
  if error["type"] == "json_invalid":
    detail = error.get("ctx", {}).get("error", "JSON decode error")
    return _error(request, 400, f"the request body is not valid JSON ({detail} at character "
                  f"{loc[0] if loc else 0}); send a JSON object")
  if not loc or not isinstance(loc[0], str):
    return _error(request, 400, "the request body must be a JSON object, sent with "
                  "content-type: application/json")
  field = ".".join(str(part) for part in loc)
  reason = error["msg"].removeprefix("Value error, ")
  reason = reason[:1].lower() + reason[1:]
  got = "" if error["type"] == "missing" else f", got {_shown(error.get('input'))}"
  return _error(request, 400, f"{field}: {reason}{got}", param=loc[0])


async def internal_error(request: Request, e: Exception) -> JSONResponse:
  return _error(request, 500, f"internal error: {type(e).__name__}: {_shown(str(e))}; the "
                "server log has the traceback", kind="server_error")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(body: bytes) -> int:
  """How deep arrays and objects nest in a JSON text (brackets inside strings do not count),
  without decoding it: decoding a text nested 100,000 deep overflows the stack. A text with
  at most MAX_JSON_DEPTH opening brackets answers their count (it cannot nest deeper)."""
  opening = body.count(b"[") + body.count(b"{")
  if opening <= MAX_JSON_DEPTH:
    return opening
  brackets = _JSON_STRING.sub(b'""', body).translate(None, _NOT_BRACKETS)
  steps = np.where(np.isin(np.frombuffer(brackets, np.uint8), list(b"[{")), 1, -1)
  return int(np.cumsum(steps).max(initial=0))


class _Guard:
  """ASGI middleware: bounds the body (413) and its nesting (400) before anything decodes it,
  and turns an unexpected exception into a JSON 500 that keeps the connection (Starlette's
  outermost error handler re-raises, and uvicorn then closes a keep-alive connection)."""

  def __init__(self, app, max_body_bytes: int):
    self.app, self.max_body_bytes = app, max_body_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    started = False

    async def tracked_send(message):
      nonlocal started
      started = started or message["type"] == "http.response.start"
      await send(message)

    async def refuse(status, message, param=None):
      request = Request(scope)
      await _error(request, status, message, param=param)(scope, receive, send)

    limit = self.max_body_bytes
    too_big = (f"the request body is over {limit} bytes, the server's --max_body_bytes; send a "
               "smaller one (shorter prompts or fewer texts)")
    length = dict(scope["headers"]).get(b"content-length", b"")
    if length.isdigit() and int(length) > limit:
      return await refuse(413, too_big)
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] != "http.request":
        return  # the client went away before its body arrived
      chunks.append(message.get("body", b""))
      size += len(chunks[-1])
      if size > limit:
        return await refuse(413, too_big)
      if not message.get("more_body", False):
        break
    body = b"".join(chunks)
    del chunks
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
      return await refuse(400, f"the request body nests arrays and objects {depth} deep; at "
                          f"most {MAX_JSON_DEPTH} levels are accepted: flatten it")
    replayed = False

    async def replay():
      nonlocal replayed
      if replayed:
        return await receive()  # after the body: the client's disconnect
      replayed = True
      return {"type": "http.request", "body": body, "more_body": False}

    try:
      await self.app(scope, replay, tracked_send)
    except Exception as e:  # pylint: disable=broad-except
      if started:
        raise  # nothing to say any more: the response is under way
      log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
      response = await internal_error(Request(scope), e)
      await response(scope, receive, send)


def create_app(engine: engine_lib.Engine, *, model_name: str, request_timeout: float = 600.0,
               chat_template: str | None = None, drain_seconds: float = 5.0,
               manage_engine: bool = True, max_body_bytes: int = MAX_BODY_BYTES,
               calibration_dir: str | None = None) -> FastAPI:
  """The FastAPI app over `engine`. With manage_engine the app starts the engine and stops it
  at shutdown (running requests get drain_seconds to finish, then are cancelled). Bodies over
  max_body_bytes get 413; calibration files are read only under calibration_dir (None: no
  files at all)."""
  if max_body_bytes < 1:
    raise ValueError(f"max_body_bytes={max_body_bytes} must be >= 1")
  app = FastAPI(title="emo_jax expert-subset server", lifespan=_lifespan)
  app.state.server = Server(engine, model_name=model_name, request_timeout=request_timeout,
                            chat_template=chat_template, calibration_dir=calibration_dir)
  app.state.manage_engine = manage_engine
  app.state.drain_seconds = drain_seconds
  app.add_exception_handler(protocol.ApiError, api_error)
  app.add_exception_handler(RequestValidationError, validation_error)
  app.add_exception_handler(Exception, internal_error)
  app.add_middleware(_Guard, max_body_bytes=max_body_bytes)
  app.include_router(routes.router)
  app.include_router(explore.router)  # POST /v1/route, GET /explore (the routing explorer)
  return app


def uvicorn_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "warning"):
  """A uvicorn server for `app` whose shutdown (SIGTERM, SIGINT, or `handle_exit` called from
  another thread) first stops the engine: running requests get drain_seconds, then the rest
  are cancelled while their connections are still open, so each gets a proper error (a JSON
  503, or a stream's error event and `data: [DONE]`). uvicorn waits drain_seconds + 10 s for
  the connections to finish."""
  import uvicorn  # pylint: disable=import-outside-toplevel
  drain = float(app.state.drain_seconds)

  class DrainingServer(uvicorn.Server):
    _drain: threading.Thread | None = None

    def handle_exit(self, sig, frame):
      if self._drain is None and app.state.manage_engine:
        engine = app.state.server.engine
        self._drain = threading.Thread(target=engine.stop, kwargs={"drain_seconds": drain},
                                       name="emo-drain", daemon=True)
        self._drain.start()
      super().handle_exit(sig, frame)

  return DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                       timeout_graceful_shutdown=drain + 10))


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning") -> None:
  """Runs `app` until SIGTERM or SIGINT (see `uvicorn_server`)."""
  uvicorn_server(app, host=host, port=port, log_level=log_level).run()
