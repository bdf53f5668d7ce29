"""Test setup: 8 fake CPU devices so sharded code paths run on a laptop.

The flag must be set before jax initialises its backend, hence here, at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test session: the many short training runs of the
# suite compile the same step functions again and again (each run jits its own closures), and
# identical programs then compile once. Subprocesses started by tests inherit it.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="emo_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


import signal  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def reap():
  """`reap(proc)` registers a child process; it is killed by its pid when the test ends, however
  the test ends (a failed assertion must not leave a trainer or a server running)."""
  procs = []
  yield procs.append
  for proc in procs:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
