"""Text generation for a batch of prompts with a KV cache: greedy, temperature and top-p
(nucleus) sampling, with an optional repetition penalty and no-repeat n-gram ban.

The prompts run through the model once (`decode.prefill`), then one token per step
(`decode.decode_step`); the serving engine drives the same two functions, and the tokens are
picked by the one sampler (`sampling.sample`). Works on full models, on models with an expert
routing mask (`keep_experts`) and on physically pruned models (selective.prune), which are
ordinary models.

The routed experts run dropless here (capacity = all tokens; `loading.inference_execution`),
because capacity drops would make a row's output depend on the other rows and on how many
tokens a step processes.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.inference import decode
from emo_jax.inference import sampling as sampling_lib
# Re-exported: the names callers of generation reach through this module.
from emo_jax.inference.decode import left_pad
from emo_jax.inference.sampling import SamplingConfig, banned_next_tokens, penalize

__all__ = ["SamplingConfig", "banned_next_tokens", "generate_ids", "generate_text", "left_pad",
           "penalize"]


def _rows(sampling: SamplingConfig, keys, history: sampling_lib.History | None
          ) -> sampling_lib.Rows:
  """The step's per-row inputs: every row under the batch's one setting."""
  B = keys.shape[0]
  rows = sampling_lib.Rows(keys=keys, temperature=jnp.full((B,), sampling.temperature, jnp.float32),
                           top_p=jnp.full((B,), sampling.top_p, jnp.float32))
  if history is None:
    return rows
  return rows._replace(seen=jnp.asarray(history.seen), banned=jnp.asarray(history.banned()),
                       repetition_penalty=jnp.full((B,), sampling.repetition_penalty,
                                                   jnp.float32))


def generate_ids(graphdef, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 *, eos_id: int | None = None, pad_id: int = 0,
                 keep_experts: np.ndarray | None = None, return_logits: bool = False) -> dict:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens.

  A row stops after it emits `eos_id` (the EOS is kept in its output); the loop stops when every
  row has stopped. Returns {"tokens": list of generated id lists, "new_tokens": count of
  generated tokens, "seconds", "tokens_per_s"} (timing excludes compilation of the first call
  only if the functions were compiled before), plus "logits" [B, steps, V] (the model's,
  before any penalty) when asked.
  """
  tokens, positions, valid = left_pad(prompts, pad_id)
  B, T = tokens.shape
  steps = sampling.max_new_tokens
  history = None
  if sampling.needs_history:
    vocab_size = nnx.merge(graphdef, params).cfg.vocab_size
    history = sampling_lib.History(prompts, vocab_size, sampling.no_repeat_ngram)
  keep = None if keep_experts is None else jnp.asarray(keep_experts, bool)
  start = time.perf_counter()
  sampled, cache = decode.prefill(
      graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid), keep,
      _rows(sampling, sampling_lib.row_keys(sampling.seed, B), history),
      cache_len=T + steps)
  next_pos = jnp.asarray(valid.sum(axis=1).astype(np.int32))
  out = [[] for _ in range(B)]
  done = np.zeros(B, bool)
  all_logits = []
  new_tokens = 0
  for step in range(steps):
    if return_logits:
      all_logits.append(np.asarray(sampled.logits))
    token_np = np.asarray(sampled.tokens)
    if history is not None:
      history.append(token_np)
    for i in range(B):
      if not done[i]:
        out[i].append(int(token_np[i]))
        new_tokens += 1
        if eos_id is not None and token_np[i] == eos_id:
          done[i] = True
    if done.all() or step == steps - 1:
      break
    sampled, cache = decode.decode_step(graphdef, params, sampled.tokens, next_pos, cache, keep,
                                        _rows(sampling, sampled.keys, history))
    next_pos = next_pos + 1
  seconds = time.perf_counter() - start
  result = {"tokens": out, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_s": new_tokens / max(seconds, 1e-9)}
  if return_logits:
    result["logits"] = np.stack(all_logits, axis=1)
  return result


def generate_text(graphdef, params, tokenizer, prompts: Sequence[str], sampling: SamplingConfig,
                  *, keep_experts: np.ndarray | None = None) -> dict:
  """`generate_ids` on text prompts; adds "texts" (decoded continuations, EOS dropped)."""
  ids = [tokenizer.encode(p) for p in prompts]
  result = generate_ids(graphdef, params, ids, sampling, eos_id=tokenizer.eos_id,
                        pad_id=tokenizer.pad_id, keep_experts=keep_experts)
  result["texts"] = [tokenizer.decode([t for t in row if t != tokenizer.eos_id])
                     for row in result["tokens"]]
  return result
