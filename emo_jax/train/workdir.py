"""One trainer per workdir: an advisory lock held by the training process.

Two trainers writing the same checkpoints and metrics destroy each other's files, so a second
one is refused at start. The lock is `fcntl.flock` on a file in the workdir, taken by the
process and released by the kernel when the process ends in any way (exit, crash, kill -9):
there is never a stale lock to remove before a restart. Each process of a multi-host run
locks its own file, so the processes of one run share the workdir.
"""

from __future__ import annotations

import fcntl
import os
import pathlib


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirUnusableError(RuntimeError):
  """The workdir cannot be created or written (a file, under a file, a read-only place)."""


class WorkdirLock:
  """Holds `workdir/.lock.process_<index>` until `release` (or the process's death)."""

  def __init__(self, workdir: str | pathlib.Path, process_index: int = 0):
    self.path = pathlib.Path(workdir) / f".lock.process_{process_index}"
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirUnusableError(
          f"--workdir {workdir} cannot be used: {e.strerror or e} ({e.filename or workdir}); "
          "pass a directory path you can write to") from None
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(self._fd)
      raise WorkdirBusyError(
          f"workdir {self.path.parent} is in use by another trainer (pid {holder}); wait for "
          "it to finish or stop it, or pass another --workdir") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None
