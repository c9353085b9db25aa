"""The reproduction registry, its one-command CLI, reuse of finished runs and the report."""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ih_jax import sweep
from ih_jax.train import experiment
from ih_jax.experiments.paper import registry, scales
from ih_jax.experiments.paper.study import Study, feature_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_HEADS = {s: dict(strongest=(s + 2) % 8, pt_order=[(s + k) % 8 for k in range(8)])
              for s in (5, 6, 7, 8, 9)}
# The 6-layer entry picks heads from its own unclamped runs (ih_jax/experiments/paper/beyond.py).
_DEEP = {str(s): dict(pt=f"L{1 + s % 5}H{s % 8}", ih=f"L{2 + s % 5}H{(s + 1) % 8}",
                      last=f"L6H{(s + 2) % 8}") for s in (5, 6, 7, 8, 9)}
FAKE_HEADS["deep"] = {"mlp0": _DEEP, "mlp4": _DEEP}


@pytest.mark.parametrize("scale", ["quick", "full"])
def test_every_entry_builds_a_valid_grid(tmp_path, scale):
  study = Study(str(tmp_path / scale), scales.get(scale), log=lambda m: None)
  seen_figures = set()
  for entry in registry.ENTRIES.values():
    seen_figures.update(entry.figures)
    for name, cfg in entry.stages(study, FAKE_HEADS):
      progs = sweep.plan_programs(cfg)
      assert progs, (entry.key, name)
      for p in progs:
        runs = experiment.program_runs(p)   # parses every condition (and donor names)
        assert runs and all(r.spec for r in runs)
      # (the token task trains at its own learning rate)
      assert cfg.train.learning_rate == scales.get(scale).learning_rate or cfg.is_tokens
  # Every paper figure to reproduce has an entry.
  assert {"3a", "3b", "4a", "4b", "5a", "5b", "6", "A7", "A8", "A10", "A15", "A17",
          "A18"} <= seen_figures
  assert {"X-deep", "X-capacity", "X-vocab"} <= seen_figures


def test_beyond_entries_build_the_declared_grids(tmp_path):
  study = Study(str(tmp_path), scales.get("quick"), log=lambda m: None)
  stages = dict(registry.ENTRIES["deep"].stages(study, FAKE_HEADS))
  cfg = stages["deep_mlp4_clamps_s5"]
  assert (cfg.model.num_layers, cfg.model.mlp_ratio) == (6, 4)
  h = _DEEP["5"]
  assert cfg.sweep.conditions == ("none", f"pt=pt:{h['pt']}", f"match=ih:{h['ih']}",
                                  "perfect_l1=perfect_l1", f"l1_copy=perfect_l1;copy:{h['last']}")
  cap = dict(registry.ENTRIES["capacity"].stages(study, FAKE_HEADS))
  shapes = {(p.cfg.model.d_model, p.cfg.model.num_heads)
            for p in sweep.plan_programs(cap["cap_width_heads"])}
  assert shapes == {(w, h) for w in (16, 32, 64, 128) for h in (1, 2, 4, 8)}
  assert sorted(p.cfg.model.num_layers for p in sweep.plan_programs(cap["cap_depth"])) == [1, 2, 3, 4]
  (_, vocab), = registry.ENTRIES["vocab"].stages(study, FAKE_HEADS)
  grid = {(p.cfg.model.num_labels, p.cfg.task.class_split[0]) for p in sweep.plan_programs(vocab)}
  assert grid == {(l, c) for l in (5, 10, 20, 40) for c in (10, 50, 200, 800)}


def test_head_choices_come_from_the_heads_not_constants(tmp_path):
  study = Study(str(tmp_path), scales.get("quick"), log=lambda m: None)
  (_, cfg), = registry.ENTRIES["5b"].stages(study, FAKE_HEADS)
  s, p = FAKE_HEADS[5]["strongest"], FAKE_HEADS[5]["pt_order"][0]
  assert f"match=ih:L2H{s};keep_only:L2H{s}" in cfg.sweep.conditions
  assert f"pt=pt:L1H{p};keep_only:L2H{s}" in cfg.sweep.conditions


