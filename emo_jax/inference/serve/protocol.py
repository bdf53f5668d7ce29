"""What the HTTP layer needs beyond the request schemas: OpenAI-style errors, subset names,
calibration files and chat templates. Imports without the serve extra (jinja2 is read only
when a chat is rendered).

Every refusal is an `ApiError`, which the app turns into {"error": {"message", "type", "param",
"code"}} with the message naming the field and the fix.
"""

from __future__ import annotations

import json
import pathlib
import re

from emo_jax.data import sources

SUBSET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ApiError(Exception):
  """An HTTP error with an OpenAI-style body."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               kind: str = "invalid_request_error", code: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.code, self.headers = code, headers


def calibration_texts(path: str) -> list[str]:
  """The "text" of each document of a JSONL file, as experiments.select_experts reads it."""
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
