"""Saved state of a program: resume checkpoints (Orbax) and params snapshots.

Layout inside a workdir:

  snapshots/                  params only, on the configured dense schedule, in one
                              array store (ih_jax.snapshots): what analysis reads
  resume/<seqs>/params        the full training state: runs-stacked params ...
  resume/<seqs>/train         ... Adam state, data-stream key(s), step, fingerprint;
                              written every `checkpoint.resume_every_s` seconds of wall
                              time, on SIGINT/SIGTERM and at the end (the latest two kept)
  checkpoints/<seqs>/         the older layout (an Orbax checkpoint per scheduled
                              step): still read by the analysis API below

Each resume checkpoint carries a fingerprint of every leaf (a wrapping uint32 sum of
its bits) so silent corruption is caught on load, not only the checksum failures
Orbax reports. A resume checkpoint is written only once every snapshot up to it is on
disk, so resuming from it never loses one.

Analysis API: `list_steps(workdir)`, `load_params(workdir, run, seqs)`,
`load_params_series(workdir, run, steps)` (snapshots, or the old checkpoints/).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from typing import Any, Callable

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp

from ih_jax import distributed
from ih_jax import snapshots as snap_lib

CHECKPOINT_DIR = "checkpoints"   # the older per-step Orbax layout (read only)
RESUME_DIR = "resume"
CORRUPT_DIR = "corrupt_checkpoints"   # unreadable checkpoints are moved here, not deleted


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable."""


class _DropOrbaxWaitWarning(logging.Filter):
  """Orbax warns "Waiting for previous save to complete took ..." (absl logger) when a
  save waits on the previous one; resume saves are rare and the wait is intended."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Waiting for previous save")


_absl_logger = logging.getLogger("absl")
if not any(isinstance(f, _DropOrbaxWaitWarning) for f in _absl_logger.filters):
  _absl_logger.addFilter(_DropOrbaxWaitWarning())


def fingerprint(tree: Any) -> np.ndarray:
  """[num_leaves] uint32: the wrapping sum of each leaf's 32-bit words (host numpy)."""
  out = []
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    if x.dtype.itemsize != 4:
      x = x.astype(np.int32 if np.issubdtype(x.dtype, np.integer) else np.float32)
    out.append(int(np.ascontiguousarray(x).view(np.uint32).sum(dtype=np.uint64)) & 0xFFFFFFFF)
  return np.asarray(out, np.uint32)


def to_host(state) -> dict[str, Any]:
  """The two checkpointables of a TrainState, copied to host numpy.

  Typed PRNG keys are stored as raw key data. Copying first (this waits for the
  state to be computed) lets the caller donate the device state to the next
  chunk while Orbax writes in the background. With several processes this gathers the
  runs from all of them: every process must call it at the same boundary.
  """
  params, opt_state, key_data, step = distributed.fetch(
      (state.params, state.opt_state, jax.random.key_data(state.data_key), state.step))
  content = dict(params=params,
                 train=dict(opt_state=opt_state, data_key=key_data, step=np.asarray(step)))
  content["train"]["fingerprint"] = fingerprint(content)
  return content


def _verify(content: dict[str, Any], where: str) -> None:
  train = dict(content["train"])
  stored = np.asarray(train.pop("fingerprint"))
  actual = fingerprint(dict(params=content["params"], train=train))
  if stored.shape != actual.shape or not np.array_equal(stored, actual):
    raise CheckpointError(f"{where}: contents do not match the fingerprint saved with them")


def _restore_target(ckptr, step: int, template: dict[str, Any]) -> dict[str, Any]:
  """`template`'s structure with the saved runs-axis length, on the host CPU."""
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  saved = ckptr.checkpointables_metadata(step).metadata
  runs = jax.tree.leaves(saved["params"])[0].shape[0]
  stacked = lambda x: jax.ShapeDtypeStruct((runs,) + np.shape(x)[1:], np.asarray(x).dtype,
                                           sharding=cpu)
  plain = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=cpu)
  train = template["train"]
  return dict(params=jax.tree.map(stacked, template["params"]),
              train=dict(opt_state=jax.tree.map(stacked, train["opt_state"]),
                         data_key=plain(train["data_key"]), step=plain(train["step"]),
                         fingerprint=plain(train["fingerprint"])))


