"""The entry points (python -m experiments.NAME). Importing the package keeps freed host memory
in the process before any library can start a thread (emo_jax/host_memory.py)."""

from emo_jax import host_memory as _host_memory

_host_memory.configure_early()
