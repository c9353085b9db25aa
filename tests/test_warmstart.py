"""Warm starts (ih_jax.warmstart): runs start from another workdir's saved params, with
chosen groups re-initialised, on different data settings; bad sources are refused."""
import jax
import numpy as np
import pytest

import ih_jax
from ih_jax.checkpoint import CheckpointError
from ih_jax.config import ExperimentConfig

pytestmark = pytest.mark.xdist_group("test_warmstart")  # one worker trains the donor


def _cfg(seed, **train):
  return ExperimentConfig.from_dict({
      "train": {"num_seqs": 640, "eval_every": 320, "learning_rate": 1e-3,
                "progress_every_s": 0, **train},
      "checkpoint": {"every": 320},
      "sweep": {"conditions": ["none"], "init_seeds": [seed]},
      "evaluators": [{"name": "fsl_train", "size": 64}]})


@pytest.fixture(scope="session")
def donor(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("donor") / "wd")
  return wd, ih_jax.run(_cfg(5), wd, verbose=False).run()


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_runs_start_from_the_donor_except_reinit_groups(donor, tmp_path):
  wd, src = donor
  # Another init seed and another feature family; unembed (and ln_f) re-initialised.
  cfg = _cfg(6, init_from=f"{wd}:0@320", reinit=["unembed"])
  cfg = ExperimentConfig.from_dict({**cfg.to_dict(), "data": {"family": "gaussian"}})
  warm = ih_jax.run(cfg, str(tmp_path / "warm"), verbose=False).run()
  cold = ih_jax.run(_cfg(6), str(tmp_path / "cold"), verbose=False).run()
  start, donor_params, fresh = warm.params(0), src.params(320), cold.params(0)
  for group in ("blocks_0", "blocks_1", "embed_x", "embed_y"):
    assert _equal(start[group], donor_params[group]), group
  for group in ("unembed", "ln_f"):
    assert _equal(start[group], fresh[group]) and not _equal(start[group], donor_params[group])
  assert not _equal(warm.params(), start)  # and it trains from there
  assert warm.context().cfg.data.family == "gaussian"


def test_bad_sources_are_refused_by_name(donor, tmp_path):
  wd, _ = donor
  with pytest.raises(ValueError, match="no workdir '/nonexistent/wd'"):
    ih_jax.run(_cfg(6, init_from="/nonexistent/wd"), str(tmp_path / "a"), verbose=False)
  with pytest.raises(CheckpointError, match="no checkpoint at 100 seqs; saved: "):
    ih_jax.run(_cfg(6, init_from=f"{wd}@100"), str(tmp_path / "b"), verbose=False)
  small = ExperimentConfig.from_dict({**_cfg(6, init_from=wd).to_dict(),
                                      "model": {"d_model": 32}})
  with pytest.raises(ValueError, match="do not fit this model"):
    ih_jax.run(small, str(tmp_path / "c"), verbose=False)
  with pytest.raises(ValueError, match="needs train.init_from"):
    _cfg(6, reinit=["L1"])
  with pytest.raises(ValueError, match="bad sequence count 'x'"):
    _cfg(6, init_from=f"{wd}@x")
  with pytest.raises(ValueError, match="unknown group 'L9x'"):
    _cfg(6, init_from=wd, reinit=["L9x"])
