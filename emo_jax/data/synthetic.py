"""A synthetic multi-domain corpus, generated in milliseconds, for tests and smoke runs.

Each domain is its own little language: a private word list built from its own letters and a
sparse first-order Markov chain over those words. A model can learn the chains, and tokens of
one document all come from one domain, so document-level expert pools have something to find.
No downloads, no tokenizer training (it is meant for the byte tokenizer), fully deterministic.
"""

from __future__ import annotations

import numpy as np

DOMAIN_LETTERS = {
    "alpha": ("bdgk", "aeo"),
    "beta": ("lmnr", "iu"),
    "gamma": ("pstv", "ay"),
    "delta": ("fhjwz", "eoi"),
}


def _vocabulary(rng: np.random.Generator, consonants: str, vowels: str, size: int) -> list[str]:
  words: set[str] = set()
  while len(words) < size:
    syllables = rng.integers(1, 4)
    words.add("".join(rng.choice(list(consonants)) + rng.choice(list(vowels))
                      for _ in range(syllables)))
  return sorted(words)


def synthetic_corpus(num_documents: int = 2000, *, seed: int = 0, words_per_domain: int = 64,
                     successors: int = 4, min_words: int = 20,
                     max_words: int = 120) -> list[dict[str, str]]:
  """Documents `{text, domain, id}` spread evenly over the domains of DOMAIN_LETTERS."""
  rng = np.random.default_rng(seed)
  domains = list(DOMAIN_LETTERS)
  chains = {}
  for name in domains:
    vocab = _vocabulary(rng, *DOMAIN_LETTERS[name], words_per_domain)
    nexts = rng.integers(0, len(vocab), size=(len(vocab), successors))
    chains[name] = (vocab, nexts)
  documents = []
  for i in range(num_documents):
    name = domains[i % len(domains)]
    vocab, nexts = chains[name]
    word = int(rng.integers(len(vocab)))
    out = []
    for j in range(int(rng.integers(min_words, max_words + 1))):
      out.append(vocab[word])
      if j % 12 == 11:
        out.append(".\n")
      word = int(nexts[word, rng.integers(successors)])
    text = " ".join(out).replace(" .\n ", ".\n")
    documents.append({"text": text, "domain": name, "id": f"synthetic-{name}-{i}"})
  return documents
