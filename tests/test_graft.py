"""Graft-in through the training program: donors from a finished workdir."""
import jax
import numpy as np
import pytest

from ih_jax import checkpoint, train
from ih_jax.train import experiment, state as state_lib
from ih_jax.interventions import graft as graft_lib
from ih_jax.config import ExperimentConfig

# One worker builds this module's shared runs (a session-scoped fixture, so tests of other
# modules run in between do not tear it down): `make test` passes --dist loadgroup.
pytestmark = pytest.mark.xdist_group("test_graft")

BASE = {"train": {"num_seqs": 1600, "eval_every": 800, "progress_every_s": 1e9},
        "evaluators": [{"name": "fsl_train", "size": 100}]}


@pytest.fixture(scope="session")
def donor_dir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("donor") / "w")
  train.train_and_evaluate(ExperimentConfig.from_dict(BASE), wd, verbose=False)
  return wd


def test_donor_entry_parsing():
  assert graft_lib.parse_donor("a=/x/y") == ("a", "/x/y", 0, None)
  assert graft_lib.parse_donor("a=/x/y:3@5000") == ("a", "/x/y", 3, 5000)
  with pytest.raises(ValueError, match="NAME=WORKDIR"):
    graft_lib.parse_donor("/x/y")


def test_grafted_runs_carry_their_donor_and_freeze_layer0(donor_dir, tmp_path):
  cfg = ExperimentConfig.from_dict(dict(BASE, sweep={
      "conditions": ["none", "g=graft:d"], "donors": [f"d={donor_dir}"], "init_seeds": [6]}))
  exp = experiment.setup_experiment(cfg)
  assert exp.plan.uses("graft") and [r.spec for r in exp.runs] == ["none", "graft:d"]
  donor = checkpoint.load_params(donor_dir, 0)
  got = jax.tree.map(lambda x: np.asarray(x)[1], exp.clamps["graft_params"])
  chex_equal = jax.tree.map(np.array_equal, got, jax.tree.map(np.asarray, donor))
  assert all(jax.tree.leaves(chex_equal))
  assert all(np.all(np.asarray(x)[0] == 0) for x in jax.tree.leaves(exp.clamps["graft_params"]))
  res = train.train_and_evaluate(cfg, str(tmp_path / "g"), verbose=False)
  # Training changes the ungrafted run's layer 0 but not the grafted run's (zero grads).
  init = state_lib.init_state(experiment.setup_experiment(cfg)).params
  for name in ("blocks_0", "embed_x"):
    for a, b in zip(jax.tree.leaves(init[name]), jax.tree.leaves(res.params[name])):
      a, b = np.asarray(a), np.asarray(b)
      assert np.array_equal(a[1], b[1]) and not np.array_equal(a[0], b[0])


def test_missing_donor_is_a_clear_error(tmp_path):
  cfg = ExperimentConfig.from_dict(dict(BASE, sweep={
      "conditions": ["g=graft:d"], "donors": [f"d={tmp_path}/nowhere"]}))
  with pytest.raises(ValueError, match="graft donor 'd'.*cannot load"):
    experiment.setup_experiment(cfg)
  cfg = ExperimentConfig.from_dict(dict(BASE, sweep={"conditions": ["g=graft:e"],
                                                     "donors": [f"d={tmp_path}"]}))
  with pytest.raises(ValueError, match="not declared"):
    experiment.setup_experiment(cfg)
