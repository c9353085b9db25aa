"""Snapshots: schedule, equality with the training state, resume, torn batches,
and workdirs of the older checkpoint layout (Orbax checkpoints/<seqs>).

Equalities are exact: every run here replays one compiled program on one data stream.
"""
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from crashes import Crash, crash_after_saves
from orbax.checkpoint import v1 as ocp

from ih_jax import checkpoint as ckpt_lib
from ih_jax import schedule
from ih_jax import snapshots as snap_lib
from ih_jax import train
from ih_jax.analysis import context
from ih_jax.config import ExperimentConfig


def cfg(num_seqs=1280, every=160, resume_every_s=1e-6, windows=(), at=()):
  """Two runs, eval every 320 seqs; snapshots every `every` (+ windows / at); a resume
  checkpoint at every boundary by default (resume_every_s tiny)."""
  return ExperimentConfig.from_dict({
      "train": dict(num_seqs=num_seqs, eval_every=320, progress_every_s=0),
      "sweep": {"conditions": ["none"], "init_seeds": [5, 6]},
      "checkpoint": dict(every=every, resume_every_s=resume_every_s, windows=list(windows),
                         at=list(at)),
      "evaluators": [{"name": "fsl_train", "size": 32}],
  })


def read(path):
  with open(path, "rb") as f:
    return f.read()




@pytest.fixture(scope="module")
def full(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("full"))
  # Small batches (2 snapshots each) so the store has several batch files.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(snap_lib, "BATCH_BYTES", 2 * 2 * 67141 * 4)
    res = train.train_and_evaluate(cfg(), wd, verbose=False)
  return wd, res


def all_params(wd):
  steps = ckpt_lib.list_steps(wd)
  return steps, [ckpt_lib.load_stacked_params(wd, s, nearest=False)[1] for s in steps]


def assert_same(wd_a, wd_b):
  for f in ("metrics.csv", "train_log.csv"):
    assert read(os.path.join(wd_a, f)) == read(os.path.join(wd_b, f)), f
  steps_a, pa = all_params(wd_a)
  steps_b, pb = all_params(wd_b)
  assert steps_a == steps_b
  for a, b in zip(pa, pb):
    chex.assert_trees_all_equal(a, b)


def test_schedule_is_exact_and_batched(full):
  wd, _ = full
  c = cfg(windows=[(100, 300, 50)], at=[999])
  want = [s * 32 for s in schedule.checkpoint_steps(c.checkpoint, 1280, 32)]
  wd2 = wd + "_sched"
  train.train_and_evaluate(c, wd2, verbose=False)
  assert ckpt_lib.list_steps(wd2) == want
  assert 128 in want and 1024 in want  # window 100 -> 128, at 999 -> 1024
  shutil.rmtree(wd2)
  assert ckpt_lib.list_steps(wd) == [0, 160, 320, 480, 640, 800, 960, 1120, 1280]
  manifest = snap_lib.read_manifest(wd)
  assert len(manifest["batches"]) >= 4  # written in several batches
  assert [s for b in manifest["batches"] for s in b["seqs"]] == ckpt_lib.list_steps(wd)
  assert not os.path.exists(os.path.join(wd, "checkpoints"))


def test_snapshots_equal_the_training_state(full, tmp_path):
  wd, res = full
  # The last snapshot holds the final params, bit for bit.
  step, last = ckpt_lib.load_stacked_params(wd)
  assert step == 1280
  chex.assert_trees_all_equal(last, res.params)
  # A snapshot mid-run equals the final params of the same run stopped there.
  stopped = train.train_and_evaluate(cfg(num_seqs=640), None, verbose=False)
  chex.assert_trees_all_equal(ckpt_lib.load_stacked_params(wd, 640, nearest=False)[1],
                              stopped.params)
  # The series reader and the context agree with single loads.
  ctx = context.load_context(wd)
  assert ctx.checkpoint_steps() == ckpt_lib.list_steps(wd)
  series = ctx.stacked_params(1, [0, 640, 1280])
  for k, s in enumerate([0, 640, 1280]):
    chex.assert_trees_all_equal(jax.tree.map(lambda x, k=k: x[k], series),
                                ckpt_lib.load_params(wd, 1, s, nearest=False))
  assert [r["init_seed"] for r in ckpt_lib.run_table(wd)] == [5, 6]


