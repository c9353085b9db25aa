"""Sweeps: grid expansion and grouping, data variants, chunking, sharding over devices.

Per-run results of differently batched programs (chunks, shards, variants vs
separate runs) are compared to float tolerance (rtol 1e-5 / atol 1e-6): a vmap
or partition of a different size may compile to a different summation order,
so bitwise equality is not promised there (measured max difference: ~5e-7).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ih_jax import checkpoint as ckpt_lib
from ih_jax import sweep as sweep_lib
from ih_jax import train
from ih_jax.train import driver
from ih_jax.config import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITIONS = ["none", "match=ih:L2H0;keep_only:L2H0", "copy=copy:L2H1"]


def small(conditions=CONDITIONS, seeds=(5, 6), grid=(), max_runs=0, **data):
  return ExperimentConfig.from_dict({
      "train": dict(num_seqs=320, eval_every=160, progress_every_s=0),
      "sweep": dict(conditions=list(conditions), init_seeds=list(seeds), grid=list(grid),
                    max_runs_per_program=max_runs),
      "data": data,
      "evaluators": [{"name": "fsl_train", "size": 64},
                     {"name": "fsl_val_rl", "pairs": "val", "size": 64}],
  })


def per_run(result, key="loss"):
  """{(condition, seed, variant): [metric over eval points and sets]}."""
  results = result if isinstance(result, list) else [result]
  out = {}
  for res in results:
    for r in res.runs:
      rows = [m for m in res.metrics if m["run"] == r.index and m["clamped"] == 1]
      out[(r.condition, r.init_seed, r.variant)] = np.asarray([m[key] for m in rows])
  return out


def assert_close_runs(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


@pytest.fixture(scope="module")
def one_program():
  return train.train_and_evaluate(small(), None, verbose=False)


def test_grid_expansion_and_grouping():
  cfg = small(grid=("data.rho=0.7,0.8", "model.num_labels=5,10"))
  programs = sweep_lib.plan_programs(cfg)
  # rho varies per run (one program each); num_labels changes shapes (two programs).
  assert [p.name for p in programs] == ["program_0", "program_1"]
  assert [[v.name for v in p.variants] for p in programs] == [
      ["data.rho=0.7;model.num_labels=5", "data.rho=0.8;model.num_labels=5"],
      ["data.rho=0.7;model.num_labels=10", "data.rho=0.8;model.num_labels=10"]]
  assert [len(p.runs) for p in programs] == [12, 12]
  assert programs[1].cfg.model.num_labels == 10 and programs[1].variants[1].cfg.data.rho == 0.8
  chunks = sweep_lib.plan_programs(small(), max_runs=4)
  assert [len(p.runs) for p in chunks] == [4, 2]
  assert [(r.condition, r.init_seed) for p in chunks for r in p.runs] == [
      (c.split("=")[0], s) for c in CONDITIONS for s in (5, 6)]


@pytest.mark.parametrize("grid,match", [
    (("data.rhoo=0.7,0.8",), "unknown field 'data.rhoo'"),
    (("dat.rho=0.7",), "unknown field 'dat.rho'"),
    (("data.rho",), "must look like 'section.field=v1,v2"),
    (("sweep.init_seeds=5,6",), "use sweep.conditions / sweep.init_seeds"),
    (("data.rho=0.7", "data.rho=0.8"), "names a field twice"),
    (("data.rho=high",), r"data.rho.*must be float, got 'high'"),
])
def test_grid_errors(grid, match):
  with pytest.raises(ValueError, match=match):
    sweep_lib.plan_programs(small(grid=grid))


def test_chunked_grid_matches_one_program(one_program, tmp_path):
  chunked = train.train_and_evaluate(small(max_runs=4), str(tmp_path / "chunked"),
                                     verbose=False)
  assert isinstance(chunked, list) and [len(r.runs) for r in chunked] == [4, 2]
  assert sorted(os.listdir(tmp_path / "chunked")) == ["program_0", "program_1", "sweep.json"]
  with open(tmp_path / "chunked" / "sweep.json") as f:
    assert [p["workdir"] for p in json.load(f)] == ["program_0", "program_1"]
  assert_close_runs(per_run(one_program), per_run(chunked))


def test_data_variants_in_one_program_match_separate_runs():
  both = train.train_and_evaluate(
      small(conditions=CONDITIONS[:2], seeds=(5,), grid=("data.rho=0.7,0.8",
                                                          "train.train_seed=0,3")),
      None, verbose=False)
  assert not isinstance(both, list)  # rho and train_seed vary per run: one program
  assert len(both.runs) == 8
  got = per_run(both)
  for rho in (0.7, 0.8):
    for seed in (0, 3):
      alone_cfg = small(conditions=CONDITIONS[:2], seeds=(5,), rho=rho)
      alone_cfg = ExperimentConfig.from_dict(
          dict(alone_cfg.to_dict(), train=dict(alone_cfg.to_dict()["train"], train_seed=seed)))
      alone = per_run(train.train_and_evaluate(alone_cfg, None, verbose=False))
      for (cond, s, _), v in alone.items():
        np.testing.assert_allclose(got[(cond, s, f"data.rho={rho};train.train_seed={seed}")],
                                   v, rtol=1e-5, atol=1e-6)
  # Different data really does change the runs.
  assert not np.allclose(got[("none", 5, "data.rho=0.7;train.train_seed=0")],
                         got[("none", 5, "data.rho=0.8;train.train_seed=0")])


SHARDED_SCRIPT = """
import json, sys
import ih_jax, jax, numpy as np
from jax.sharding import PartitionSpec as P
from ih_jax import train
from ih_jax.train import experiment, placement, state as state_lib, step as step_lib
sys.path.insert(0, {tests!r})
from test_sweep import small, small_with_checkpoints
assert jax.device_count() == 4, jax.devices()
cfg = small()
exp = experiment.setup_experiment(cfg)
state = state_lib.init_state(exp)
clamps, feats, batches = placement.place_inputs(exp)
out, _, _ = step_lib.make_train_chunk(exp, 4)(state, 2, True, clamps, feats, batches)
leaf = jax.tree.leaves(out.params)[0]
info = dict(padded=exp.num_padded, runs_axis=bool(leaf.sharding.spec == P("runs")),
            shard_rows=sorted({{s.data.shape[0] for s in leaf.addressable_shards}}),
            devices=len({{s.device for s in leaf.addressable_shards}}))
