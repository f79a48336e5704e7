"""Test set-up: CPU backend, 8 fake devices, persistent compilation cache.

The environment variables must be set before the JAX backend starts, so this
module sets them at import time, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "medseg_jax_test_jit"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
