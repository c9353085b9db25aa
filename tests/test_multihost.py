"""Several processes, one sweep (ih_jax.distributed): CPU processes on localhost (gloo
collectives over loopback), each with one device, training the runs axis together."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ih_jax import checkpoint as ckpt_lib
from ih_jax import distributed
from ih_jax import train
from ih_jax import workdir as workdir_lib
from ih_jax.experiments.configs import common, tiny

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, "multihost_worker.py")
# 4 runs of the tiny model; a resume checkpoint at every boundary (0, 400, ..., 1600).
OVERRIDES = dict(conditions=("none",), init_seeds=(5, 6, 7, 8), num_seqs=1600, eval_every=400)
FLAGS = ["--config=tiny", "--config.sweep.conditions=('none',)",
         "--config.sweep.init_seeds=(5,6,7,8)", "--config.train.num_seqs=1600",
         "--config.train.eval_every=400", "--config.checkpoint.resume_every_s=1e-9", "--noplot"]


def _config():
  cfg = tiny.get_config()
  cfg.sweep.conditions = OVERRIDES["conditions"]
  cfg.sweep.init_seeds = OVERRIDES["init_seeds"]
  cfg.train.num_seqs = OVERRIDES["num_seqs"]
  cfg.train.eval_every = OVERRIDES["eval_every"]
  return common.to_experiment(cfg)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(n: int, workdir: str, logs: str, die_after_saves: int = 0) -> tuple[list[int], list[str]]:
  """Starts n worker processes of one sweep; returns their exit codes and outputs."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
             IH_JAX_TEST_DIE_AFTER_SAVES=str(die_after_saves),
             XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""),
                                 "--xla_force_host_platform_device_count=1"]).strip())
  procs, paths = [], []
  for i in range(n):
    paths.append(os.path.join(logs, f"n{n}_p{i}.log"))
    with open(paths[-1], "w") as out:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, *FLAGS, f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
           f"--process_id={i}"], stdout=out, stderr=subprocess.STDOUT, env=env))
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = []
  for path in paths:
    with open(path) as f:
      outs.append(f.read())
  return codes, outs


def _ih_lines(text: str) -> list[str]:
  return [l for l in text.splitlines() if l.startswith("[ih_jax]")]


def test_killed_two_process_sweep_resumes_on_four_and_equals_one_process(tmp_path):
  reference = train.train_and_evaluate(_config(), verbose=False)
  wd, logs = str(tmp_path / "sweep"), str(tmp_path)

  # 2 processes; both die (os._exit) right after the second resume checkpoint (400 seqs).
  codes, outs = _launch(2, wd, logs, die_after_saves=2)
  assert codes[0] == 9, outs[0][-3000:]
  assert ckpt_lib.RunCheckpointer(wd, dict(runs=[])).steps(), "no resume checkpoint on disk"
  assert not os.path.exists(os.path.join(wd, workdir_lib.DONE_JSON))

  # Every process restarts, as 4 (the saved state is re-sharded over 4 devices).
  codes, outs = _launch(4, wd, logs)
  assert codes == [0, 0, 0, 0], "\n".join(o[-2000:] for o in outs)
  assert any("resuming" in l for l in _ih_lines(outs[0])), outs[0][-3000:]
  # Only process 0 prints progress (and writes the files).
  for out in outs[1:]:
    assert [l for l in _ih_lines(out) if "process " not in l] == [], out[-2000:]

  rows = workdir_lib.read_metrics(wd)
  key = lambda r: (r["run"], r["seqs"], r["eval_set"], r["clamped"])
  assert sorted(map(key, rows)) == sorted(map(key, reference.metrics))  # each row once
  ours = {key(r): r for r in rows}
  for ref in reference.metrics:
    for m in ("loss", "acc"):
      np.testing.assert_allclose(ours[key(ref)][m], ref[m], rtol=1e-5,
                                 atol=1e-6 * max(1.0, abs(ref[m])), err_msg=str(key(ref)))
  seqs, loss, _ = workdir_lib.read_train_log(wd, 4)
  np.testing.assert_array_equal(seqs, reference.train_seqs)
  np.testing.assert_allclose(loss, reference.train_loss, rtol=1e-5, atol=1e-6)
  _, params = ckpt_lib.load_stacked_params(wd)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("args, match", [
    (dict(num_processes=2), "together"),
    (dict(coordinator_address="localhost:1", num_processes=0, process_id=0), "at least 1"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2), r"0 \.\. 1"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "HOST:PORT"),
])
def test_bad_distributed_settings_are_named(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(**args)


def test_one_process_helpers_are_plain():
  assert distributed.agree(lambda: {"a": 1}) == {"a": 1}
  def refuse():
    raise FileExistsError("x")
  with pytest.raises(FileExistsError, match="x"):
    distributed.agree(refuse)
  assert distributed.gather_flags([1, 0]).tolist() == [[1, 0]]
  assert distributed.fetch({"a": np.ones(2)})["a"].tolist() == [1.0, 1.0]


def test_only_train_and_sweep_take_distributed_flags(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ih_jax.experiments.analyze", f"--workdir={tmp_path}",
       "--num_processes=2"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "only `ih-jax train` and `ih-jax sweep`" in proc.stderr, \
      proc.stderr[-2000:]
  proc = subprocess.run(
      [sys.executable, "-m", "ih_jax.experiments.sweep", "--config=tiny",
       f"--workdir={tmp_path}/w", "--num_processes=2"], capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1 and "together" in proc.stderr, proc.stderr[-2000:]