def test_resolve_figures():
  assert [e.key for e in registry.resolve("3a")] == ["main"]
  assert [e.key for e in registry.resolve("5b,A7")] == ["5b", "A7"]
  paper = registry.resolve("all")
  beyond = registry.resolve("beyond")
  assert [e.key for e in beyond] == ["tokens", "deep", "capacity", "vocab", "release",
                                     "freeze_l1", "lr_law", "llc"]
  assert {e.key for e in paper} | {e.key for e in beyond} == set(registry.ENTRIES)
  assert not {e.key for e in paper} & {e.key for e in beyond}
  with pytest.raises(ValueError, match="unknown figure '9z'.*5b"):
    registry.resolve("9z")


def test_feature_overrides():
  assert feature_overrides("synthetic") == {}
  assert feature_overrides("gaussian") == {"source": "synthetic", "family": "gaussian"}
  assert feature_overrides("relu:latent_dim=128") == {"source": "synthetic", "family": "relu",
                                                      "latent_dim": "128"}
  assert feature_overrides("h5:/x/f.h5") == {"source": "file", "path": "/x/f.h5"}
  assert feature_overrides("omniglot_conv:dim=64") == {"source": "omniglot_conv", "dim": "64"}
  with pytest.raises(ValueError, match="field=value"):
    feature_overrides("omniglot_conv:oops")


