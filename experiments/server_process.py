"""`experiments.serve` in a child process on a free 127.0.0.1 port, stopped by its process id.

One launcher for everything that needs a real server: the serving benchmark
(experiments/bench_serve.py) and the HTTP and browser tests. `serving(args, log_path)` starts the
server, waits until /health answers, yields a `Server` (url, process, log), and on leaving
stops it with SIGTERM (the graceful drain), then SIGKILL by pid if it is still there however
the block ended. `Server.exit_code` holds the graceful stop's exit status (None when the stop
had to kill), so a test can require a clean exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

__all__ = ["Server", "free_port", "serving"]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Server:
  url: str
  process: subprocess.Popen
  log_path: pathlib.Path
  exit_code: int | None = None

  def log_tail(self, chars: int = 3000) -> str:
    return self.log_path.read_bytes().decode(errors="replace")[-chars:]


@contextlib.contextmanager
def serving(args: Sequence[str], log_path: str | pathlib.Path, *, start_timeout_s: float = 600,
            stop_timeout_s: float = 60, env: Mapping[str, str] | None = None) -> Iterator[Server]:
  """Runs `python -m experiments.serve ARGS --port=P` (P free) with stdout and stderr in
  `log_path`; yields once /health answers 200. RuntimeError (quoting the log's end) when the
  server exits or stays silent past `start_timeout_s`."""
  import httpx  # pylint: disable=import-outside-toplevel
  log_path = pathlib.Path(log_path)
  port = free_port()
  with open(log_path, "wb") as log:
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.serve", *args, f"--port={port}"], cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
  server = Server(f"http://127.0.0.1:{port}", process, log_path)
  try:
    deadline = time.time() + start_timeout_s
    while True:
      if process.poll() is not None:
        raise RuntimeError(f"the server exited ({process.returncode}) before answering "
                           f"/health; its log ends:\n{server.log_tail()}")
      try:
        if httpx.get(server.url + "/health", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.time() > deadline:
        raise RuntimeError(f"the server did not answer /health in {start_timeout_s:.0f} s; "
                           f"its log ends:\n{server.log_tail()}")
      time.sleep(0.5)
    yield server
    process.send_signal(signal.SIGTERM)
    try:
      server.exit_code = process.wait(timeout=stop_timeout_s)
    except subprocess.TimeoutExpired:
      pass
  finally:  # stopped by its pid however the block or the graceful stop went
    if process.poll() is None:
      os.kill(process.pid, signal.SIGKILL)
      process.wait()
