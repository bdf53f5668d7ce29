"""Benchmarks for expert subsets: installed task data, OLMES-style prompts and scoring.

`load_task(name)` gives a `Task` (scored instances + calibration pool) from the data the `eval`
extra installs or from a JSONL file; `evaluate_task` scores it by log-likelihood. See
docs/selective_eval.md. `bpb` scores gold answers in bits per byte (`load_bpb_task`,
`evaluate_bpb`), the benchmark metric of the reproduction study (docs/reproduction.md).
"""

from emo_jax.tasks.data import EXTRA_HINT, Instance, TaskNotInstalled
from emo_jax.tasks.registry import Task, expand_task_names, load_task, task_names
from emo_jax.tasks.scoring import accuracy, evaluate_task, score_pairs, task_pairs

__all__ = ["EXTRA_HINT", "Instance", "Task", "TaskNotInstalled", "accuracy", "evaluate_task",
           "expand_task_names",
           "load_task", "score_pairs", "task_names", "task_pairs"]
