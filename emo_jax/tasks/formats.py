"""OLMES-style prompts, few-shot examples and instance samples (docs/selective_eval.md).

Two formulations of a multiple-choice question, both scored by log-likelihood:
* cloze / rank classification (`rc`): the prompt ends in "Answer:" and each choice's text is a
  continuation (" Paris");
* multiple-choice letters (`mc`): the choices are listed as " A. ...", " B. ..." in the prompt
  and the continuations are the letters (" A").
A k-shot prompt is a description line (MMLU names its subject) and k solved examples, each
"<query> <answer>\n\n", then the query. The OLMES request files already hold finished prompts;
these functions build the same shape for MMLU and for raw JSONL items.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# OLMES: a task with more than 1,500 instances is scored on a fixed sample of 1,000.
SAMPLE_ABOVE = 1500
SAMPLE_SIZE = 1000


def rc_query(question: str) -> str:
  return f"Question: {question}\nAnswer:"


def mc_query(question: str, choices: Sequence[str]) -> str:
  if len(choices) > len(LETTERS):
    raise ValueError(f"{len(choices)} choices do not fit the letters A..Z")
  listed = "".join(f"\n {LETTERS[i]}. {c}" for i, c in enumerate(choices))
  return f"Question: {question}{listed}\nAnswer:"


def query_and_continuations(question: str, choices: Sequence[str],
                            formulation: str) -> tuple[str, tuple[str, ...]]:
  """(query, continuations) of one question in the `rc` or `mc` formulation."""
  if formulation == "rc":
    return rc_query(question), tuple(f" {c}" for c in choices)
  if formulation == "mc":
    return mc_query(question, choices), tuple(f" {LETTERS[i]}" for i in range(len(choices)))
  raise ValueError(f"formulation {formulation!r} must be 'rc' (cloze) or 'mc' (letters)")


def solved(question: str, choices: Sequence[str], answer: int, formulation: str) -> str:
  """One solved few-shot example: the query and its right continuation."""
  query, conts = query_and_continuations(question, choices, formulation)
  return query + conts[answer]


def few_shot_prompt(shots: Sequence[str], query: str, description: str = "") -> str:
  """description, then each solved example followed by a blank line, then the query."""
  return description + "".join(f"{s}\n\n" for s in shots) + query


def pick_shots(candidates: Sequence[int], exclude: int | None, num_shots: int,
               seed: int) -> list[int]:
  """`num_shots` of the candidate ids, never `exclude` (the instance being scored).

  The draw depends only on (seed, exclude), so an instance gets the same examples in every
  run and for every expert subset.
  """
  pool = [c for c in candidates if c != exclude]
  if num_shots > len(pool):
    raise ValueError(f"{num_shots} few-shot examples requested but only {len(pool)} "
                     "candidates remain; lower the number of shots")
  rng = np.random.default_rng([seed, -1 if exclude is None else exclude + 1])
  return [pool[i] for i in sorted(rng.choice(len(pool), size=num_shots, replace=False))]


def olmes_sample(doc_ids: Sequence[int], seed: int, *, above: int = SAMPLE_ABOVE,
                 size: int = SAMPLE_SIZE) -> list[int]:
  """The fixed evaluation sample: all ids when there are at most `above`, else `size` of them
  drawn with `seed` (in increasing order)."""
  ids = list(doc_ids)
  if len(ids) <= above:
    return ids
  rng = np.random.default_rng(seed)
  return sorted(ids[i] for i in rng.choice(len(ids), size=size, replace=False))


def seeded_subset(doc_ids: Sequence[int], n: int | None, seed: int) -> list[int]:
  """The first n ids after a seeded permutation (all of them, permuted, when n is None)."""
  ids = list(doc_ids)
  order = np.random.default_rng(seed).permutation(len(ids))
  picked = [ids[i] for i in order]
  return picked if n is None else picked[:n]
