"""Orbax checkpoints of a stacked sweep, keyed by sequences seen (SPEC §5.2).

Layout inside a workdir:

  checkpoints/<seqs>/params   runs-stacked params (leading axis = runs)
  checkpoints/<seqs>/train    Adam state, data-stream key(s), step, fingerprint
  resume/<seqs>/...           same content, written every `checkpoint.resume_every_s`
                              seconds of wall time and on SIGINT/SIGTERM; deleted
                              when the run finishes

`checkpoints/` holds exactly the configured schedule (plus the final point).
Each checkpoint carries a fingerprint of every leaf (a wrapping uint32 sum of
its bits; the params' one also in the step's custom metadata) so silent
corruption is caught on load, not only the checksum failures Orbax reports.

Analysis API: `list_steps(workdir)` and `load_params(workdir, run, seqs)`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any, Callable

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp

CHECKPOINT_DIR = "checkpoints"
RESUME_DIR = "resume"
CORRUPT_DIR = "corrupt_checkpoints"   # unreadable checkpoints are moved here, not deleted


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable."""


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
  chunk while Orbax writes in the background.
  """
  params, opt_state, key_data, step = jax.device_get(
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
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
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
  """Writes the scheduled and the resume checkpoints of one program's workdir."""

  def __init__(self, workdir: str, schedule_seqs: list[int], metadata: dict[str, Any]):
    self.workdir = workdir = os.path.abspath(workdir)  # Orbax wants absolute paths
    self.schedule_seqs = sorted(schedule_seqs)
    self.num_runs = len(metadata["runs"])  # real runs; the stack may be padded
    policies = ocp.training.save_decision_policies
    self._main = ocp.training.Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR),
        save_decision_policy=policies.SpecificStepsPolicy(steps=set(self.schedule_seqs)),
        custom_metadata=metadata, cleanup_tmp_directories=True)
    # Periodic (every resume_every_s) and on-interrupt saves; the caller decides when.
    self._resume = ocp.training.Checkpointer(
        os.path.join(workdir, RESUME_DIR),
        save_decision_policy=policies.AnySavePolicy([]),  # saves only when forced
        preservation_policy=ocp.training.preservation_policies.LatestN(2),
        custom_metadata=metadata, cleanup_tmp_directories=True)

  def save(self, seqs: int, content: dict[str, Any], scheduled: bool, resume: bool) -> None:
    """Starts an async save of `to_host(state)` content (blocks only on a previous save)."""
    meta = dict(seqs=seqs, num_runs=self.num_runs,
                params_fingerprint=fingerprint(content["params"]).tolist())
    if scheduled:
      self._main.save_checkpointables_async(seqs, content, custom_metadata=meta)
    elif resume:
      self._resume.save_checkpointables_async(seqs, content, force=True, overwrite=True,
                                              custom_metadata=meta)

  def restore_latest(self, template: dict[str, Any], from_saveable: Callable[[dict], Any],
                     log: Callable[[str], None] = print) -> tuple[int, Any] | None:
    """Loads the newest readable checkpoint from either directory.

    Unreadable ones (Orbax errors or a fingerprint mismatch) are moved to
    `corrupt_checkpoints/` with a message, and the previous one is tried.
    `template` is `to_host(state)` of the live state: it gives the tree structure
    (optax's named tuples); the runs-axis length is taken from each checkpoint, as
    the saving process may have padded it for another device count.
    Returns (seqs, from_saveable(host content)), or None when there are no
    checkpoints; raises CheckpointError when there are some but none is readable.
    """
    candidates = [(m.step, 1, self._main) for m in self._main.checkpoints]
    candidates += [(m.step, 0, self._resume) for m in self._resume.checkpoints]
    for seqs, _, ckptr in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
      where = os.path.join(str(ckptr.directory), str(seqs))
      try:
        content = ckptr.load_checkpointables(seqs, _restore_target(ckptr, seqs, template))
        content = jax.tree.map(np.asarray, content)
        _verify(content, where)
      except Exception as e:  # pylint: disable=broad-except
        msg = e if isinstance(e, CheckpointError) else _first_line(e)
        log(f"[ih_jax] WARNING: checkpoint {where} is unreadable ({msg}); moving it to "
            f"{CORRUPT_DIR}/ and falling back to the previous one")
        self._quarantine(ckptr, seqs)
        continue
      return seqs, from_saveable(content)
    if candidates:
      raise CheckpointError(
          f"none of the {len(candidates)} checkpoint(s) in {self.workdir} could be read (all "
          f"moved to {CORRUPT_DIR}/); refusing to restart silently. Pass overwrite=True "
          "(--overwrite) to start this run over")
    return None

  def _quarantine(self, ckptr, seqs: int) -> None:
    src = os.path.join(str(ckptr.directory), str(seqs))
    dst_root = os.path.join(self.workdir, CORRUPT_DIR, os.path.basename(str(ckptr.directory)))
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, str(seqs))
    if os.path.exists(dst):
      shutil.rmtree(dst)
    shutil.move(src, dst)
    ckptr.reload()

  def drop_after(self, seqs: int) -> None:
    """Removes resume checkpoints newer than `seqs` (left behind by a fallback)."""
    for m in self._resume.checkpoints:
      if m.step > seqs:
        self._resume.delete(m.step)

  def wait(self) -> None:
    self._main.wait()
    self._resume.wait()

  def finish(self) -> None:
    """Waits for pending saves and removes the transient resume checkpoints."""
    self.wait()
    self.close()
    shutil.rmtree(os.path.join(self.workdir, RESUME_DIR), ignore_errors=True)

  def close(self) -> None:
    self._main.close()
    self._resume.close()


