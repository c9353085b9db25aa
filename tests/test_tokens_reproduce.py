"""--figure=tokens: its grid at every scale, head choices from measured scores, the CLI."""
import json
import os
import subprocess
import sys

import pytest

from ih_jax import sweep
from ih_jax.train import experiment
from ih_jax.experiments.paper import registry, scales
from ih_jax.experiments.paper.study import Study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_HEADS = {5: dict(strongest=7, pt_order=list(range(8)))}   # few-shot heads: not used


def _reproduce(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "ih_jax.experiments.reproduce", "--quiet", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


@pytest.mark.parametrize("scale", ["smoke", "quick", "full"])
def test_tokens_entry_builds_a_valid_grid(tmp_path, scale):
  study = Study(str(tmp_path / scale), scales.get(scale), log=lambda m: None)
  stages = list(registry.ENTRIES["tokens"].stages(study, {}))
  assert [n for n, _ in stages] == ["tokens_main", "tokens_clamps"]
  for _, cfg in stages:
    assert cfg.is_tokens
    for p in sweep.plan_programs(cfg):
      assert all(r.spec for r in experiment.program_runs(p))   # every condition parses on tokens
  assert stages[0][1].sweep.init_seeds[0] == 5


def test_tokens_heads_come_from_measured_scores(tmp_path):
  study = Study(str(tmp_path), scales.get("quick"), log=lambda m: None)
  with open(os.path.join(study.root, "tokens_heads.json"), "w") as f:
    json.dump({"5": dict(pt=3, ih=6)}, f)   # keyed by seed (Study.cached)
  (_, _), (_, cfg) = registry.ENTRIES["tokens"].stages(study, FAKE_HEADS)
  assert "pt=pt:L1H3" in cfg.sweep.conditions and "ih=ih:L2H6" in cfg.sweep.conditions
  assert "ablate_ih=ablate:L2H6" in cfg.sweep.conditions


def test_cli_tokens_smoke_end_to_end(tmp_path):
  wd = str(tmp_path / "repro")
  out = _reproduce("--figure=tokens", "--scale=smoke", f"--workdir={wd}")
  assert "FAILED" not in out.stdout
  report = open(os.path.join(wd, "REPORT.md")).read()
  assert "## tokens" in report and "| tokens | tokens |" in report
  heads = json.load(open(os.path.join(wd, "tokens_heads.json")))["5"]
  assert heads["pt"] in range(8) and heads["ih"] in range(8)
  assert len(heads["prefix_matching"]) == 2 and len(heads["copying"][1]) == 8
  assert os.path.exists(os.path.join(wd, "figures", "tokens_clamps.png"))