def test_resume_after_crash_is_byte_identical(full, tmp_path):
  wd_full, _ = full
  wd = str(tmp_path / "crashed")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(snap_lib, "BATCH_BYTES", 2 * 2 * 67141 * 4)
    crash_after_saves(mp, 4)  # boundaries 0, 160, 320, 480: dies after the one at 480
    with pytest.raises(Crash):
      train.train_and_evaluate(cfg(), wd, verbose=False)
  # 640 too: its chunk was dispatched (and its snapshot queued) before 480's checkpoint.
  assert ckpt_lib.list_steps(wd) == [0, 160, 320, 480, 640]
  train.train_and_evaluate(cfg(), wd, verbose=False)  # drops 640, recomputes it
  assert_same(wd_full, wd)


@pytest.mark.parametrize("damage", ["truncate", "flip", "unlisted"])
def test_torn_or_corrupt_last_batch_is_recomputed(full, tmp_path, capsys, damage):
  """The last batch file damaged after a crash: detected, the run goes back to a resume
  checkpoint before it, nothing is lost and every value equals the uninterrupted run."""
  wd_full, _ = full
  wd = str(tmp_path / "torn")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(snap_lib, "BATCH_BYTES", 2 * 2 * 67141 * 4)
    crash_after_saves(mp, 6)  # resume checkpoints ... 640, 800; snapshots up to 800
    with pytest.raises(Crash):
      train.train_and_evaluate(cfg(), wd, verbose=False)
  manifest = snap_lib.read_manifest(wd)
  # The batch holding the newest resume checkpoint's own snapshot (800).
  last = next(b for b in manifest["batches"] if 800 in b["seqs"])
  path = os.path.join(wd, "snapshots", last["file"])
  if damage == "truncate":     # a kill mid-write of a file the manifest lists
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == "flip":       # silent corruption
    data = bytearray(read(path))
    data[-100] ^= 0x01
    with open(path, "wb") as f:
      f.write(bytes(data))
  else:                        # written, but the manifest never updated: a stray file
    shutil.copy(path, os.path.join(wd, "snapshots", "b999999.npy"))
    with open(os.path.join(wd, "snapshots", "b999999.npy.tmp"), "wb") as f:
      f.write(b"partial")
  if damage != "unlisted":
    with pytest.raises(ckpt_lib.CheckpointError, match="do not match|truncated|unreadable"):
      ckpt_lib.load_params_series(wd, 1, last["seqs"])  # the flipped byte is in run 1
  train.train_and_evaluate(cfg(), wd, verbose=True)
  out = capsys.readouterr().out
  if damage != "unlisted":
    assert f"snapshot batch {last['file']}" in out and "damaged" in out, out
    # The run goes back to the newest resume checkpoint before the damaged batch
    # (resume/ keeps 640 and 800), or to the start if the batch holds 640 too.
    want = "starting from scratch" if 640 in last["seqs"] else "from the checkpoint at 640"
    assert want in out, out
  else:
    assert "from the checkpoint at 800 seqs" in out
  assert sorted(os.listdir(os.path.join(wd, "snapshots"))) == sorted(
      [b["file"] for b in snap_lib.read_manifest(wd)["batches"]] + ["manifest.json"])
  assert_same(wd_full, wd)


def test_reading_one_runs_series_is_one_call(full):
  wd, _ = full
  store = snap_lib.Store(wd)
  flat = store.read(store.steps(), 1)
  assert flat.shape == (9, 67141) and flat.dtype == np.float32
  np.testing.assert_array_equal(store.read([640], None)[0, 1], flat[4])