def _reproduce(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "ih_jax.experiments.reproduce", "--quiet", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if check:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def test_cli_end_to_end_reuses_runs_and_writes_report(tmp_path):
  wd = str(tmp_path / "repro")
  # llc reuses the main and Fig. 5b stages: SGLD on their checkpoints (tiny at smoke scale).
  first = _reproduce("--figure=5a,5b,llc", "--scale=smoke", f"--workdir={wd}")
  report = open(os.path.join(wd, "REPORT.md")).read()
  assert "## 5a" in report and "## 5b" in report and "| 5b | 5b |" in report
  assert "**held**" in report            # the toy model's verdict holds even at smoke scale
  assert os.path.exists(os.path.join(wd, "figures", "fig5a_toy.png"))
  assert "## llc" in report and "llc FAILED" not in first.stdout + first.stderr
  for name in ("llc_trace", "llc_per_head", "llc_clamped"):
    assert os.path.exists(os.path.join(wd, "figures", f"{name}.png")), name
  cached = json.load(open(os.path.join(wd, "llc.json")))
  trace = next(v for k, v in cached.items() if k.startswith("trace:"))
  assert len(trace["llc"]) == len(trace["steps"]) == 4 and all(map(math.isfinite, trace["llc"]))
  clamped = next(v for k, v in cached.items() if k.startswith("clamped:"))
  assert {"none", "pt", "perfect_l1", "match", "copy", "l1_copy"} <= set(clamped)
  assert json.load(open(os.path.join(wd, "heads.json")))["5"]["strongest"] in range(8)
  metrics = os.path.join(wd, "clamps_s5", "metrics.csv")
  stamp = os.path.getmtime(metrics)
  time.sleep(0.01)
  # Second time: nothing is retrained (the finished workdirs are reloaded).
  again = _reproduce("--figure=5b", "--scale=smoke", f"--workdir={wd}")
  assert os.path.getmtime(metrics) == stamp
  assert "stage clamps_s5" in again.stdout and "FAILED" not in again.stdout
  # A workdir holds one scale: mixing is refused with a clear message.
  bad = _reproduce("--figure=5a", "--scale=quick", f"--workdir={wd}", check=False)
  assert bad.returncode != 0 and "holds a reproduction at" in bad.stderr + bad.stdout


def test_cli_quick_scale_toy_figure(tmp_path):
  """--scale=quick for a cheap figure (the toy model of Fig. 5a) end to end."""
  wd = str(tmp_path / "quick")
  out = _reproduce("--figure=5a", "--scale=quick", f"--workdir={wd}")
  assert "5a: held" in out.stdout
  report = open(os.path.join(wd, "REPORT.md")).read()
  assert "scale: `quick`" in report and "| 5a | 5a, A9 |" in report


def test_dynamics_entries_run_and_report_at_smoke_scale(tmp_path, monkeypatch):
  """release (windowed clamps), freeze_l1 (freeze schedules) and lr_law (per-run optimizer
  settings) end to end, one seed, a 2 x 2 learning-rate grid."""
  from ih_jax.experiments.paper import dynamics, report
  monkeypatch.setattr(dynamics, "_seeds", lambda study: (5,))
  monkeypatch.setattr(dynamics, "FRACTIONS", (0.5,))
  monkeypatch.setattr(dynamics, "LRS", (1e-4, 3e-4))
  monkeypatch.setattr(dynamics, "WDS", (0.0, 1e-2))
  study = Study(str(tmp_path), scales.get("smoke"), log=lambda m: None, verbose=False)
  for key in ("release", "freeze_l1", "lr_law"):
    outcome, _, error = report.run_entry(study, registry.ENTRIES[key])
    assert error is None, (key, error)
    assert outcome.verdicts and all(v.measured for v in outcome.verdicts), key
    assert all(os.path.exists(f) for f in outcome.figures) and outcome.figures, key
  # One program each: the windows and the freeze schedules are per-run data.
  assert not os.path.exists(os.path.join(str(tmp_path), "release", "sweep.json"))
  # The release clamps act on the seed's own STRONGEST head (from its main run).
  with open(os.path.join(str(tmp_path), "heads.json")) as f:
    strongest = json.load(f)["5"]["strongest"]
  with open(os.path.join(str(tmp_path), "release", "config.json")) as f:
    assert f"match50[5]=ih:L2H{strongest}@[0," in f.read()
  assert not os.path.exists(os.path.join(str(tmp_path), "freeze_l1", "sweep.json"))
  assert not os.path.exists(os.path.join(str(tmp_path), "lr_law", "sweep.json"))


def test_release_conditions_bind_each_seed_to_its_strongest_head():
  """Three seeds with different STRONGEST heads: one program, each seed's clamped runs
  on its own head, the never-clamped run for every seed."""
  from ih_jax.experiments.paper import dynamics
  study = Study("/nonexistent", scales.get("quick"), log=lambda m: None, verbose=False)
  heads = {5: {"strongest": 2}, 6: {"strongest": 0}, 7: {"strongest": 4}}
  (name, cfg), = dynamics._release_stages(study, heads)  # pylint: disable=protected-access
  programs = sweep.plan_programs(cfg)
  assert name == "release" and len(programs) == 1
  runs = {(r.condition, r.init_seed): r.condition_entry for r in programs[0].runs}
  assert len(runs) == 3 * 7
  for seed, h in ((5, 2), (6, 0), (7, 4)):
    assert runs[("match10", seed)] == f"match10[{seed}]=ih:L2H{h}@[0,15000)"
    assert runs[("l1copy50", seed)].endswith(f"copy:L2H{h}@[0,75000)")
    assert runs[("none", seed)] == "none"


@pytest.mark.parametrize("table,fit", [
    # quick-like: the smallest learning rate censored, five learned
    ({1e-5: math.nan, 2e-5: 120_000, 5e-5: 80_000, 1e-4: 50_000, 2e-4: 40_000,
      3e-4: 40_000}, True),
    # only two learning rates learned: no fit, but the measured 1e-5 -> 1e-4 ratio
    ({1e-5: 100_000, 2e-5: math.nan, 5e-5: math.nan, 1e-4: 50_000, 2e-4: math.nan,
      3e-4: math.nan}, False),
])
def test_lr_law_gives_each_claim_one_verdict(tmp_path, monkeypatch, table, fit):
  """The lr-law analysis on given learning times: one verdict per claim, the fit only
  over >= 3 learned learning rates, the local exponents and the 1e-5 -> 1e-4 ratio."""
  import types  # pylint: disable=g-import-not-at-top
  from ih_jax.experiments.paper import dynamics
  lts = {("none", s, f"train.learning_rate={lr:g};train.weight_decay={wd:g}"): lt
         for lr, lt in table.items() for wd in dynamics.WDS for s in (5, 6, 7)}
  monkeypatch.setattr(dynamics, "learning_times", lambda res: lts)
  monkeypatch.setattr(dynamics, "horizon", lambda res: 150_000.0)
  study = types.SimpleNamespace(figure_dir=str(tmp_path),
                                scale=types.SimpleNamespace(extra_seeds=(6, 7)))
  out = dynamics._lr_analyze(study, {"lr_law": []}, {})  # pylint: disable=protected-access
  claims = [v.claim for v in out.verdicts]
  assert len(claims) == len(set(claims)) == 2, claims
  power = out.verdicts[0]
  assert power.claim.startswith("Q: does the learning time fall as a power")
  assert (power.held is not None) == fit and ("alpha = " in power.measured) == fit
  notes = " ".join(out.notes)
  if fit:
    assert "2e-05 -> 5e-05: 0.44" in notes and "0.0002 -> 0.0003: 0.00" in notes
    assert "Measured: lr 1e-4" not in notes  # 1e-5 censored: no ratio
  else:
    assert "1e-05 -> 0.0001: 0.30" in notes and "learns 2.0x sooner than lr 1e-5" in notes


def test_beyond_entries_run_and_report_at_smoke_scale(tmp_path, monkeypatch):
  """deep / capacity / vocab end to end (training, head choice, analysis, verdicts) on
  shrunken grids; the full grids run with --scale=quick (numbers in BUILD_NOTES.md)."""
  from ih_jax.experiments.paper import beyond, report
  monkeypatch.setattr(beyond, "DEEP_LAYERS", 3)
  monkeypatch.setattr(beyond, "DEEP_MLP", (2,))
  monkeypatch.setattr(beyond, "_deep_seeds", lambda study: (5,))
  monkeypatch.setattr(beyond, "CAP_WIDTHS", (16,))
  monkeypatch.setattr(beyond, "CAP_HEADS", (2,))
  monkeypatch.setattr(beyond, "CAP_DEPTHS", (1,))
  monkeypatch.setattr(beyond, "VOCAB_LABELS", (5,))
  monkeypatch.setattr(beyond, "VOCAB_CLASSES", (50,))
  study = Study(str(tmp_path), scales.get("smoke"), log=lambda m: None, verbose=False)
  for key in ("deep", "capacity", "vocab"):
    outcome, _, error = report.run_entry(study, registry.ENTRIES[key])
    assert error is None, (key, error)
    assert outcome.verdicts and outcome.notes, key
    assert all(v.measured for v in outcome.verdicts)
    assert all(os.path.exists(f) for f in outcome.figures), key
  # Heads were chosen from the trained 3-layer runs and cached per seed.
  deep = json.load(open(os.path.join(str(tmp_path), "deep_heads.json")))["mlp2"]
  assert set(deep) == {"5"} and all(h["last"].startswith("L3H") for h in deep.values())
  assert all(len(h["pt_score"]) == 3 for h in deep.values())


def test_llc_trace_stage_helpers():
  """The LLC entry's stage analysis: leading negative estimates (non-minima) are left
  out, a trace that never rises has no steepest rise, turns need a real reversal."""
  from ih_jax.experiments.paper import llc_entry
  steps = np.arange(10.0) * 10
  y = np.array([-50.0, 1, 1.1, 1, 5, 9, 10, 9.5, 6, 6.2])
  assert llc_entry._settled(steps, y) == 1
  assert llc_entry._steepest_rise(steps, y) == 45.0   # not the -50 -> 1 jump at the start
  assert llc_entry._turns(steps, y) == [(60.0, "peak")]
  assert llc_entry._turns(steps, y + 0.05 * np.sin(np.arange(10))) == [(60.0, "peak")]
  falling = np.linspace(10.0, 1.0, 10)
  assert math.isnan(llc_entry._steepest_rise(steps, falling))
  assert llc_entry._turns(steps, falling) == []
