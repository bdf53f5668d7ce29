"""Does llama.cpp run our qwen2_moe export? Converts it to GGUF and compares logits with ours.

  pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llama_sdist
  pip install /tmp/llama_sdist/llama_cpp_python-*.tar.gz     # builds llama.cpp (~20 min, 2 cores)
  python -m experiments.llama_cpp_check --sdist /tmp/llama_sdist/llama_cpp_python-*.tar.gz \
      [--checkpoint W] [--keep 4] [--out /tmp/llama_check]

The sdist carries llama.cpp's own converter (vendor/llama.cpp/convert_hf_to_gguf.py with its
`conversion` package and gguf-py), which is what turns a Hugging Face folder into GGUF. Without
--checkpoint a random tiny MoE (qk_norm off: Qwen2-MoE has no QK-norm) is written first. The
full model and, with --keep, a pruned one (`selective.prune` on a fixed expert selection) are
exported (`convert.hf.export_hf`, layout qwen2_moe), converted at float32, loaded with
llama-cpp-python, run over the same token ids, and their next-token logits compared with this
repository's forward pass. It prints one JSON line per model: max |difference|, the logits'
scale, top-1 agreement, NaN count, and where llama.cpp fails, the step and its message. Both
are the export as written, with no edit: its shared-expert gate is 2^-24, not 0 (see
GATE_EPSILON for why).

Two things of the conversion are set here because our byte-level tokenizer is not one that
llama.cpp's converter knows: its pre-tokenizer name (given as "default") and its BPE merges (it
has none; llama.cpp refuses a BPE vocabulary without the merges key, so one unused merge is
written). Both only concern text tokenization, which this check bypasses by feeding token ids.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import importlib.util
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from safetensors.numpy import load_file

from emo_jax.config import ModelConfig
from emo_jax.convert import hf
from emo_jax.convert import layouts
from emo_jax.convert import loading
from emo_jax.model.transformer import Transformer
from emo_jax.study import selective
from emo_jax.train import checkpoint as ckpt_lib
from experiments import cli


def define_flags() -> None:
  """The command's flags, defined only when it runs as a command (tests import the module
  beside others that define flags of the same names)."""
  flags.DEFINE_string("sdist", None, "llama-cpp-python source archive (.tar.gz).")
  flags.DEFINE_string("checkpoint", None, "A qk_norm=False MoE checkpoint (default: a random "
                      "tiny one).")
  flags.DEFINE_integer("keep", 4, "Also check a pruned export keeping this many experts per "
                       "layer (0 = skip).")
  flags.DEFINE_string("out", None, "Work folder (default: a temporary one).")
  flags.DEFINE_integer("tokens", 24, "Token ids compared per model.")

# llama.cpp's qwen2moe graph computes the shared expert's sigmoid gate as silu(x) / x, which is
# 0 / 0 = NaN at x = 0, so an export with an exactly-zero gate (sigmoid(0) = 0.5, the down
# projection doubled) ran NaN. The exporter therefore writes every gate weight as 2^-24
# (layouts.SHARED_GATE: a float16 subnormal, so it survives every output type), which keeps x
# far below float32's resolution around 0.5: sigmoid(x) is 0.5 to a few ulp, and llama.cpp
# runs the export as it is.
GATE_EPSILON = layouts.SHARED_GATE

CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import gguf
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
original = gguf.SpecialVocab.add_to_gguf
def add_to_gguf(self, writer, *args, **kwargs):
  if not self.merges:
    self.merges = ["a b"]
  return original(self, writer, *args, **kwargs)
gguf.SpecialVocab.add_to_gguf = add_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", "f32"]
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def unpack_converter(sdist: str, into: pathlib.Path) -> pathlib.Path:
  """Extracts vendor/llama.cpp's converter, its `conversion` package and gguf-py."""
  wanted = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
            "vendor/llama.cpp/gguf-py/")
  with tarfile.open(sdist) as tar:
    members = [m for m in tar.getmembers()
               if any(w in m.name for w in wanted) and m.isfile()]
    if not members:
      raise app.UsageError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py; pass the "
                           "llama-cpp-python source archive")
    tar.extractall(into, members=members, filter="data")
  return next(into.glob("*/vendor/llama.cpp"))


