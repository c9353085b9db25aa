"""Where a program's arrays live: the 1-D ('runs',) device mesh and the shardings on it.

With several devices the runs axis is sharded over the mesh and padded to a multiple of
the device count (ih_jax.train.experiment.setup_experiment); everything else (features,
eval batches, the data keys, the step) is replicated. Without a mesh (one device) every
function here leaves its input where it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ih_jax.data import sampler

if TYPE_CHECKING:  # type hints only: experiment and state import this module
  from ih_jax.train.experiment import Experiment
  from ih_jax.train.state import TrainState

# pylint: disable=invalid-name


def make_mesh(num_runs: int) -> jax.sharding.Mesh | None:
  """A 1-D ('runs',) mesh over min(local devices, runs) devices, or None for one.

  Using no more devices than runs means a program of R <= devices runs is never padded
  (e.g. 8 runs on a 16-core machine's 16 CPU devices use 8 of them).
  """
  devices = jax.local_devices()[:num_runs]
  if len(devices) <= 1:
    return None
  return jax.make_mesh((len(devices),), ("runs",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def runs_sharding(exp: Experiment) -> NamedSharding | None:
  """The sharding that splits the runs axis over the mesh (None without a mesh)."""
  return None if exp.mesh is None else NamedSharding(exp.mesh, P("runs"))


def replicated(exp: Experiment) -> NamedSharding | None:
  """The sharding that replicates an array on every device (None without a mesh)."""
  return None if exp.mesh is None else NamedSharding(exp.mesh, P())


def place_state(exp: Experiment, state: TrainState) -> TrainState:
  """Puts runs-stacked leaves on the runs mesh axis and the rest replicated."""
  if exp.mesh is None:
    return state
  rs, rep = runs_sharding(exp), replicated(exp)
  put = lambda tree, s: jax.tree.map(lambda x: jax.device_put(x, s), tree)
  return state._replace(params=put(state.params, rs), opt_state=put(state.opt_state, rs),
                        data_key=jax.device_put(state.data_key, rep),
                        step=jax.device_put(state.step, rep))


def place_inputs(exp: Experiment) -> tuple[Any, jax.Array, dict[str, sampler.Batch]]:
  """(clamps, features, eval batches) on device(s)."""
  clamps = jax.tree.map(jnp.asarray, exp.clamps)
  if exp.mesh is None:
    return clamps, exp.features, exp.eval_batches
  rs, rep = runs_sharding(exp), replicated(exp)
  return (jax.device_put(clamps, rs), jax.device_put(exp.features, rep),
          jax.device_put(exp.eval_batches, rep))

