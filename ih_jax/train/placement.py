"""Where a program's arrays live: the 1-D ('runs',) device mesh and the shardings on it.

With several devices the runs axis is sharded over the mesh and padded to a multiple of
the device count (ih_jax.train.experiment.setup_experiment); everything else (features,
eval batches, the data keys, the step) is replicated. Without a mesh (one device) every
function here leaves its input where it is.

With several processes (ih_jax.distributed) the mesh holds every process's devices, and
what the host reads after each chunk (losses, evaluations, snapshot params) is
replicated inside the program (`gathered`), so each process can read it locally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ih_jax import distributed
from ih_jax.data import sampler

if TYPE_CHECKING:  # type hints only: experiment and state import this module
  from ih_jax.train.experiment import Experiment
  from ih_jax.train.state import TrainState

# pylint: disable=invalid-name


def make_mesh(num_runs: int) -> jax.sharding.Mesh | None:
  """A 1-D ('runs',) mesh over min(local devices, runs) devices, or None for one.

  Using no more devices than runs means a program of R <= devices runs is never padded
  (e.g. 8 runs on a 16-core machine's 16 CPU devices use 8 of them). With several
  processes the mesh is every process's devices (each process runs the program).
  """
  if distributed.multiprocess():
    devices = jax.devices()
    return jax.make_mesh((len(devices),), ("runs",),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
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


def gathered(exp: Experiment) -> NamedSharding | None:
  """With several processes, the replicated sharding for what the host reads back from
  a chunk (None otherwise: one process reads its own devices' shards directly)."""
  if exp.mesh is None or not distributed.multiprocess():
    return None
  return replicated(exp)


def _host(x: Any) -> Any:
  # A process's own arrays go to a mesh spanning processes from host memory.
  return jax.device_get(x) if distributed.multiprocess() else x


def place_state(exp: Experiment, state: TrainState) -> TrainState:
  """Puts runs-stacked leaves on the runs mesh axis and the rest replicated."""
  if exp.mesh is None:
    return state
  rs, rep = runs_sharding(exp), replicated(exp)
  put = lambda tree, s: jax.tree.map(lambda x: jax.device_put(_host(x), s), tree)
  if distributed.multiprocess():  # typed keys travel as their raw data
    data_key = jax.random.wrap_key_data(
        jax.device_put(_host(jax.random.key_data(state.data_key)), rep))
  else:
    data_key = jax.device_put(state.data_key, rep)
  return state._replace(params=put(state.params, rs), opt_state=put(state.opt_state, rs),
                        data_key=data_key, step=jax.device_put(_host(state.step), rep))


def place_inputs(exp: Experiment) -> tuple[Any, jax.Array, dict[str, sampler.Batch]]:
  """(clamps, features, eval batches) on device(s)."""
  clamps = jax.tree.map(jnp.asarray, exp.clamps)
  if exp.mesh is None:
    return clamps, exp.features, exp.eval_batches
  rs, rep = runs_sharding(exp), replicated(exp)
  host = lambda tree: jax.tree.map(_host, tree)
  return (jax.device_put(host(clamps), rs), jax.device_put(host(exp.features), rep),
          jax.device_put(host(exp.eval_batches), rep))

