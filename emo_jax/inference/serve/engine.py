"""Continuous batching over fixed decode slots, every row on its own expert subset.

The engine owns one KV cache of `slots` rows and runs one compiled decode step for all of them,
whatever subsets the rows use: each row's routing mask ([slots, layers, C] over the bank's
slots, see `bank`) is an input of the step, not part of the compiled program. Requests join at
step boundaries and leave when done:

* prefill: the prompt runs alone (batch 1), left-padded to the next length bucket (powers of
  two up to the context), so prefills compile once per bucket;
* insert (`cache_rows.insert_prompt`): its keys and values are copied into a free row so that
  the prompt ends just before the cache's write column `index`, the column every row writes
  next. The model's cache has one write column for all rows (`Transformer.init_cache`); a
  row's tokens keep their own RoPE positions and its other columns are marked empty, which is
  exactly the left-padded layout of `decode.left_pad`, so a row decodes as it would alone;
* generate: one step for every row; finished, cancelled and timed-out rows free their slot.

Prefill and step are `decode.prefill` and `decode.decode_step`, the functions the batch
generator (`generate.generate_ids`) drives, with every row's temperature, top-p and key as
inputs of the one sampler (`sampling.sample`): greedy text equals `generate`'s.

The write column starts at the context length and grows by one per step; when it reaches the
cache's end (context + `shift_every` columns), the cache is shifted left by `shift_every`
columns. Every live row's tokens lie in its last `context` columns (prompt + max_tokens never
exceed the context), so nothing live is dropped, and one compiled shift serves every time.

All JAX work happens on the engine thread; other threads submit requests and bank changes and
receive events (`Delta`, then one `Done`) through each request's `on_event` callback.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.inference import decode
from emo_jax.convert import loading
from emo_jax.inference import sampling
from emo_jax.inference.serve import bank as bank_lib
from emo_jax.inference.serve.cache_rows import insert_prompt, length_buckets, shift_left

log = logging.getLogger(__name__)
TOP_LOGPROBS = 5  # the most alternatives a request may ask for (as OpenAI's completions API)


class QueueFull(RuntimeError):
  """The pending queue is at its bound; the client should retry later."""


class ShuttingDown(RuntimeError):
  """The engine is stopping and takes no new requests."""


class SubsetInUse(bank_lib.SubsetError):
  """A subset that running or queued requests route into cannot be replaced or deleted."""


@dataclasses.dataclass(frozen=True)
class Delta:
  """Text of a request that can no longer change (no partial character, no partial stop
  string), with the tokens it came from and their log-probabilities."""
  text: str
  tokens: list[int]
  logprobs: list[float]
  top_logprobs: list[dict[int, float]] | None  # per token, when the request asked for them


@dataclasses.dataclass(frozen=True)
class Done:
  """The last event of a request. finish_reason: "stop" (EOS or a stop string), "length",
  "cancelled", "timeout" or "error" (then `error` says what failed)."""
  finish_reason: str
  prompt_tokens: int
  completion_tokens: int
  error: str | None = None


Event = Union[Delta, Done]


@dataclasses.dataclass
class Request:
  """One generation: the prompt's token ids, its routing mask and how to sample.

  on_event receives, on the engine thread, a `Delta` whenever text becomes final, then one
  `Done`.
  """
  prompt_ids: Sequence[int]
  mask_LxR: np.ndarray
  max_tokens: int
  on_event: Callable[[Event], None]
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  logprobs: int = 0
  deadline: float | None = None  # time.monotonic() after which the request is abandoned
  subsets: tuple[str, ...] = ()
  cancelled: bool = False
  # Filled in by the engine.
  generated: list[int] = dataclasses.field(default_factory=list)
  emitted_chars: int = 0
  emitted_tokens: int = 0
  token_logprobs: list[float] = dataclasses.field(default_factory=list)
  top: list[dict[int, float]] = dataclasses.field(default_factory=list)
  done: bool = False

  def cancel(self) -> None:
    self.cancelled = True


# ---- the engine ---------------------------------------------------------------------------------
class Engine:
  """Fixed decode slots over one KV cache, fed by a bounded queue; see the module docstring."""

  def __init__(self, bank: bank_lib.ExpertBank, tokenizer, *, slots: int = 4,
               max_queue: int = 64, shift_every: int | None = None, execution=None):
    """execution: an execution.ExecutionConfig (expert kernel, attention kernel) for the
    compact model; default the one `generate` uses, so outputs equal its outputs."""
    if slots < 1:
      raise ValueError(f"slots={slots} must be >= 1")
    if max_queue < 0:
      raise ValueError(f"max_queue={max_queue} must be >= 0")
    self.bank = bank
    self.execution = execution
    self.tokenizer = tokenizer
    self.slots = slots
    self.max_queue = max_queue
    self.context = bank.cfg.max_seq_len
    self.shift_every = shift_every or max(16, self.context // 2)
    self.cache_len = self.context + self.shift_every
    self.buckets = length_buckets(self.context)
    self._cv = threading.Condition()
    self._pending: collections.deque[Request] = collections.deque()
    self._controls: collections.deque = collections.deque()
    self._admin_lock = threading.Lock()
    self._stop_lock = threading.Lock()
    self._rows: list[Request | None] = [None] * slots
    self._admitting: Request | None = None  # taken off the queue, being prefilled into a row
    self._worker: threading.Thread | None = None
    self._stopping = False
    self._accepting = True
    self.stats = collections.Counter()
    self._recent = collections.deque()  # (time, tokens) of the last steps, for tokens/s
    self._graphdefs: dict[int, Any] = {}
    self._refresh_model()
    self._reset_cache()

  # ---- state on the device --------------------------------------------------------------------
  def _refresh_model(self) -> None:
    cfg = self.bank.compact_config()
    params = self.bank.compact_params()
    width = self.bank.width
    if width not in self._graphdefs:
      self._graphdefs[width] = loading.build_model(cfg, {}, self.execution)[0]
    self._graphdef, self._params = self._graphdefs[width], params
    occupied = np.zeros((self.bank.cfg.num_layers, width), bool)
    for layer, ids in enumerate(self.bank.slots):
      occupied[layer, :len(ids)] = True
    self._idle_mask = occupied  # idle rows route somewhere valid (an all-False row is NaN)
    self._masks = np.stack([self._row_mask(r) for r in self._rows])
    self._masks_device = None  # device copies of the masks and sampling settings, when current

  def _row_mask(self, req: Request | None) -> np.ndarray:
    return self._idle_mask if req is None else self.bank.slot_mask(req.mask_LxR)

  def _reset_cache(self) -> None:
    model = nnx.merge(self._graphdef, self._params)
    cache = model.init_cache(self.slots, self.cache_len)
    cache["index"] = jnp.asarray(self.context, jnp.int32)
    self._cache = cache
    self._index = self.context
    self._tokens = np.zeros(self.slots, np.int32)
    self._positions = np.zeros(self.slots, np.int32)
    self._temperature = np.zeros(self.slots, np.float32)
    self._top_p = np.ones(self.slots, np.float32)
    self._keys = sampling.row_keys(0, self.slots)

  def warmup(self) -> float:
    """Compiles every prefill bucket, insert, step and shift before serving (call it before
    `start`); returns the seconds it took. The cache is reset afterwards."""
    start = time.perf_counter()
    mask = jnp.asarray(self._idle_mask[None])
    for T in self.buckets:
      ones = jnp.ones((1, T), bool)
      _, cache = self._prefill(jnp.zeros((1, T), jnp.int32), jnp.zeros((1, T), jnp.int32), ones,
                               mask, self._sampling_rows(slice(0, 1)))
      self._cache = insert_prompt(self._cache, cache["k"], cache["v"], ones, jnp.int32(0))
    _, self._cache = self._step(jnp.asarray(self._masks), self._sampling_rows(slice(None)))
    jax.block_until_ready(shift_left(self._cache, self.shift_every))
    self._reset_cache()
    return time.perf_counter() - start

  def _sampling_rows(self, rows: slice) -> sampling.Rows:
    return sampling.Rows(keys=self._keys[rows], temperature=jnp.asarray(self._temperature[rows]),
                         top_p=jnp.asarray(self._top_p[rows]))

  def _prefill(self, tokens_1xT, positions_1xT, valid_1xT, keep_1xLxC, rows: sampling.Rows):
    """One prompt alone, in a cache of its bucket's length: (Sampled, cache)."""
    return decode.prefill(self._graphdef, self._params, tokens_1xT, positions_1xT, valid_1xT,
                          keep_1xLxC, rows, cache_len=tokens_1xT.shape[1],
                          top_logprobs=TOP_LOGPROBS)

  def _step(self, keep_SxLxC, rows: sampling.Rows):
    """One token for every row, each under its own routing mask: (Sampled, cache)."""
    return decode.decode_step(self._graphdef, self._params, jnp.asarray(self._tokens),
                              jnp.asarray(self._positions), self._cache, keep_SxLxC, rows,
                              top_logprobs=TOP_LOGPROBS)

  # ---- threads -------------------------------------------------------------------------------
  @property
  def running(self) -> bool:
    """Whether the engine thread is serving (started and not stopped)."""
    return self._worker is not None and self._worker.is_alive()

  def start(self) -> "Engine":
    self._worker = threading.Thread(target=self._loop, name="emo-engine", daemon=True)
    self._worker.start()
    return self

  def stop(self, *, drain_seconds: float = 0.0) -> None:
    """Stops taking requests, lets running ones finish for up to drain_seconds, cancels the
    rest (they receive finish_reason "cancelled") and ends the engine thread. Calling it again
    (the app's shutdown after a signal handler's stop) waits for the first call and returns."""
    with self._stop_lock:
      self._stop(drain_seconds)

  def _stop(self, drain_seconds: float) -> None:
    with self._cv:
      self._accepting = False
      self._cv.notify_all()
    end = time.monotonic() + drain_seconds
    while time.monotonic() < end and (self.active() or self.queue_depth()):
      time.sleep(0.02)
    with self._cv:
      self._stopping = True
      self._cv.notify_all()
    if self._worker is not None:
      self._worker.join(timeout=30)
    for req in list(self._pending) + [r for r in self._rows if r is not None]:
      self._finish(req, "cancelled")
    self._pending.clear()
    self._rows = [None] * self.slots

  def submit(self, req: Request) -> None:
    """Queues a request (raises QueueFull at the bound, ShuttingDown when stopping)."""
    if len(req.prompt_ids) == 0:
      raise ValueError("the prompt is empty; generation needs at least one prompt token")
    if len(req.prompt_ids) + req.max_tokens > self.context:
      raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens "
                       f"({req.max_tokens}) exceeds the context of {self.context} tokens")
    with self._cv:
      if not self._accepting:
        raise ShuttingDown("the server is shutting down")
      # Beyond the free slots at most max_queue wait; a request being prefilled holds a slot.
      free = sum(r is None for r in self._rows) - (self._admitting is not None)
      if len(self._pending) >= self.max_queue + free:
        raise QueueFull(f"{len(self._pending) - free} requests are waiting for a decode slot "
                        f"(the bound is {self.max_queue}); retry shortly")
      self._pending.append(req)
      self.stats["requests_submitted"] += 1
      self._cv.notify_all()

  def call(self, fn: Callable[[], Any]) -> Any:
    """Runs fn on the engine thread between two steps and returns its result."""
    if not self.running:
      return fn()
    future: concurrent.futures.Future = concurrent.futures.Future()
    with self._cv:
      self._controls.append((fn, future))
      self._cv.notify_all()
    return future.result()

  def queue_depth(self) -> int:
    return len(self._pending)

  def active(self) -> int:
    return sum(r is not None for r in self._rows)

  def tokens_per_second(self, window: float = 10.0) -> float:
    now = time.monotonic()
    recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
    if not recent:
      return 0.0
    span = max(now - recent[0][0], 1e-3)
    return sum(n for _, n in recent) / span

  # ---- subsets ------------------------------------------------------------------------------
  def _users(self, name: str) -> list[Request]:
    """The running, queued and prefilling requests that route into subset `name`."""
    with self._cv:
      candidates = list(self._pending) + self._rows + [self._admitting]
    return [r for r in candidates if r is not None and not r.done and name in r.subsets]

  def _refuse_in_use(self, name: str, action: str) -> None:
    users = self._users(name)
    if users:
      raise SubsetInUse(f"subset {name!r} is in use by {len(users)} running or queued "
                        f"requests; {action} it when they are done")

  def register(self, subset: bank_lib.Subset) -> dict:
    """Adds a subset, or replaces one no request uses (SubsetInUse otherwise): reads its
    missing experts, then re-lays the bank."""
    with self._admin_lock:
      replacing = subset.name in self.bank.subsets
      if replacing:
        self._refuse_in_use(subset.name, "replace")
      subsets = dict(self.bank.subsets)
      subsets[subset.name] = subset
      layout = self.bank.prepare(subsets)

      def commit():
        if replacing:  # checked again between two steps: nothing was admitted meanwhile
          self._refuse_in_use(subset.name, "replace")
        self._commit(layout, subsets)
      self.call(commit)
      return self.bank.memory()

  def delete(self, name: str) -> dict:
    """Drops a subset and frees the experts no other subset uses (refused while in use)."""
    with self._admin_lock:
      if name not in self.bank.subsets:
        raise bank_lib.SubsetError(f"no subset named {name!r}; registered: "
                                   f"{sorted(self.bank.subsets)}")
      subsets = {k: v for k, v in self.bank.subsets.items() if k != name}
      layout = self.bank.prepare(subsets)

      def commit():
        self._refuse_in_use(name, "delete")
        self._commit(layout, subsets)
      self.call(commit)
      return self.bank.memory()

  def _commit(self, layout, subsets) -> None:
    self.bank.commit(layout, subsets)
    # A running row whose experts left the bank would route into an all-False mask row (NaN):
    # it ends with an error instead (the in-use checks of register and delete prevent this).
    for row, req in enumerate(self._rows):
      if req is not None and not self.bank.covers(req.mask_LxR):
        self._rows[row] = None
        self._finish(req, "error", error="the request's experts left the bank (its subset was "
                     "replaced or deleted); send it again")
    self._refresh_model()

  # ---- the loop ------------------------------------------------------------------------------
  def _loop(self) -> None:
    while True:
      with self._cv:
        while not (self._stopping or self._pending or self._controls or self.active()):
          self._cv.wait(timeout=0.5)
        if self._stopping:
          break
        controls = list(self._controls)
        self._controls.clear()
      for fn, future in controls:
        try:
          future.set_result(fn())
        except Exception as e:  # pylint: disable=broad-except
          future.set_exception(e)
      self._admit()
      if self.active():
        try:
          self._decode_step()
        except Exception as e:  # pylint: disable=broad-except
          log.exception("decode step failed; failing the running requests")
          for row, req in enumerate(self._rows):
            if req is not None:
              self._finish(req, "error", error=f"decode step failed: {type(e).__name__}: {e}")
              self._rows[row] = None
          self._reset_cache()
          self._masks = np.stack([self._row_mask(None)] * self.slots)
          self._masks_device = None

  def _expired(self, req: Request) -> str | None:
    if req.cancelled:
      return "cancelled"
    if req.deadline is not None and time.monotonic() > req.deadline:
      return "timeout"
    return None

  def _admit(self) -> None:
    for row in range(self.slots):
      if self._rows[row] is not None:
        continue
      while True:
        with self._cv:
          req = self._pending.popleft() if self._pending else None
          self._admitting = req
        if req is None:
          return
        try:
          if self._admit_into(row, req):
            break
        finally:
          with self._cv:
            self._admitting = None

  def _admit_into(self, row: int, req: Request) -> bool:
    """Prefills `req` into `row`; False when it finished instead (expired, not resident,
    failed)."""
    reason = self._expired(req)
    if reason:
      self._finish(req, reason)
      return False
    if not self.bank.covers(req.mask_LxR):  # its subset was deleted before it was queued
      self._finish(req, "error", error="the request's experts are no longer resident (its "
                   "subset was deleted); send it again")
      return False
    try:
      self._prefill_into(row, req)
    except Exception as e:  # pylint: disable=broad-except
      log.exception("prefill failed")
      self._finish(req, "error", error=f"prefill failed: {type(e).__name__}: {e}")
      return False
    return True

  def _prefill_into(self, row: int, req: Request) -> None:
    n = len(req.prompt_ids)
    T = next(b for b in self.buckets if b >= n)
    tokens, positions, valid = decode.left_pad([req.prompt_ids], self.tokenizer.pad_id, T)
    mask = self._row_mask(req)
    rows = sampling.Rows(keys=sampling.row_keys(req.seed, 1),
                         temperature=jnp.asarray([req.temperature], jnp.float32),
                         top_p=jnp.asarray([req.top_p], jnp.float32))
    sampled, cache = self._prefill(jnp.asarray(tokens), jnp.asarray(positions),
                                   jnp.asarray(valid), jnp.asarray(mask[None]), rows)
    self._cache = insert_prompt(self._cache, cache["k"], cache["v"], jnp.asarray(valid),
                          jnp.int32(row))
    self._keys = self._keys.at[row].set(sampled.keys[0])
    self._temperature[row] = req.temperature
    self._top_p[row] = req.top_p
    self._rows[row] = req
    self._masks[row] = mask
    self._masks_device = None
    self.stats["prompt_tokens"] += n
    self._positions[row] = n
    token, lp, top_ids, top_lp = jax.device_get(
        (sampled.tokens[0], sampled.logprobs[0], sampled.top_ids[0], sampled.top_logprobs[0]))
    self._accept(row, int(token), float(lp), top_ids, top_lp)

  def _decode_step(self) -> None:
    for row, req in enumerate(self._rows):
      if req is not None:
        reason = self._expired(req)
        if reason:
          self._release(row, reason)
    if not self.active():
      return
    if self._index >= self.cache_len:
      self._cache = shift_left(self._cache, self.shift_every)
      self._index -= self.shift_every
    if self._masks_device is None:
      self._masks_device = jnp.asarray(self._masks)
      self._sampling_device = (jnp.asarray(self._temperature), jnp.asarray(self._top_p))
    sampled, self._cache = self._step(self._masks_device,
                                      sampling.Rows(self._keys, *self._sampling_device))
    self._index += 1
    self._positions += 1
    self._keys = sampled.keys
    tokens, lp, top_ids, top_lp = jax.device_get(
        (sampled.tokens, sampled.logprobs, sampled.top_ids, sampled.top_logprobs))
    produced = 0
    for row, req in enumerate(self._rows):
      if req is not None:
        self._accept(row, int(tokens[row]), float(lp[row]), top_ids[row], top_lp[row])
        produced += 1
    self.stats["steps"] += 1
    now = time.monotonic()
    self._recent.append((now, produced))
    while self._recent and now - self._recent[0][0] > 60:
      self._recent.popleft()

  def _accept(self, row: int, token: int, logprob: float, top_ids, top_lp) -> None:
    """Appends a sampled token to the row's request; finishes it on EOS, stop or length."""
    req = self._rows[row]
    self._tokens[row] = token
    req.generated.append(token)
    req.token_logprobs.append(logprob)
    if req.logprobs:
      req.top.append({int(i): float(p) for i, p in zip(top_ids[:req.logprobs],
                                                       top_lp[:req.logprobs])})
    self.stats["generation_tokens"] += 1
    eos = self.tokenizer.eos_id
    reason = None
    if token == eos:
      reason = "stop"
    elif len(req.generated) >= req.max_tokens:
      reason = "length"
    text = self._text(req)
    if req.stop and reason != "stop":
      hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
      if hits:
        text = text[:min(hits)]
        reason = "stop"
    self._emit(req, text, final=reason is not None)
    if reason:
      self._release(row, reason)

  def _text(self, req: Request) -> str:
    return self.tokenizer.decode([t for t in req.generated if t != self.tokenizer.eos_id])

  def _emit(self, req: Request, text: str, *, final: bool) -> None:
    """Sends the text that can no longer change (no partial character, no partial stop)."""
    stable = len(text)
    if not final:
      while stable > req.emitted_chars and text[stable - 1] == "\ufffd":
        stable -= 1
      if req.stop:
        stable = max(req.emitted_chars, min(stable, len(text) - max(map(len, req.stop)) + 1))
    tokens = req.generated[req.emitted_tokens:]
    if stable <= req.emitted_chars and not (final and tokens):
      return
    delta = Delta(text=text[req.emitted_chars:stable], tokens=tokens,
                  logprobs=req.token_logprobs[req.emitted_tokens:],
                  top_logprobs=req.top[req.emitted_tokens:] if req.logprobs else None)
    req.emitted_chars = stable
    req.emitted_tokens = len(req.generated)
    self._send(req, delta)

  def _send(self, req: Request, event: Event) -> None:
    try:
      req.on_event(event)
    except Exception:  # pylint: disable=broad-except
      log.exception("a request's event callback failed; cancelling it")
      req.cancelled = True

  def _release(self, row: int, reason: str) -> None:
    req = self._rows[row]
    self._rows[row] = None
    self._masks[row] = self._idle_mask
    self._temperature[row] = 0.0
    self._masks_device = None
    self._finish(req, reason)

  def _finish(self, req: Request, reason: str, *, error: str | None = None) -> None:
    if req.done:
      return
    req.done = True
    self.stats[f"finished_{reason}"] += 1
    self._send(req, Done(finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                         completion_tokens=len(req.generated), error=error))


@dataclasses.dataclass(frozen=True)
class Result:
  """A whole generation (`run_sync`): its text, tokens and their log-probabilities, and how it
  ended (the fields of its `Done`)."""
  text: str
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str
  prompt_tokens: int
  completion_tokens: int
  error: str | None = None


def run_sync(engine: Engine, prompt_ids: Sequence[int], mask_LxR: np.ndarray, *,
             max_tokens: int, timeout: float | None = None, **request_fields) -> Result:
  """Submits one request (`request_fields`: temperature, top_p, seed, stop, ... of `Request`)
  and waits for it."""
  events: queue.Queue = queue.Queue()
  req = Request(prompt_ids=list(prompt_ids), mask_LxR=mask_LxR, max_tokens=max_tokens,
                on_event=events.put, **request_fields)
  engine.submit(req)
  text, tokens, logprobs = [], [], []
  while True:
    event = events.get(timeout=timeout)
    if isinstance(event, Delta):
      text.append(event.text)
      tokens.extend(event.tokens)
      logprobs.extend(event.logprobs)
    else:
      return Result("".join(text), tokens, logprobs, **dataclasses.asdict(event))
