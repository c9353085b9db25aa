"""The reproduction registry, its one-command CLI, reuse of finished runs and the report."""
import json
import os
import subprocess
import sys
import time

import pytest

from ih_jax import program, sweep
from experiments.paper import registry, scales
from experiments.paper.study import Study, feature_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_HEADS = {s: dict(strongest=(s + 2) % 8, pt_order=[(s + k) % 8 for k in range(8)])
              for s in (5, 6, 7, 8, 9)}


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
        runs = program.program_runs(p)   # parses every condition (and donor names)
        assert runs and all(r.spec for r in runs)
      # (the token task, #8, trains at its own learning rate)
      assert cfg.train.learning_rate == scales.get(scale).learning_rate or cfg.is_tokens
  # Every figure of the list has an entry.
  assert {"3a", "3b", "4a", "4b", "5a", "5b", "6", "A7", "A8", "A10", "A15", "A17",
          "A18"} <= seen_figures


def test_head_choices_come_from_the_heads_not_constants(tmp_path):
  study = Study(str(tmp_path), scales.get("quick"), log=lambda m: None)
  (_, cfg), = registry.ENTRIES["5b"].stages(study, FAKE_HEADS)
  s, p = FAKE_HEADS[5]["strongest"], FAKE_HEADS[5]["pt_order"][0]
  assert f"match=ih:L2H{s};keep_only:L2H{s}" in cfg.sweep.conditions
  assert f"pt=pt:L1H{p};keep_only:L2H{s}" in cfg.sweep.conditions


def test_resolve_figures():
  assert [e.key for e in registry.resolve("3a")] == ["main"]
  assert [e.key for e in registry.resolve("5b,A7")] == ["5b", "A7"]
  assert len(registry.resolve("all")) == len(registry.ENTRIES)
  with pytest.raises(ValueError, match="unknown figure '9z'.*5b"):
    registry.resolve("9z")


def test_feature_overrides():
  assert feature_overrides("gaussian") == {}
  assert feature_overrides("h5:/x/f.h5") == {"source": "file", "path": "/x/f.h5"}
  assert feature_overrides("omniglot_conv:dim=64") == {"source": "omniglot_conv", "dim": "64"}
  with pytest.raises(ValueError, match="field=value"):
    feature_overrides("omniglot_conv:oops")


def _reproduce(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--quiet", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if check:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def test_cli_end_to_end_reuses_runs_and_writes_report(tmp_path):
  wd = str(tmp_path / "repro")
  first = _reproduce("--figure=5a,5b", "--scale=smoke", f"--workdir={wd}")
  report = open(os.path.join(wd, "REPORT.md")).read()
  assert "## 5a" in report and "## 5b" in report and "| 5b | 5b |" in report
  assert "**held**" in report            # the toy model's verdict holds even at smoke scale
  assert os.path.exists(os.path.join(wd, "figures", "fig5a_toy.png"))
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