def _first_line(e: BaseException) -> str:
  """The innermost cause of an Orbax error, on one line (Orbax wraps them deeply)."""
  while e.__cause__ is not None:
    e = e.__cause__
  return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


class RunCheckpointer:
  """Writes one program's resume checkpoints (the full training state) to `resume/`.

  With several processes (ih_jax.distributed), every process makes one and calls each
  method at the same point, as Orbax requires; choices that read the folder are made by
  process 0 and shared.
  """

  def __init__(self, workdir: str, metadata: dict[str, Any]):
    self.workdir = workdir = os.path.abspath(workdir)  # Orbax wants absolute paths
    self.num_runs = len(metadata["runs"])  # real runs; the stack may be padded
    policies = ocp.training.save_decision_policies
    # Periodic (every resume_every_s), on-interrupt and final saves; the caller decides when.
    self._resume = ocp.training.Checkpointer(
        os.path.join(workdir, RESUME_DIR),
        save_decision_policy=policies.AnySavePolicy([]),  # saves only when forced
        preservation_policy=ocp.training.preservation_policies.LatestN(2),
        custom_metadata=metadata, cleanup_tmp_directories=True)

  def save(self, seqs: int, content: dict[str, Any]) -> None:
    """Starts an async save of `to_host(state)` content (blocks only on a previous save)."""
    meta = dict(seqs=seqs, num_runs=self.num_runs,
                params_fingerprint=fingerprint(content["params"]).tolist())
    self._resume.save_checkpointables_async(seqs, content, force=True, overwrite=True,
                                            custom_metadata=meta)

  def steps(self) -> list[int]:
    """Sequences-seen labels of the resume checkpoints on disk, ascending."""
    return sorted(m.step for m in self._resume.checkpoints)

  def restore_latest(self, template: dict[str, Any], from_saveable: Callable[[dict], Any],
                     log: Callable[[str], None] = print, max_seqs: int | None = None
                     ) -> tuple[int, Any] | None:
    """Loads the newest readable resume checkpoint (at or before `max_seqs` if given).

    Unreadable ones (Orbax errors or a fingerprint mismatch) are moved to
    `corrupt_checkpoints/` with a message, and the previous one is tried.
    `template` is `to_host(state)` of the live state: it gives the tree structure
    (optax's named tuples); the runs-axis length is taken from each checkpoint, as
    the saving process may have padded it for another device count.
    Returns (seqs, from_saveable(host content)), or None when there are no
    checkpoints; raises CheckpointError when there are some but none is readable.
    """
    candidates = distributed.agree(lambda: [
        m.step for m in self._resume.checkpoints if max_seqs is None or m.step <= max_seqs])
    for seqs in sorted(candidates, reverse=True):
      where = os.path.join(str(self._resume.directory), str(seqs))
      problem = None
      try:
        content = self._resume.load_checkpointables(
            seqs, _restore_target(self._resume, seqs, template))
        content = jax.tree.map(np.asarray, content)
        _verify(content, where)
      except Exception as e:  # pylint: disable=broad-except
        problem = e if isinstance(e, CheckpointError) else _first_line(e)
      # Readable only if every process read it intact (one answer for all).
      if distributed.gather_flags([problem is not None]).any():
        if distributed.is_primary():
          log(f"[ih_jax] WARNING: checkpoint {where} is unreadable "
              f"({problem or 'on another process'}); moving it to {CORRUPT_DIR}/ and "
              "falling back to the previous one")
        self._quarantine(seqs)
        continue
      return seqs, from_saveable(content)
    if candidates:
      raise CheckpointError(
          f"none of the {len(candidates)} checkpoint(s) in {self.workdir} could be read (all "
          f"moved to {CORRUPT_DIR}/); refusing to restart silently. Pass overwrite=True "
          "(--overwrite) to start this run over")
    return None

  def _quarantine(self, seqs: int) -> None:
    ckptr = self._resume
    if distributed.is_primary():
      src = os.path.join(str(ckptr.directory), str(seqs))
      dst_root = os.path.join(self.workdir, CORRUPT_DIR, os.path.basename(str(ckptr.directory)))
      os.makedirs(dst_root, exist_ok=True)
      dst = os.path.join(dst_root, str(seqs))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      shutil.move(src, dst)
    distributed.barrier(f"ih_jax_quarantine_{seqs}")
    ckptr.reload()

  def drop_after(self, seqs: int) -> None:
    """Removes resume checkpoints newer than `seqs` (left behind by a fallback)."""
    for m in self._resume.checkpoints:
      if m.step > seqs:
        self._resume.delete(m.step)

  def wait(self) -> None:
    """Blocks until pending async saves have finished."""
    self._resume.wait()

  def finish(self) -> None:
    """Waits for pending saves; only the final state stays in resume/."""
    self.wait()
    for step in self.steps()[:-1]:
      self._resume.delete(step)
    self.close()

  def close(self) -> None:
    """Closes the underlying Orbax checkpointer."""
    self._resume.close()


