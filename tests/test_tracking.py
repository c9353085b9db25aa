"""Tracking: TensorBoard event files mirror metrics.csv (read back here), and W&B in
offline mode when wandb is installed."""
import glob
import os
import struct

import numpy as np
import pytest

from ih_jax import train, workdir as workdir_lib
from conftest import small_sweep

pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402


def _config(writers, **tracking):
  return small_sweep(["none", "pt=pt:L1H3"], 960, 320,
                     tracking=dict(writers=writers, **tracking))


def read_events(path: str) -> list:
  """The Event records of one TFRecord event file (length, crc, data, crc)."""
  out = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      f.read(4)
      out.append(event_pb2.Event.FromString(data))
  return out


def _scalars(run_dir: str) -> dict[str, dict[int, float]]:
  out: dict[str, dict[int, float]] = {}
  for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
    for ev in read_events(path):
      for v in ev.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("tb"))
  train.train_and_evaluate(_config(["tensorboard"]), wd, verbose=False)
  return wd


def test_tensorboard_events_mirror_metrics_csv(tb_run):
  wd = tb_run
  runs = sorted(os.listdir(os.path.join(wd, "tensorboard")))
  assert runs == ["none_seed5", "pt_seed5"]
  rows = workdir_lib.read_metrics(wd)
  for index, name in enumerate(runs):
    got = _scalars(os.path.join(wd, "tensorboard", name))
    for view, suffix in ((1, ""), (0, "_clampfree")):
      mine = [r for r in rows if r["run"] == index and r["clamped"] == view]
      want = {r["seqs"]: r["loss"] for r in mine}
      assert set(got[f"fsl_train{suffix}/loss"]) == set(want) == {0, 320, 640, 960}
      for step, v in want.items():  # float32 in the event file
        np.testing.assert_allclose(got[f"fsl_train{suffix}/loss"][step], v, rtol=1e-6)
    # Train loss: the mean over each chunk of steps, at the chunk's last sequence count.
    seqs, loss, _ = workdir_lib.read_train_log(wd, 2)
    chunk = seqs <= 320
    np.testing.assert_allclose(got["train/loss"][320], loss[index][chunk].mean(), rtol=1e-5)


def test_tensorboard_hparams_and_figure(tb_run):
  run_dir = os.path.join(tb_run, "tensorboard", "pt_seed5")
  events = [ev for p in glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"),
                                  recursive=True) for ev in read_events(p)]
  plugins = {v.metadata.plugin_data.plugin_name for ev in events for v in ev.summary.value
             if v.HasField("metadata")}
  assert "hparams" in plugins
  blobs = b"".join(v.metadata.plugin_data.content for ev in events for v in ev.summary.value
                   if v.HasField("metadata"))
  assert b"pt:L1H3" in blobs and b"condition" in blobs  # the run's spec and condition
  assert any(v.HasField("image") for ev in events for v in ev.summary.value
             if v.tag == "loss_curves")


def test_tracking_config_errors_and_missing_package(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match=r"unknown writer\(s\) \['mlflow'\]"):
    _config(["mlflow"])
  with pytest.raises(ValueError, match="wandb_mode='cloud'"):
    _config([], wandb_mode="cloud")
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_tbx(name, *a, **kw):
    if name.startswith("tensorboardX"):
      raise ImportError(name)
    return real_import(name, *a, **kw)

  monkeypatch.setattr(builtins, "__import__", no_tbx)
  with pytest.raises(ValueError, match=r"needs tensorboardX: pip install 'ih_jax\[tracking\]'"):
    train.train_and_evaluate(_config(["tensorboard"]), str(tmp_path / "wd"), verbose=False)


def test_wandb_offline(tmp_path):
  wandb = pytest.importorskip("wandb")  # not in the test extras: a large package
  wd = str(tmp_path / "wb")
  train.train_and_evaluate(_config(["wandb"], wandb_mode="offline"), wd, verbose=False)
  del wandb
  runs = glob.glob(os.path.join(wd, "wandb", "offline-run-*"))
  assert len(runs) == 2, runs   # one W&B run per ih_jax run
  for r in runs:                # each with its history file, ready for `wandb sync`
    assert glob.glob(os.path.join(r, "run-*.wandb")), os.listdir(r)
