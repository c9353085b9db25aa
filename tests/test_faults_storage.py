"""Fault injection on what ih_jax stores and reads.

Each case damages or swaps a file the way a user probe did and checks the outcome:
refused with a message naming the file / line / value, or repaired with nothing lost
(and said so). A crashed run is built once per module and copied for each case.
"""
import os
import shutil
import struct
import zipfile

import h5py
import numpy as np
import pytest

from crashes import Crash, crash_after_saves

from ih_jax import checkpoint as ckpt_lib
from ih_jax import sweep as sweep_lib
from ih_jax import train
from ih_jax.train import driver
from ih_jax import workdir as workdir_lib
from ih_jax.config import ExperimentConfig
from ih_jax.data import omniglot
from ih_jax.experiments.paper import scales
from ih_jax.experiments.paper.study import Study

SHARED_OMNIGLOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "data", "omniglot")


def tiny(num_seqs=640, **data):
  """One run, 20 steps of 32: evaluations every 160 seqs, snapshots at 0, 320, 640, a
  resume checkpoint at every boundary (resume_every_s tiny)."""
  task = {"class_split": [50, -1, 100]} if data else {}
  return ExperimentConfig.from_dict({
      "train": dict(num_seqs=num_seqs, eval_every=160, progress_every_s=0),
      "checkpoint": dict(every=320, resume_every_s=1e-6),
      "evaluators": [{"name": "fsl_train", "size": 32}],
      "data": data, "task": task,
  })




def read(path):
  with open(path, newline="") as f:
    return f.read()


def write(path, text):
  with open(path, "w", newline="") as f:
    f.write(text)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("full"))
  train.train_and_evaluate(tiny(), wd, verbose=False)
  return wd


@pytest.fixture(scope="module")
def crashed_template(tmp_path_factory):
  """A workdir whose run died right after its checkpoint at 320 seqs."""
  wd = str(tmp_path_factory.mktemp("crashed") / "wd")
  with pytest.MonkeyPatch.context() as mp:
    crash_after_saves(mp, 3)  # resume checkpoints: 0, 160, 320
    with pytest.raises(Crash):
      train.train_and_evaluate(tiny(), wd, verbose=False)
  assert ckpt_lib.list_steps(wd) == [0, 320]
  return wd


