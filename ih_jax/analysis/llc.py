"""The local learning coefficient (LLC), estimated with SGLD, vmapped over chains and
checkpoints (and runs: stack them on the same axis).

  LLC(w*) = n*beta * (E_w[L(w)] - L(w*)),

the expectation over the tempered posterior localised at w*,
p(w) ~ exp(-n*beta * L(w) - gamma/2 * |w - w*|^2), sampled with SGLD (Lau et al. 2023,
the estimator devinterp's `estimate_learning_coeff` computes):

  w <- w - eps/2 * (n*beta * grad L_m(w) + gamma * (w - w*)) + N(0, eps),

L_m the mean loss on a fresh minibatch of the data stream (drawn on device). Default
n*beta = n / log n (beta* = 1 / log n). Each step also evaluates L_m(w*) on the same
minibatch, and the estimate averages the paired differences L_m(w_t) - L_m(w*) (the same
expectation as with one initial loss; less variance). A `restrict` mask moves only a
parameter subset (one head's Q/K/V/O, one layer: ih_jax.freeze groups) for per-head or
per-layer LLCs; the rest stays at w*.

Every (checkpoint, chain) draws its own key (`fold_in` of the caller's key by index),
so the numbers do not depend on how the work is batched. `diagnose` flags chains that
diverge, drift or do not move, with the setting to change.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import clamps as clamps_lib
from ih_jax import freeze as freeze_lib
from ih_jax import model as model_lib
from ih_jax import tasks as tasks_lib
from ih_jax.analysis import pointmap

# pylint: disable=invalid-name


@dataclasses.dataclass(frozen=True)
class SGLDConfig:
  """SGLD settings of an LLC estimate (names as in devinterp where they exist)."""
  step_size: float = 1e-4       # eps
  gamma: float = 100.0          # localisation strength
  num_samples: int = 10_000     # n (the data-set size the posterior is tempered for)
  nbeta: float | None = None    # n*beta; None = n / log n
  num_chains: int = 4
  num_draws: int = 200          # steps whose losses enter the estimate
  num_burnin: int = 0           # steps before them, discarded
  batch_size: int = 64          # minibatch per step

  def __post_init__(self):
    for name in ("step_size", "gamma"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"SGLDConfig.{name} must be a finite number >= 0, got {v!r}")
    if self.step_size <= 0:
      raise ValueError(f"SGLDConfig.step_size must be > 0, got {self.step_size}")
    if self.num_samples < 2:
      raise ValueError(f"SGLDConfig.num_samples (n) must be >= 2, got {self.num_samples}")
    if self.nbeta is not None and not self.nbeta > 0:
      raise ValueError(f"SGLDConfig.nbeta must be > 0 (or None for n / log n), got {self.nbeta}")
    for name in ("num_chains", "num_draws", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"SGLDConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_burnin < 0:
      raise ValueError(f"SGLDConfig.num_burnin must be >= 0, got {self.num_burnin}")

  @property
  def effective_nbeta(self) -> float:
    """n*beta: `nbeta`, or n / log n."""
    return float(self.nbeta) if self.nbeta is not None else \
        self.num_samples / math.log(self.num_samples)


class LLCResult(NamedTuple):
  """An LLC estimate (host arrays; leading [K] = checkpoints / runs as stacked)."""
  llc: np.ndarray          # [K] mean over chains
  llc_std: np.ndarray      # [K] spread (std) over chains
  llc_chains: np.ndarray   # [K, C] each chain's estimate
  excess: np.ndarray       # [K, C, S] L_m(w_t) - L_m(w*) per step (burn-in included)
  loss_star: np.ndarray    # [K] mean L_m(w*) over the steps' minibatches
  distance: np.ndarray     # [K, C, S] rms |w_t - w*| per moved parameter
  nbeta: float
  num_burnin: int


def _sgld_chain(loss_fn: Callable, w_star: Any, extra: Any, sample: Callable,
                key: jax.Array, cfg: SGLDConfig, mask: Any | None):
  """One chain from w*: (excess [S], loss at w* [S], rms distance [S])."""
  nbeta = cfg.effective_nbeta
  eps = cfg.step_size
  steps = cfg.num_burnin + cfg.num_draws
  grad_fn = jax.value_and_grad(lambda w, b: loss_fn(w, b, extra))
  n_moved = sum(jnp.sum(m) for m in jax.tree.leaves(mask)) if mask is not None \
      else sum(int(np.prod(x.shape)) for x in jax.tree.leaves(w_star))

  def step(w, k):
    k_batch, k_noise = jax.random.split(k)
    batch = sample(k_batch, cfg.batch_size)
    loss, g = grad_fn(w, batch)
    loss_star = loss_fn(w_star, batch, extra)
    leaves, treedef = jax.tree.flatten(w)
    noise_keys = jax.tree.unflatten(treedef, list(jax.random.split(k_noise, len(leaves))))

    def update(x, x0, gx, kx, m):
      dx = (-0.5 * eps * (nbeta * gx + cfg.gamma * (x - x0))
            + math.sqrt(eps) * jax.random.normal(kx, x.shape, x.dtype))
      return x + (dx if m is None else jnp.where(m, dx, 0.0))

    masks = mask if mask is not None else jax.tree.map(lambda _: None, w)
    new_w = jax.tree.map(update, w, w_star, g, noise_keys, masks,
                         is_leaf=lambda x: x is None)
    sq = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(w),
                                                         jax.tree.leaves(w_star)))
    return new_w, (loss - loss_star, loss_star, jnp.sqrt(sq / jnp.maximum(n_moved, 1)))

  _, (excess, loss_star, dist) = jax.lax.scan(step, w_star, jax.random.split(key, steps))
  return excess, loss_star, dist


def estimate(loss_fn: Callable[[Any, Any, Any], jax.Array], params_K: Any,
             sample: Callable[[jax.Array, int], Any], key: jax.Array,
             cfg: SGLDConfig = SGLDConfig(), *, extras_K: Any = None,
             restrict: Any | None = None, restrict_K: Any | None = None,
             ckpt_batch: int = 4) -> LLCResult:
  """LLC estimates of K stacked parameter points (checkpoints, runs, or both flattened).

  loss_fn(params, batch, extra) -> scalar mean loss (the training loss: for a model,
    its negative log-likelihood per sample); `extra` is the item's entry of `extras_K`
    (e.g. a run's clamps), None without.
  sample(key, batch_size) -> a batch, in-graph.
  restrict: a params-shaped tree of bools (one point's shape): only True entries move.
  restrict_K: the same with a leading [K] axis, one mask per point (e.g. every head's
    LLC at every checkpoint in one program); not with `restrict`.
  One compiled program: lax.map over points (vmapped `ckpt_batch` at a time; the points
  split over the local devices, ih_jax.analysis.pointmap), vmap over
  chains, lax.scan over steps.
  """
  K = jax.tree.leaves(params_K)[0].shape[0]
  C = cfg.num_chains
  keys_KC = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(jnp.arange(C)))(
      jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(K)))
  if restrict is not None and restrict_K is not None:
    raise ValueError("pass restrict (one mask for every point) or restrict_K (one per point), "
                     "not both")
  as_bool = lambda t: None if t is None else jax.tree.map(lambda m: np.asarray(m, bool), t)  # noqa: E731
  mask, mask_K = as_bool(restrict), as_bool(restrict_K)
  if mask_K is not None and jax.tree.leaves(mask_K)[0].shape[0] != K:
    raise ValueError(f"restrict_K has {jax.tree.leaves(mask_K)[0].shape[0]} masks for {K} points")
  run = _program(loss_fn, sample, cfg, max(1, min(ckpt_batch, K)))
  excess, loss_star, dist = jax.device_get(run(params_K, extras_K, keys_KC, mask, mask_K))
  nbeta = cfg.effective_nbeta
  draws = excess[:, :, cfg.num_burnin:].astype(np.float64)
  llc_chains = nbeta * draws.mean(-1)
  return LLCResult(llc_chains.mean(-1), llc_chains.std(-1), llc_chains, excess,
                   loss_star.mean((1, 2)), dist, nbeta, cfg.num_burnin)


@functools.lru_cache(maxsize=32)
def _program(loss_fn: Callable, sample: Callable, cfg: SGLDConfig, ckpt_batch: int):
  """The jitted estimate, one per (loss, sampler, settings): calling `estimate` again
  with the same functions (more checkpoints, another run) reuses the compiled program."""
  @jax.jit
  def run(params_K, extras_K, keys_KC, mask, mask_K):
    def one_point(point, shared_mask):
      w_star, extra, keys_C, own_mask = point
      m = own_mask if own_mask is not None else shared_mask
      return jax.vmap(lambda k: _sgld_chain(loss_fn, w_star, extra, sample, k, cfg, m))(keys_C)
    # Points split over the local devices (one per CPU core), ckpt_batch at a time.
    return pointmap.map_points(one_point, (params_K, extras_K, keys_KC, mask_K), mask,
                               ckpt_batch)
  return run


def diagnose(result: LLCResult, cfg: SGLDConfig) -> list[str]:
  """Warnings (empty: none) about chains that diverge, drift or do not move, each
  naming the point, the chain and the setting to change."""
  out = []
  draws = result.excess[:, :, result.num_burnin:]
  S = draws.shape[-1]
  for k in range(draws.shape[0]):
    for c in range(draws.shape[1]):
      tr = draws[k, c].astype(np.float64)
      where = f"point {k}, chain {c}"
      if not np.all(np.isfinite(tr)):
        out.append(f"{where}: the loss became non-finite (diverged): lower step_size "
                   f"(now {cfg.step_size:g}) or raise gamma (now {cfg.gamma:g})")
        continue
      if result.llc_chains[k, c] < 0:
        out.append(f"{where}: negative estimate {result.llc_chains[k, c]:.3g}: w* is not a "
                   "local minimum of the sampled loss, or the chain is too noisy: lower "
                   "step_size, raise gamma, or use more draws / a larger batch_size")
      # Within ~16 float32 roundings of the loss: the chain did not leave w*.
      scale = abs(float(result.loss_star[k])) + 1e-12
      if np.abs(tr).max() < 1e-6 * scale:
        out.append(f"{where}: the loss never moved from w*'s: raise step_size (now "
                   f"{cfg.step_size:g})")
        continue
      if S >= 8:
        # Drift: the second half's trend, against the trace's own noise.
        half = tr[S // 2:]
        t = np.arange(len(half)) - (len(half) - 1) / 2
        slope = float(np.dot(t, half - half.mean()) / np.dot(t, t))
        rise = slope * len(half)
        noise = float(half.std()) + 1e-12
        if rise > 3 * noise and rise > 0.1 * abs(float(half.mean())):
          out.append(f"{where}: the loss still rises in the second half of the draws "
                     f"(+{rise:.3g} against a spread of {noise:.3g}): the chain has not "
                     "settled: lower step_size, raise gamma, or add num_burnin")
  return out


# ------------------------------------------------------------------ the ih_jax model

def model_loss_and_sampler(cfg: Any, plan: clamps_lib.ClampPlan = clamps_lib.NO_CLAMPS,
                           task: tasks_lib.Task | None = None
                           ) -> tuple[Callable, Callable, tasks_lib.Task]:
  """(loss_fn(params, batch, extra), sample(key, batch_size), task) of an
  ExperimentConfig's model and task: the training loss under the clamps (`plan`: the
  static plan of the clamps passed; NO_CLAMPS for unclamped runs), on fresh batches of
  the training stream (the first data variant's).

  `extra` (each point's entry of `estimate`'s extras_K) is the point's clamps; when the
  plan has windows or ramps (`plan.scheduled`: clamps that act only in part of the
  run), it is (clamps, seqs) with seqs the point's sequences seen, so the clamps act at
  each checkpoint as they did in training there (`point_extras` builds it)."""
  task = task if task is not None else tasks_lib.for_config(cfg)
  task.check()
  data = task.setup([cfg])
  per_variant, shared = task.sampling_inputs(data.data_V)
  table = jax.tree.map(lambda x: x[0], per_variant)
  timed = bool(plan.scheduled)

  def loss_fn(params, batch, extra):
    clamps, seqs = extra if timed else (extra, None)
    def forward(b, *, sites=(), query_only=False):
      return model_lib.apply(params, b, clamps, cfg.model, plan, sites=sites,
                             query_only=query_only, seqs=seqs, task=task)
    return task.loss(forward, batch)

  def sample(key, batch_size):
    return task.sample(key, table, shared, batch_size)

  return loss_fn, sample, task


def restrict_mask(template: Any, groups: Sequence[str], num_heads: int) -> Any:
  """A params-shaped bool tree: the union of ih_jax.freeze groups (e.g. ("L2H3",) for
  one head's Q/K/V/O, ("L1",) for a layer, ("L2H3.qk",) for part of a head)."""
  masks = [freeze_lib.group_mask(template, g, num_heads) for g in groups]
  if not masks:
    raise ValueError("restrict_mask needs at least one group")
  return jax.tree.map(lambda *ms: np.logical_or.reduce(ms), *masks)


def point_extras(clamps_K: Any, seqs_K: Sequence[int], plan: clamps_lib.ClampPlan) -> Any:
  """extras_K for `estimate` with `model_loss_and_sampler(cfg, plan)`'s loss: each point's
  clamps ([K]-stacked), with each point's sequences seen when the plan has windows."""
  if not plan.scheduled:
    return clamps_K
  K = jax.tree.leaves(clamps_K)[0].shape[0]
  if len(seqs_K) != K:
    raise ValueError(f"seqs_K has {len(seqs_K)} entries for {K} points")
  return clamps_K, np.asarray(seqs_K, np.int32)
