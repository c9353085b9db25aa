"""Several processes, one sweep: `jax.distributed` setup and the agreements training needs.

With several processes (one per host, or several on one machine), a program's runs axis
is sharded over the devices of every process (ih_jax.train.placement) and every process
runs the same compiled program. What is communicated: each chunk's training losses and
evaluation metrics (a few floats per run), the params at snapshot points and the full
state at resume checkpoints, all gathered inside the program or at those boundaries;
training steps themselves need nothing from other processes (runs are independent).

Who writes what:
- process 0 alone writes the workdir's own files (config.json, the CSVs, snapshots/,
  sweep.json, done.json, plots, trackers);
- Orbax resume checkpoints are saved and loaded by all processes together, as Orbax
  requires; so the workdir must be on a filesystem every process sees (NFS, a shared
  disk; the same path on every host);
- decisions that read files (fresh / resume / finished, which checkpoint to resume
  from) are made by process 0 and broadcast (`agree`), so processes never disagree,
  and a refused workdir fails on every process with the same message.

Everything here is a no-op (or plain `jax.device_get`) with one process.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Callable, TypeVar

import jax
from jax.experimental import multihost_utils
import numpy as np

from ih_jax import cpu_flags

T = TypeVar("T")

# Exceptions re-raised on the other processes under their own type (the rest become
# RuntimeError with process 0's message).
_BUILTIN_ERRORS = {e.__name__: e for e in (
    ValueError, TypeError, KeyError, IndexError, OSError, FileExistsError,
    FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError,
    FloatingPointError)}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: list[int] | None = None) -> None:
  """Starts JAX's multi-process runtime (`jax.distributed.initialize`), checked first.

  Give all three of coordinator_address ('host:port' of process 0), num_processes and
  process_id (0 .. num_processes - 1), or none of them: then JAX detects them from the
  cluster environment (SLURM, Open MPI, Cloud TPU pod slices); JAX_COORDINATOR_ADDRESS
  is read when no address is given. Must run before JAX computes anything. On CPU the
  processes exchange data over TCP (gloo collectives).
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given) and not (coordinator_address is None
                                            and os.environ.get("JAX_COORDINATOR_ADDRESS")):
    raise ValueError(
        "distributed settings: give --coordinator_address, --num_processes and --process_id "
        "together (got coordinator_address="
        f"{coordinator_address!r}, num_processes={num_processes!r}, process_id={process_id!r}), "
        "or none of them to detect them from SLURM / Open MPI / a TPU pod slice")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}: must be at least 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id}: must be in 0 .. {num_processes - 1} "
                     f"(--num_processes={num_processes})")
  if coordinator_address is not None:
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT "
                       "(process 0's address and a free port, e.g. 10.0.0.1:8476)")
  if cpu_flags.backend_started():
    raise RuntimeError("ih_jax.distributed.initialize must run before JAX computes anything "
                       "(call it first in the process)")
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids)


def process_count() -> int:
  """How many processes share the programs (1 without jax.distributed)."""
  return jax.process_count()


def multiprocess() -> bool:
  """Whether several processes share the programs."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this is process 0, the one that writes the workdir's files."""
  return jax.process_index() == 0


def fetch(tree: Any) -> Any:
  """`tree` as host numpy arrays, whole on every process.

  With several processes, arrays sharded over them are all-gathered: a collective,
  so every process must call this at the same point with the same structure.
  """
  if not multiprocess():
    return jax.device_get(tree)
  leaves, treedef = jax.tree.flatten(tree)
  split = [isinstance(x, jax.Array) and not x.is_fully_addressable
           and not x.is_fully_replicated for x in leaves]
  gathered = iter(multihost_utils.process_allgather(
      [x for x, s in zip(leaves, split) if s], tiled=True))
  return treedef.unflatten([np.asarray(next(gathered)) if s else jax.device_get(x)
                            for x, s in zip(leaves, split)])


def _broadcast_bytes(payload: bytes | None) -> bytes:
  """Process 0's bytes on every process (the others pass None)."""
  n = int(multihost_utils.broadcast_one_to_all(
      np.asarray(len(payload) if payload is not None else 0, np.int64)))
  size = 1 << max(n - 1, 0).bit_length()  # a few padded sizes: a few compiled broadcasts
  buf = np.zeros(size, np.uint8)
  if payload is not None:
    buf[:n] = np.frombuffer(payload, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n].tobytes()


def _error_class(record: dict[str, str]) -> type[BaseException]:
  if record["module"] == "builtins":
    return _BUILTIN_ERRORS.get(record["name"], RuntimeError)
  try:
    cls = getattr(importlib.import_module(record["module"]), record["name"])
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError
  except (ImportError, AttributeError):
    return RuntimeError


def agree(fn: Callable[[], T]) -> T:
  """Runs `fn` on process 0 only and returns its (JSON-serialisable) value on every
  process; an exception it raises is raised on every process (same type and message
  where possible). With one process, just `fn()`."""
  if not multiprocess():
    return fn()
  if is_primary():
    try:
      record = dict(value=fn())
      error = None
    except Exception as e:  # pylint: disable=broad-except
      error = e
      record = dict(error=dict(module=type(e).__module__, name=type(e).__name__,
                               message=str(e)))
    _broadcast_bytes(json.dumps(record).encode())
    if error is not None:
      raise error
    return record["value"]
  record = json.loads(_broadcast_bytes(None))
  if "error" in record:
    err = record["error"]
    cls = _error_class(err)
    try:
      raise cls(err["message"])
    except TypeError:  # an exception class with other constructor arguments
      raise RuntimeError(f"{err['name']}: {err['message']}") from None
  return record["value"]


def gather_flags(values: list[int]) -> np.ndarray:
  """[processes, len(values)]: every process's small integer flags (a collective; with
  one process just [1, len(values)])."""
  flags = np.asarray(values, np.int64)[None]
  if not multiprocess():
    return flags
  return np.asarray(multihost_utils.process_allgather(flags, tiled=True))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if multiprocess():
      multihost_utils.sync_global_devices(name)
