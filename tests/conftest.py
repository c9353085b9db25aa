"""Shared fixtures: a paper-sized model, its params and small batches."""
import os

# The suite's time is mostly XLA compiling small programs (hundreds of them), not
# running them. LLVM's optimisation level 0 compiles them ~1.5x faster (a training
# test pair: 127 -> 84 s CPU); it keeps IEEE semantics (no fast-math), so what the
# tests compare (program vs program, resume vs uninterrupted) is unaffected. Users'
# runs keep XLA's default level. Set IH_JAX_TEST_XLA_OPT=default to test at it.
# Long trainings (the scientific checks) run ~4x faster at the default level, so they
# train in a child process at it (train_at_default_opt below).
OPT0_FLAG = "--xla_backend_optimization_level=0"
# (pytest-xdist workers inherit the controller's XLA_FLAGS, level 0 included: drop it.)
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "").replace(OPT0_FLAG, "").strip()
if os.environ.get("IH_JAX_TEST_XLA_OPT", "0") != "default" and \
    "xla_backend_optimization_level" not in USER_XLA_FLAGS:
  os.environ["XLA_FLAGS"] = (USER_XLA_FLAGS + " " + OPT0_FLAG).strip()

import ih_jax  # noqa: F401,E402  (sets the CPU XLA flags before JAX starts)
import jax
import numpy as np
import pytest

from ih_jax import model as model_lib
from ih_jax.config import ExperimentConfig
from ih_jax.data import evalsets, features, sampler, splits as splits_lib

import json
import pickle
import subprocess
import sys
import tempfile

import numerics

# Many tests (and the CLI subprocesses they start, which inherit the variable) compile
# the same small programs; JAX's persistent compilation cache compiles each one once
# per test session. The cache is keyed on the program, flags and versions, so a stale
# entry is never reused for a different program.
CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         ".pytest_cache", "jax_compilation_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


_CHILD = """
import json, pickle, sys
import ih_jax, jax
from ih_jax import train
from ih_jax.config import ExperimentConfig
cfg = ExperimentConfig.from_dict(json.load(open(sys.argv[1])))
result = train.train_and_evaluate(cfg, sys.argv[3] or None, verbose=False)
with open(sys.argv[2], "wb") as f:
  pickle.dump(jax.device_get(result), f)
"""


def train_at_default_opt(cfg: ExperimentConfig, workdir: str | None = None):
  """`train.train_and_evaluate(cfg, workdir)` in a child process at XLA's default
  optimisation level (the user's level): for trainings long enough that running, not
  compiling, dominates (a 500k-sequence main run: 82 s at level 0, 21 s at the default).
  Returns the same TrainResult (arrays on the host)."""
  env = dict(os.environ, XLA_FLAGS=USER_XLA_FLAGS)
  with tempfile.TemporaryDirectory() as tmp:
    cfg_path, out_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "result.pkl")
    with open(cfg_path, "w") as f:
      json.dump(cfg.to_dict(), f)
    proc = subprocess.run([sys.executable, "-c", _CHILD, cfg_path, out_path, workdir or ""],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out_path, "rb") as f:
      return pickle.load(f)


@pytest.fixture(scope="session")
def feature_table():
  return features.synthetic_features()


@pytest.fixture(scope="session")
def paper_splits():
  return splits_lib.make_splits(1623, 5, 5)


@pytest.fixture(scope="session")
def cfg():
  return model_lib.ModelConfig()


@pytest.fixture(scope="session")
def params(cfg):
  return model_lib.init_params(jax.random.key(5), cfg, 512)


def small_sweep(conditions, num_seqs: int, every: int, *, eval_size: int = 64,
                **extra) -> ExperimentConfig:
  """A short sweep of `conditions` (seed 5): evaluations and snapshots every `every`
  sequences, one small fsl_train eval set; `extra` adds config sections."""
  train = dict(num_seqs=num_seqs, eval_every=every, progress_every_s=0)
  train.update(extra.pop("train", {}))
  return ExperimentConfig.from_dict({
      "train": train, "checkpoint": dict(every=every),
      "sweep": {"conditions": list(conditions), "init_seeds": [5]},
      "evaluators": [{"name": "fsl_train", "size": eval_size}], **extra})


def make_batch(feature_table, splits, n=2, batch_size=16, seed=3):
  return sampler.sample_batch(jax.random.key(seed), feature_table, evalsets.train_spec(splits),
                              batch_size, n)


@pytest.fixture(scope="session")
def batch(feature_table, paper_splits):
  return make_batch(feature_table, paper_splits)


def as_np(tree):
  return jax.tree.map(np.asarray, tree)


def assert_query_only_exact(params, batch, clamps, cfg, plan):
  """apply(query_only=True) gives the full forward's query logits and the same grads."""
  full, _ = model_lib.apply(params, batch, clamps, cfg, plan)
  qo, _ = model_lib.apply(params, batch, clamps, cfg, plan, query_only=True)
  assert qo.shape == (full.shape[0], 1, full.shape[2])
  # Two programs (the last layer on one row vs all rows): equal up to rounding, judged per
  # leaf against its own scale (entries near 0 carry their leaf's rounding).
  numerics.assert_close(qo[:, 0], full[:, -1], rtol=1e-5, rel_atol=1e-5)
  loss = lambda p, q: model_lib.query_loss(model_lib.apply(p, batch, clamps, cfg, plan,
                                                           query_only=q)[0], batch.y)
  g_full, g_qo = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
  numerics.assert_close(g_qo, g_full, rtol=1e-4, rel_atol=1e-5)
