"""Writes the shared data sets and minima (w*) that both LLC estimators load, as .npy.

Run with the project's venv (it trains the MLP with JAX):
  /work/main/.venv/bin/python benchmarks/llc_devinterp/make_data.py [OUT_DIR]

Everything is saved as float32, the dtype both sides compute in, so ih_jax and devinterp
start from bit-identical numbers (w* is the float32 rounding of a float64 minimum).

  linear_X.npy [n, 10], linear_y.npy [n], linear_w.npy [10]
      y = X w0 + N(0, 1); w* = least squares (a regular model: LLC = d/2 as gamma -> 0).
  mlp_X.npy [n, 2], mlp_y.npy [n], mlp_W1.npy [8, 2], mlp_b1.npy [8], mlp_W2.npy [1, 8],
  mlp_b2.npy [1]
      y = teacher(x) + N(0, 1), the teacher a 2-2-1 tanh net; the student 2-8-1 tanh
      (33 parameters, many more than the teacher needs: a singular model), trained to a
      minimum of the same loss. Layouts are torch.nn.Linear's (weight [out, in]).

The loss on both sides: the per-sample Gaussian negative log-likelihood with unit
variance, up to its constant, 0.5 * (y - f(x))^2, averaged over the minibatch.
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)   # train in float64, save float32

N = 10_000


def mlp(p: dict, x: jnp.ndarray) -> jnp.ndarray:
  """f(x) = W2 tanh(W1 x + b1) + b2, torch.nn.Linear layouts; [n, 2] -> [n]."""
  return (jnp.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"])[:, 0]


def loss(p: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  return 0.5 * jnp.mean((y - mlp(p, x)) ** 2)


def main(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)

  # (i) linear regression, d = 10, no bias.
  X = rng.standard_normal((N, 10)).astype(np.float32)
  y = (X @ rng.standard_normal(10) + rng.standard_normal(N)).astype(np.float32)
  w = np.linalg.lstsq(X.astype(np.float64), y.astype(np.float64), rcond=None)[0]
  np.save(out / "linear_X.npy", X)
  np.save(out / "linear_y.npy", y)
  np.save(out / "linear_w.npy", w.astype(np.float32))

  # (ii) tanh MLP: a 2-unit teacher, an 8-unit student.
  Xm = rng.standard_normal((N, 2))
  teacher = {"W1": np.array([[1.5, -1.0], [0.5, 2.0]]), "b1": np.array([0.3, -0.2]),
             "W2": np.array([[2.0, -1.5]]), "b2": np.array([0.1])}
  ym = np.asarray(mlp(teacher, jnp.asarray(Xm))) + rng.standard_normal(N)
  Xm, ym = Xm.astype(np.float32), ym.astype(np.float32)
  x64, y64 = jnp.asarray(Xm, jnp.float64), jnp.asarray(ym, jnp.float64)
  k1, k2 = jax.random.split(jax.random.key(0))
  p = {"W1": jax.random.normal(k1, (8, 2)) / np.sqrt(2), "b1": jnp.zeros(8),
       "W2": jax.random.normal(k2, (1, 8)) / np.sqrt(8), "b2": jnp.zeros(1)}
  p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
  # Full-batch Adam with a decaying rate, then plain gradient descent: the LLC is taken
  # at a (local) minimum, so the gradient at w* should be ~0 (reported below).
  opt = optax.adam(optax.exponential_decay(1e-2, 5000, 0.1))
  state = opt.init(p)
  vg = jax.jit(jax.value_and_grad(loss))

  @jax.jit
  def adam_step(p, state):
    l, g = vg(p, x64, y64)
    upd, state = opt.update(g, state)
    return optax.apply_updates(p, upd), state, l

  for _ in range(20_000):
    p, state, _ = adam_step(p, state)
  p32 = {k: np.asarray(v, np.float32) for k, v in p.items()}
  for k, v in p32.items():
    np.save(out / f"mlp_{k}.npy", v)
  np.save(out / "mlp_X.npy", Xm)
  np.save(out / "mlp_y.npy", ym)

  l32, g32 = vg(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p32), x64, y64)
  gnorm = float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g32))))
  meta = {"n": N, "linear_loss_star": float(0.5 * np.mean((y - X @ w.astype(np.float32)) ** 2)),
          "mlp_loss_star": float(l32), "mlp_grad_norm_at_w_star": gnorm,
          "mlp_num_params": int(sum(v.size for v in p32.values()))}
  (out / "meta.json").write_text(json.dumps(meta, indent=1))
  print(json.dumps(meta))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llc_devinterp_data"))
