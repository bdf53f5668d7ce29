"""Serves a checkpoint over an OpenAI-compatible HTTP API, each request on its own experts.

  python -m experiments.serve --checkpoint workdirs/demo --port 8000 \
      --subset code=code_calibration.jsonl:4 --subset medicine=med.jsonl:4

--subset NAME=CALIBRATION.jsonl:K registers the K experts per layer (shared included) that
`experiments.select_experts --calibration CALIBRATION.jsonl --keep K` keeps (its first
--num_examples documents); requests pick it with "experts": "NAME" (the openai client:
extra_body={"experts": "NAME"}) or model "BASE:NAME". "all" (every expert) is registered too
unless --noserve_all, in which case only the subsets' experts are ever resident. Subsets can be
added and removed while serving: POST /v1/subsets, DELETE /v1/subsets/NAME (not "all"); a
subset that running requests use can be neither replaced nor deleted (409). POST /v1/subsets
reads a calibration file ("calibration": "FILE.jsonl") only with --calibration_dir DIR, and
only below DIR; without it, subsets are registered from "texts" or "experts".

Bodies over --max_body_bytes get 413 before they are read whole.

The server prints one JSON line when it listens (with the resident expert bytes), and stops on
SIGTERM or Ctrl-C after letting running requests finish for --drain_seconds; those still
running then get an error (a JSON 503, or a stream's error event and [DONE]).
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json
import pathlib
import signal

from absl import app, flags

from emo_jax.convert import loading
from emo_jax.inference.serve import bank as bank_lib
from emo_jax.inference.serve import engine as engine_lib
from emo_jax.inference.serve import protocol
from emo_jax.model.execution import ExecutionConfig
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind.")
_SUBSET = flags.DEFINE_multi_string("subset", [], "NAME=CALIBRATION.jsonl:K (repeatable).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 5, "Calibration documents per subset.")
_SERVE_ALL = flags.DEFINE_bool("serve_all", True, "Also serve every expert as subset 'all'.")
_SLOTS = flags.DEFINE_integer("slots", 4, "Decode slots (rows decoded together).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Requests waiting beyond the free slots "
                                  "before new ones get 429.")
_TIMEOUT = flags.DEFINE_float("request_timeout", 600.0, "Seconds a request may take.")
_DRAIN = flags.DEFINE_float("drain_seconds", 5.0, "At shutdown, seconds running requests get.")
_CALIBRATION_DIR = flags.DEFINE_string(
    "calibration_dir", None, "Directory whose .jsonl files POST /v1/subsets may name as "
    "\"calibration\" (default none: clients send texts or experts, and no file is read).")
_MAX_BODY_BYTES = flags.DEFINE_integer("max_body_bytes", 4 << 20, "Largest request body (bytes); "
                                       "larger ones get 413 before they are read whole.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model id (default: the checkpoint "
                                  "folder's name).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Override the checkpoint's tokenizer.")
_CLUSTERS = flags.DEFINE_string("clusters", None, "clusters.json of experiments.cluster: the "
                                "routing explorer (GET /explore) colours experts by domain.")
_EXPERT_BACKEND = flags.DEFINE_enum("expert_backend", None, ["capacity", "ragged", "dense"],
                                    "Routed-expert kernel (default: the one experiments.generate "
                                    "runs, so outputs equal its outputs).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile the decode step and the prefill buckets "
                            "before listening.")


def parse_subset(spec: str) -> tuple[str, str, int]:
  """NAME=PATH:K -> (NAME, PATH, K), with a one-line error naming the problem."""
  name, eq, rest = spec.partition("=")
  path, colon, keep = rest.rpartition(":")
  if not (eq and colon and name and path and keep.isdigit()):
    raise app.UsageError(f"--subset {spec!r} must look like NAME=CALIBRATION.jsonl:K, e.g. "
                         "code=code.jsonl:4")
  return name, path, int(keep)


def main(argv):
  cli.start(argv)
  # The serve extra (fastapi, uvicorn): read here so that --help works without it.
  from emo_jax.inference.serve import app as app_lib  # pylint: disable=import-outside-toplevel

  specs = [parse_subset(s) for s in _SUBSET.value]
  if _CALIBRATION_DIR.value is not None and not pathlib.Path(_CALIBRATION_DIR.value).is_dir():
    raise app.UsageError(f"--calibration_dir {_CALIBRATION_DIR.value} is not a directory")
  if _MAX_BODY_BYTES.value < 1:
    raise app.UsageError(f"--max_body_bytes={_MAX_BODY_BYTES.value} must be >= 1")
  if not specs and not _SERVE_ALL.value:
    raise app.UsageError("--noserve_all needs at least one --subset to serve")
  tok_spec = _TOKENIZER.value or loading.tokenizer_spec(_CHECKPOINT.value)
  if not tok_spec or tok_spec == "none":
    raise app.UsageError("cannot tell which tokenizer the checkpoint uses; pass --tokenizer")
  tokenizer = loading.load_tokenizer(tok_spec)
  bank = bank_lib.ExpertBank(_CHECKPOINT.value)
  subsets = {}
  if _SERVE_ALL.value:
    subsets[bank_lib.ALL] = bank_lib.all_experts(bank.cfg)
    bank.commit(bank.prepare(subsets), subsets)
  for name, path, keep in specs:
    try:
      texts = protocol.calibration_texts(path)[:_NUM_EXAMPLES.value]
      subsets[name] = bank_lib.select_from_texts(
          bank, texts, keep, tokenizer, name=name, source=f"calibration {path}, keep {keep}")
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--subset {name}={path}:{keep}: {e}") from e
  bank.commit(bank.prepare(subsets), subsets)
  execution = None
  if _EXPERT_BACKEND.value:
    execution = ExecutionConfig(expert_backend=_EXPERT_BACKEND.value)
  engine = engine_lib.Engine(bank, tokenizer, slots=_SLOTS.value, max_queue=_MAX_QUEUE.value,
                             execution=execution)
  if _WARMUP.value:
    engine.warmup()
  model_name = _MODEL_NAME.value or pathlib.Path(_CHECKPOINT.value).absolute().name
  api = app_lib.create_app(engine, model_name=model_name, request_timeout=_TIMEOUT.value,
                           chat_template=protocol.chat_template_of(tokenizer),
                           drain_seconds=_DRAIN.value, max_body_bytes=_MAX_BODY_BYTES.value,
                           calibration_dir=_CALIBRATION_DIR.value)
  if _CLUSTERS.value:
    from emo_jax.inference.serve import explore  # pylint: disable=import-outside-toplevel
    try:
      explore.attach_clusters(api, _CLUSTERS.value)
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--clusters={_CLUSTERS.value}: {e}") from e
  print(json.dumps({"listening": f"http://{_HOST.value}:{_PORT.value}/v1", "model": model_name,
                    "subsets": sorted(bank.subsets), "slots": _SLOTS.value,
                    **bank.memory()}), flush=True)
  # uvicorn shuts down gracefully on SIGTERM / SIGINT and then re-raises the signal to the
  # handler that was installed before it; this one lets the process end normally (exit 0).
  received = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda number, _: received.append(signal.Signals(number).name))
  app_lib.serve(api, host=_HOST.value, port=_PORT.value)  # drains the engine first on SIGTERM
  print(json.dumps({"stopped": received[0] if received else "exit",
                    "requests": {k: v for k, v in sorted(engine.stats.items())}}), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main)
