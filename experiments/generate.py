"""Generates text from a training workdir or a (pruned) parameter checkpoint with a KV cache.

  python -m experiments.generate --checkpoint workdirs/demo --prompt "The patient" \
      --prompt "def main(" --max_new_tokens 64 --temperature 0.8 --top_p 0.9
  python -m experiments.generate --checkpoint pruned/ --prompt "To be"   # a pruned model

Prompts run as one batch; each row stops at EOS. Prints each continuation, then one JSON line
with new tokens, seconds and tokens/s (the first call includes compilation; --warmup runs the
batch once before timing).
"""

import json

from absl import app, flags, logging

from emo_jax import generate

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Override the checkpoint's tokenizer.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile with one untimed run first.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  cfg, graphdef, params, tok, _ = generate.load_checkpoint(_CHECKPOINT.value,
                                                           tokenizer=_TOKENIZER.value)
  if tok is None:
    raise app.UsageError("cannot tell which tokenizer the checkpoint uses; pass --tokenizer")
  sampling = generate.SamplingConfig(max_new_tokens=_MAX_NEW.value,
                                     temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                                     seed=_SEED.value)
  if _WARMUP.value:
    generate.generate_text(graphdef, params, tok, _PROMPT.value, sampling)
  result = generate.generate_text(graphdef, params, tok, _PROMPT.value, sampling)
  for prompt, text in zip(_PROMPT.value, result["texts"]):
    print(f"--- {prompt!r}\n{prompt}{text}")
  print(json.dumps({"prompts": len(_PROMPT.value), "num_experts": cfg.num_experts,
                    "new_tokens": result["new_tokens"], "seconds": round(result["seconds"], 3),
                    "tokens_per_s": round(result["tokens_per_s"], 1)}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "prompt"])
  app.run(main)
