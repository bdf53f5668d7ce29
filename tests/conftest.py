"""Test setup: 8 fake CPU devices so sharded code paths run on a laptop.

The flag must be set before jax initialises its backend, hence here, at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
