"""The local learning coefficient: the SGLD estimator against a regular model's known
answer, invariance to how the work is batched, diagnostics, and the ih_jax model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ih_jax import clamps as clamps_lib
from ih_jax import model as model_lib
from ih_jax.analysis import llc
from ih_jax.config import ExperimentConfig

D, N = 10, 10_000


@pytest.fixture(scope="module")
def regression():
  """Linear regression with unit Gaussian noise, d = 10 parameters: w* = least squares;
  the loss is the per-sample negative log-likelihood (up to a constant)."""
  kx, kw, ke = jax.random.split(jax.random.key(0), 3)
  X = jax.random.normal(kx, (N, D))
  y = X @ jax.random.normal(kw, (D,)) + jax.random.normal(ke, (N,))
  w_star = jnp.linalg.lstsq(X, y)[0]
  loss_fn = lambda w, b, extra: 0.5 * jnp.mean((b[1] - b[0] @ w["w"]) ** 2)

  def sample(key, batch_size):
    i = jax.random.randint(key, (batch_size,), 0, N)
    return X[i], y[i]
  return loss_fn, sample, w_star, np.asarray(X)


def test_linear_regression_llc_is_half_the_parameter_count(regression):
  """A regular model's learning coefficient is d/2. With localisation gamma the sampled
  posterior is exp(-nb L - gamma/2 |w - w*|^2), whose exact expectation here is
  nb E[L - L*] = sum_i h_i nb / (2 (nb h_i + gamma)) (h_i: the eigenvalues of X'X/n,
  ~1). Small steps and large batches keep SGLD's bias ~1%."""
  loss_fn, sample, w_star, X = regression
  cfg = llc.SGLDConfig(step_size=2e-5, gamma=100.0, num_samples=N, num_chains=8,
                       num_draws=3000, num_burnin=600, batch_size=1024)
  r = llc.estimate(loss_fn, {"w": w_star[None]}, sample, jax.random.key(1), cfg)
  nb = cfg.effective_nbeta
  assert nb == pytest.approx(N / math.log(N))
  h = np.linalg.eigvalsh(X.T @ X / N)
  exact = float(np.sum(h * nb / (2 * (nb * h + cfg.gamma))))
  se = r.llc_std[0] / math.sqrt(cfg.num_chains)
  assert abs(r.llc[0] - exact) < 4 * se + 0.03 * exact, (r.llc, r.llc_std, exact)
  assert abs(r.llc[0] - D / 2) < 0.15 * D / 2        # and d/2 up to the localisation
  assert llc.diagnose(r, cfg) == []


def test_estimate_does_not_depend_on_batching(regression):
  loss_fn, sample, w_star, _ = regression
  points = {"w": jnp.stack([w_star, w_star + 0.01, w_star - 0.2])}
  cfg = llc.SGLDConfig(step_size=1e-4, num_chains=3, num_draws=50, batch_size=64)
  one = llc.estimate(loss_fn, points, sample, jax.random.key(2), cfg, ckpt_batch=1)
  all_ = llc.estimate(loss_fn, points, sample, jax.random.key(2), cfg, ckpt_batch=3)
  # Same draws either way; only float rounding may differ (tolerances scaled to the values).
  scale = np.abs(all_.excess).max()
  np.testing.assert_allclose(one.excess, all_.excess, rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(one.llc, all_.llc, rtol=1e-4, atol=1e-5 * np.abs(all_.llc).max())
  # A point far from the minimum: the chains slide down, the estimate goes negative.
  assert one.llc[2] < 0 and one.llc[0] > 0


def test_diagnostics_name_the_setting_to_change(regression):
  loss_fn, sample, w_star, _ = regression
  point = {"w": w_star[None]}
  big = llc.SGLDConfig(step_size=0.5, gamma=0.0, num_chains=2, num_draws=40)
  warnings = llc.diagnose(llc.estimate(loss_fn, point, sample, jax.random.key(3), big), big)
  assert warnings and all("lower step_size" in w for w in warnings), warnings
  tiny = llc.SGLDConfig(step_size=1e-14, num_chains=2, num_draws=40)
  warnings = llc.diagnose(llc.estimate(loss_fn, point, sample, jax.random.key(3), tiny), tiny)
  assert any("raise step_size" in w for w in warnings), warnings
  with pytest.raises(ValueError, match="step_size must be > 0"):
    llc.SGLDConfig(step_size=0.0)
  with pytest.raises(ValueError, match="num_chains must be >= 1"):
    llc.SGLDConfig(num_chains=0)


def test_model_llc_per_head_and_clamped():
  """The paper's model on its task: the whole model, one head, and under a clamp, for
  two stacked points in one program; a restricted chain moves only its head."""
  cfg = ExperimentConfig.from_dict(dict(
      evaluators=[dict(name="fsl_train", size=64)]))
  loss_fn, sample, task = llc.model_loss_and_sampler(cfg)
  params = model_lib.init_params(jax.random.key(5), cfg.model, 512, task=task)
  params_K = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  sg = llc.SGLDConfig(step_size=1e-6, gamma=1000.0, num_chains=2, num_draws=20,
                      batch_size=32)
  whole = llc.estimate(loss_fn, params_K, sample, jax.random.key(0), sg)
  assert whole.llc.shape == (2,) and np.isfinite(whole.llc).all()
  # The same point twice draws its own chains (keys folded in by point index).
  assert not np.array_equal(whole.excess[0], whole.excess[1])
  mask = llc.restrict_mask(params, ["L2H3"], cfg.model.num_heads)
  head = llc.estimate(loss_fn, params_K, sample, jax.random.key(0), sg, restrict=mask)
  # Fewer parameters move: a smaller excess loss per step than the whole model's.
  assert np.abs(head.excess).mean() < np.abs(whole.excess).mean()
  assert (head.distance[..., 1:] > 0).all()  # recorded before each step: 0 at the start
  # Under a run's clamps (each point its own, as stacked runs would be): same draws, so
  # the difference is the clamp's.
  c = clamps_lib.parse("ablate:L1H0", 2, 8)
  loss_c, sample_c, _ = llc.model_loss_and_sampler(cfg, clamps_lib.plan_for(clamps_lib.stack([c])))
  extras = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * 2), c)
  clamped = llc.estimate(loss_c, params_K, sample_c, jax.random.key(0), sg, extras_K=extras)
  assert np.isfinite(clamped.llc).all()
  assert not np.allclose(clamped.excess, whole.excess)


