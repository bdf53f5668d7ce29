"""Generates text from a training workdir or a (pruned) parameter checkpoint with a KV cache.

  python -m experiments.generate --checkpoint workdirs/demo --prompt "The patient" \
      --prompt "def main(" --max_new_tokens 64
  python -m experiments.generate --checkpoint pruned/ --prompt "To be"   # a pruned model
  python -m experiments.generate --checkpoint workdirs/demo --prompt "The patient" --sample

By default decoding is greedy (argmax): the model's single most likely continuation, the same
tokens the server (experiments.serve), transformers and llama.cpp give for the same model, so
outputs can be compared. Greedy decoding of a model with a validation perplexity in the hundreds
falls into loops ("the the the ..."); --sample reads better on the small models trained here:
tokens sampled at temperature 0.6 from the top-p 0.9 nucleus, with a repetition penalty of 1.2
on tokens already in the row and no 3-gram repeated (each adjustable with its flag). The seed is
fixed, so a command prints the same text every time.

Prompts run as one batch; each row stops at EOS. Prints each continuation, then one JSON line
with new tokens, seconds and tokens/s (the first call includes compilation; --warmup runs the
batch once before timing).
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json

from absl import app, flags, logging

from emo_jax.inference import generate
from emo_jax.convert import loading
from emo_jax.inference.sampling import SamplingConfig
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "Sampling temperature with --sample "
                                  "(0 = argmax).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass with --sample (1 = off).")
_REPETITION_PENALTY = flags.DEFINE_float(
    "repetition_penalty", 1.2, "Divides the (positive) logits of tokens already in the row "
    "(1 = off).")
_NO_REPEAT_NGRAM = flags.DEFINE_integer("no_repeat_ngram", 3, "Never repeat an n-gram of this "
                                        "many tokens (0 = off).")
_SAMPLE = flags.DEFINE_bool("sample", False, "Sample with --temperature, --top_p, "
                            "--repetition_penalty and --no_repeat_ngram instead of argmax.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding, the default (overrides "
                            "--sample).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Override the checkpoint's tokenizer.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile with one untimed run first.")


def main(argv):
  cli.start(argv)
  logging.set_verbosity(logging.WARNING)
  cfg, graphdef, params, tok, _ = loading.load_checkpoint(_CHECKPOINT.value,
                                                           tokenizer=_TOKENIZER.value)
  if tok is None:
    raise app.UsageError("cannot tell which tokenizer the checkpoint uses; pass --tokenizer")
  if _GREEDY.value or not _SAMPLE.value:
    sampling = SamplingConfig(max_new_tokens=_MAX_NEW.value, seed=_SEED.value)
  else:
    sampling = SamplingConfig(
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
        seed=_SEED.value, repetition_penalty=_REPETITION_PENALTY.value,
        no_repeat_ngram=_NO_REPEAT_NGRAM.value)
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
