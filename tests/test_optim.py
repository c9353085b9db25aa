"""Optimizer settings as per-run data (ih_jax.optim): a learning-rate x weight-decay grid
trains in one program and equals the same settings trained one at a time."""
import math

import jax
import jax.numpy as jnp
import numerics
import numpy as np
import optax
import pytest
from conftest import small_sweep

from ih_jax import optim, sweep as sweep_lib, train
from ih_jax.config import ExperimentConfig, TrainConfig

# One worker builds this module's shared runs (a session-scoped fixture, so tests of other
# modules run in between do not tear it down): `make test` passes --dist loadgroup.
pytestmark = pytest.mark.xdist_group("test_optim")


def test_defaults_build_plain_adam():
  plan = optim.plan_for([TrainConfig()])
  assert plan.is_plain_adam and not plan.varying
  params = {"w": jnp.ones((3,))}
  ours = optim.transformation(plan).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(optax.adam(1e-5).init(params))


def test_schedule_warmup_cosine_and_linear():
  t = TrainConfig(num_seqs=3200, batch_size=32, learning_rate=1e-3, warmup_seqs=320,
                  lr_schedule="cosine", final_lr_fraction=0.1)
  plan = optim.plan_for([t])
  hp = {**plan.shared}
  lr = lambda s: float(optim.learning_rate_at(plan, hp, s))  # noqa: E731
  assert math.isclose(lr(0), 1e-4, rel_tol=1e-6)           # step 1 of a 10-step warmup
  assert math.isclose(lr(9), 1e-3, rel_tol=1e-6)           # warmup done
  assert math.isclose(lr(55), 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
                      rel_tol=1e-5)                        # halfway through the decay
  assert math.isclose(lr(100), 1e-4, rel_tol=1e-5)         # the end: final fraction
  lin = optim.plan_for([TrainConfig(num_seqs=3200, learning_rate=1e-3, lr_schedule="linear")])
  assert math.isclose(float(optim.learning_rate_at(lin, lin.shared, 50)), 5e-4, rel_tol=1e-5)


def test_sgd_with_momentum_and_decay_is_the_textbook_update():
  plan = optim.plan_for([TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9,
                                     weight_decay=0.01)])
  p, g1, g2 = np.float32(2.0), np.float32(0.5), np.float32(-0.25)
  tx = optim.transformation(plan, None, 0)
  state = tx.init(jnp.asarray(p))
  u1, state = tx.update(jnp.asarray(g1), state, jnp.asarray(p))
  p1 = p + float(u1)
  u2, _ = optim.transformation(plan, None, 1).update(jnp.asarray(g2), state, jnp.asarray(p1))
  m1 = g1
  m2 = 0.9 * m1 + g2
  np.testing.assert_allclose(float(u1), -0.1 * (m1 + 0.01 * p), rtol=1e-6)
  np.testing.assert_allclose(float(u2), -0.1 * (m2 + 0.01 * p1), rtol=1e-6)


def test_bad_optimizer_settings_are_refused_by_name():
  with pytest.raises(ValueError, match="train.optimizer='adamw' is unknown; allowed: adam, sgd"):
    TrainConfig(optimizer="adamw")
  with pytest.raises(ValueError, match="train.momentum=0.9 applies to train.optimizer='sgd'"):
    TrainConfig(momentum=0.9)
  with pytest.raises(ValueError, match="warmup_seqs=5000 must be < train.num_seqs=4000"):
    TrainConfig(num_seqs=4000, warmup_seqs=5000)
  with pytest.raises(ValueError, match=r"train.adam_b2 must be in \[0, 1\), got 1.0"):
    TrainConfig(adam_b2=1.0)
  with pytest.raises(ValueError, match="train.weight_decay must be in"):
    TrainConfig(weight_decay=-1e-3)
  with pytest.raises(ValueError, match="final_lr_fraction=0.5 needs a decaying"):
    TrainConfig(final_lr_fraction=0.5)


GRID = ("train.learning_rate=1e-4,3e-4", "train.weight_decay=0,0.01")


def _run(grid=(), **train_fields):
  cfg = small_sweep(["none"], 640, 640, train=train_fields, sweep={
      "conditions": ["none"], "init_seeds": [5], "grid": list(grid)})
  return cfg, train.train_and_evaluate(cfg, None, verbose=False)


@pytest.fixture(scope="session")
def grid_result():
  return _run(GRID)


def test_grid_is_one_program_with_per_run_numbers(grid_result):
  cfg, result = grid_result
  assert len(sweep_lib.plan_programs(cfg)) == 1
  assert [r.variant for r in result.runs] == [
      "train.learning_rate=0.0001;train.weight_decay=0", "train.learning_rate=0.0001;"
      "train.weight_decay=0.01", "train.learning_rate=0.0003;train.weight_decay=0",
      "train.learning_rate=0.0003;train.weight_decay=0.01"]
  # Different settings train differently (the per-run numbers reach the update).
  finals = result.train_loss[:, -1]
  assert len(set(np.round(finals, 6).tolist())) == 4, finals


@pytest.mark.parametrize("index, lr, wd", [(0, 1e-4, 0.0), (3, 3e-4, 0.01)])
def test_grid_run_equals_the_same_settings_alone(grid_result, index, lr, wd):
  _, grid = grid_result
  _, alone = _run(learning_rate=lr, weight_decay=wd)
  numerics.assert_close(numerics.without_key_bias(jax.tree.map(lambda x: x[index], grid.params)),
                        numerics.without_key_bias(jax.tree.map(lambda x: x[0], alone.params)),
                        rtol=1e-4, rel_atol=1e-4)
  numerics.assert_close(grid.train_loss[index], alone.train_loss[0], rtol=1e-4)


def test_configs_stored_without_optimizer_fields_load_as_plain_adam():
  """Old workdirs (no optimizer fields in config.json) load with the paper's Adam."""
  d = ExperimentConfig().to_dict()
  for f in ("optimizer", "lr_schedule", "weight_decay", "adam_b1", "momentum"):
    d["train"].pop(f)
  assert optim.plan_for([ExperimentConfig.from_dict(d).train]).is_plain_adam
