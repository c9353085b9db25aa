"""`lax.map` over stacked points (checkpoints, runs) with the points split over devices.

Analysis programs evaluate K independent parameter points (measures at K checkpoints,
LLC chains around K checkpoints). On one device they run as `lax.map` (vmapped
`batch_size` points at a time). With several local devices (a multi-core CPU, where
ih_jax makes one XLA device per core, or several GPUs) the K axis is split over them
with `shard_map`, each device mapping over its own share: on a 2-core CPU this is ~2x,
as the training program's runs axis is. K is padded to a multiple of the device count
by repeating the last point; the padding is dropped from the result.

Numbers do not depend on the split: each point is computed by the same per-point
function, and callers draw any randomness per point (fold_in of the point's index).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ih_jax import distributed

# pylint: disable=invalid-name


def num_devices(K: int) -> int:
  """Devices the K points are split over: min(local devices, K); 1 in multi-process
  programs (each process analyses on its own, so there is no cross-process mesh)."""
  if distributed.multiprocess():
    return 1
  return max(1, min(len(jax.local_devices()), K))


def map_points(fn: Callable[[Any, Any], Any], points_K: Any, shared: Any,
               batch_size: int) -> Any:
  """[K, ...] outputs of fn(point, shared) for each point of `points_K` (leading axis K).

  Call inside jit. `shared` is passed whole to every point (replicated). `batch_size`
  points are vmapped at a time on each device.
  """
  K = jax.tree.leaves(points_K)[0].shape[0]
  D = num_devices(K)
  if D == 1:
    return jax.lax.map(lambda p: fn(p, shared), points_K, batch_size=max(1, min(batch_size, K)))
  pad = (-K) % D
  padded = jax.tree.map(
      lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x, points_K)
  per_device = (K + pad) // D
  mesh = jax.make_mesh((D,), ("points",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices()[:D])

  def local(block, sh):
    return jax.lax.map(lambda p: fn(p, sh), block, batch_size=max(1, min(batch_size, per_device)))

  out = jax.shard_map(local, mesh=mesh, in_specs=(P("points"), P()), out_specs=P("points"),
                      check_vma=False)(padded, shared)
  return jax.tree.map(lambda x: x[:K], out)
