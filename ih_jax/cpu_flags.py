"""Default XLA:CPU settings that make this tiny model several times faster.

Measured on a 2-core CPU (benchmarks/ and BUILD_NOTES.md), `import ih_jax` adds two
flags to XLA_FLAGS (each only if the user has not set it, and neither if
IH_JAX_KEEP_XLA_FLAGS is set). They must be set before JAX initialises its CPU
backend, hence at import. Neither has any effect on GPU/TPU.

* --xla_cpu_experimental_ynn_fusion_type=dot: with XLA's default YNNPACK fusion of
  element-wise ops and reductions, the [B, T, T, D]-shaped attention ops of a 5-token
  model run ~3x slower than with YNNPACK used for matmuls only.
* --xla_force_host_platform_device_count=<cores this process may use>: one CPU device
  per core. A sweep program then shards its runs axis over the cores (ih_jax.program);
  each core runs its share of the runs, instead of every tiny op being split over all
  cores' threads: 8 runs 7.3 -> 3.8 ms per step, 32 runs 29.9 -> 20.2 on 2 cores.
  A one-run program still uses one device (and every core's threads), as before.
"""

from __future__ import annotations

import os

_DEFAULTS = (("--xla_cpu_experimental_ynn_fusion_type", lambda: "dot"),
             ("--xla_force_host_platform_device_count", lambda: str(usable_cores())))


def usable_cores() -> int:
  """Cores this process may run on (its CPU affinity where the OS reports one)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


def apply_cpu_defaults() -> list[str]:
  """Adds the default flags the user has not set to XLA_FLAGS; returns those added."""
  if os.environ.get("IH_JAX_KEEP_XLA_FLAGS"):
    return []
  flags = os.environ.get("XLA_FLAGS", "")
  added = [f"{name}={value()}" for name, value in _DEFAULTS if name not in flags]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([flags] + added).strip()
  return added