res = train.train_and_evaluate(cfg, None, verbose=False)
# Resume, on 4 devices (runs padded to 8), a workdir a 1-device process left at 160 seqs.
resumed = train.train_and_evaluate(small_with_checkpoints(), {workdir!r}, verbose=True)
info["resumed_rows_match"] = bool(np.allclose([r["loss"] for r in resumed.metrics],
                                              [r["loss"] for r in res.metrics],
                                              rtol=1e-5, atol=1e-6))
rows = [dict(run=r["run"], loss=r["loss"], clamped=r["clamped"]) for r in res.metrics]
print("RESULT" + json.dumps(dict(info=info, rows=rows,
      runs=[[r.condition, r.init_seed] for r in res.runs],
      params=float(sum(np.abs(x).sum() for x in jax.tree.leaves(res.params))))))
"""


def small_with_checkpoints():
  return ExperimentConfig.from_dict(dict(small().to_dict(),
                                         checkpoint=dict(every=160, resume_every_s=1e-6)))


class Crash(Exception):
  pass


def test_sharded_sweep_on_4_cpu_devices_matches_one_device(one_program, tmp_path, monkeypatch):
  # A one-device run that dies after its checkpoint at 160 seqs, resumed on 4 devices below.
  wd = str(tmp_path / "moved")
  real_save = ckpt_lib.RunCheckpointer.save
  def save_then_die(self, seqs, *args):
    real_save(self, seqs, *args)
    if seqs == 160:
      self.wait()
      self.close()
      raise Crash()
  monkeypatch.setattr(ckpt_lib.RunCheckpointer, "save", save_then_die)
  with pytest.raises(Crash):
    train.train_and_evaluate(small_with_checkpoints(), wd, verbose=False)
  monkeypatch.undo()

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run(
      [sys.executable, "-c", SHARDED_SCRIPT.format(tests=os.path.join(ROOT, "tests"),
                                                   workdir=wd)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from the checkpoint at 160 seqs" in proc.stdout
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  # 6 runs padded to 8, split 2 per device along the runs axis.
  assert out["info"] == dict(padded=8, runs_axis=True, shard_rows=[2], devices=4,
                             resumed_rows_match=True)
  assert out["runs"] == [[r.condition, r.init_seed] for r in one_program.runs]
  ref = [dict(run=r["run"], loss=r["loss"], clamped=r["clamped"]) for r in one_program.metrics]
  assert [(r["run"], r["clamped"]) for r in out["rows"]] == [(r["run"], r["clamped"]) for r in ref]
  np.testing.assert_allclose([r["loss"] for r in out["rows"]], [r["loss"] for r in ref],
                             rtol=1e-5, atol=1e-6)
  params_sum = float(sum(np.abs(x).sum() for x in
                         __import__("jax").tree.leaves(one_program.params)))
  np.testing.assert_allclose(out["params"], params_sum, rtol=1e-6)


def test_resume_refuses_a_different_split_into_programs(tmp_path):
  """Same config, other chunking (automatic chunking on another machine): refused."""
  wd = str(tmp_path / "split")
  cfg = small(conditions=CONDITIONS[:2], seeds=(5,))
  first_chunk = sweep_lib.plan_programs(cfg, 1)[0]
  driver.train_program(first_chunk, cfg, wd, verbose=False)
  whole = sweep_lib.plan_programs(cfg, None)[0]
  with pytest.raises(FileExistsError, match=r"holds runs \[none/s5\] but this program has "
                                            r"\[none/s5, match/s5\].*max_runs_per_program=1"):
    driver.train_program(whole, cfg, wd, verbose=False)


def test_automatic_runs_per_program():
  assert driver.auto_max_runs(small(), 6) is None  # small sweeps: no limit needed
  n = 64 * jax.local_device_count() + 1  # one run more than 64 per device
  many = small(conditions=["none"], seeds=tuple(range(10, 10 + n)))
  limit = driver.memory_max_runs(many, n)
  assert isinstance(limit, int) and limit >= 1
  assert driver.auto_max_runs(many, n) <= limit


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 8])
def test_cpu_limit_splits_wide_sweeps_into_the_fewest_programs(devices):
  cap = 12 * devices
  assert driver.split_limit(cap, devices, 12) is None  # fits: one program
  for runs in (cap + 1, 32, 54, 100, 10 * cap + 3):
    limit = driver.split_limit(runs, devices, 12)
    if runs <= cap:
      assert limit is None
      continue
    assert limit <= cap and limit % devices == 0, (runs, limit)
    assert -(-runs // limit) == -(-runs // cap), (runs, limit)  # no more programs than needed
  assert [driver.split_limit(r, 2, 12) for r in (25, 32, 54)] == [14, 16, 18]


def test_cpu_limit_applies_only_on_cpu(monkeypatch):
  n = 12 * jax.local_device_count() + 1
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert driver.cpu_max_runs(n) is not None
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert driver.cpu_max_runs(n) is None


def test_cpu_split_keeps_the_layout_of_a_workdir_started_wide(tmp_path, monkeypatch):
  """A sweep trained as one program before the CPU limit existed reloads as that one
  program; a new (or overwritten) workdir gets the split."""
  cfg = small(conditions=CONDITIONS[:2], seeds=(5, 6))  # 4 runs
  monkeypatch.setattr(driver, "cpu_max_runs", lambda n: 2 if n > 2 else None)
  programs, cpu_split = driver._plan(cfg, None, verbose=False)  # pylint: disable=protected-access
  assert cpu_split and [len(p.runs) for p in programs] == [2, 2]
  wd = str(tmp_path / "wide")
  whole = sweep_lib.plan_programs(cfg, None)[0]
  driver.train_program(whole, cfg, wd, verbose=False)
  again = train.train_and_evaluate(cfg, wd, verbose=False)  # reloads the wide program
  assert not isinstance(again, list) and len(again.runs) == 4
  assert not os.path.exists(os.path.join(wd, "sweep.json"))
  split = train.train_and_evaluate(cfg, str(tmp_path / "new"), verbose=False)
  assert isinstance(split, list) and [len(r.runs) for r in split] == [2, 2]
  assert_close_runs(per_run(split), per_run(again))
  over = train.train_and_evaluate(cfg, wd, overwrite=True, verbose=False)
  assert isinstance(over, list) and os.path.exists(os.path.join(wd, "sweep.json"))
  # Without the CPU limit (a GPU, more cores) the split workdir still reloads as 2 x 2.
  monkeypatch.setattr(driver, "cpu_max_runs", lambda n: None)
  reloaded = train.train_and_evaluate(cfg, str(tmp_path / "new"), verbose=False)
  assert isinstance(reloaded, list) and [len(r.runs) for r in reloaded] == [2, 2]
  assert_close_runs(per_run(reloaded), per_run(split))


def test_a_bad_condition_in_a_later_program_stops_the_sweep_before_training(tmp_path):
  cfg = small(conditions=["none", "bad[6]=ih:L9H0"], max_runs=2)
  assert len(sweep_lib.plan_programs(cfg, 2)) == 2  # the bad entry is only in program_1
  with pytest.raises(ValueError, match="unknown head 'L9H0'"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"), verbose=False)
  assert not os.path.exists(tmp_path / "w" / "program_0" / "metrics.csv")


def test_duplicate_conditions_are_refused():
  with pytest.raises(ValueError, match=r"duplicate condition name 'none'"):
    sweep_lib.plan_programs(small(conditions=["none", "none"]))


def test_seed_bound_conditions_match_the_full_product(one_program):
  """'m[5]=A', 'm[6]=B': condition m means A for seed 5 and B for seed 6, in one program;
  each run equals the same clamps trained in the full conditions x seeds product."""
  bound = ["none", "m[5]=ih:L2H0;keep_only:L2H0", "m[6]=copy:L2H1"]
  programs = sweep_lib.plan_programs(small(conditions=bound))
  assert len(programs) == 1
  assert [(r.condition, r.init_seed) for r in programs[0].runs] == [
      ("none", 5), ("none", 6), ("m", 5), ("m", 6)]
  res = train.train_and_evaluate(small(conditions=bound), None, verbose=False)
  specs = {(r.condition, r.init_seed): r.spec for r in res.runs}
  full_specs = {(r.condition, r.init_seed): r.spec for r in one_program.runs}
  assert specs[("m", 5)] == full_specs[("match", 5)] != specs[("m", 6)]
  assert specs[("m", 6)] == full_specs[("copy", 6)]
  got, full = per_run(res), per_run(one_program)
  for mine, theirs in {("none", 5): ("none", 5), ("none", 6): ("none", 6),
                       ("m", 5): ("match", 5), ("m", 6): ("copy", 6)}.items():
    np.testing.assert_allclose(got[mine + ("",)], full[theirs + ("",)], rtol=1e-5, atol=1e-6,
                               err_msg=str(mine))
  # The first run of a seed-bound sweep sizes the automatic per-program limit.
  many = small(conditions=["m[11]=copy:L2H1"], seeds=tuple(range(10, 10 + 64 *
                                                                   jax.local_device_count() + 1)))
  assert driver.memory_max_runs(many, 64 * jax.local_device_count() + 1) >= 1


@pytest.mark.parametrize("conditions,match", [
    (["none", "none[5]=ih:L2H0"], "'none' is also given for every seed"),
    (["m[5]=ih:L2H0", "m=copy:L2H1"], "'m' is also bound to seeds"),
    (["m[5]=ih:L2H0", "m[5,6]=copy:L2H1"], "both give 'm' for seed 5"),
    (["m[9]=ih:L2H0"], r"seed\(s\) \[9\] are not in sweep.init_seeds \(5, 6\)"),
    (["m[x]=ih:L2H0"], r"a seed binding looks like 'name\[5\]=spec'"),
    (["m[]=ih:L2H0"], r"a seed binding looks like"),
])
def test_seed_binding_errors(conditions, match):
  with pytest.raises(ValueError, match=match):
    sweep_lib.plan_programs(small(conditions=conditions))