def write_old_layout(wd, params_R, steps, runs):
  """An older workdir: Orbax checkpoints/<seqs>/{params,train} as the old trainer wrote."""
  policies = ocp.training.save_decision_policies
  ck = ocp.training.Checkpointer(os.path.join(os.path.abspath(wd), "checkpoints"),
                                 save_decision_policy=policies.SpecificStepsPolicy(
                                     steps=set(steps)),
                                 custom_metadata=dict(runs=runs))
  for i, s in enumerate(steps):
    p = jax.tree.map(lambda x, i=i: np.asarray(x) * np.float32(2 ** i), params_R)  # exact
    content = dict(params=p, train=dict(step=np.asarray(s // 32)))
    ck.save_checkpointables(s, content, custom_metadata=dict(
        seqs=s, num_runs=len(runs), params_fingerprint=ckpt_lib.fingerprint(p).tolist()))
  ck.close()


def test_old_layout_workdir_still_loads(full, tmp_path):
  wd_new, res = full
  wd = str(tmp_path / "old")
  os.makedirs(wd)
  for f in ("config.json", "metrics.csv", "train_log.csv"):
    shutil.copy(os.path.join(wd_new, f), wd)
  runs = json.load(open(os.path.join(wd, "config.json")))["runs"]
  write_old_layout(wd, res.params, [0, 640], runs)
  assert ckpt_lib.list_steps(wd) == [0, 640]
  chex.assert_trees_all_equal(ckpt_lib.load_params(wd, 1, 0),
                              jax.tree.map(lambda x: x[1], res.params))
  series = ckpt_lib.load_params_series(wd, 0, [0, 640])
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1] / 2, series),
                              jax.tree.map(lambda x: x[0], res.params))
  assert [r["init_seed"] for r in ckpt_lib.run_table(wd)] == [5, 6]
  assert context.load_context(wd).checkpoint_steps() == [0, 640]
  # An unfinished old-layout run is not continued into a snapshot store.
  with pytest.raises(FileExistsError, match="older checkpoint layout"):
    train.train_and_evaluate(cfg(), wd, verbose=False)


def test_writer_cuts_a_batch_straddling_the_resume_point(tmp_path):
  """Resuming from an earlier checkpoint (a fallback) rewrites a batch that holds
  snapshots on both sides of it with its prefix, and drops later batches."""
  layout = snap_lib.Layout([["w"]], [(3,)])
  runs = [dict(index=0), dict(index=1)]
  w = snap_lib.SnapshotWriter(str(tmp_path), layout, runs, log=lambda m: None,
                              batch_bytes=3 * 2 * 3 * 4)  # 3 snapshots a batch
  w.open(None)
  vals = {s: np.full((2, 3), s, np.float32) for s in (0, 10, 20, 30, 40)}
  for s, v in vals.items():
    w.add(s, v)
  w.close()
  assert [b["seqs"] for b in snap_lib.read_manifest(str(tmp_path))["batches"]] == [
      [0, 10, 20], [30, 40]]
  w = snap_lib.SnapshotWriter(str(tmp_path), layout, runs, log=lambda m: None)
  assert w.resume_limit([0, 10, 20, 30, 40]) is None      # all there: no limit
  assert w.resume_limit([0, 10, 20, 25, 30, 40]) == 24    # 25 missing: resume before it
  w.open(10)
  w.add(20, vals[20] + 1)
  w.close()
  store = snap_lib.Store(str(tmp_path))
  assert store.steps() == [0, 10, 20]
  np.testing.assert_array_equal(store.read([0, 10, 20])[:, 1, 0], [0, 10, 21])
  assert sorted(os.listdir(tmp_path / "snapshots")) == sorted(
      [b["file"] for b in store.manifest["batches"]] + ["manifest.json"])
  params = store.layout.unravel(store.read([10], 0)[0])
  np.testing.assert_array_equal(params["w"], [10, 10, 10])
