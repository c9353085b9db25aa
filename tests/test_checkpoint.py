"""Saved state: snapshot schedule on disk, resume = uninterrupted, corruption fallback,
signals (snapshot-store specifics: tests/test_snapshots.py).

Equality claims here are exact: a resumed run replays the same compiled program
on the same data stream, so metrics.csv / train_log.csv must match the
uninterrupted run's byte for byte, and the final params bitwise.
"""
import glob
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crashes import Crash, crash_after_saves

from ih_jax import checkpoint as ckpt_lib
from ih_jax import schedule
from ih_jax import train
from ih_jax.train import driver, state as state_lib
from ih_jax.config import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_with_checkpoints(num_seqs=2048, **ckpt):
  return ExperimentConfig.from_dict({
      "train": dict(num_seqs=num_seqs, eval_every=512, progress_every_s=0),
      "sweep": {"conditions": ["none", "match=ih:L2H0;keep_only:L2H0"], "init_seeds": [5, 6]},
      # resume_every_s tiny: a resume checkpoint at every boundary, so crash tests can
      # die right after the n-th one.
      "checkpoint": dict(dict(every=640, resume_every_s=1e-6), **ckpt),
      "evaluators": [{"name": "fsl_train", "size": 64}],
  })


def read(path):
  with open(path) as f:
    return f.read()



@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("full"))
  res = train.train_and_evaluate(cfg_with_checkpoints(), wd, verbose=False)
  return wd, res



def crashed_run(monkeypatch, wd, n_saves):
  """A run of cfg_with_checkpoints() in `wd` that dies after its n-th resume checkpoint
  (boundaries 0, 512, 640, 1024, 1280, 1536, 1920, 2048)."""
  crash_after_saves(monkeypatch, n_saves)
  with pytest.raises(Crash):
    train.train_and_evaluate(cfg_with_checkpoints(), wd, verbose=False)
  monkeypatch.undo()


def assert_same_outputs(wd_a, wd_b):
  for f in ("metrics.csv", "train_log.csv"):
    assert read(os.path.join(wd_a, f)) == read(os.path.join(wd_b, f)), f
  assert ckpt_lib.list_steps(wd_a) == ckpt_lib.list_steps(wd_b)
  for run in range(4):
    chex.assert_trees_all_equal(ckpt_lib.load_params(wd_a, run), ckpt_lib.load_params(wd_b, run))


def test_checkpoints_follow_the_schedule_exactly(uninterrupted):
  wd, res = uninterrupted
  # every=640 -> points 0, 640, 1280, 1920 (fire at 0, 640, 1280, 1920), plus final 2048.
  assert ckpt_lib.list_steps(wd) == [0, 640, 1280, 1920, 2048]
  assert not os.path.exists(os.path.join(wd, "checkpoints"))  # the older checkpoint layout
  assert sorted(os.listdir(os.path.join(wd, "resume"))) == ["2048", "metadata"]  # final state
  chex.assert_trees_all_equal(ckpt_lib.load_params(wd, 2),
                              jax.tree.map(lambda x: x[2], res.params))


def test_load_params_nearest_and_errors(uninterrupted):
  wd, _ = uninterrupted
  a = ckpt_lib.load_params(wd, 1, 700)                 # nearest: 640
  chex.assert_trees_all_equal(a, ckpt_lib.load_params(wd, 1, 640, nearest=False))
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint at 700 seqs; saved: 0, 640"):
    ckpt_lib.load_params(wd, 1, 700, nearest=False)
  with pytest.raises(IndexError, match="run 4 out of range: this workdir has runs 0..3"):
    ckpt_lib.load_params(wd, 4)
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoints in"):
    ckpt_lib.load_params(os.path.join(wd, "nowhere"), 0)
  assert [r["condition"] for r in ckpt_lib.run_table(wd)] == ["none", "none", "match", "match"]


