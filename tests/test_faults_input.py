"""Fault injection, input side: nonsense settings and contradictory specs are refused
before anything compiles, with a short message naming the bad value; launchers print it
in a few lines instead of a traceback."""
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from ih_jax import clamps as cl
from ih_jax.train import driver
from ih_jax.config import ExperimentConfig
from ih_jax.train.experiment import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ config values

@pytest.mark.parametrize("section,field,value,allowed", [
    ("train", "learning_rate", -1e-3, "finite number > 0"),
    ("train", "learning_rate", 0.0, "finite number > 0"),
    ("train", "learning_rate", math.nan, "finite number > 0"),
    ("train", "learning_rate", math.inf, "finite number > 0"),
    ("train", "num_seqs", 0, ">= 1"),
    ("train", "batch_size", 0, ">= 1"),
    ("train", "eval_every", 0, ">= 1"),
    ("train", "progress_every_s", -1.0, ">= 0"),
    ("train", "matmul_precision", "fast", "allowed: default"),
    ("train", "train_seed", -1, r"\[0, 2\*\*32\)"),
    ("checkpoint", "every", -1, ">= 0"),
    ("checkpoint", "at", (100, -5), ">= 0"),
    ("checkpoint", "log_num", -2, ">= 0"),
    ("checkpoint", "windows", ((500, 100, 10),), "0 <= start <= stop"),
    ("checkpoint", "windows", ((0, 100, 0),), "every >= 1"),
    ("checkpoint", "resume_every_s", math.nan, ">= 0"),
    ("sweep", "init_seeds", (5, -1), r"\[0, 2\*\*32\)"),
    ("sweep", "max_runs_per_program", -1, ">= 0"),
])
def test_bad_numbers_are_refused_naming_the_field(section, field, value, allowed):
  with pytest.raises(ValueError) as info:
    ExperimentConfig.from_dict({section: {field: value}})
  msg = str(info.value)
  assert f"{section}.{field}" in msg and re.search(allowed, msg), msg
  shown = value[-1] if isinstance(value, tuple) and not isinstance(value[-1], tuple) else value
  if not isinstance(shown, tuple):
    assert str(shown) in msg, msg
  assert "\n" not in msg


@pytest.mark.parametrize("field", ["conditions", "init_seeds"])
def test_empty_sweep_axes_are_named(field):
  with pytest.raises(ValueError, match=rf"sweep\.{field} is empty"):
    ExperimentConfig.from_dict({"sweep": {field: []}})


def test_huge_learning_rate_warns_but_is_accepted():
  with pytest.warns(UserWarning, match=r"train\.learning_rate=1000 is > 1.*diverge"):
    cfg = ExperimentConfig.from_dict({"train": {"learning_rate": 1e3}})
  assert cfg.train.learning_rate == 1e3
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the paper's and the quick scale's rates stay silent
    ExperimentConfig.from_dict({"train": {"learning_rate": 1e-3}})
    ExperimentConfig.from_dict({"train": {"learning_rate": 1.0}})


def test_non_finite_training_loss_names_run_seed_step_and_last_loss():
  runs = [Run(0, "none", "none", 5), Run(1, "pt", "pt:L1H0", 6, "data.rho=0.7")]
  losses = np.array([[0.7, 0.69, 0.68], [3e6, np.inf, np.nan]])
  with pytest.raises(FloatingPointError) as info:
    driver.check_finite_losses(losses, runs, 10, 32, np.full(2, 0.5), 1e3)
  msg = str(info.value)
  for part in ("run 1", "'pt'", "seed 6", "data.rho=0.7", "384 seqs", "last finite loss 3e+06",
               "train.learning_rate", "1000"):
    assert part in msg, (part, msg)
  # Diverged on a chunk's first step: the previous chunk's loss is the last finite one.
  with pytest.raises(FloatingPointError, match=r"run 0 .*\(352 seqs\); last finite loss 0.5"):
    driver.check_finite_losses(np.array([[np.nan]]), runs[:1], 10, 32, np.full(1, 0.5), 1e-5)
  driver.check_finite_losses(losses[:1], runs[:1], 10, 32, np.full(1, 0.5), 1e-5)  # finite: ok


# ------------------------------------------------------------------ clamp specs

L, H = 2, 8


