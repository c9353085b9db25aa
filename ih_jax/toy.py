"""The rank-1 three-factor toy model of the phase change (the paper's Fig. 5a).

Target T* = a* (x) b* (x) c* with a*, b*, c* ~ N(0, I_20); model T = a (x) b (x) c;
loss (1/2N) sum (T* - T)^2 with N = 20^3. Full-batch gradient descent (lr 1,
simultaneous updates) from N(0, I) initial vectors; clamped factors are reset to
their true values after init and after every update. The whole trajectory is one
`lax.scan`, and the conditions are vmapped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DIM = 20
CONDITIONS = {"none": (False, False), "clamp c": (False, True), "clamp b, c": (True, True)}


class ToyCurves(NamedTuple):
  """Per-condition trajectories of the toy model: loss and the two progress measures."""
  loss: np.ndarray   # [Q, steps + 1]  (index 0 = after init)
  pm1: np.ndarray    # [Q, steps + 1]  1 - cos^2(a, a*)
  pm2: np.ndarray    # [Q, steps + 1]  the loss if b and c were perfect (best sign of a)
  conditions: tuple[str, ...]


def _loss(a, b, c, a_t, b_t, c_t):
  """(1/2N) ||T* - a(x)b(x)c||^2 without forming the tensors (rank-1 inner products)."""
  n = a.shape[0] ** 3
  sq = lambda x, y, z: (x @ x) * (y @ y) * (z @ z)
  cross = (a @ a_t) * (b @ b_t) * (c @ c_t)
  return (sq(a_t, b_t, c_t) - 2 * cross + sq(a, b, c)) / (2 * n)


def run(steps: int = 1000, lr: float = 1.0, seed: int = 1,
        conditions: tuple[str, ...] = tuple(CONDITIONS)) -> ToyCurves:
  """Full-batch gradient descent on the toy model for `steps` updates under each
  condition (vmapped, one `lax.scan`); the measures after init and after every update."""
  unknown = [c for c in conditions if c not in CONDITIONS]
  if unknown:
    raise ValueError(f"unknown toy condition(s) {unknown}; allowed: {list(CONDITIONS)}")
  if steps < 1:
    raise ValueError(f"toy steps must be >= 1, got {steps}")
  if not (np.isfinite(lr) and lr > 0):
    raise ValueError(f"toy learning rate must be a finite number > 0, got {lr}")
  keys = jax.random.split(jax.random.key(seed), 6)
  a_t, b_t, c_t, a0, b0, c0 = (jax.random.normal(k, (DIM,)) for k in keys)
  n = DIM ** 3
  clamp_BC = jnp.asarray([CONDITIONS[c] for c in conditions])

  def one(clamp_b_c):
    def fix(a, b, c):
      return (a, jnp.where(clamp_b_c[0], b_t, b), jnp.where(clamp_b_c[1], c_t, c))

    def measures(a, b, c):
      cos2 = (a @ a_t) ** 2 / ((a @ a) * (a_t @ a_t))
      pm2 = jnp.minimum(_loss(a, b_t, c_t, a_t, b_t, c_t), _loss(-a, b_t, c_t, a_t, b_t, c_t))
      # The closed form can round a hair below 0; the loss is a sum of squares.
      return jnp.maximum(jnp.stack([_loss(a, b, c, a_t, b_t, c_t), 1 - cos2, pm2]), 0.0)

    def step(abc, _):
      a, b, c = abc
      # dL/da = -(1/N) [a* (b*.b)(c*.c) - a |b|^2 |c|^2], and symmetrically.
      ga = -(a_t * (b_t @ b) * (c_t @ c) - a * (b @ b) * (c @ c)) / n
      gb = -(b_t * (a_t @ a) * (c_t @ c) - b * (a @ a) * (c @ c)) / n
      gc = -(c_t * (a_t @ a) * (b_t @ b) - c * (a @ a) * (b @ b)) / n
      new = fix(a - lr * ga, b - lr * gb, c - lr * gc)
      return new, measures(*new)

    init = fix(a0, b0, c0)
    _, traj = jax.lax.scan(step, init, None, length=steps)
    return jnp.concatenate([measures(*init)[None], traj])  # [steps + 1, 3]

  out = np.asarray(jax.jit(jax.vmap(one))(clamp_BC))
  return ToyCurves(out[..., 0], out[..., 1], out[..., 2], tuple(conditions))