@pytest.fixture
def crashed(crashed_template, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(crashed_template, wd)
  return wd


CSVS = ["metrics.csv", "train_log.csv"]


# ------------------------------------------------------------ 1. metrics / train log on resume

def test_torn_last_lines_are_cut_said_and_nothing_is_lost(crashed, full, capsys):
  for name in CSVS:  # a kill mid-write: a partial row, no newline
    path = os.path.join(crashed, name)
    write(path, read(path) + "0,none,5,3")
  train.train_and_evaluate(tiny(), crashed, verbose=True)
  out = capsys.readouterr().out
  for name in CSVS:
    assert read(os.path.join(crashed, name)) == read(os.path.join(full, name)), name
    assert f"{name}: line" in out and "incomplete last line" in out, out


@pytest.mark.parametrize("name", CSVS)
@pytest.mark.parametrize("damage", ["torn header", "renamed column"])
def test_damaged_header_is_refused_and_rows_kept(crashed, name, damage):
  path = os.path.join(crashed, name)
  header, rest = read(path).split("\r\n", 1)
  new = header[:9] if damage == "torn header" else header.replace("seed", "sead")
  write(path, new + "\r\n" + rest)
  before = read(path)
  with pytest.raises(ValueError, match=rf"{name}, line 1: header"):
    train.train_and_evaluate(tiny(), crashed, verbose=False)
  assert read(path) == before  # nothing cut


@pytest.mark.parametrize("name", CSVS)
def test_short_row_before_the_checkpoint_is_refused(crashed, name):
  path = os.path.join(crashed, name)
  lines = read(path).split("\r\n")
  lines[2] = lines[2].rsplit(",", 1)[0]  # line 3 loses its last field
  write(path, "\r\n".join(lines))
  with pytest.raises(ValueError, match=rf"{name}, line 3: .*fields, expected"):
    train.train_and_evaluate(tiny(), crashed, verbose=False)


@pytest.mark.parametrize("name", CSVS)
def test_rows_missing_before_the_checkpoint_are_refused(crashed, name):
  path = os.path.join(crashed, name)
  lines = read(path).split("\r\n")
  write(path, "\r\n".join(lines[:-3] + [""]))  # the last two rows gone, on a line boundary
  with pytest.raises(ValueError, match=rf"{name}.*missing.*320"):
    train.train_and_evaluate(tiny(), crashed, verbose=False)
  os.remove(path)
  with pytest.raises(ValueError, match=rf"{name} is missing"):
    train.train_and_evaluate(tiny(), crashed, verbose=False)


def test_damaged_metrics_of_a_finished_run_name_file_line_and_field(full, tmp_path):
  lines = read(os.path.join(full, "metrics.csv")).split("\r\n")
  header = lines[0].split(",")
  bad = lines[3].split(",")
  bad[header.index("loss")] = "0.6x"
  path = str(tmp_path / "metrics.csv")
  write(path, "\r\n".join(lines[:3] + [",".join(bad)] + lines[4:]))
  with pytest.raises(ValueError, match=r"metrics.csv, line 4: field 'loss' is '0.6x'"):
    workdir_lib.read_metrics(path)
  write(path, "\r\n".join(lines[:3] + [",".join(bad[:-2])] + lines[4:]))
  with pytest.raises(ValueError, match=r"metrics.csv, line 4: \d+ fields, expected"):
    workdir_lib.read_metrics(path)
  log = str(tmp_path / "log")
  os.makedirs(log)
  lines = read(os.path.join(full, "train_log.csv")).split("\r\n")
  lines[5] = lines[5].replace(",5,", ",five,", 1)
  write(os.path.join(log, "train_log.csv"), "\r\n".join(lines))
  with pytest.raises(ValueError, match=r"train_log.csv, line 6: field 'seed' is 'five'"):
    workdir_lib.read_train_log(log, 1)


# ------------------------------------------------------------ 2. a changed feature file

def test_changed_feature_file_is_refused_on_reload_and_resume(tmp_path):
  table = np.random.default_rng(0).normal(size=(160, 5, 8)).astype(np.float32)
  path = str(tmp_path / "feats.npy")
  np.save(path, table)
  cfg = tiny(num_seqs=320, source="file", path=path)
  wd = str(tmp_path / "wd")
  train.train_and_evaluate(cfg, wd, verbose=False)
  np.save(path, table * 2)  # another file at the same path
  with pytest.raises(FileExistsError, match=r"feats.npy.*changed.*sha256 [0-9a-f]+.*restore"):
    train.train_and_evaluate(cfg, wd, verbose=False)
  from ih_jax.analysis import context  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileExistsError, match=r"feats.npy.*changed"):  # analysis refuses too
    context.load_context(wd)
  os.remove(os.path.join(wd, "done.json"))  # an unfinished run: resume is refused too
  with pytest.raises(FileExistsError, match=r"feats.npy.*changed"):
    train.train_and_evaluate(cfg, wd, verbose=False)
  np.save(path, table)  # the original file back: reloaded / resumed as before
  train.train_and_evaluate(cfg, wd, verbose=False)


# ------------------------------------------------------------ 3. --overwrite

