"""Input pipeline throughput next to the model's training throughput, in one run.

  python -m experiments.bench_data --config configs/demo.py --out bench_data.json
  python -m experiments.bench_data --config configs/tiny.py --batches 200

For each worker count the pipeline (tokenize + pack + batch) is timed over --batches batches,
then the training step of the same config on the same batch shape; the ratio says how many
times faster the pipeline feeds tokens than the step consumes them (>1: never the bottleneck).
"""

from emo_jax import host_memory

# First, before any library can start a native thread (emo_jax/host_memory.py).
host_memory.configure_early()

import itertools
import json
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from emo_jax.train import trainer as train_lib
from emo_jax.data import corpus as corpus_lib
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_BATCHES = flags.DEFINE_integer("batches", 100, "Batches timed per measurement.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Pipeline worker counts to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps timed (after one compile step).")
_OUT = flags.DEFINE_string("out", "bench_data.json", "Where to write the JSON results.")


def time_pipeline(corpus, dc, cfg, workers: int, batches: int) -> dict:
  ds = corpus.dataset("train", seq_len=dc.seq_len, batch_size=dc.batch_size,
                      max_segments=cfg.max_segments, seed=dc.seed, num_epochs=None,
                      num_workers=workers)
  it = iter(ds)
  next(it)  # start-up (process spawn, first documents) is not throughput
  start = time.perf_counter()
  tokens = 0
  for batch in itertools.islice(it, batches):
    tokens += int((batch["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  return {"workers": workers, "tokens_per_s": tokens / seconds,
          "batches_per_s": batches / seconds}


def time_training(tc, corpus, dc, cfg, steps: int) -> dict:
  graphdef, optimizer, state = train_lib.init_state(cfg, tc)
  step = jax.jit(lambda s, b: train_lib.train_step(s, b, graphdef=graphdef, optimizer=optimizer,
                                                   cfg=cfg, tc=tc), donate_argnums=0)
  batches = list(itertools.islice(iter(corpus.dataset(
      "train", seq_len=dc.seq_len, batch_size=dc.batch_size, max_segments=cfg.max_segments)),
      steps + 1))
  state, stats = step(state, batches[0])
  jax.block_until_ready(stats)
  start = time.perf_counter()
  for batch in batches[1:]:
    state, stats = step(state, batch)
  jax.block_until_ready(stats)
  seconds = time.perf_counter() - start
  tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches[1:])
  return {"tokens_per_s": tokens / seconds, "step_time_s": seconds / steps}


def main(argv):
  cli.start(argv)
  experiment = cli.experiment(_CONFIG.value)
  cfg, dc = experiment.model, experiment.data
  corpus_lib.prepare_corpus(dc)  # as the trainer does: built once, then only read
  corpus = corpus_lib.load_corpus(dc)
  training = time_training(experiment.train, corpus, dc, cfg, _STEPS.value)
  rows = [time_pipeline(corpus, dc, cfg, int(w), _BATCHES.value) for w in _WORKERS.value]
  print(f"{'what':<28}{'tokens/s':>12}{'x training':>12}")
  print(f"{'training step':<28}{training['tokens_per_s']:>12.0f}{1.0:>12.2f}")
  for row in rows:
    row["ratio_to_training"] = row["tokens_per_s"] / training["tokens_per_s"]
    print(f"{'pipeline, ' + str(row['workers']) + ' workers':<28}{row['tokens_per_s']:>12.0f}"
          f"{row['ratio_to_training']:>12.2f}")
  result = {"config": config.get("name", ""), "seq_len": dc.seq_len,
            "batch_size": dc.batch_size, "device": jax.devices()[0].device_kind,
            "training": training, "pipeline": rows}
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