def test_per_point_masks_equal_one_mask_per_call(regression):
  """restrict_K (a mask per point: every head at every checkpoint in one program) gives
  each point the chains that `restrict` with that point's mask gives it."""
  loss_fn, sample, w_star, _ = regression
  points = {"w": jnp.stack([w_star, w_star + 0.01])}
  cfg = llc.SGLDConfig(step_size=1e-4, num_chains=2, num_draws=30, batch_size=64)
  a, b = np.arange(D) < 4, np.arange(D) >= 4
  both = llc.estimate(loss_fn, points, sample, jax.random.key(4), cfg,
                      restrict_K={"w": np.stack([a, b])})
  for k, m in enumerate((a, b)):
    one = llc.estimate(loss_fn, points, sample, jax.random.key(4), cfg, restrict={"w": m})
    scale = np.abs(one.excess[k]).max()
    np.testing.assert_allclose(both.excess[k], one.excess[k], rtol=1e-4, atol=1e-5 * scale)
  assert not np.allclose(both.excess[0], both.excess[1])
  with pytest.raises(ValueError, match="not both"):
    llc.estimate(loss_fn, points, sample, jax.random.key(4), cfg, restrict={"w": a},
                 restrict_K={"w": np.stack([a, b])})


def test_windowed_clamps_act_by_each_points_sequences():
  """A clamp on for [0, 1000) sequences: a point at 500 is estimated under the clamp, a
  point at 5000 without it (the same draws as the always-clamped / unclamped loss)."""
  cfg = ExperimentConfig.from_dict(dict(evaluators=[dict(name="fsl_train", size=64)]))
  _, _, task = llc.model_loss_and_sampler(cfg)
  params = model_lib.init_params(jax.random.key(5), cfg.model, 512, task=task)
  params_K = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  sg = llc.SGLDConfig(step_size=1e-6, gamma=1000.0, num_chains=2, num_draws=10, batch_size=32)

  def run(spec, seqs=None):
    c = clamps_lib.parse(spec, 2, 8)
    plan = clamps_lib.plan_for(clamps_lib.stack([c]))
    loss_fn, sample, _ = llc.model_loss_and_sampler(cfg, plan)
    stacked = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * 2), c)
    return llc.estimate(loss_fn, params_K, sample, jax.random.key(0), sg,
                        extras_K=llc.point_extras(stacked, seqs, plan))

  windowed = run("ih:L2H3@[0,1000)", [500, 5000])
  always, never = run("ih:L2H3"), run("none")
  scale = np.abs(always.excess).max() + np.abs(never.excess).max()
  np.testing.assert_allclose(windowed.excess[0], always.excess[0], rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(windowed.excess[1], never.excess[1], rtol=1e-4, atol=1e-5 * scale)
  assert not np.allclose(always.excess[0], never.excess[0])
