"""ih_jax: induction-head formation under clamped subcircuits (Singh et al. 2024) in JAX.

Pipeline: data (features, sampler, eval sets) -> model + clamps -> train -> analysis.
"""

from ih_jax import cpu_flags as _cpu_flags

_cpu_flags.apply_cpu_defaults()  # must run before JAX initialises its CPU backend

__version__ = "0.1.0"
