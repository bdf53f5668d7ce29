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
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from emo_jax.inference.serve import engine as engine_lib
from emo_jax.inference.serve import explore
from emo_jax.inference.serve import protocol
from emo_jax.inference.serve import routes
from emo_jax.inference.serve.server import Server

__all__ = ["Server", "create_app"]


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
  request.app.state.server.count(request.url.path, status)
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
  return _error(request, 500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


def create_app(engine: engine_lib.Engine, *, model_name: str, request_timeout: float = 600.0,
               chat_template: str | None = None, drain_seconds: float = 5.0,
               manage_engine: bool = True) -> FastAPI:
  """The FastAPI app over `engine`. With manage_engine the app starts the engine and stops it
  at shutdown (running requests get drain_seconds to finish, then are cancelled)."""
  app = FastAPI(title="emo_jax expert-subset server", lifespan=_lifespan)
  app.state.server = Server(engine, model_name=model_name, request_timeout=request_timeout,
                            chat_template=chat_template)
  app.state.manage_engine = manage_engine
  app.state.drain_seconds = drain_seconds
  app.add_exception_handler(protocol.ApiError, api_error)
  app.add_exception_handler(RequestValidationError, validation_error)
  app.add_exception_handler(Exception, internal_error)
  app.include_router(routes.router)
  app.include_router(explore.router)  # POST /v1/route, GET /explore (the routing explorer)
  return app
