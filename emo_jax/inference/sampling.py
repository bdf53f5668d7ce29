"""The package's one token sampler: greedy, temperature and top-p (nucleus) per row, with an
optional repetition penalty and no-repeat n-gram ban (small models loop without them).

Both decoding drivers call it through `decode`: the batch generator (`generate.generate_ids`)
and the serving engine (`serve.engine`, one request per row). Every setting is an array over
the rows ([B]), so rows with different settings share one compiled step, and every row draws
from its own key (`row_keys`), so a sampled row comes out the same whatever else shares its
batch. Temperature 0 is greedy (argmax) for that row.

The penalties are the transformers rules. repetition_penalty > 1 makes every token already in
the row (prompt or generated) less likely: its logit is divided by the penalty when positive,
multiplied when negative (the CTRL rule). no_repeat_ngram = n > 0 forbids any token that
would repeat an n-gram already in the row. The host keeps each row's tokens (`History`) and
hands the step the seen and banned tokens as [B, V] masks.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import ConfigError

__all__ = ["History", "Rows", "Sampled", "SamplingConfig", "banned_next_tokens", "penalize",
           "row_keys", "sample"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How `generate.generate_ids` picks the next tokens of a batch (every row alike).

  temperature 0 = greedy (argmax); top_p 1 = the whole distribution; repetition_penalty 1 and
  no_repeat_ngram 0 = off (see the module docstring). Row i of a batch draws from
  `row_keys(seed, B)[i]`.
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  repetition_penalty: float = 1.0
  no_repeat_ngram: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
    if not self.repetition_penalty >= 1.0:
      raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be >= 1 (1 = off)")
    if self.no_repeat_ngram < 0:
      raise ConfigError(f"no_repeat_ngram={self.no_repeat_ngram} must be >= 0 (0 = off)")

  @property
  def needs_history(self) -> bool:
    return self.repetition_penalty != 1.0 or self.no_repeat_ngram > 0


class Rows(NamedTuple):
  """The per-row inputs of one sampling step ([B] arrays; the masks [B, V]).

  seen, banned and repetition_penalty are None when no row uses the penalties: the step then
  compiles without them.
  """
  keys: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  seen: jax.Array | None = None
  banned: jax.Array | None = None
  repetition_penalty: jax.Array | None = None


class Sampled(NamedTuple):
  """What a sampling step returns. logprobs and top alternatives are of the model's own
  distribution (before penalties and temperature, as OpenAI's API reports them), and None
  unless asked for (`top_logprobs` > 0)."""
  tokens: jax.Array                    # int32 [B]
  keys: jax.Array                      # [B]: each row's key for its next draw
  logits: jax.Array                    # [B, V]: the model's logits the tokens came from
  logprobs: jax.Array | None = None    # [B]: of the chosen tokens
  top_ids: jax.Array | None = None     # int32 [B, top_logprobs]
  top_logprobs: jax.Array | None = None  # [B, top_logprobs]


def row_keys(seed: int, rows: int) -> jax.Array:
  """The first keys of `rows` rows sampled under `seed`: row i draws from fold_in(key, i)."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(rows))


def penalize(logits_BxV: jax.Array, seen_BxV: jax.Array, banned_BxV: jax.Array,
             repetition_penalty) -> jax.Array:
  """float32 logits with seen tokens penalised (CTRL rule) and banned tokens at -inf.

  repetition_penalty: one number, or one per row ([B]); 1 leaves the logits as they are.
  """
  logits = logits_BxV.astype(jnp.float32)
  penalty = jnp.asarray(repetition_penalty, jnp.float32)
  if penalty.ndim == 1:
    penalty = penalty[:, None]
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  logits = jnp.where(seen_BxV, penalised, logits)
  return jnp.where(banned_BxV, -jnp.inf, logits)


def _nucleus_one(logits_V: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
  """One row's top-p draw at `temperature` (> 0): the smallest prefix of the tokens by
  probability whose mass reaches top_p is kept (the first token always is)."""
  scaled = logits_V / temperature
  order_V = jnp.argsort(-scaled)
  sorted_V = scaled[order_V]
  probs = jax.nn.softmax(sorted_V)
  mass_before = jnp.cumsum(probs) - probs
  sorted_V = jnp.where((mass_before < top_p) | (top_p >= 1.0), sorted_V, -jnp.inf)
  return order_V[jax.random.categorical(key, sorted_V)].astype(jnp.int32)


def sample(logits_BxV: jax.Array, rows: Rows, *, top_logprobs: int = 0) -> Sampled:
  """Next token of every row: argmax where the row's temperature is 0, else top-p sampling.

  Every row's key is split once per call whatever its temperature, so a row's draws depend
  only on its seed and its step. When no row samples, the sort is skipped (`lax.cond`).
  """
  logits = logits_BxV.astype(jnp.float32)
  if rows.seen is not None:
    logits = penalize(logits, rows.seen, rows.banned, rows.repetition_penalty)
  split = jax.vmap(jax.random.split)(rows.keys)
  keys, draws = split[:, 0], split[:, 1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature = rows.temperature.astype(jnp.float32)

  def drawn():
    safe = jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.vmap(_nucleus_one)(logits, draws, safe, rows.top_p.astype(jnp.float32))
    return jnp.where(temperature > 0, sampled, greedy)

  tokens = jax.lax.cond(jnp.any(temperature > 0), drawn, lambda: greedy)
  if top_logprobs <= 0:
    return Sampled(tokens, keys, logits_BxV)
  logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logprobs_BxV, tokens[:, None], axis=1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(logprobs_BxV, top_logprobs)
  return Sampled(tokens, keys, logits_BxV, chosen, top_ids.astype(jnp.int32), top_lp)


# ---- the host side of the penalties -------------------------------------------------------------
def banned_next_tokens(history: Sequence[int], n: int) -> set[int]:
  """Tokens that would complete an n-gram already in `history` (no-repeat n-gram)."""
  if n <= 0 or len(history) < n - 1:
    return set()
  if n == 1:
    return set(history)
  prefix = tuple(history[len(history) - n + 1:])
  return {history[i + n - 1] for i in range(len(history) - n + 1)
          if tuple(history[i:i + n - 1]) == prefix}


class History:
  """Every row's tokens so far (prompt and generated), as the penalties' [B, V] masks."""

  def __init__(self, prompts: Sequence[Sequence[int]], vocab_size: int, no_repeat_ngram: int):
    self.vocab_size = vocab_size
    self.no_repeat_ngram = no_repeat_ngram
    self.tokens = [list(p) for p in prompts]
    self.seen = np.zeros((len(prompts), vocab_size), bool)
    for i, p in enumerate(prompts):
      self.seen[i, [t for t in p if 0 <= t < vocab_size]] = True

  def append(self, tokens_B: np.ndarray) -> None:
    for i, token in enumerate(tokens_B):
      self.tokens[i].append(int(token))
      self.seen[i, token] = True

  def banned(self) -> np.ndarray:
    """bool [B, V]: the tokens no row may pick next. A row with nothing left to pick gets no
    ban (the ban gives way)."""
    banned = np.zeros_like(self.seen)
    for i, row in enumerate(self.tokens):
      banned[i, list(banned_next_tokens(row, self.no_repeat_ngram))] = True
      if banned[i].all():
        banned[i] = False
    return banned
