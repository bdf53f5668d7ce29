"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling, with an
optional repetition penalty and no-repeat n-gram ban (small models loop without them).

Prompts of a batch are left-padded to a common length so that every row writes the same cache
slot at every step (one `dynamic_update_slice`, one compiled step function whatever the batch's
prompt lengths); RoPE positions are per row and padding slots are never attended to, so a padded
row produces exactly what it would alone. The prompt runs through the model once (prefill), then
one token per step. Works on full models, on models with an expert routing mask
(`keep_experts`) and on physically pruned models (selective.prune), which are ordinary models.

The routed experts run dropless here (capacity = all tokens), because capacity drops would make
a row's output depend on the other rows and on how many tokens a step processes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is picked. temperature 0 = greedy (argmax).

  repetition_penalty > 1 makes every token already in the row (prompt or generated) less
  likely: its logit is divided by the penalty when positive, multiplied when negative (the
  CTRL rule, as in transformers). no_repeat_ngram = n > 0 forbids any token that would repeat
  an n-gram already in the row. Both are off by default (1.0 and 0); a small model decoded
  greedily repeats itself ("the the the"), which they prevent.
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  repetition_penalty: float = 1.0
  no_repeat_ngram: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if not self.repetition_penalty >= 1.0:
      raise ValueError(f"repetition_penalty={self.repetition_penalty} must be >= 1 (1 = off)")
    if self.no_repeat_ngram < 0:
      raise ValueError(f"no_repeat_ngram={self.no_repeat_ngram} must be >= 0 (0 = off)")

  @property
  def needs_history(self) -> bool:
    return self.repetition_penalty != 1.0 or self.no_repeat_ngram > 0


def penalize(logits_BxV: jax.Array, seen_BxV: jax.Array, banned_BxV: jax.Array,
             repetition_penalty: float) -> jax.Array:
  """Logits with seen tokens penalised (CTRL rule) and banned tokens at -inf."""
  logits = logits_BxV.astype(jnp.float32)
  if repetition_penalty != 1.0:
    penalised = jnp.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
    logits = jnp.where(seen_BxV, penalised, logits)
  return jnp.where(banned_BxV, -jnp.inf, logits)


def banned_next_tokens(history: Sequence[int], n: int) -> set[int]:
  """Tokens that would complete an n-gram already in `history` (no-repeat n-gram)."""
  if n <= 0 or len(history) < n - 1:
    return set()
  if n == 1:
    return set(history)
  prefix = tuple(history[len(history) - n + 1:])
  return {history[i + n - 1] for i in range(len(history) - n + 1)
          if tuple(history[i:i + n - 1]) == prefix}


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature: float,
                  top_p: float) -> jax.Array:
  """Next token ids [B]: argmax when temperature is 0, else top-p sampling at `temperature`."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order_BxV = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order_BxV, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order_BxV, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, params, tokens_BxT, positions_BxT, valid_BxT, cache, keep_experts):
  model = nnx.merge(graphdef, params)
  return model.decode(tokens_BxT, positions_BxT, valid_BxT, cache, keep_experts=keep_experts)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _step(graphdef, params, token_B, position_B, cache, keep_experts):
  model = nnx.merge(graphdef, params)
  B = token_B.shape[0]
  logits, cache = model.decode(token_B[:, None], position_B[:, None], jnp.ones((B, 1), bool),
                               cache, keep_experts=keep_experts)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(logits_BxV, key, temperature, top_p):
  return sample_logits(logits_BxV, key, temperature, top_p)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample_with_history(logits_BxV, key, temperature, top_p, repetition_penalty, seen_BxV,
                         banned_BxV):
  logits = penalize(logits_BxV, seen_BxV, banned_BxV, repetition_penalty)
  return sample_logits(logits, key, temperature, top_p)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
  """(tokens, positions, valid) [B, T] for left-padded prompts (empty prompts are an error)."""
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token")
  T = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), T), pad_id, np.int32)
  positions = np.zeros((len(prompts), T), np.int32)
  valid = np.zeros((len(prompts), T), bool)
  for i, p in enumerate(prompts):
    n = len(p)
    tokens[i, T - n:] = p
    positions[i, T - n:] = np.arange(n)
    valid[i, T - n:] = True
  return tokens, positions, valid


def generate_ids(graphdef, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 *, eos_id: int | None = None, pad_id: int = 0,
                 keep_experts: np.ndarray | None = None, return_logits: bool = False) -> dict:
  """Continues each prompt (a list of token ids) by up to `sampling.max_new_tokens` tokens.

  A row stops after it emits `eos_id` (the EOS is kept in its output); the loop stops when every
  row has stopped. Returns {"tokens": list of generated id lists, "new_tokens": count of
  generated tokens, "seconds", "tokens_per_s"} (timing excludes compilation of the first call
  only if the functions were compiled before), plus "logits" [B, steps, V] when asked.
  """
  tokens, positions, valid = left_pad(prompts, pad_id)
  B, T = tokens.shape
  cache = nnx.merge(graphdef, params).init_cache(B, T + sampling.max_new_tokens)
  keep = None if keep_experts is None else jnp.asarray(keep_experts, bool)
  key = jax.random.key(sampling.seed)
  start = time.perf_counter()
  logits, cache = _prefill(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions),
                           jnp.asarray(valid), cache, keep)
  last = logits[:, -1]
  next_pos = jnp.asarray(valid.sum(axis=1).astype(np.int32))
  out = [[] for _ in range(B)]
  done = np.zeros(B, bool)
  all_logits = []
  new_tokens = 0
  if sampling.needs_history:
    V = last.shape[-1]
    history = [list(p) for p in prompts]
    seen = np.zeros((B, V), bool)
    for i, p in enumerate(prompts):
      seen[i, [t for t in p if 0 <= t < V]] = True
  for step in range(sampling.max_new_tokens):
    key, sub = jax.random.split(key)
    if return_logits:
      all_logits.append(np.asarray(last))
    if sampling.needs_history:
      banned = np.zeros((B, V), bool)
      for i in range(B):
        banned[i, list(banned_next_tokens(history[i], sampling.no_repeat_ngram))] = True
        if banned[i].all():  # nothing left to pick: the ban gives way
          banned[i] = False
      token = _sample_with_history(last, sub, float(sampling.temperature),
                                   float(sampling.top_p), float(sampling.repetition_penalty),
                                   jnp.asarray(seen), jnp.asarray(banned))
    else:
      token = _sample(last, sub, float(sampling.temperature), float(sampling.top_p))
    token_np = np.asarray(token)
    if sampling.needs_history:
      for i in range(B):
        history[i].append(int(token_np[i]))
        seen[i, token_np[i]] = True
    for i in range(B):
      if not done[i]:
        out[i].append(int(token_np[i]))
        new_tokens += 1
        if eos_id is not None and token_np[i] == eos_id:
          done[i] = True
    if done.all() or step == sampling.max_new_tokens - 1:
      break
    last, cache = _step(graphdef, params, token, next_pos, cache, keep)
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
