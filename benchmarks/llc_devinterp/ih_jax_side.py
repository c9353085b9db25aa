"""ih_jax's LLC estimate (ih_jax.analysis.llc.estimate) on the shared models and w*.

  /work/main/.venv/bin/python benchmarks/llc_devinterp/ih_jax_side.py \
      [--data /tmp/llc_devinterp_data] [--models linear,mlp] [--seed 0]

Prints one JSON object: per model, the estimate over chains (mean, std, SE), the
per-chain values, wall times, and for the linear model the exact localised value and
SGLD's own prediction at this step size and batch. Settings: common_settings.json.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax.analysis import llc

HERE = pathlib.Path(__file__).resolve().parent


def load_settings() -> dict[str, Any]:
  s = json.loads((HERE / "common_settings.json").read_text())
  s.pop("_comment", None)
  return s


def linear_problem(d: pathlib.Path):
  """(loss_fn, sample, w*, X, y): 0.5 (y - x.w)^2 averaged over the minibatch."""
  X, y = jnp.asarray(np.load(d / "linear_X.npy")), jnp.asarray(np.load(d / "linear_y.npy"))
  w_star = {"w": jnp.asarray(np.load(d / "linear_w.npy"))}

  def loss_fn(p, batch, extra):
    xb, yb = batch
    return 0.5 * jnp.mean((yb - xb @ p["w"]) ** 2)
  return loss_fn, _sampler(X, y), w_star, X, y


def mlp_problem(d: pathlib.Path):
  """(loss_fn, sample, w*, X, y) of the 2-8-1 tanh MLP, torch.nn.Linear layouts."""
  X, y = jnp.asarray(np.load(d / "mlp_X.npy")), jnp.asarray(np.load(d / "mlp_y.npy"))
  w_star = {k: jnp.asarray(np.load(d / f"mlp_{k}.npy")) for k in ("W1", "b1", "W2", "b2")}

  def loss_fn(p, batch, extra):
    xb, yb = batch
    f = (jnp.tanh(xb @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"])[:, 0]
    return 0.5 * jnp.mean((yb - f) ** 2)
  return loss_fn, _sampler(X, y), w_star, X, y


def _sampler(X: jax.Array, y: jax.Array) -> Callable:
  """Minibatches drawn in-graph, indices uniform with replacement from the fixed set
  (devinterp instead walks a shuffled epoch without replacement: see README)."""
  n = X.shape[0]

  def sample(key, batch_size):
    i = jax.random.randint(key, (batch_size,), 0, n)
    return X[i], y[i]
  return sample


def linear_reference(X: np.ndarray, y: np.ndarray, w: np.ndarray, cfg: llc.SGLDConfig
                     ) -> dict[str, float]:
  """The linear model's answers, in float64.

  exact: the localised posterior exp(-nb L - gamma/2 |w - w*|^2) of the quadratic L
    (Hessian H = X'X/n, eigenvalues h_i): nb E[L - L*] = sum_i nb h_i / (2 (nb h_i + gamma)).
  sgld_predicted: what SGLD itself converges to at this finite step size and batch, with
    iid minibatches: delta <- A delta - eps/2 nb G_m + sqrt(eps) xi, A = I - eps/2 (nb H +
    gamma), G_m the minibatch gradient at w* (covariance C/m, C the per-sample gradient
    covariance); the stationary covariance S solves S = A S A + Q, Q = eps I +
    (eps nb / 2)^2 C / m, and the estimator's expectation is nb/2 tr(H S) (its minibatch
    cross term G_m . delta has mean zero when batches are drawn independently). Neglects
    the minibatch Hessian's fluctuation (a ~1% effect on the noise here).
  """
  X, y, w = (np.asarray(a, np.float64) for a in (X, y, w))
  n = X.shape[0]
  nb, eps, gamma, m = cfg.effective_nbeta, cfg.step_size, cfg.gamma, cfg.batch_size
  H = X.T @ X / n
  h, V = np.linalg.eigh(H)
  exact = float(np.sum(nb * h / (2 * (nb * h + gamma))))
  r = y - X @ w
  g = X * r[:, None]                       # per-sample gradients at w* (mean ~0)
  C = np.cov(g.T, bias=True)
  a = 1 - 0.5 * eps * (nb * h + gamma)     # A in H's eigenbasis
  Q = V.T @ (eps * np.eye(len(h)) + (0.5 * eps * nb) ** 2 * C / m) @ V
  S = Q / (1 - np.outer(a, a))
  pred = float(0.5 * nb * np.sum(h * np.diag(S)))
  # The same without the minibatch gradient noise (full-batch SGLD's discretisation only).
  pred_full = float(0.5 * nb * np.sum(h * eps / (1 - a * a)))
  return {"exact": exact, "sgld_predicted_iid_batches": pred,
          "sgld_predicted_full_batch": pred_full, "d_over_2": X.shape[1] / 2}


def run(name: str, problem, cfg: llc.SGLDConfig, seed: int) -> dict[str, Any]:
  loss_fn, sample, w_star, X, y = problem
  params_K = jax.tree.map(lambda a: a[None], w_star)
  t0 = time.perf_counter()
  r = llc.estimate(loss_fn, params_K, sample, jax.random.key(seed), cfg)
  first = time.perf_counter() - t0
  # Same work again on the cached program (another key): the run time without compiling.
  t0 = time.perf_counter()
  llc.estimate(loss_fn, params_K, sample, jax.random.key(seed + 1), cfg)
  again = time.perf_counter() - t0
  chains = r.llc_chains[0]
  # devinterp's convention for comparison: average over every step, burn-in included.
  all_steps = r.nbeta * r.excess[0].astype(np.float64).mean(-1)
  C = cfg.num_chains
  out = {
      "llc_mean": float(chains.mean()), "llc_std": float(chains.std()),
      "llc_se": float(chains.std(ddof=1) / math.sqrt(C)),
      "llc_chains": chains.tolist(),
      "llc_mean_all_steps": float(all_steps.mean()),
      "llc_se_all_steps": float(all_steps.std(ddof=1) / math.sqrt(C)),
      "loss_star_mean": float(r.loss_star[0]),
      "final_rms_distance": float(r.distance[0, :, -1].mean()),
      "wall_s_first_call_incl_compile": first, "wall_s_cached_call": again,
      "diagnose": llc.diagnose(r, cfg),
  }
  if name == "linear":
    out["reference"] = linear_reference(np.asarray(X), np.asarray(y),
                                        np.asarray(w_star["w"]), cfg)
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", default="/tmp/llc_devinterp_data")
  ap.add_argument("--models", default="linear,mlp")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num-chains", type=int, default=None,
                  help="override common_settings.json's num_chains")
  args = ap.parse_args()
  s = load_settings()
  if args.num_chains is not None:
    s["num_chains"] = args.num_chains
  d = pathlib.Path(args.data)
  n = int(np.load(d / "linear_y.npy").shape[0])
  cfg = llc.SGLDConfig(step_size=s["step_size"], gamma=s["gamma"], num_samples=n,
                       nbeta=s["nbeta"], num_chains=s["num_chains"],
                       num_draws=s["num_draws"], num_burnin=s["num_burnin"],
                       batch_size=s["batch_size"])
  problems = {"linear": linear_problem, "mlp": mlp_problem}
  res: dict[str, Any] = {"side": "ih_jax", "jax": jax.__version__,
                         "backend": jax.default_backend(), "nbeta": cfg.effective_nbeta,
                         "settings": dataclass_dict(cfg)}
  for name in args.models.split(","):
    res[name] = run(name, problems[name](d), cfg, args.seed)
  print(json.dumps(res, indent=1))


def dataclass_dict(cfg: llc.SGLDConfig) -> dict[str, Any]:
  return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


if __name__ == "__main__":
  main()
