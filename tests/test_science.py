"""Scientific integration checks with the real training, at CI scale.

Budgets were measured with the default synthetic features (family relu, latent_dim 64,
rho = 0.8), init seed 5 and train seed 0: the main run's fsl_train loss sits near ln 2
from ~1e5 to ~3e5 sequences and crosses 0.4 ln 2 at 440,000 sequences (430,016 on the
Gaussian family, the earlier default; BUILD_NOTES.md "Synthetic features").
"""
import math

import numpy as np
import pytest

import jax

from conftest import train_at_default_opt
from ih_jax.analysis import ablation, measures
from ih_jax.analysis.timing import learning_time
from ih_jax.data import evalsets, features, splits
from ih_jax.config import ExperimentConfig

LN2 = math.log(2)
pytestmark = pytest.mark.slow


def _curves(res):
  out = {}
  for run in res.runs:
    rows = [r for r in res.metrics if r["run"] == run.index and r["clamped"] == 1
            and r["eval_set"] == "fsl_train"]
    out[run.condition] = (np.array([r["seqs"] for r in rows]), np.array([r["loss"] for r in rows]))
  return out


def test_main_run_plateau_then_phase_change():
  cfg = ExperimentConfig.from_dict({
      "train": {"num_seqs": 500_000, "eval_every": 10_000, "progress_every_s": 30},
      "evaluators": [{"name": "fsl_train"}]})
  res = train_at_default_opt(cfg)
  seqs, loss = _curves(res)["none"]
  plateau = loss[(seqs >= 100_000) & (seqs <= 250_000)]
  # A plateau near ln 2: the model picks one of the two context labels at random...
  assert np.all(np.abs(plateau - LN2) < 0.15), plateau
  assert plateau.max() - plateau.min() < 0.1, plateau
  # ...then an abrupt drop below 0.4 ln 2 (the learning-time threshold).
  lt = learning_time(seqs, loss)
  assert 250_000 < lt <= 500_000, lt
  assert loss[-1] < 0.4 * LN2
  drop_window = (seqs >= lt - 100_000) & (seqs <= lt)
  assert loss[drop_window][0] - loss[drop_window][-1] > 0.3  # steep, not a slow drift
  # The trained model has induction heads, found from the data (no index hard-coded). On
  # the relu features the task is shared by several (as the paper's Fig. 4a): measured at
  # 5e5, induction strength 0.61 / 0.44 / 0.36 / 0.32 (L2H2, H5, H0, H4), keep-only-one
  # accuracy 0.80 for the strongest (median head 0.54), removing it 0.976 -> 0.876 (the
  # largest drop). (On the Gaussian family one head dominated: IS > 2x the next, keep-only
  # accuracy > 0.9.)
  params = jax.tree.map(lambda x: x[0], res.params)
  m = measures.measure(jax.tree.map(lambda x: x[None], params), res_features(cfg),
                       dense_subset(cfg, 2000), cfg.model)
  strength = m["induction_strength"][0, 1]
  order = np.argsort(-strength)
  assert strength[order[0]] > 0.4, strength
  assert (strength > 0.25).sum() >= 2, strength  # redundant induction heads
  abl = ablation.head_ablations(params, res_features(cfg), dense_subset(cfg, 2000), cfg.model,
                                strength)
  only, remove = np.asarray(abl["only_acc"]), np.asarray(abl["remove_acc"])
  assert only[order[0]] == only.max() and only[order[0]] > 0.7, abl
  assert np.median(only) < 0.65, abl
  assert remove[order[0]] == remove.min(), abl  # the strongest is the one most needed


def res_features(cfg):
  return features.load_features(cfg.data)


def dense_subset(cfg, size):
  sp = splits.make_splits(1623, 5, cfg.model.num_labels)
  idx = evalsets.dense_indices(sp)
  keep = np.random.default_rng(0).choice(idx.classes.shape[0], size, replace=False)
  return jax.tree.map(lambda x: x[np.sort(keep)], idx)


def test_clamping_subcircuits_removes_the_plateau():
  """Fig. 5b in one vmapped program: REST ablated vs perfect match vs perfect L1 + copy."""
  cfg = ExperimentConfig.from_dict({
      "train": {"num_seqs": 150_000, "eval_every": 5_000, "progress_every_s": 30},
      "sweep": {"conditions": ["none=keep_only:L2H0", "match=ih:L2H0;keep_only:L2H0",
                               "l1copy=perfect_l1;copy:L2H0"]},
      "evaluators": [{"name": "fsl_train"}]})
  curves = _curves(train_at_default_opt(cfg))
  lt = {c: learning_time(*curves[c]) for c in curves}
  assert math.isnan(lt["none"]) and curves["none"][1][-1] > 0.6, curves["none"][1]
  assert lt["match"] <= 100_000, lt
  assert lt["l1copy"] <= 100_000, lt