def test_keep_only_clauses_in_one_layer_keep_the_union():
  c = cl.parse("keep_only:L2H0;keep_only:L2H1", L, H)
  np.testing.assert_array_equal(c["v_keep"][1], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(c["v_keep"][0], np.ones(H))
  c = cl.parse("ih:L2H1;keep_only:L2H0;keep_only:L2H1", L, H)
  assert c["ih_on"][1, 1] and c["v_keep"][1, :2].all() and not c["v_keep"][1, 2:].any()
  # Specs the library builds itself stay valid (ih_jax/analysis, ih_jax/experiments/paper).
  for spec in ("keep_only:L2H3;ih:L2H3", "keep_only:L2H3;pt:L1H5",
               "preserve_pattern;keep_only:L2H2;ablate:L1H4",
               "preserve_value;keep_only:L2H2;keep_only:L1H4", "keep_only:L2H1,L2H6",
               "preserve_pattern;preserve_value;ablate:L1H0-7", "perfect_l1;copy:L2H3",
               "pt:L1H*;keep_only:L2H3", "pt:L1H*;pt:L1H2", "ablate:L2H1;ablate:L2H1"):
    cl.parse(spec, L, H)


@pytest.mark.parametrize("spec,both", [
    ("pt:L1H2;ablate:L1H2", ("pt:L1H2", "ablate:L1H2")),
    ("ih:L2H3;keep_only:L2H0", ("ih:L2H3", "keep_only:L2H0")),
    ("keep_only:L2H0;copy:L2H5", ("copy:L2H5", "keep_only:L2H0")),
    ("keep_only:L2H0;ablate:L2H0", ("keep_only:L2H0", "ablate:L2H0")),
    ("pt:L2H1;ih:L2H1", ("pt:L2H1", "ih:L2H1")),
    ("match:L2H0-3;pt:L2H2@0.5", ("match:L2H0-3", "pt:L2H2@0.5")),
    ("pt:L1H0;pt:L1H0@0.5", ("pt:L1H0", "pt:L1H0@0.5")),
    ("ih:L2H0@0.3;ih:L2H*@0.6", ("ih:L2H0@0.3", "ih:L2H*@0.6")),
])
def test_contradictory_clauses_are_refused_naming_both(spec, both):
  with pytest.raises(ValueError) as info:
    cl.parse(spec, L, H)
  msg = str(info.value)
  assert all(repr(c) in msg for c in both), msg
  assert "\n" not in msg


@pytest.mark.parametrize("spec", ["none;ablate:L2H0", "keep_only:L2H3;none"])
def test_none_is_refused_with_other_clauses(spec):
  with pytest.raises(ValueError, match=rf"'none' means no clamp.*{re.escape(repr(spec))}"):
    cl.parse(spec, L, H)


@pytest.mark.parametrize("spec,text", [
    ("pt:L1H0@nan", "nan"), ("ih:L2H0@inf", "inf"), ("pt:L1H0@x", "x"),
    ("ih:L2H3@-0.5", "-0.5"), ("pt:L1H0@", "")])
def test_bad_strength_is_named_with_the_allowed_range(spec, text):
  with pytest.raises(ValueError, match=rf"strength {re.escape(repr(text))} must be a number "
                                       r"in \[0, 1\]"):
    cl.parse(spec, L, H)


# ------------------------------------------------------------------ launchers

def _cli(*args, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != "IH_JAX_TRACEBACK"}
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=env)
  assert proc.returncode != 0, proc.stdout[-2000:]
  return proc


def _assert_short(proc, *parts):
  err = proc.stderr.strip()
  assert "Traceback" not in err and len(err.splitlines()) <= 5, err[-3000:]
  for p in parts:
    assert p in err, (p, err[-3000:])


def test_cli_config_typo_shows_did_you_mean_and_traceback_on_request(tmp_path):
  args = ("ih_jax.experiments.train", "--config=tiny",
          f"--workdir={tmp_path}/a", "--config.train.num_seq=5")
  _assert_short(_cli(*args), "num_seq", "did you mean 'num_seqs'?")
  assert "Traceback" in _cli(*args, env_extra={"IH_JAX_TRACEBACK": "1"}).stderr


@pytest.mark.parametrize("override,parts", [
    ("--config.train.learning_rate=-1e-3", ("train.learning_rate", "-0.001")),
    ("--config.checkpoint.every=-1", ("checkpoint.every", "-1")),
    ("--config.sweep.conditions=('keep_only:L2H0;keep_only:L2H1;ablate:L2H1',)",
     ("'keep_only:L2H1'", "'ablate:L2H1'")),
])
def test_cli_train_bad_values_fail_in_a_few_lines(tmp_path, override, parts):
  _assert_short(_cli("ih_jax.experiments.train", "--config=tiny",
                     f"--workdir={tmp_path}/a", override), *parts)


def test_cli_other_entry_points_fail_in_a_few_lines(tmp_path):
  _assert_short(_cli("ih_jax.experiments.sweep", "--config=tiny",
                     f"--workdir={tmp_path}/s", "--config.sweep.init_seeds=()"),
                "sweep.init_seeds is empty")
  _assert_short(_cli("ih_jax.experiments.reproduce", "--figure=zz", f"--workdir={tmp_path}/r"),
                "unknown figure 'zz'")
  _assert_short(_cli("ih_jax.experiments.analyze", f"--workdir={tmp_path}/none"), f"{tmp_path}/none")
  _assert_short(_cli("ih_jax.experiments.toy", "--steps=0", f"--out={tmp_path}/t"), "steps", "0")
