"""Request parsing shared by the HTTP endpoints: OpenAI-style errors, fields, chat templates.

Every refusal is an `ApiError`, which the app turns into {"error": {"message", "type", "param",
"code"}} with the message naming the field and the fix.
"""

from __future__ import annotations

import json
import pathlib
import re

SUBSET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_STOP = 4


class ApiError(Exception):
  """An HTTP error with an OpenAI-style body."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               kind: str = "invalid_request_error", code: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.code, self.headers = code, headers


# ---- request parsing --------------------------------------------------------------------------
def number(body: dict, name: str, default, kind, low=None, high=None):
  value = body.get(name, default)
  if value is None:
    value = default
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and not float(value).is_integer()):
    raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got "
                   f"{value!r}", param=name)
  value = kind(value)
  if (low is not None and value < low) or (high is not None and value > high):
    raise ApiError(400, f"{name}={value} is out of range [{low}, {high}]", param=name)
  return value


def refuse_unsupported(body: dict) -> None:
  """Settings with a non-default value that this server cannot honour."""
  defaults = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0,
              "frequency_penalty": 0, "logit_bias": None}
  for name, default in defaults.items():
    value = body.get(name, default)
    if value not in (default, None) and not (name == "logit_bias" and value == {}):
      raise ApiError(400, f"{name}={value!r} is not supported by this server; leave it at "
                     f"{default!r}", param=name)


def parse_stop(body: dict) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = [stop]
  if (not isinstance(stop, list) or len(stop) > MAX_STOP
      or not all(isinstance(s, str) and s for s in stop)):
    raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} "
                   "non-empty strings", param="stop")
  return tuple(stop)


def json_object(raw: bytes) -> dict:
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from e
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
  return body


def calibration_texts(path: str) -> list[str]:
  """The "text" of each document of a JSONL file, as experiments.select_experts reads it."""
  from emo_jax.data import sources  # pylint: disable=import-outside-toplevel
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"{path} is not a file")
  return [d["text"] for d in sources.load_documents(path)]


def chat_template_of(tokenizer) -> str | None:
  """The tokenizer's chat template (tokenizer_config.json beside a tokenizer.json), if any."""
  path = getattr(tokenizer, "path", None)
  if not path or path == "bytes":
    return None
  folder = pathlib.Path(path)
  folder = folder if folder.is_dir() else folder.parent
  config = folder / "tokenizer_config.json"
  if config.is_file():
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, str):
      return template
  return None


def render_chat(template: str, messages: list[dict], tokenizer) -> str:
  import jinja2.sandbox  # pylint: disable=import-outside-toplevel
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  try:
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            eos_token=tokenizer.decode([tokenizer.eos_id]),
                                            bos_token="")
  except jinja2.TemplateError as e:
    raise ApiError(400, f"the chat template cannot render these messages: {e}",
                   param="messages") from e
