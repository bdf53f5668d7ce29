"""Selects a task's experts from a few calibration documents and prunes the model to them.

  python -m experiments.select_experts --checkpoint workdirs/demo --calibration task.jsonl \
      --num_examples 5 --keep 4 --out pruned/ [--export_hf qwen2_moe|emo]

--calibration is a JSONL of {"text": ...} documents (the first --num_examples are used, e.g. a
task's few-shot prompts with their answers). --keep K keeps K experts per layer: K-1 routed
chosen greedily layer by layer (docs/algorithm.md) + the shared expert. --out receives the pruned
parameter checkpoint (train it further with --config.train.init_from=OUT, generate with
experiments/generate.py), kept_experts.json / .txt, and with --export_hf a Hugging Face export in
OUT/hf. The last stdout line is one JSON object with params_before / params_after (counts) and
bytes_before / bytes_after.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json
import pathlib
import time

from absl import app, flags, logging

from emo_jax.convert import hf
from emo_jax.data import sources
from emo_jax.convert import loading
from emo_jax.study import calibration, selective
from emo_jax.train import checkpoint as ckpt_lib
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint.")
_CALIBRATION = flags.DEFINE_string("calibration", None, "JSONL of {\"text\": ...} documents.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 5, "Calibration documents to use.")
_KEEP = flags.DEFINE_integer("keep", None, "Experts kept per layer, shared included.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the pruned checkpoint.")
_ONE_PASS = flags.DEFINE_bool("one_pass", False, "Score all layers on the full model in one "
                              "pass instead of greedily layer by layer.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Tokens per calibration document (0 = the "
                                "model's max_seq_len).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer (\"bytes\", .model or "
                                 "tokenizer.json); default: the run's.")
_EXPORT_HF = flags.DEFINE_enum("export_hf", None, ["qwen2_moe", "emo"],
                               "Also write a Hugging Face export of the pruned model to OUT/hf.")


def export_hf(pruned_dir: pathlib.Path, layout: str, tokenizer: str | None) -> dict:
  """Calls the HF converter (emo_jax.convert.hf) on the pruned parameter checkpoint."""
  return hf.export_hf(pruned_dir, pruned_dir / "hf", layout=layout,
                      tokenizer=tokenizer or "none")


def main(argv):
  cli.start(argv)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  start = time.time()
  out = pathlib.Path(_OUT.value)
  if (out / ckpt_lib.PARAMS_ITEM).exists():
    raise app.UsageError(f"{out / ckpt_lib.PARAMS_ITEM} already exists; choose another --out")
  cfg, graphdef, params, tok, spec = loading.load_checkpoint(_CHECKPOINT.value,
                                                              tokenizer=_TOKENIZER.value)
  if tok is None:
    raise app.UsageError(f"cannot tell which tokenizer {_CHECKPOINT.value} uses; pass "
                         "--tokenizer")
  docs = sources.load_documents(_CALIBRATION.value)[:_NUM_EXAMPLES.value]
  if not docs:
    raise app.UsageError(f"{_CALIBRATION.value} holds no documents")
  batches = calibration.calibration_batches([d["text"] for d in docs], tok,
                                            seq_len=_SEQ_LEN.value or cfg.max_seq_len)
  selection = selective.select_experts(graphdef, params, cfg, batches, _KEEP.value,
                                       greedy=not _ONE_PASS.value)
  pruned, pruned_cfg = selective.prune(params, cfg, selection)
  ckpt_lib.save_params(out, pruned, pruned_cfg.to_dict())
  (out / loading.SOURCE_FILE).write_text(json.dumps(
      {"checkpoint": str(pathlib.Path(_CHECKPOINT.value).absolute()), "tokenizer": spec,
       "calibration": str(_CALIBRATION.value), "num_examples": len(docs)}, indent=1))
  files = selective.write_selection(selection, out)
  print(selective.format_table(selection))
  summary = {
      "out": str(out.absolute()), "keep": _KEEP.value, "num_experts_before": cfg.num_experts,
      "routed_kept": _KEEP.value - cfg.num_shared_experts, "top_k": pruned_cfg.top_k,
      "params_before": selective.param_count(params), "params_after": selective.param_count(pruned),
      "bytes_before": selective.param_bytes(params), "bytes_after": selective.param_bytes(pruned),
      "calibration_tokens": calibration.calibration_tokens(batches),
      "greedy": not _ONE_PASS.value, **files}
  if _EXPORT_HF.value:
    summary["hf"] = export_hf(out, _EXPORT_HF.value, spec)["out"]
  summary["seconds"] = round(time.time() - start, 2)
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "calibration", "keep", "out"])
  app.run(main)