# ---------------------------------------------------------------- analysis API

def _checkpoint_dir(workdir: str) -> str:
  path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)  # Orbax wants absolute paths
  if not os.path.isdir(path):
    raise CheckpointError(f"no checkpoints in {workdir!r} (expected a {snap_lib.SNAPSHOT_DIR}/ "
                          f"store or an older {CHECKPOINT_DIR}/ folder; was the run trained "
                          "with a workdir?)")
  return path


def _store(workdir: str) -> snap_lib.Store | None:
  """The workdir's snapshot store, or None for an older workdir (Orbax checkpoints/)."""
  if not snap_lib.has_store(workdir):
    return None
  try:
    return snap_lib.Store(workdir)
  except snap_lib.SnapshotError as e:
    raise CheckpointError(str(e)) from None


def list_steps(workdir: str) -> list[int]:
  """Sequences-seen labels of the saved params: the snapshots (or, in a workdir written
  in older workdirs, the Orbax checkpoints in `checkpoints/`)."""
  store = _store(workdir)
  if store is not None:
    return store.steps()
  path = _checkpoint_dir(workdir)
  # Orbax renames a step's temporary folder to its bare number only once it is complete.
  return sorted(int(d) for d in os.listdir(path)
                if d.isdigit() and os.path.isdir(os.path.join(path, d)))


def parse_source(text: str, where: str) -> tuple[str, int, int | None]:
  """'WORKDIR[:RUN][@SEQS]' -> (workdir, run index (default 0), seqs (None = the last
  saved point)): which saved params a graft donor or a warm start reads. `where` names
  the setting in errors."""
  rest, seqs = text.strip(), None
  if "@" in rest:
    rest, _, count = rest.rpartition("@")
    try:
      seqs = int(float(count))
    except ValueError:
      raise ValueError(f"{where}: bad sequence count {count!r} after '@' "
                       "(e.g. /runs/main@300000)") from None
  run = 0
  head, sep, tail = rest.rpartition(":")
  if sep and tail.isdigit():
    rest, run = head, int(tail)
  if not rest.strip():
    raise ValueError(f"{where} must look like WORKDIR[:RUN][@SEQS]")
  return rest.strip(), run, seqs


def resolve_step(steps: list[int], seqs: int | None, nearest: bool) -> int:
  """The saved step to load: the last one when `seqs` is None, else `seqs` itself, or
  with `nearest` the closest saved step (ties to the smaller); raises CheckpointError
  when nothing is saved or `seqs` is missing without `nearest`."""
  if not steps:
    raise CheckpointError("no params were saved (empty snapshot store / checkpoint folder)")
  if seqs is None:
    return steps[-1]
  if seqs in steps:
    return seqs
  if not nearest:
    raise CheckpointError(f"no checkpoint at {seqs} seqs; saved: {_summarise(steps)} "
                          "(pass nearest=True to take the closest)")
  return min(steps, key=lambda s: (abs(s - seqs), s))


def _summarise(steps: list[int]) -> str:
  if len(steps) <= 8:
    return ", ".join(map(str, steps))
  return ", ".join(map(str, steps[:4])) + f", ... ({len(steps)} in all) ..., " + \
      ", ".join(map(str, steps[-2:]))


