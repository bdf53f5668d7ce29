"""The HTTP contract of the server: pydantic models of every request and response body.

FastAPI validates each request body against its model and publishes them all as the OpenAPI
schema (GET /openapi.json, /docs). A body that does not fit gets a 400 whose OpenAI-style error
names the field (`app.validation_error`). What depends on the model being served (the
context, the vocabulary, the registered subsets) is checked after this, by `server.Server`.

As in OpenAI's API a JSON null means "not given", and unknown fields are ignored. Numbers are
not read from strings or booleans, and must be finite (NaN and Infinity, which Python's JSON
reader accepts, are refused). A string holding a lone surrogate ("\\ud800", which JSON can
spell but which is no Unicode text) is refused naming its field. Settings this server cannot honour (n > 1, best_of, echo,
suffix, penalties, logit_bias) are fields too, refused unless they have their default value.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, field_serializer,
                      field_validator, model_validator)

from emo_jax.inference.serve.engine import TOP_LOGPROBS

MAX_STOP = 4  # stop strings a request may give (as OpenAI's API)


# ---- field types ------------------------------------------------------------------------------
def _number(value: Any) -> Any:
  if isinstance(value, (bool, str)):
    raise ValueError("must be a number")
  if isinstance(value, float) and not math.isfinite(value):
    raise ValueError("must be a finite number")
  return value


def _lone_surrogate(value: Any, where: str = "") -> str | None:
  """Where in `value` (a JSON value) a string holds a lone surrogate, or None."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      return f"{where or 'the string'} at character {e.start}"
    return None
  if isinstance(value, dict):
    items = value.items()
  elif isinstance(value, (list, tuple)):
    items = enumerate(value)
  else:
    return None
  for key, item in items:
    found = (_lone_surrogate(key, f"{where} key") if isinstance(key, str) else None) or \
        _lone_surrogate(item, f"{where}[{key!r}]" if isinstance(key, str) else f"{where}[{key}]")
    if found:
      return found
  return None


def _integer(value: Any) -> Any:
  if isinstance(value, (bool, str)) or (isinstance(value, float) and not value.is_integer()):
    raise ValueError("must be an integer")
  return value


def _is_token(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _prompt(value: Any) -> Any:
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value and (
      all(_is_token(t) for t in value)
      or all(isinstance(p, str) or (isinstance(p, list) and all(_is_token(t) for t in p))
             for p in value)):
    return value
  raise ValueError("must be a string, a list of strings, or token ids (a list of integers, or "
                   "a list of such lists)")


def _stop(value: Any) -> Any:
  stops = [value] if isinstance(value, str) else value
  if (not isinstance(stops, list) or len(stops) > MAX_STOP
      or not all(isinstance(s, str) and s for s in stops)):
    raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP} non-empty "
                     "strings")
  return stops


def _experts(value: Any) -> Any:
  if not isinstance(value, str) or not value:
    raise ValueError("must be a subset name, names joined by '+', or 'all'")
  return value


Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]
TokenIds = list[StrictInt]
Prompt = Annotated[Union[str, TokenIds, list[Union[str, TokenIds]]], BeforeValidator(_prompt)]
Stop = Annotated[Union[str, list[str]], BeforeValidator(_stop)]
Experts = Annotated[str, BeforeValidator(_experts)]

# Fields of OpenAI's API this server refuses unless they keep these values.
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0,
               "frequency_penalty": 0, "logit_bias": None}


class RequestBody(BaseModel):
  """A request body: unknown fields are ignored, a null field counts as not given, numbers
  are finite and strings are Unicode text."""
  model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

  @model_validator(mode="before")
  @classmethod
  def _null_is_not_given(cls, data: Any) -> Any:
    if isinstance(data, dict):
      return {k: v for k, v in data.items() if v is not None}
    return data

  @field_validator("*", mode="before")
  @classmethod
  def _unicode_text(cls, value: Any) -> Any:
    where = _lone_surrogate(value)
    if where:
      raise ValueError(f"holds a lone surrogate ({where.strip()}), which is no Unicode text; "
                       "send UTF-8 text (a surrogate must be one of a pair)")
    return value


# ---- generation requests ------------------------------------------------------------------------
class StreamOptions(RequestBody):
  include_usage: bool = False


def _stream_options(value: Any) -> Any:
  if not isinstance(value, (dict, StreamOptions)):
    raise ValueError('must be an object such as {"include_usage": true}')
  return value


class GenerationRequest(RequestBody):
  """What /v1/completions and /v1/chat/completions share: which experts and how to sample.

  temperature defaults to 0 (greedy, as `experiments.generate`), unlike OpenAI's 1.
  """
  model: str | None = Field(None, description="BASE or BASE:SUBSET (GET /v1/models).")
  experts: Experts | None = Field(
      None, description="A registered subset, a union 'a+b', or 'all' (an extension: the "
      "openai client sends it with extra_body). Default: the subset `model` names, else 'all'.")
  max_tokens: Integer | None = Field(None, ge=1, description="Default 16.")
  max_completion_tokens: Integer | None = Field(None, ge=1, description="max_tokens' newer name.")
  temperature: Number = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
  top_p: Number = Field(1.0, ge=1e-6, le=1.0)
  seed: Integer | None = Field(None, ge=0, le=2**31 - 1, description="Default: a random seed.")
  stop: Stop | None = None
  stream: bool = False
  stream_options: Annotated[StreamOptions, BeforeValidator(_stream_options)] | None = Field(
      None, description="With stream: include_usage sends a last chunk with the usage.")
  n: Integer = 1
  best_of: Integer = 1
  echo: bool = False
  suffix: str | None = None
  presence_penalty: Number = 0.0
  frequency_penalty: Number = 0.0
  logit_bias: dict[str, Number] | None = None

  @field_validator(*UNSUPPORTED, mode="before")
  @classmethod
  def _refuse_unsupported(cls, value: Any, info) -> Any:
    default = UNSUPPORTED[info.field_name]
    if value != default and not (info.field_name == "logit_bias" and value == {}):
      raise ValueError(f"{value!r} is not supported by this server; leave it at {default!r}")
    return value

  def alternatives(self) -> int:
    """Top log-probabilities to report per token (0 = no log-probabilities)."""
    raise NotImplementedError


