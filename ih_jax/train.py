"""Scanned, vmapped training of a stack of runs (conditions x init seeds).

One compiled program trains every run of a sweep side by side: the leading axis
of params / optimizer state / clamps is the runs axis R. Between two evaluation
points the program runs a device-side loop of optimizer steps (data sampled
in-graph, no host sync), then evaluates every run on the fixed eval sets, under
its own clamps and (optionally) clamp-free. The host only dispatches one call per
evaluation point and writes the previous point's metrics while the next runs.

Entry point: `train_and_evaluate(cfg, workdir)`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ih_jax import clamps as clamps_lib
from ih_jax import model as model_lib
from ih_jax import schedule
from ih_jax import workdir as workdir_lib
from ih_jax.config import ExperimentConfig
from ih_jax.data import evalsets, features as features_lib, sampler, splits as splits_lib
from ih_jax.metrics import METRIC_NAMES, query_metrics

# pylint: disable=invalid-name


@dataclasses.dataclass(frozen=True)
class Run:
  index: int
  condition: str   # condition name
  spec: str        # canonical clamp spec (ih_jax.clamps.describe)
  init_seed: int


class TrainState(NamedTuple):
  params: Any        # runs-stacked params
  opt_state: Any     # runs-stacked Adam state
  data_key: jax.Array  # the shared training stream (split once per step)
  step: jax.Array      # updates done (int32 scalar)


@dataclasses.dataclass
class Experiment:
  """Everything derived from a config that training and evaluation need."""
  cfg: ExperimentConfig
  features: jax.Array                    # [classes, exemplars, F]
  splits: splits_lib.Splits
  train_spec: sampler.SamplerSpec
  eval_batches: dict[str, sampler.Batch]
  runs: list[Run]
  clamps: clamps_lib.Clamps              # runs-stacked, host numpy
  plan: clamps_lib.ClampPlan


def parse_conditions(entries: tuple[str, ...], num_layers: int,
                     num_heads: int) -> list[tuple[str, clamps_lib.Clamps]]:
  """'name=spec' or 'spec' entries -> [(name, clamps)], with unique names."""
  out, seen = [], set()
  for entry in entries:
    name, sep, spec = entry.partition("=")
    if not sep:
      name, spec = entry.strip(), entry
    name = name.strip()
    try:
      c = clamps_lib.parse(spec, num_layers, num_heads)
    except ValueError as e:
      raise ValueError(f"condition {entry!r}: {e}") from None
    if name in seen:
      raise ValueError(f"duplicate condition name {name!r} in sweep.conditions")
    seen.add(name)
    out.append((name, c))
  if not out:
    raise ValueError("sweep.conditions is empty; use ('none',) for a plain run")
  return out


def check_seeds(cfg: ExperimentConfig) -> None:
  t = cfg.train
  if not cfg.sweep.init_seeds:
    raise ValueError("sweep.init_seeds is empty")
  if t.train_seed == t.eval_seed:
    raise ValueError(f"train_seed and eval_seed must differ (both {t.train_seed})")
  for s in cfg.sweep.init_seeds:
    if s in (t.train_seed, t.eval_seed):
      raise ValueError(f"init seed {s} equals train_seed ({t.train_seed}) or eval_seed "
                       f"({t.eval_seed}); the three seeds must be pairwise distinct")
  if len(set(cfg.sweep.init_seeds)) != len(cfg.sweep.init_seeds):
    raise ValueError(f"duplicate init seeds in {cfg.sweep.init_seeds}")


def setup_experiment(cfg: ExperimentConfig) -> Experiment:
  """Validates the config and builds features, splits, eval sets and the runs axis."""
  check_seeds(cfg)
  if cfg.train.batch_size < 1:
    raise ValueError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
  feats = features_lib.load_features(cfg.data)
  C, E, _ = feats.shape
  splits = splits_lib.make_splits(C, E, cfg.model.num_labels, cfg.task.class_split,
                                  cfg.task.exemplar_split, cfg.task.pair_weights)
  eval_idx = evalsets.make_eval_indices(cfg.train.eval_seed, splits, cfg.evaluators,
                                        cfg.task.num_context)
  eval_batches = {k: sampler.gather_features(feats, v) for k, v in eval_idx.items()}
  conds = parse_conditions(cfg.sweep.conditions, cfg.model.num_layers, cfg.model.num_heads)
  runs, per_run = [], []
  for name, c in conds:
    for seed in cfg.sweep.init_seeds:
      runs.append(Run(len(runs), name, clamps_lib.describe(c), int(seed)))
      per_run.append(c)
  stacked = clamps_lib.stack(per_run)
  return Experiment(cfg, feats, splits, evalsets.train_spec(splits), eval_batches, runs,
                    stacked, clamps_lib.plan_for(stacked))


def init_state(exp: Experiment) -> TrainState:
  cfg = exp.cfg
  seeds = jnp.asarray([r.init_seed for r in exp.runs], jnp.uint32)
  init = lambda key: model_lib.init_params(key, cfg.model, exp.features.shape[-1],
                                           cfg.task.num_context)
  params = jax.jit(jax.vmap(lambda s: init(jax.random.key(s))))(seeds)
  opt_state = jax.vmap(make_optimizer(cfg).init)(params)
  data_key, _model_key = jax.random.split(jax.random.key(cfg.train.train_seed))
  return TrainState(params, opt_state, data_key, jnp.zeros((), jnp.int32))


def make_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
  # Plain Adam: a zero gradient leaves a parameter unchanged, which the frozen
  # parts of clamped runs rely on (AdamW's decay would shrink them).
  return optax.adam(cfg.train.learning_rate)


def make_evaluate(exp: Experiment) -> Callable:
  """(params_R, clamps_R, eval_batches) -> {set: {'clamped'|'unclamped': {metric: [R]}}}."""
  cfg = exp.cfg

  def one_run(params, clamps, batch, clamped: bool):
    if clamped:
      logits, _ = model_lib.apply(params, batch, clamps, cfg.model, exp.plan)
    else:
      logits, _ = model_lib.apply(params, batch, None, cfg.model)
    return {k: v.mean() for k, v in query_metrics(logits, batch.y).items()}

  def evaluate(params_R, clamps_R, batches):
    out = {}
    for name, batch in batches.items():
      res = {"clamped": jax.vmap(lambda p, c: one_run(p, c, batch, True))(params_R, clamps_R)}
      if cfg.train.eval_unclamped and exp.plan != clamps_lib.NO_CLAMPS:
        res["unclamped"] = jax.vmap(lambda p: one_run(p, None, batch, False))(params_R)
      out[name] = res
    return out

  return evaluate


def make_train_chunk(exp: Experiment, max_steps: int) -> Callable:
  """Jitted (state, n_steps, clamps_R, features, eval_batches) -> (state, log, evals).

  Runs n_steps (dynamic, <= max_steps) optimizer steps in a device loop, then
  evaluates. Per-step train loss and gradient norm land in [R, max_steps] buffers.
  """
  cfg = exp.cfg
  B, n = cfg.train.batch_size, cfg.task.num_context
  tx = make_optimizer(cfg)
  evaluate = make_evaluate(exp)
  R = len(exp.runs)

  def loss_fn(params, batch, clamps):
    logits, _ = model_lib.apply(params, batch, clamps, cfg.model, exp.plan)
    return model_lib.query_loss(logits, batch.y)

  def run_step(params, opt_state, batch, clamps):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, clamps)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

  def chunk(state: TrainState, n_steps, clamps_R, feats, batches):
    def body(i, carry):
      params, opt_state, data_key, losses, gnorms = carry
      data_key, batch_key = jax.random.split(data_key)
      # One batch shared by every run (it depends only on train_seed).
      batch = sampler.sample_batch(batch_key, feats, exp.train_spec, B, n)
      params, opt_state, loss_R, gnorm_R = jax.vmap(run_step, in_axes=(0, 0, None, 0))(
          params, opt_state, batch, clamps_R)
      losses = losses.at[:, i].set(loss_R)
      gnorms = gnorms.at[:, i].set(gnorm_R)
      return params, opt_state, data_key, losses, gnorms

    buf = jnp.full((R, max_steps), jnp.nan, jnp.float32)
    params, opt_state, data_key, losses, gnorms = jax.lax.fori_loop(
        0, n_steps, body, (state.params, state.opt_state, state.data_key, buf, buf))
    new_state = TrainState(params, opt_state, data_key, state.step + n_steps)
    return new_state, (losses, gnorms), evaluate(params, clamps_R, batches)

  return jax.jit(chunk, donate_argnums=(0,))


@dataclasses.dataclass
class TrainResult:
  runs: list[Run]
  params: Any                  # runs-stacked final params (host)
  metrics: list[dict[str, Any]]  # one row per run x eval point x eval set x clamped
  train_seqs: np.ndarray       # [S] sequences label of each step's loss
  train_loss: np.ndarray       # [R, S]
  grad_norm: np.ndarray        # [R, S]
  wall_s: float
  compile_s: float


def _progress_line(seqs: int, total: int, rate: float, rows: list[dict], runs: list[Run],
                   elapsed: float) -> str:
  set_name = rows[0]["eval_set"]  # the first evaluator (fsl_train in the paper configs)
  losses = {r["run"]: r["loss"] for r in rows
            if r["eval_set"] == set_name and r["clamped"] == 1}
  shown = ", ".join(f"{runs[i].condition}/s{runs[i].init_seed}={l:.3f}"
                    for i, l in list(losses.items())[:4])
  more = f" (+{len(losses) - 4} runs)" if len(losses) > 4 else ""
  speed = f"{rate:,.0f} seq/s per run, ETA {(total - seqs) / rate:.0f}s" if rate > 0 else "starting"
  return (f"[ih_jax] {seqs:>10,d}/{total:,d} seqs ({100 * seqs / total:5.1f}%) | "
          f"{set_name} loss {shown}{more} | {speed} | {elapsed:.1f}s elapsed")


def train_and_evaluate(cfg: ExperimentConfig, workdir: str | None = None, *,
                       overwrite: bool = False, verbose: bool = True) -> TrainResult:
  """Trains every run of the sweep in one program; writes metrics to `workdir` if given."""
  t_start = time.time()
  exp = setup_experiment(cfg)
  B = cfg.train.batch_size
  steps = schedule.eval_steps(cfg.train.eval_every, cfg.train.num_seqs, B)
  max_chunk = max(1, max(np.diff([0] + steps)))
  total_seqs = steps[-1] * B
  writer = None
  if workdir is not None:
    writer = workdir_lib.RunWriter(workdir, exp, overwrite=overwrite)
  if verbose:
    print(f"[ih_jax] {len(exp.runs)} run(s) x {total_seqs:,d} seqs, {len(steps)} evaluations; "
          f"clamp plan: {exp.plan.num_passes} pass(es)", flush=True)

  with jax.default_matmul_precision(cfg.train.matmul_precision):
    state = init_state(exp)
    chunk_fn = make_train_chunk(exp, max_chunk)
    clamps_dev = jax.tree.map(jnp.asarray, exp.clamps)
    t0 = time.time()
    compiled = chunk_fn.lower(state, 0, clamps_dev, exp.features, exp.eval_batches).compile()
    compile_s = time.time() - t0

    metrics_rows: list[dict[str, Any]] = []
    log_seqs, log_loss, log_gnorm = [], [], []
    done, pending = 0, None
    t_train, last_print = time.time(), 0.0

    def consume(item):
      nonlocal last_print
      step_from, n_steps, (losses, gnorms), evals = item
      losses = np.asarray(losses)[:, :n_steps]
      gnorms = np.asarray(gnorms)[:, :n_steps]
      if not np.isfinite(losses).all():
        bad = sorted({exp.runs[r].condition for r in np.where(~np.isfinite(losses).all(1))[0]})
        raise FloatingPointError(f"non-finite training loss in run(s) of condition(s) {bad} "
                                 f"between steps {step_from} and {step_from + n_steps}")
      seqs_k = B * (step_from + 1 + np.arange(n_steps))  # loss of step k labelled B(k+1)
      log_seqs.append(seqs_k)
      log_loss.append(losses)
      log_gnorm.append(gnorms)
      seqs = B * (step_from + n_steps)
      rows = _eval_rows(exp.runs, seqs, step_from + n_steps, jax.device_get(evals),
                        [e.name for e in cfg.evaluators])
      metrics_rows.extend(rows)
      if writer is not None:
        writer.append(rows, seqs_k, losses, gnorms)
      now = time.time()
      if verbose and (now - last_print >= cfg.train.progress_every_s or seqs == total_seqs):
        rate = seqs / max(now - t_train, 1e-9)
        print(_progress_line(seqs, total_seqs, rate, rows, exp.runs, now - t_start), flush=True)
        last_print = now

    for target in steps:
      n_steps = target - done
      state, log, evals = compiled(state, n_steps, clamps_dev, exp.features, exp.eval_batches)
      if pending is not None:  # host work for the previous chunk overlaps this one
        consume(pending)
      pending = (done, n_steps, log, evals)
      done = target
    consume(pending)
    params = jax.device_get(state.params)

  wall = time.time() - t_start
  result = TrainResult(exp.runs, params, metrics_rows, np.concatenate(log_seqs),
                       np.concatenate(log_loss, axis=1), np.concatenate(log_gnorm, axis=1),
                       wall, compile_s)
  if writer is not None:
    writer.finish(result)
  if verbose:
    print(f"[ih_jax] done in {wall:.1f}s (compile {compile_s:.1f}s)", flush=True)
  return result


def _eval_rows(runs: list[Run], seqs: int, step: int, evals: dict,
               order: list[str]) -> list[dict[str, Any]]:
  rows = []
  for set_name in order:
    for mode in ("clamped", "unclamped"):
      if mode not in evals[set_name]:
        continue
      metrics = evals[set_name][mode]
      for r in runs:
        row = dict(run=r.index, condition=r.condition, seed=r.init_seed, seqs=seqs, step=step,
                   eval_set=set_name, clamped=int(mode == "clamped"))
        row.update({m: float(metrics[m][r.index]) for m in METRIC_NAMES})
        rows.append(row)
  return rows


def learning_time(seqs: np.ndarray, loss: np.ndarray, threshold: float = 0.4 * math.log(2)) -> float:
  """First seqs at which loss < threshold; NaN (censored) if never (SPEC §6.7)."""
  below = np.nonzero(np.asarray(loss) < threshold)[0]
  return float(np.asarray(seqs)[below[0]]) if below.size else float("nan")
