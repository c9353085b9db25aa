"""ih_jax: induction-head formation under clamped subcircuits (Singh et al. 2024) in JAX.

Pipeline: data (features, sampler, eval sets) -> model + interventions -> train ->
analysis. In a notebook: `ih_jax.run(config, workdir)` trains a sweep and
`ih_jax.load(workdir)` reads one back (ih_jax.api); both return a Sweep whose runs
are addressed by condition and seed.
"""

from ih_jax import cpu_flags as _cpu_flags

_cpu_flags.apply_cpu_defaults()  # must run before JAX initialises its CPU backend

from ih_jax.api import Run, Sweep, load, run  # noqa: E402  (after the XLA flags)

__version__ = "0.1.0"
__all__ = ["Run", "Sweep", "load", "run"]