def test_overwrite_removes_every_output_and_keeps_user_files(full, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(full, wd)
  stale = ["analysis/phase_times.csv", "loss_curves.png", "loss_curves.pdf", "sweep.json",
           "program_1/metrics.csv", "metrics.csv.tmp"]
  for rel in stale + ["notes.txt", "mine/plot.png"]:
    os.makedirs(os.path.dirname(os.path.join(wd, rel)), exist_ok=True)
    write(os.path.join(wd, rel), "x")
  train.train_and_evaluate(tiny(num_seqs=320), wd, overwrite=True, verbose=False)
  assert sorted(os.listdir(wd)) == ["config.json", "done.json", "metrics.csv", "mine",
                                    "notes.txt", "resume", "snapshots", "train_log.csv"]
  # A sweep's folder: the same, one level up.
  for rel in stale + ["notes.txt"]:
    os.makedirs(os.path.dirname(os.path.join(wd, rel)), exist_ok=True)
    write(os.path.join(wd, rel), "x")
  cfg = dict(tiny().to_dict(), sweep=dict(grid=["model.num_labels=5,6"]))
  cfg = ExperimentConfig.from_dict(cfg)
  programs = sweep_lib.plan_programs(cfg)
  driver._prepare_sweep_dir(wd, cfg, programs, overwrite=True)  # pylint: disable=protected-access
  assert sorted(os.listdir(wd)) == ["mine", "notes.txt", "sweep.json"]
  os.makedirs(os.path.join(wd, "analysis"))  # a sweep's own analysis does not block its rerun
  driver._prepare_sweep_dir(wd, cfg, programs, overwrite=False)  # pylint: disable=protected-access


# ------------------------------------------------------------ 4. a bad feature source

def _h5(path, classes=1623):
  with h5py.File(path, "w") as f:
    f.create_dataset("resnet18/224/feat",
                     data=np.random.default_rng(0).normal(size=(classes, 5, 8)).astype(np.float32))
  return path


def test_reproduce_bad_features_write_nothing_and_do_not_lock(tmp_path):
  root = str(tmp_path / "repro")
  smoke = scales.get("smoke")
  missing = str(tmp_path / "missing.h5")
  with pytest.raises(ValueError, match=r"missing.h5.*does not exist"):
    Study(root, smoke, f"h5:{missing}", log=lambda m: None)
  with pytest.raises(ValueError, match=r"small.h5.*class"):
    Study(root, smoke, f"h5:{_h5(str(tmp_path / 'small.h5'), classes=40)}", log=lambda m: None)
  assert not os.path.exists(root)
  good = _h5(str(tmp_path / "good.h5"))
  Study(root, smoke, f"h5:{good}", log=lambda m: None)
  # A workdir locked by a failed start (older versions wrote repro.json first): its stage
  # holds config.json only. A corrected rerun takes it over.
  write(os.path.join(root, "repro.json"), f'{{"scale": "smoke", "features": "h5:{missing}"}}')
  os.makedirs(os.path.join(root, "main"))
  write(os.path.join(root, "main", "config.json"), "{}")
  msgs = []
  Study(root, smoke, f"h5:{good}", log=msgs.append)
  assert good in read(os.path.join(root, "repro.json"))
  assert any("failed start" in m for m in msgs), msgs


def test_failed_start_does_not_lock_the_workdir(tmp_path, monkeypatch, capsys):
  wd = str(tmp_path / "wd")

  def broken(*args, **kwargs):
    raise RuntimeError("compile failed")
  with monkeypatch.context() as mp:
    mp.setattr(driver, "make_train_chunk", broken)
    with pytest.raises(RuntimeError, match="compile failed"):
      train.train_and_evaluate(tiny(num_seqs=320), wd, verbose=False)
  assert os.path.exists(os.path.join(wd, "config.json"))
  res = train.train_and_evaluate(tiny(num_seqs=640), wd, verbose=True)  # another config
  assert res.metrics[-1]["seqs"] == 640
  assert "failed start" in capsys.readouterr().out


# ------------------------------------------------------------ 5. unclear errors

def test_corrupt_omniglot_member_names_archive_and_member(tmp_path):
  src = os.path.join(SHARED_OMNIGLOT, "images_background_small1.zip")
  if not os.path.exists(src):
    pytest.skip(f"Omniglot archives not found in {SHARED_OMNIGLOT}")
  path = str(tmp_path / "images_background_small1.zip")
  shutil.copyfile(src, path)
  with zipfile.ZipFile(path) as z:  # the first member read: the lowest label's first drawing
    pngs = [i for i in z.infolist() if i.filename.endswith(".png")]
    first = min(pngs, key=lambda i: int(i.filename.split("/")[3].split("_")[0]))
  with open(path, "r+b") as f:
    f.seek(first.header_offset + 26)
    n, m = struct.unpack("<HH", f.read(4))
    f.seek(first.header_offset + 30 + n + m)
    f.write(b"\xff" * min(64, first.compress_size))
  with pytest.raises(ValueError, match=rf"images_background_small1.zip.*{first.filename}.*corrupt"):
    omniglot.read_archives([path])


def test_workdir_that_cannot_hold_outputs_is_refused_before_setup(tmp_path, monkeypatch):
  def no_setup(*args, **kwargs):
    raise AssertionError("setup ran before the workdir was checked")
  monkeypatch.setattr(sweep_lib, "plan_programs", no_setup)
  monkeypatch.setattr(driver, "setup_experiment", no_setup)
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(NotADirectoryError, match=r"a_file.*is a file"):
    train.train_and_evaluate(tiny(), str(a_file), verbose=False)
  with pytest.raises(NotADirectoryError, match=r"a_file.*is a file"):
    train.train_and_evaluate(tiny(), str(a_file / "wd"), verbose=False)
  # Read-only (simulated: root ignores permission bits, so chmod alone cannot show it).
  ro = str(tmp_path / "ro")
  os.makedirs(ro)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(ro)
                      else real_access(p, mode, **kw))
  with pytest.raises(PermissionError, match=r"ro.*not writable"):
    train.train_and_evaluate(tiny(), os.path.join(ro, "wd"), verbose=False)


def test_load_params_nearest_reports_the_step(full):
  with pytest.warns(UserWarning, match=r"no checkpoint at 300 seqs.*nearest, 320"):
    ckpt_lib.load_params(full, 0, 300)
  step, params = ckpt_lib.load_params(full, 0, 300, return_step=True)
  assert step == 320
  np.testing.assert_array_equal(
      params["blocks_0"]["qkv"]["kernel"],
      ckpt_lib.load_params(full, 0, 320, nearest=False)["blocks_0"]["qkv"]["kernel"])