class CompletionRequest(GenerationRequest):
  """POST /v1/completions."""
  prompt: Prompt
  logprobs: Integer | None = Field(None, ge=0, le=TOP_LOGPROBS,
                                   description="Top alternatives to report per token.")

  def alternatives(self) -> int:
    return self.logprobs or 0


class ChatMessage(RequestBody):
  """A message; fields beyond role and content (e.g. name) reach the chat template too."""
  model_config = ConfigDict(extra="allow")
  role: str
  content: str


class ChatCompletionRequest(GenerationRequest):
  """POST /v1/chat/completions, rendered through the tokenizer's chat template."""
  messages: list[ChatMessage] = Field(min_length=1)
  logprobs: bool = False
  top_logprobs: Integer | None = Field(None, ge=0, le=TOP_LOGPROBS)

  def alternatives(self) -> int:
    return (self.top_logprobs or 1) if self.logprobs else 0


# ---- generation responses ---------------------------------------------------------------------
class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class Logprobs(BaseModel):
  """The completions API's log-probabilities of a choice (or of a stream chunk's tokens)."""
  tokens: list[str]
  token_logprobs: list[float]
  text_offset: list[int]
  top_logprobs: list[dict[str, float]] | None


class CompletionChoice(BaseModel):
  index: int
  text: str
  logprobs: Logprobs | None
  finish_reason: str | None


class Completion(BaseModel):
  """The response of /v1/completions; in a stream, the last chunk when include_usage asks
  for it (with no choices)."""
  id: str
  object: Literal["text_completion"] = "text_completion"
  created: int
  model: str
  choices: list[CompletionChoice]
  usage: Usage


class CompletionChunk(BaseModel):
  """One server-sent event of a /v1/completions stream."""
  id: str
  object: Literal["text_completion"] = "text_completion"
  created: int
  model: str
  choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class ChatChoice(BaseModel):
  index: int
  message: AssistantMessage
  finish_reason: str


class ChatCompletion(BaseModel):
  """The response of /v1/chat/completions."""
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int
  model: str
  choices: list[ChatChoice]
  usage: Usage


class ChatDelta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class ChatChunkChoice(BaseModel):
  index: int
  delta: ChatDelta
  finish_reason: str | None

  @field_serializer("delta")
  def _only_given(self, delta: ChatDelta) -> dict:
    return delta.model_dump(exclude_none=True)  # the finishing chunk's delta is {}


class ChatCompletionChunk(BaseModel):
  """One server-sent event of a /v1/chat/completions stream; with include_usage, the last
  one has no choices and the usage."""
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int
  model: str
  choices: list[ChatChunkChoice]
  usage: Usage | None = None


# ---- the rest of the API ----------------------------------------------------------------------
class ErrorDetail(BaseModel):
  message: str
  type: str
  param: str | None
  code: str | None


class ErrorBody(BaseModel):
  """Every refusal: the message names the field and the fix."""
  error: ErrorDetail


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "emo_jax"


class ModelList(BaseModel):
  """GET /v1/models: the base model and BASE:SUBSET for every registered subset."""
  object: Literal["list"] = "list"
  data: list[ModelCard]


class Memory(BaseModel):
  """Where the bytes are (`bank.ExpertBank.memory`)."""
  resident_expert_bytes: int
  bank_bytes: int
  full_expert_bytes: int
  non_expert_bytes: int
  resident_experts: int
  routed_experts: int


class Health(Memory):
  """GET /health."""
  status: Literal["ok"] = "ok"
  slots: int
  active: int
  queue_depth: int
  subsets: list[str]


class SubsetInfo(BaseModel):
  name: str
  model: str = Field(description="The model id that routes into this subset.")
  source: str = Field(description="How it was made (calibration, explicit, all).")
  experts: list[list[int]] = Field(description="Routed expert ids per layer.")
  expert_bytes: int = Field(description="Bytes of its experts, shared ones included.")


class SubsetList(BaseModel):
  """GET /v1/subsets."""
  subsets: list[SubsetInfo]
  memory: Memory


class RegisteredSubset(SubsetInfo):
  """POST /v1/subsets: the subset and the bank's memory after registering it."""
  memory: Memory


class DeletedSubset(BaseModel):
  """DELETE /v1/subsets/{name}."""
  deleted: str
  memory: Memory


class SubsetRequest(RequestBody):
  """POST /v1/subsets: {name, experts} (per-layer routed ids), or {name, keep} with
  calibration texts or a JSONL path on the server (as `experiments.select_experts`)."""
  name: str = Field(description="1-64 letters, digits, '_', '.' or '-' (not 'all').")
  experts: list[list[StrictInt]] | None = None
  keep: Integer | None = Field(None, ge=1, description="Experts per layer, shared included.")
  texts: list[str] | None = Field(None, min_length=1)
  calibration: str | None = Field(None, description="A JSONL file on the server.")
  num_examples: Integer = Field(5, ge=1, description="Calibration documents to use.")
