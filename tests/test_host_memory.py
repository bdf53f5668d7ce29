"""The host allocator setting: freed XLA buffers are reused instead of faulted in again."""

import json
import os
import platform
import subprocess
import sys

import pytest

from emo_jax import host_memory

# A jitted op whose 64 MiB output is freed and allocated again on every call; prints the median
# minor page faults of a call once the heap has reached its steady size (the median, so that
# one late growth of the heap does not count as a fault on every call), next to the output's
# page count.
PROBE = r"""
import json, resource, sys
from emo_jax import host_memory
in_effect = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((4096, 1), jnp.float32)
w = jnp.ones((1, 4096), jnp.float32)
f = jax.jit(lambda x, w: x @ w)
for _ in range(48):  # the heap grows to its steady size over the first few dozen calls
  f(x, w).block_until_ready()
per_call = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(per_call)[len(per_call) // 2]
print(json.dumps({"in_effect": in_effect, "faults_per_call": faults,
                  "pages": 4096 * 4096 * 4 // resource.getpagesize()}))
"""


def probe(choice: str) -> dict:
  out = subprocess.run([sys.executable, "-c", PROBE, choice], check=True, capture_output=True,
                       timeout=120,
                       text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc malloc's")
@pytest.mark.slow
def test_retained_memory_is_not_faulted_in_again():
  retained = probe("retain")
  assert retained["in_effect"] == "retain"
  # Every page of a freshly mapped 64 MiB output would fault once per call.
  assert retained["faults_per_call"] < 0.1 * retained["pages"], retained
  system = probe("system")
  assert system["in_effect"] == "system"
  # The probe sees the faults where the setting is off: glibc maps and unmaps the output.
  assert system["faults_per_call"] > 0.5 * system["pages"], system


def test_unknown_choice_is_a_clear_error(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, "jemalloc")
  with pytest.raises(ValueError, match="EMO_JAX_HOST_ALLOCATOR='jemalloc' is invalid"):
    host_memory.requested()
  with pytest.raises(ValueError, match="invalid"):
    host_memory.configure("tcmalloc")
  monkeypatch.setenv(host_memory.ENV_VAR, "system")
  # "system" changes nothing (settings already applied in this process cannot be undone).
  assert host_memory.configure() == host_memory.in_effect()