# ---------------------------------------------------------------- analysis API

def _checkpoint_dir(workdir: str) -> str:
  path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)  # Orbax wants absolute paths
  if not os.path.isdir(path):
    raise CheckpointError(f"no checkpoints in {workdir!r} (expected a {CHECKPOINT_DIR}/ "
                          "folder; was the run trained with checkpointing on?)")
  return path


def list_steps(workdir: str) -> list[int]:
  """Sequences-seen labels of the checkpoints saved in `workdir/checkpoints`.

  Read from the folder names: Orbax renames a step's temporary folder to its bare
  number only once the step is complete.
  """
  path = _checkpoint_dir(workdir)
  return sorted(int(d) for d in os.listdir(path)
                if d.isdigit() and os.path.isdir(os.path.join(path, d)))


def resolve_step(steps: list[int], seqs: int | None, nearest: bool) -> int:
  if not steps:
    raise CheckpointError("the checkpoint folder is empty")
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
  """(seqs, runs-stacked params) of the checkpoint at `seqs` (latest if None).

  The runs axis holds the real runs only (padding added for sharding is dropped).
  The params are checked against the fingerprint saved with them.
  """
  step = resolve_step(list_steps(workdir), seqs, nearest)
  path = os.path.join(_checkpoint_dir(workdir), str(step))
  try:
    meta = ocp.checkpointables_metadata(path)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
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
  return step, params


def run_table(workdir: str) -> list[dict[str, Any]]:
  """The runs of a workdir's checkpoints (index, condition, spec, init_seed, variant)."""
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
  step, stacked = load_stacked_params(workdir, seqs, nearest=nearest)
  if seqs is not None and step != seqs and not return_step:
    warnings.warn(f"load_params: no checkpoint at {seqs:,d} seqs in {workdir!r}; loaded the "
                  f"nearest, {step:,d}", stacklevel=2)
  num_runs = jax.tree.leaves(stacked)[0].shape[0]
  if not 0 <= run < num_runs:
    raise IndexError(f"run {run} out of range: this workdir has runs 0..{num_runs - 1}")
  params = jax.tree.map(lambda x: x[run], stacked)
  return (step, params) if return_step else params


def load_params_series(workdir: str, run: int, steps: list[int]) -> Any:
  """[K, ...] params of one run at the given checkpoint steps (exact steps)."""
  per = [load_params(workdir, run, s, nearest=False) for s in steps]
  return jax.tree.map(lambda *xs: np.stack(xs), *per)
