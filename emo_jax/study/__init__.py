"""The study wing: expert subsets and what they are worth (docs/selective_eval.md).

  selective.py            the paper's greedy expert selection, pruning to a subset, subset sizes
  calibration.py          calibration text as batches: the one builder every selection reads
  subset_methods.py       other selection methods (random, frequency, EASY-EP, ...)
  subset_finetune.py      fine-tuning a pruned subset on a task
  reproduction.py         the paper's comparison at small scale (experiments.reproduce)
  reproduction_report.py  its tables
  analysis.py             routing statistics: per-document pools, clusters, concentration
  plots.py                the figures of all of the above
"""
