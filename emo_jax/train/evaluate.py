"""Evaluation: perplexity per domain on held-out batches, and the unigram baseline.

Per-domain perplexity is the measure EMO is about (a subset of experts should keep its domain's
perplexity), so the evaluator always splits the loss by the `domain_ids` the pipeline emits.
Evaluation uses the model's inference routing (no pool, or the configured fixed eval pool).

Selective use adds: every evaluation takes an optional expert subset (`keep_experts`, a routing
mask equal to the physically pruned model), few-shot multiple-choice scoring by log-likelihood
(JSONL items {question, choices, answer}), and sweeps over subset sizes that write JSON and a
plot of quality against the fraction of experts kept.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.model.losses import token_losses
from emo_jax.data.sources import DataError


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _domain_sums(graphdef, params, batch, num_domains: int, mesh=None, keep_experts=None):
  """Summed cross-entropy and token counts per domain for one batch.

  keep_experts: optional bool [layers, routed] routing mask (a subset of the experts).
  """
  model = nnx.merge(graphdef, params)
  logits, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"], train=False,
                    mesh=mesh, keep_experts=keep_experts)
  ce, _ = token_losses(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  one_hot = jax.nn.one_hot(batch["domain_ids"], num_domains, dtype=jnp.float32)  # -1 -> zeros
  ce_by_domain = jnp.einsum("bl,bld->d", ce * mask, one_hot)
  tokens_by_domain = jnp.einsum("bl,bld->d", mask, one_hot)
  return ce_by_domain, tokens_by_domain, jnp.sum(ce * mask), jnp.sum(mask)


def perplexity(graphdef, params, batches: Sequence[Mapping[str, np.ndarray]],
               domains: Sequence[str], *, prefix: str = "", mesh=None,
               keep_experts=None) -> dict[str, float]:
  """Mean loss and perplexity over the batches, overall and per domain.

  With a `mesh`, batches are this host's rows and are assembled into global arrays.
  keep_experts: optional bool [layers, routed experts]: evaluate with only those experts
  (a routing mask on the full weights; equal to the physically pruned model).
  """
  keep = None if keep_experts is None else jnp.asarray(keep_experts, bool)
  num_domains = max(len(domains), 1)
  ce_d = np.zeros(num_domains)
  tok_d = np.zeros(num_domains)
  ce_total = tok_total = 0.0
  for batch in batches:
    if mesh is not None:
      from emo_jax.model.sharding import global_batch  # only sharded runs need it
      batch = global_batch(batch, mesh)
    c, t, c_all, t_all = jax.device_get(_domain_sums(graphdef, params, batch, num_domains, mesh,
                                                     keep))
    ce_d += c
    tok_d += t
    ce_total += float(c_all)
    tok_total += float(t_all)
  loss = ce_total / max(tok_total, 1.0)
  out = {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 50.0))}
  for i, name in enumerate(domains):
    if tok_d[i] > 0:
      out[f"{prefix}perplexity/{name}"] = math.exp(min(ce_d[i] / tok_d[i], 50.0))
  return out


def unigram_baseline(corpus, dc, max_segments: int, eval_batches: int,
                     train_batches: int = 64) -> dict[str, float]:
  """Perplexity of a unigram model (token frequencies of the train split, add-one smoothed)
  on the same validation batches the trainer evaluates: the bar a model must clear to have
  learned anything beyond token frequencies."""
  vocab = corpus.tokenizer.vocab_size
  counts = np.ones(vocab, np.float64)
  train = corpus.dataset("train", seq_len=dc.seq_len, batch_size=dc.batch_size,
                         max_segments=max_segments, seed=dc.seed, num_epochs=1)
  for batch in itertools.islice(train, train_batches):
    mask = batch["loss_mask"] > 0
    counts += np.bincount(batch["targets"][mask], minlength=vocab)[:vocab]
  log_p = np.log(counts / counts.sum())
  num_domains = len(corpus.domains)
  nll_d, tokens_d = np.zeros(num_domains + 1), np.zeros(num_domains + 1)  # last: no domain
  for batch in corpus.eval_batches(dc, max_segments, eval_batches):
    mask = batch["loss_mask"] > 0
    domain = np.where(batch["domain_ids"] >= 0, batch["domain_ids"], num_domains)[mask]
    nll_d -= np.bincount(domain, log_p[batch["targets"][mask]], minlength=num_domains + 1)
    tokens_d += np.bincount(domain, minlength=num_domains + 1)
  loss = float(nll_d.sum()) / max(float(tokens_d.sum()), 1.0)
  out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
  for i, name in enumerate(corpus.domains):  # the same keys as `perplexity` writes
    if tokens_d[i] > 0:
      out[f"perplexity/{name}"] = math.exp(min(nll_d[i] / tokens_d[i], 50.0))
  return out


# ---- multiple choice ----------------------------------------------------------------------------
def read_multiple_choice(path) -> list[dict[str, Any]]:
  """Items {question, choices, answer} from a JSONL file; errors name the file and line."""
  import json
  import pathlib
  path = pathlib.Path(path)
  items = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be an object "
                        f"{ITEM_FORMAT}") from None
      items.append(check_item(obj, where))
  if not items:
    raise DataError(f"{path} holds no multiple-choice items")
  return items


ITEM_FORMAT = '{"question": str, "choices": [str, ...], "answer": int}'
ITEM_FIELDS = ("question", "choices", "answer")


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


def format_question(item: Mapping[str, Any]) -> str:
  return f"Question: {item['question']}\nAnswer:"


def few_shot_prefix(items: Sequence[Mapping[str, Any]], index: int, num_shots: int,
                    seed: int = 0) -> str:
  """`num_shots` other items with their correct answers, chosen deterministically per index."""
  others = [i for i in range(len(items)) if i != index]
  rng = np.random.default_rng(seed + index)
  picked = rng.choice(others, size=min(num_shots, len(others)), replace=False) if others else []
  return "".join(f"{format_question(items[i])} {items[i]['choices'][items[i]['answer']]}\n\n"
                 for i in picked)


@functools.partial(jax.jit, static_argnums=(0,))
def _continuation_loglik(graphdef, params, tokens, cont_mask, keep_experts):
  """Sum of log p(token) over the positions marked in cont_mask (targets = tokens shifted)."""
  model = nnx.merge(graphdef, params)
  valid = (tokens >= 0)
  segment_ids = valid.astype(jnp.int32)
  inputs = jnp.where(valid, tokens, 0)
  logits, _ = model(inputs[:, :-1], segment_ids[:, :-1], None, train=False,
                    keep_experts=keep_experts)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_logp = jnp.take_along_axis(logp, inputs[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(target_logp * cont_mask[:, 1:], axis=-1)


def choice_logliks(graphdef, params, tokenizer, contexts: Sequence[str],
                   continuations: Sequence[str], *, seq_len: int, keep_experts=None,
                   batch_size: int = 16) -> np.ndarray:
  """log p(continuation | context) for each pair, float64 [N].

  Context and continuation are tokenized separately and concatenated; a row longer than
  seq_len + 1 loses tokens from the left of the context. Rows are padded to one length per
  call (bucketed to a multiple of 32) so a few compiled shapes serve a whole task.
  """
  rows, conts = [], []
  for ctx, cont in zip(contexts, continuations):
    c_ids = list(tokenizer.encode(ctx))
    x_ids = list(tokenizer.encode(cont))
    if not x_ids:
      raise ValueError(f"continuation {cont!r} encodes to no tokens")
    ids = (c_ids + x_ids)[-(seq_len + 1):]
    rows.append(ids)
    conts.append(min(len(x_ids), len(ids) - 1))
  width = max(len(r) for r in rows)
  width = min(-(-width // 32) * 32, seq_len + 1)
  keep = None if keep_experts is None else jnp.asarray(keep_experts, bool)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    tokens = np.full((batch_size, width), -1, np.int32)
    mask = np.zeros((batch_size, width), np.float32)
    for i, r in enumerate(chunk):
      # Left-aligned rows: causal attention makes right padding harmless.
      tokens[i, :len(r)] = r
      n = conts[start + i]
      mask[i, len(r) - n:len(r)] = 1.0
    ll = jax.device_get(_continuation_loglik(graphdef, params, jnp.asarray(tokens),
                                             jnp.asarray(mask), keep))
    out.extend(np.asarray(ll, np.float64)[:len(chunk)])
  return np.asarray(out)


def multiple_choice(graphdef, params, tokenizer, items: Sequence[Mapping[str, Any]], *,
                    num_shots: int = 3, seq_len: int = 512, keep_experts=None,
                    seed: int = 0, batch_size: int = 16) -> dict[str, Any]:
  """Few-shot multiple-choice accuracy by log-likelihood of each choice.

  The prompt is `num_shots` other items with their answers, then "Question: ...\nAnswer:";
  each choice is scored as the continuation " choice". accuracy takes the choice with the
  highest log-likelihood; normalized accuracy divides it by the choice's length in bytes
  (lm-evaluation-harness's acc_norm), which removes the bias towards short answers.
  """
  contexts, continuations, owner = [], [], []
  for i, item in enumerate(items):
    ctx = few_shot_prefix(items, i, num_shots, seed) + format_question(item)
    for choice in item["choices"]:
      contexts.append(ctx)
      continuations.append(" " + choice)
      owner.append(i)
  ll = choice_logliks(graphdef, params, tokenizer, contexts, continuations, seq_len=seq_len,
                      keep_experts=keep_experts, batch_size=batch_size)
  correct = correct_norm = 0
  predictions = []
  pos = 0
  for item in items:
    n = len(item["choices"])
    scores = ll[pos:pos + n]
    lengths = np.array([len((" " + c).encode("utf-8")) for c in item["choices"]], np.float64)
    pred = int(np.argmax(scores))
    pred_norm = int(np.argmax(scores / lengths))
    correct += pred == item["answer"]
    correct_norm += pred_norm == item["answer"]
    predictions.append({"prediction": pred, "prediction_norm": pred_norm,
                        "logliks": [round(float(x), 4) for x in scores]})
    pos += n
  return {"accuracy": correct / len(items), "accuracy_norm": correct_norm / len(items),
          "items": len(items), "num_shots": num_shots, "predictions": predictions}


# ---- subset-size sweeps ----------------------------------------------------------------------
PAPER_FRACTIONS = (8 / 128, 16 / 128, 32 / 128, 64 / 128, 1.0)


def subset_sizes(num_experts: int, num_shared: int = 1,
                 fractions: Sequence[float] = PAPER_FRACTIONS) -> list[int]:
  """The paper's subset sizes (8, 16, 32, 64, all of 128) scaled to `num_experts`, as total
  experts kept (shared included), deduplicated, increasing; at least one routed expert."""
  sizes = {min(num_experts, max(num_shared + 1, int(round(f * num_experts)))) for f in fractions}
  return sorted(sizes)


def subset_sweep(graphdef, params, cfg, calibration: Sequence[Mapping[str, np.ndarray]],
                 evaluate_fn, *, sizes: Sequence[int] | None = None, greedy: bool = True,
                 out_dir=None, name: str = "sweep", metric: str = "loss") -> dict[str, Any]:
  """Selects experts at every size from the calibration batches and evaluates each subset.

  evaluate_fn(keep_experts) -> dict of metrics (keep_experts None = all experts). Writes
  `{name}.json` and `{name}.png` (`metric` against the fraction of experts kept) into out_dir
  when given. Returns {"sizes": [...], "results": [{keep, fraction, kept_routed, **metrics}]}.
  """
  from emo_jax.study import selective  # pylint: disable=import-outside-toplevel
  sizes = list(sizes or subset_sizes(cfg.num_experts, cfg.num_shared_experts))
  results = []
  for keep in sizes:
    if keep >= cfg.num_experts:
      metrics, kept = evaluate_fn(None), None
    else:
      selection = selective.select_experts(graphdef, params, cfg, calibration, keep,
                                           greedy=greedy)
      metrics, kept = evaluate_fn(selection.mask), selection.kept_routed.tolist()
    results.append({"keep": keep, "fraction": keep / cfg.num_experts, "kept_routed": kept,
                    **metrics})
  sweep = {"sizes": sizes, "num_experts": cfg.num_experts, "greedy": greedy, "results": results}
  if out_dir is not None:
    write_sweep(sweep, out_dir, name=name, metric=metric)
  return sweep


def write_sweep(sweep: Mapping[str, Any], out_dir, *, name: str = "sweep",
                metric: str = "loss") -> dict[str, str]:
  """`{name}.json` and a `{name}.png` of `metric` against the fraction of experts kept."""
  import json
  import pathlib
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(sweep, indent=1))
  from emo_jax.study import plots  # pylint: disable=import-outside-toplevel  (matplotlib: only here)
  plots.plot_fraction_curves({name: [(r["fraction"], r[metric]) for r in sweep["results"]
                                     if metric in r]},
                             out / f"{name}.png", ylabel=metric, title=name)
  return {"json": str(out / f"{name}.json"), "png": str(out / f"{name}.png")}
