"""Host allocator settings that keep freed memory in the process (glibc malloc, CPU runs).

Why: XLA:CPU (and PyTorch on CPU) allocate every step's large buffers afresh, and glibc's malloc
serves an allocation over 32 MB, or any allocation from a worker thread's arena that does not
fit that arena's 64 MB heap, with its own `mmap` and gives it back with `munmap` on free. The
next step then page-faults in, and the kernel zeroes, every 4 KiB page of those buffers again:
for the demo's training step (16 x 256 tokens, an 8,192-token vocabulary) that is tens of
thousands of faults and about a fifth of the step in kernel time (docs/accelerators.md, "CPU").

`retain_freed_memory()` makes every thread allocate from the main arena, serves large
allocations from the heap instead of fresh mappings and never trims the heap, so freed buffers
are reused by the next step as they are. The cost: the process keeps its peak heap size until
it exits (resident memory does not shrink after a peak), which suits a training, benchmark or
serving process. It must run before the JAX backend starts its threads (before the first JAX
computation or `jax.devices()`, and best before importing the libraries, some of which start
native threads): threads that already have an arena keep it, and later threads may be handed
theirs. Every entry point (experiments/*.py) calls `configure_early()` as its first statement,
before its other imports; `EMO_JAX_HOST_ALLOCATOR=system` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1

ENV_VAR = "EMO_JAX_HOST_ALLOCATOR"
CHOICES = ("retain", "system")
_in_effect = "system"


def in_effect() -> str:
  """What this process runs with: "retain" once the settings took effect, else "system"."""
  return _in_effect


def checked(choice: str, name: str = "host allocator") -> str:
  """`choice` if it is one of CHOICES, else a one-line ValueError naming `name`."""
  if choice not in CHOICES:
    raise ValueError(f"{name}={choice!r} is invalid: use one of {list(CHOICES)}")
  return choice


def requested() -> str:
  """The allocator the environment asks for: "retain" (default) or "system"."""
  return checked(os.environ.get(ENV_VAR, "retain").strip().lower() or "retain", ENV_VAR)


def retain_freed_memory() -> bool:
  """Applies the settings above; True if they took effect (glibc on Linux), else False."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  results = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
             mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)]
  return all(r == 1 for r in results)


def configure(choice: str | None = None) -> str:
  """Sets the host allocator to `choice` (default: the environment's) and returns what is in
  effect: "retain" when the settings took effect (they cannot be undone: "system" after
  "retain" leaves "retain"), "system" otherwise."""
  choice = requested() if choice is None else checked(choice)
  global _in_effect
  if choice == "retain" and (_in_effect == "retain" or retain_freed_memory()):
    _in_effect = "retain"
  return _in_effect


def configure_early() -> str:
  """`configure()` for an entry point's first statement: an invalid EMO_JAX_HOST_ALLOCATOR
  leaves malloc as it is here (experiments/cli.py reports it as a usage error when the entry
  point starts)."""
  try:
    return configure()
  except ValueError:
    return "system"
