"""Default XLA:CPU settings that make this tiny model several times faster.

Measured on a 2-core CPU (`ih-jax bench`, BUILD_NOTES.md), `import ih_jax` adds two
flags to XLA_FLAGS (each only if the user has not set it, and neither if
IH_JAX_KEEP_XLA_FLAGS is set). They must be set before JAX initialises its CPU
backend, hence at import. Neither has any effect on GPU/TPU.

* --xla_cpu_experimental_ynn_fusion_type=dot: with XLA's default YNNPACK fusion of
  element-wise ops and reductions, the [B, T, T, D]-shaped attention ops of a 5-token
  model run ~3x slower than with YNNPACK used for matmuls only.
* --xla_force_host_platform_device_count=<cores this process may use>: one CPU device
  per core. A sweep program then shards its runs axis over the cores (ih_jax.train);
  each core runs its share of the runs, instead of every tiny op being split over all
  cores' threads: 8 runs 7.3 -> 3.8 ms per step, 32 runs 29.9 -> 20.2 on 2 cores.
  A one-run program still uses one device (and every core's threads), as before.

The flags are applied only while it is safe, i.e. before JAX has started a backend;
importing ih_jax later warns instead of silently running with JAX's defaults.
"""

from __future__ import annotations

import os
import sys
import warnings

_DEFAULTS = (("--xla_cpu_experimental_ynn_fusion_type", lambda: "dot"),
             ("--xla_force_host_platform_device_count", lambda: str(usable_cores())))


def usable_cores() -> int:
  """Cores this process may run on (its CPU affinity where the OS reports one)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


def backend_started() -> bool:
  """Whether JAX has already initialised a backend (XLA_FLAGS are read only then)."""
  jax_mod = sys.modules.get("jax")
  if jax_mod is None:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without this helper: assume started
    return True


def apply_cpu_defaults() -> list[str]:
  """Adds the default flags the user has not set to XLA_FLAGS; returns those added.

  When JAX's backend is already running (e.g. a notebook used JAX before importing
  ih_jax), XLA_FLAGS can no longer take effect: nothing is changed and a warning
  says how to get the defaults (import ih_jax first, or restart the runtime).
  """
  if os.environ.get("IH_JAX_KEEP_XLA_FLAGS"):
    return []
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [f"{name}={value()}" for name, value in _DEFAULTS if name not in flags]
  if not missing:
    return []
  if backend_started():
    warnings.warn(
        "ih_jax was imported after JAX started its backend, so its CPU defaults ("
        + " ".join(missing) + ") cannot take effect: CPU runs use one device and are "
        "slower (sweeps ~2x). Import ih_jax before running anything in JAX, or restart "
        "the runtime; set IH_JAX_KEEP_XLA_FLAGS=1 to silence this.", RuntimeWarning,
        stacklevel=3)
    return []
  os.environ["XLA_FLAGS"] = " ".join([flags] + missing).strip()
  return missing