def load_stacked_params(workdir: str, seqs: int | None = None, *,
                        nearest: bool = True) -> tuple[int, Any]:
  """(seqs, runs-stacked params) saved at `seqs` (latest if None).

  The runs axis holds the real runs only (padding added for sharding is dropped).
  The params are checked against the fingerprints saved with them.
  """
  store = _store(workdir)
  if store is not None:
    step = resolve_step(store.steps(), seqs, nearest)
    return step, store.layout.unravel(_read(store, [step])[0])
  step = resolve_step(list_steps(workdir), seqs, nearest)
  return step, _load_orbax_params(workdir, step)


def _read(store: snap_lib.Store, steps: list[int], run: int | None = None) -> np.ndarray:
  try:
    return store.read(steps, None if run is None else run)
  except snap_lib.SnapshotError as e:
    raise CheckpointError(str(e)) from None


def _load_orbax_params(workdir: str, step: int) -> Any:
  """Runs-stacked params of an older workdir's Orbax checkpoint (checkpoints/<step>)."""
  path = os.path.join(_checkpoint_dir(workdir), str(step))
  try:
    meta = ocp.checkpointables_metadata(path)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                            meta.metadata["params"])
    content = ocp.load_checkpointables(path, {"params": abstract})
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"checkpoint {path} is unreadable: {_first_line(e)}") from None
  custom = meta.custom_metadata or {}
  params = jax.tree.map(np.asarray, content["params"])
  expected = custom.get("params_fingerprint")
  if expected is not None and fingerprint(params).tolist() != expected:
    raise CheckpointError(f"checkpoint {path}: params do not match the fingerprint saved with "
                          "them (corrupt file?)")
  if custom.get("num_runs") is not None:
    params = jax.tree.map(lambda x: x[:custom["num_runs"]], params)
  return params


def run_table(workdir: str) -> list[dict[str, Any]]:
  """The runs of a workdir's saved params (index, condition, spec, init_seed, variant)."""
  store = _store(workdir)
  if store is not None:
    return list(store.runs)
  path = os.path.join(_checkpoint_dir(workdir), "metadata", "_ROOT_METADATA")
  try:
    with open(path) as f:
      root = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  return list((root.get("custom_metadata") or {}).get("runs", []))


def load_params(workdir: str, run: int, seqs: int | None = None, *,
                nearest: bool = True, return_step: bool = False) -> Any:
  """Plain params of one run (index into the runs axis) at `seqs` (latest if None).

  With `nearest`, a missing `seqs` loads the closest saved step, with a UserWarning
  naming it, unless `return_step=True`: then (step loaded, params) is returned.
  """
  store = _store(workdir)
  if store is not None:
    step = resolve_step(store.steps(), seqs, nearest)
    _check_run(run, store.num_runs)
    params = store.layout.unravel(_read(store, [step], run)[0])
  else:
    step, stacked = load_stacked_params(workdir, seqs, nearest=nearest)
    _check_run(run, jax.tree.leaves(stacked)[0].shape[0])
    params = jax.tree.map(lambda x: x[run], stacked)
  if seqs is not None and step != seqs and not return_step:
    warnings.warn(f"load_params: no checkpoint at {seqs:,d} seqs in {workdir!r}; loaded the "
                  f"nearest, {step:,d}", stacklevel=2)
  return (step, params) if return_step else params


def _check_run(run: int, num_runs: int) -> None:
  if not 0 <= run < num_runs:
    raise IndexError(f"run {run} out of range: this workdir has runs 0..{num_runs - 1}")


def load_params_series(workdir: str, run: int, steps: list[int]) -> Any:
  """[K, ...] params of one run at the given saved steps (exact steps).

  From snapshots this is one read (a memory-mapped slice of P floats per step).
  """
  store = _store(workdir)
  if store is not None:
    _check_run(run, store.num_runs)
    saved = store.steps()
    for s in steps:
      resolve_step(saved, s, nearest=False)  # the error names what was saved
    return store.layout.unravel(_read(store, list(steps), run))
  per = [load_params(workdir, run, s, nearest=False) for s in steps]
  return jax.tree.map(lambda *xs: np.stack(xs), *per)