def to_gguf(converter: pathlib.Path, hf_dir: pathlib.Path,
            gguf: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs llama.cpp's converter (with this module's two settings, CONVERT) at float32."""
  return subprocess.run([sys.executable, "-c", CONVERT, str(converter), str(hf_dir), str(gguf)],
                        capture_output=True, text=True, check=False)


def random_checkpoint(path: pathlib.Path) -> pathlib.Path:
  cfg = ModelConfig(vocab_size=258, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                    head_dim=16, num_experts=8, num_shared_experts=1, top_k=2,
                    expert_hidden=32, mlp_hidden=128, max_segments=4, max_seq_len=128,
                    compute_dtype="float32", pool=False, qk_norm=False, init_std=0.1)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)  # norms 1, every other weight N(0, init_std^2)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, x.dtype) if "norm" in jax.tree_util.keystr(path)
                       else (cfg.init_std * rng.standard_normal(x.shape)).astype(x.dtype)),
      nnx.to_pure_dict(nnx.state(abstract)))
  ckpt_lib.save_params(path, params, cfg.to_dict())
  return path


def our_logits(checkpoint: pathlib.Path, ids) -> np.ndarray:
  _, graphdef, params, _, _ = loading.load_checkpoint(checkpoint, tokenizer="none")
  logits, _ = nnx.merge(graphdef, params)(jnp.asarray([ids]))
  return np.asarray(logits[0])


def shared_gates(hf_dir: pathlib.Path) -> list[float]:
  """The distinct shared_expert_gate weights of a safetensors export (what llama.cpp reads)."""
  values = set()
  for shard in hf_dir.glob("*.safetensors"):
    for name, tensor in load_file(shard).items():
      if name.endswith("mlp.shared_expert_gate.weight"):
        values.update(float(v) for v in np.unique(tensor))
  return sorted(values)


def check(name: str, checkpoint: pathlib.Path, converter: pathlib.Path, work: pathlib.Path,
          ids) -> dict:
  """One export through llama.cpp, as the exporter writes it (no tensor edited)."""
  hf_dir, gguf = work / f"{name}_hf", work / f"{name}.gguf"
  hf.export_hf(checkpoint, hf_dir, layout="qwen2_moe", tokenizer="bytes")
  result = {"model": name, "shared_expert_gate": shared_gates(hf_dir)}
  done = to_gguf(converter, hf_dir, gguf)
  if done.returncode:
    return {**result, "failed": "convert_hf_to_gguf", "error": done.stderr.strip()[-600:]}
  import llama_cpp  # pylint: disable=import-outside-toplevel
  try:
    # type_k / type_v 0: a float32 KV cache (the default float16 one rounds keys and values).
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)
  except ValueError as e:
    return {**result, "failed": "llama_cpp.Llama (model load)", "error": str(e)}
  llm.eval(list(ids))
  theirs = np.asarray(llm.scores[:len(ids)], np.float32)
  llm.close()
  ours = our_logits(checkpoint, ids)
  result.update({"tokens": len(ids), "nan_in_llama_cpp": int(np.isnan(theirs).sum()),
                 "max_abs_diff": float(np.nanmax(np.abs(theirs - ours))) if np.isfinite(
                     theirs).any() else None,
                 "logit_scale": float(np.abs(ours).max()),
                 "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).mean())})
  return result


def main(argv):
  cli.start(argv)
  if importlib.util.find_spec("llama_cpp") is None:
    raise app.UsageError("llama-cpp-python is not installed; see this module's docstring")
  work = pathlib.Path(flags.FLAGS.out or tempfile.mkdtemp(prefix="llama_check_"))
  work.mkdir(parents=True, exist_ok=True)
  converter = unpack_converter(flags.FLAGS.sdist, work / "src")
  checkpoint = (pathlib.Path(flags.FLAGS.checkpoint) if flags.FLAGS.checkpoint
                else random_checkpoint(work / "random"))
  ids = list(np.random.default_rng(0).integers(2, 258, flags.FLAGS.tokens))
  results = [check("full", checkpoint, converter, work, ids)]
  if flags.FLAGS.keep:
    cfg, _, params, _, _ = loading.load_checkpoint(checkpoint, tokenizer="none")
    n = selective.routed_to_keep(cfg, flags.FLAGS.keep)
    kept = np.stack([np.arange(layer % 2, cfg.num_routed_experts, 2)[:n]
                     for layer in range(cfg.num_layers)])
    selection = selective.Selection(keep=flags.FLAGS.keep, kept_routed=kept,
                                    scores=np.zeros((cfg.num_layers, cfg.num_routed_experts)),
                                    num_routed=cfg.num_routed_experts,
                                    num_shared=cfg.num_shared_experts, greedy=True)
    pruned, pruned_cfg = selective.prune(jax_to_numpy(params), cfg, selection)
    ckpt_lib.save_params(work / "pruned", pruned, pruned_cfg.to_dict())
    results.append(check(f"pruned_keep{flags.FLAGS.keep}", work / "pruned", converter, work, ids))
  for r in results:
    print(json.dumps(r))


def jax_to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["sdist"])
  app.run(main)
