"""Clusters the routing vectors of a model's tokens (docs/algorithm.md, "Clustering analysis").

  python -m experiments.cluster --checkpoint workdirs/demo --baseline workdirs/demo_stdmoe \\
      --corpus demo --out results/clusters
  python -m experiments.cluster --checkpoint /tmp/tiny --corpus docs.jsonl \\
      --num_documents 200 --clusters 8 --out /tmp/clusters
  # the step-400 checkpoints of a reproduction's two models (W/models/<label>-s<seed>-<key>)
  python -m experiments.cluster --checkpoint W/models/emo-s0-KEY \
      --baseline W/models/stdmoe-s0-KEY --step 400 --out /tmp/clusters_400

For the first `--tokens_per_document` tokens of `--num_documents` documents, each token's softmax
over the routed experts of every layer (concatenated) is mean-centred, reduced by PCA to
`--variance` of its variance, L2-normalised and clustered by spherical k-means. OUT gets
clusters.json (top-level `concentration`, `purity`, `nmi` and `expert_share` (the share of a
document's top-k assignments in its 8 most used experts per layer) of --checkpoint; `models`
with each model's full section: per-domain concentration, clusters with their domains, most
frequent and most enriched tokens and samples in context, per-layer domain x expert usage) and
PNG plots.
The last stdout line is one JSON object.

`--corpus` is "demo" or "synthetic" (that corpus's `--split`), or a JSONL file of
{"text", "domain"} documents, a folder of text files or an ArrayRecord file.

Memory: the features take 4 bytes x layers x routed experts per token (8 KB at the release's
16 x 127), so the paper's 12,000 documents (1.2 M tokens) need about 10 GB of host memory for
them plus the PCA scores; 1,000 documents need under 1 GB.
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import json
import time

from absl import app, flags, logging

from emo_jax.study import analysis
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or parameter checkpoint "
                                  "of the model to analyse.")
_BASELINE = flags.DEFINE_string("baseline", None, "Optional second model (e.g. the StdMoE "
                                "twin), analysed the same way and drawn beside the first.")
_CORPUS = flags.DEFINE_string("corpus", "demo", "'demo', 'synthetic', or a JSONL file / text "
                              "folder / ArrayRecord file of documents with domains.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"],
                           "Split of --corpus demo|synthetic.")
_NUM_DOCUMENTS = flags.DEFINE_integer("num_documents", 1000, "Documents to analyse (a seeded "
                                      "sample when the corpus has more).")
_TOKENS = flags.DEFINE_integer("tokens_per_document", analysis.TOKENS_PER_DOCUMENT,
                               "Leading non-pad tokens taken from each document.")
_CLUSTERS = flags.DEFINE_integer("clusters", 32, "k of spherical k-means.")
_VARIANCE = flags.DEFINE_float("variance", 0.95, "Share of the variance PCA keeps.")
_RESTARTS = flags.DEFINE_integer("restarts", 5, "k-means restarts (the best objective wins).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the document sample and of k-means.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Documents per forward pass.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'bytes' or a tokenizer file; default: the "
                                 "tokenizer of the training run (its config.json).")
_NAMES = flags.DEFINE_list("names", None, "Names of the model (and baseline) in the output; "
                           "default EMO / StdMoE from their configs.")
_STEP = flags.DEFINE_integer("step", None, "Training step whose checkpoint of each workdir to "
                             "analyse (default: the newest), to follow clustering over training.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")


def main(argv):
  cli.start(argv)
  start = time.time()
  checkpoints = [_CHECKPOINT.value] + ([_BASELINE.value] if _BASELINE.value else [])
  if _NAMES.value is not None and len(_NAMES.value) != len(checkpoints):
    raise app.UsageError(f"--names has {len(_NAMES.value)} names for {len(checkpoints)} models")
  try:
    docs = analysis.load_documents(_CORPUS.value, num_documents=_NUM_DOCUMENTS.value,
                                   split=_SPLIT.value, seed=_SEED.value)
  except (OSError, ValueError) as e:
    raise app.UsageError(f"--corpus={_CORPUS.value}: {e}") from e
  logging.info("%d documents from %s", len(docs), _CORPUS.value)
  try:
    report = analysis.cluster_checkpoints(
        checkpoints, docs, _OUT.value, names=_NAMES.value, clusters=_CLUSTERS.value,
        num_tokens=_TOKENS.value, variance=_VARIANCE.value, restarts=_RESTARTS.value,
        seed=_SEED.value, batch_size=_BATCH_SIZE.value, tokenizer=_TOKENIZER.value,
        step=_STEP.value)
  except (OSError, ValueError) as e:  # a missing checkpoint or step, a dense model, ...
    raise app.UsageError(str(e)) from e
  line = {"out": _OUT.value, "concentration": report["concentration"],
          "purity": report["purity"], "nmi": report["nmi"],
          "expert_share": report["expert_share"], "model": report["model"]}
  for name, section in report["models"].items():
    print(f"{name}: concentration {section['concentration']:.3f}, purity "
          f"{section['purity']:.3f}, NMI {section['nmi']:.3f}, share of a document's routing "
          f"in its top {section['expert_share_top']} experts {section['expert_share']:.3f} "
          f"({section['num_tokens']} tokens "
          f"of {section['num_documents']} documents, PCA {section['feature_dims']} -> "
          f"{section['pca_components']} dims, {_CLUSTERS.value} clusters)")
    if name != report["model"]:
      line["baseline"] = {"name": name, **{k: section[k] for k in
                                           ("concentration", "purity", "nmi",
                                            "expert_share")}}
  print(f"wrote {_OUT.value}/clusters.json and {', '.join(report['plots'])} in "
        f"{time.time() - start:.0f} s")
  print(json.dumps(line), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main)