def test_schedule_union():
  ckpt = ExperimentConfig.from_dict({"checkpoint": dict(
      every=400, at=[50, 999], log_num=4, log_start=100,
      windows=[[600, 700, 32]])}).checkpoint
  seqs = [s * 32 for s in schedule.checkpoint_steps(ckpt, 1000, 32)]
  # every: 0, 400, 800; at: 50, 999; log: 100, 215, 464, 1000(final); window: 600..696 by 32.
  points = {0, 400, 800, 50, 999, 100, 215, 464, 600, 632, 664, 696}
  expected = sorted({32 * -(-p // 32) for p in points} | {1024})
  assert seqs == expected
  with pytest.raises(ValueError, match=r"\(start, stop, every\)"):
    schedule.window_points((1, 2))


def test_resume_after_crash_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
  wd_full, _ = uninterrupted
  wd = str(tmp_path / "crashed")
  crashed_run(monkeypatch, wd, 5)  # dies after the resume checkpoint at 1280 seqs
  assert ckpt_lib.list_steps(wd) == [0, 640, 1280]
  train.train_and_evaluate(cfg_with_checkpoints(), wd, verbose=False)
  assert_same_outputs(wd_full, wd)


def test_corrupt_checkpoint_falls_back_to_previous(uninterrupted, tmp_path, monkeypatch, capsys):
  wd_full, _ = uninterrupted
  wd = str(tmp_path / "corrupt")
  crashed_run(monkeypatch, wd, 5)  # resume/ holds 1024 and 1280
  # Flip one byte in every data file of the newest checkpoint.
  for f in glob.glob(os.path.join(wd, "resume", "1280", "**", "d", "*"), recursive=True):
    data = bytearray(read_bytes(f))
    data[len(data) // 2] ^= 0xFF
    with open(f, "wb") as fh:
      fh.write(bytes(data))
  train.train_and_evaluate(cfg_with_checkpoints(), wd, verbose=True)
  out = capsys.readouterr().out
  assert "resume/1280 is unreadable" in out and "falling back to the previous one" in out
  assert "resuming" in out and "from the checkpoint at 1,024 seqs" in out, out[:3000]
  assert os.path.isdir(os.path.join(wd, "corrupt_checkpoints", "resume", "1280"))
  assert_same_outputs(wd_full, wd)


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def test_fingerprint_catches_silent_changes():
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  state = state_lib.TrainState(params, (), jax.random.split(jax.random.key(0), 1), jnp.int32(3))
  content = ckpt_lib.to_host(state)
  ckpt_lib._verify(content, "ok")  # pylint: disable=protected-access
  content["params"]["w"] = content["params"]["w"].copy()
  content["params"]["w"][1, 2] += 1e-6
  with pytest.raises(ckpt_lib.CheckpointError, match="do not match the fingerprint"):
    ckpt_lib._verify(content, "bad")  # pylint: disable=protected-access


def test_sigterm_stops_cleanly_and_rerun_resumes(tmp_path):
  """The launcher, killed with SIGTERM mid-run, then rerun with the same command."""
  overrides = ["--config.train.num_seqs=48000", "--config.train.eval_every=4000",
               "--config.checkpoint.every=8000", "--config.checkpoint.resume_every_s=0",
               "--config.sweep.conditions=('none',)", "--config.sweep.init_seeds=(5,)",
               "--noplot"]
  def launch(wd):
    return subprocess.Popen(
        [sys.executable, "-m", "ih_jax.experiments.train", "--config=tiny",
         f"--workdir={wd}"] + overrides, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)

  wd_full, wd = str(tmp_path / "full"), str(tmp_path / "killed")
  # The uninterrupted reference run first: it writes the training program to the
  # persistent compilation cache (tests/conftest.py), so the two launches below load it
  # instead of each compiling it again.
  full = launch(wd_full)
  full_out, _ = full.communicate(timeout=300)
  assert full.returncode == 0, full_out[-3000:]
  proc = launch(wd)
  log = os.path.join(wd, "train_log.csv")
  def past_first_snapshot():  # training has passed the snapshot at 8000 seqs
    try:
      return ",8032," in read(log)
    except OSError:
      return False
  deadline = time.time() + 240
  while not past_first_snapshot() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 130, out[-3000:]
  assert "SIGTERM received: stopped at" in out and "rerun the same command" in out
  assert not os.path.exists(os.path.join(wd, "done.json"))
  stopped = ckpt_lib.list_steps(wd)
  assert stopped and stopped[-1] < 48000
  again = subprocess.run(
      [sys.executable, "-m", "ih_jax.experiments.train", "--config=tiny",
       f"--workdir={wd}"] + overrides, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "resuming" in again.stdout
  for f in ("metrics.csv", "train_log.csv"):
    assert read(os.path.join(wd_full, f)) == read(os.path.join(wd, f)), f
  assert ckpt_lib.list_steps(wd) == ckpt_lib.list_steps(wd_full) == [
      0, 8000, 16000, 24000, 32000, 40000, 48000]
  chex.assert_trees_all_equal(ckpt_lib.load_params(wd, 0), ckpt_lib.load_params(wd_full, 0))


def test_interrupt_checkpoint_lands_in_resume_dir_and_is_removed_at_the_end(tmp_path, monkeypatch):
  """A SIGINT between schedule points writes a transient resume/ checkpoint."""
  wd = str(tmp_path / "sigint")
  # Only the final point is scheduled; no periodic resume checkpoints.
  cfg = cfg_with_checkpoints(num_seqs=2048, every=0, resume_every_s=0)
  real_chunk = driver.make_train_chunk

  def chunk_that_signals(exp, max_steps, **kw):
    """The real program; its 3rd call (the chunk ending at 1024 seqs) raises SIGINT."""
    lowered = real_chunk(exp, max_steps, **kw).lower
    calls = {"n": 0}

    def compiled_call(compiled, *args):
      calls["n"] += 1
      if calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGINT)
      return compiled(*args)

    class Lowerable:
      def lower(self, *a):
        low = lowered(*a)
        return type("Lowered", (), {"compile": lambda _: (
            lambda c: lambda *args: compiled_call(c, *args))(low.compile())})()
    return Lowerable()

  monkeypatch.setattr(driver, "make_train_chunk", chunk_that_signals)
  with pytest.raises(train.TrainingInterrupted, match="SIGINT received: stopped at 1,024 seqs"):
    train.train_and_evaluate(cfg, wd, verbose=False)
  assert ckpt_lib.list_steps(wd) == []  # nothing scheduled was reached
  assert sorted(os.listdir(os.path.join(wd, "resume"))) == ["1024", "metadata"]
  monkeypatch.undo()
  res = train.train_and_evaluate(cfg, wd, verbose=False)
  assert sorted(os.listdir(os.path.join(wd, "resume"))) == ["2048", "metadata"]  # final only
  assert ckpt_lib.list_steps(wd) == [2048]
  fresh = train.train_and_evaluate(cfg, None, verbose=False)
  chex.assert_trees_all_equal(res.params, fresh.params)
  assert res.metrics == fresh.metrics


def test_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  res = train.train_and_evaluate(cfg_with_checkpoints(num_seqs=640), "rel/run", verbose=False)
  assert ckpt_lib.list_steps("rel/run") == [0, 640]
  chex.assert_trees_all_equal(ckpt_lib.load_params("rel/run", 0),
                              jax.tree.map(lambda x: x[0], res.params))


def test_no_readable_checkpoint_refuses_to_restart_silently(tmp_path, monkeypatch):
  wd = str(tmp_path / "allbad")
  crashed_run(monkeypatch, wd, 2)  # resume/ holds 0 and 512
  for f in glob.glob(os.path.join(wd, "resume", "*", "**", "d", "*"), recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(8)
  with pytest.raises(ckpt_lib.CheckpointError, match="none of the 2 checkpoint"):
    train.train_and_evaluate(cfg_with_checkpoints(), wd, verbose=False)
  assert os.path.getsize(os.path.join(wd, "metrics.csv")) > 200  # rows kept
  res = train.train_and_evaluate(cfg_with_checkpoints(), wd, overwrite=True, verbose=False)
  assert res.metrics[-1]["seqs"] == 2048
