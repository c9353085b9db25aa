"""The notebook API (ih_jax.run / ih_jax.load): the README's example, verbatim."""
import math
import os
import re
import subprocess
import sys

import matplotlib
import numerics
import numpy as np
import pytest

import ih_jax
from conftest import USER_XLA_FLAGS

# One worker builds this module's shared runs (a session-scoped fixture, so tests of other
# modules run in between do not tear it down): `make test` passes --dist loadgroup.
pytestmark = pytest.mark.xdist_group("test_api")

matplotlib.use("Agg")
README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _notebook_example() -> str:
  text = open(README).read()
  start = text.index("The library never reads flags. In a notebook")
  return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.fixture(scope="session")
def example(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("api") / "run1")
  code = _notebook_example()
  assert code.count('"/content/run1"') == 2  # the only change: where it writes
  code = code.replace('"/content/run1"', repr(wd))
  # The example's training (60k sequences x 4 runs) is run-time bound: it runs first in a
  # child process at XLA's default optimisation level (the user's level; ~3x faster than the
  # suite's level 0, see conftest.train_at_default_opt), executing the whole example
  # verbatim there. The in-process exec below then finds the finished workdir, which
  # `ih_jax.run` reloads (it always returns `load(workdir)`, fresh or not), so every
  # assertion below still checks what the README's code returns.
  child = subprocess.run([sys.executable, "-c", "import sys; exec(compile(sys.stdin.read(), "
                          "'README.md', 'exec'), {})"], input=code, text=True,
                         capture_output=True, env=dict(os.environ, XLA_FLAGS=USER_XLA_FLAGS),
                         timeout=900)
  assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
  assert os.path.exists(os.path.join(wd, "done.json"))
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  return wd, namespace


def test_readme_example_runs_and_returns_what_it_says(example):
  wd, ns = example
  sweep, run = ns["sweep"], ns["run"]
  assert sweep.conditions == ["none", "match"] and sweep.seeds == [5, 6]
  assert (run.condition, run.seed) == ("match", 6)
  assert run.spec.startswith("ih:L2H0;ablate:L2H1")
  lts = ns["sweep"].learning_times()
  assert set(lts) == {("none", 5), ("none", 6), ("match", 5), ("match", 6)}
  # The perfect-match clamp learns the task within 60k sequences; the baseline does not.
  assert not math.isnan(lts[("match", 6)]) and math.isnan(lts[("none", 6)])
  curve = ns["curve"]
  assert curve["seqs"][0] == 0 and curve["seqs"][-1] == 60_000
  assert curve["loss"].shape == curve["acc"].shape == curve["seqs"].shape
  # metrics() are the run's own rows of metrics.csv
  rows = [r for r in run.records() if r["eval_set"] == "fsl_train" and r["clamped"] == 1]
  np.testing.assert_array_equal(curve["loss"], [r["loss"] for r in rows])
  L, H = 2, 8
  assert ns["scores"]["induction_strength"].shape == (L, H)
  # The IH-clamped head's pattern is the clamp's: IS = 2s - 1 = 1 under its own clamps.
  assert abs(ns["scores"]["induction_strength"][1, 0] - 1.0) < 1e-5
  assert ns["fig"].axes and ns["fig2"].axes
  again = ns["again"]
  assert again.runs == sweep.runs


def test_runs_by_condition_and_seed_across_programs_and_clear_errors(example):
  wd, ns = example
  sweep = ns["sweep"]
  with pytest.raises(ValueError, match=r"2 runs with condition='match'.*runs: \('none', seed=5\)"):
    sweep.run("match")
  with pytest.raises(ValueError, match="no run with condition='pt'"):
    sweep.run("pt", seed=5)
  with pytest.raises(ValueError, match="no clamped rows for eval set 'nope'"):
    sweep.run("none", seed=5).metrics("nope")
  with pytest.raises(FileNotFoundError, match="no workdir"):
    ih_jax.load(os.path.join(wd, "missing"))
  # Activations: own clamps vs clamp-free vs a spec on top of the run's own.
  run = ns["run"]
  b = run.batch(32)
  own = run.activations(b, ["blocks.1.pattern"])["blocks.1.pattern"]
  free = run.activations(b, ["blocks.1.pattern"], clamps=None)["blocks.1.pattern"]
  assert own.shape == (32, 8, 5, 5)
  np.testing.assert_allclose(own[:, 0, -1, 1::2].sum(-1), 1.0, atol=1e-5)  # clamped row
  assert np.abs(own - free).max() > 1e-3
  # Ablating L2H0 on top of the run's clamps zeroes its values, not its pattern.
  sites = ["blocks.1.pattern", "blocks.1.attn_out"]
  base = run.activations(b, sites)
  abl = run.activations(b, sites, clamps="ablate:L2H0")
  numerics.assert_close(abl["blocks.1.pattern"], base["blocks.1.pattern"])  # two programs
  assert np.abs(abl["blocks.1.attn_out"] - base["blocks.1.attn_out"]).max() > 1e-3
