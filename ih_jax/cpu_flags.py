"""Default XLA:CPU flags that make this tiny model several times faster.

Measured on a 2-core CPU (benchmarks/ and BUILD_NOTES.md): with XLA's default
YNNPACK fusion of element-wise ops and reductions, the [B, T, T, D]-shaped
attention ops of a 5-token model run ~3x slower than with YNNPACK used for
matmuls only. The flag must be set before JAX initialises its CPU backend, so
`import ih_jax` adds it to XLA_FLAGS when:
  * the user has not set that flag themselves, and
  * IH_JAX_KEEP_XLA_FLAGS is not set (set it to opt out).
It has no effect on GPU/TPU.
"""

from __future__ import annotations

import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_VALUE = "dot"


def apply_cpu_defaults() -> bool:
  """Adds the flag to XLA_FLAGS if allowed; returns True if it was added."""
  if os.environ.get("IH_JAX_KEEP_XLA_FLAGS"):
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if _FLAG in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={_VALUE}".strip()
  return True
