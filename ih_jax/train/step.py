"""The training step and the compiled training chunk of a program.

`train_step` is one run's optimizer step, a pure function of its static context
(`StepContext`, built once per program by `step_context`) and its per-run inputs.
`make_train_chunk` compiles one call that runs a device-side loop of such steps for every
run at once (vmapped over the runs axis; data sampled in-graph, no host sync) and then,
when asked, evaluates every run (ih_jax.train.evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ih_jax import clamps as clamps_lib
from ih_jax import freeze as freeze_lib
from ih_jax import model as model_lib
from ih_jax import optim
from ih_jax import tasks as tasks_lib
from ih_jax.train.evaluation import make_evaluate, make_forward
from ih_jax.train.experiment import Experiment, init_params
from ih_jax.train.flat import FlatParams
from ih_jax.train.placement import gathered, runs_sharding
from ih_jax.train.state import TrainState, optimizer_plan

# pylint: disable=invalid-name


@dataclasses.dataclass(frozen=True)
class StepContext:
  """The static inputs of a training step, the same for every run of a program."""
  task: tasks_lib.Task                # the program's task (loss, sampling)
  model: model_lib.ModelConfig
  plan: clamps_lib.ClampPlan          # the clamp kinds the program compiles
  flat: FlatParams                    # one run's params <-> a flat [P] vector
  opt_plan: optim.OptimizerPlan
  # Freeze schedules (ih_jax.freeze): the plan and its [G, P] bool group masks (flat
  # order), or None / None when no run freezes anything.
  freeze: freeze_lib.FreezePlan | None
  masks_GP: jax.Array | None
  batch_size: int                     # B, sequences per step
  # Windowed clamps need the sequences seen; a program without windows does not read it.
  timed: bool


def step_context(exp: Experiment) -> StepContext:
  """The StepContext of a program (builds the freeze masks when some run freezes)."""
  cfg = exp.cfg
  flat = FlatParams(jax.eval_shape(
      lambda: init_params(jax.random.key(0), cfg, exp.features.shape[-1])))
  fplan = freeze_lib.plan_for([v.cfg.train for v in exp.variants], cfg.model.num_layers,
                              cfg.model.num_heads)
  masks_GP = None
  if fplan is not None:
    masks_GP = jnp.stack([flat.ravel(freeze_lib.group_mask(flat.template, g, cfg.model.num_heads))
                          for g in fplan.groups])
  return StepContext(exp.task, cfg.model, exp.plan, flat, optimizer_plan(exp), fplan, masks_GP,
                     cfg.train.batch_size, bool(exp.plan.scheduled))


def loss_fn(ctx: StepContext, params: Any, batch: Any, clamps: Any, seqs: jax.Array) -> jax.Array:
  """One run's training loss (a scalar) on `batch` under its clamps; `seqs` (sequences
  seen) is read only by a program with windowed clamps (`ctx.timed`)."""
  forward = make_forward(ctx.model, ctx.task, params, clamps, ctx.plan,
                         seqs if ctx.timed else None)
  return ctx.task.loss(forward, batch)


def train_step(ctx: StepContext, flat_params: jax.Array, opt_state: Any, batch: Any,
               clamps: Any, hp: dict[str, jax.Array], window: tuple[jax.Array, jax.Array],
               step: jax.Array) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
  """One optimizer step of one run (make_train_chunk vmaps it over the runs axis).

  Args:
    ctx: the program's static context (step_context).
    flat_params: [P] float32, the run's params flat (ctx.flat: FlatParams order, padded).
    opt_state: the run's optimizer state, its params-shaped moments flat ([P]).
    batch: one training batch of ctx.batch_size sequences, as the task samples it
      (few-shot: a sampler.Batch of IndexedFeatures; token task: a TokenBatch).
    clamps: the run's clamps (ih_jax.clamps.Clamps leaves without the runs axis).
    hp: {field: [] float32}, the run's optimizer numbers that differ between runs
      (ctx.opt_plan.per_run; {} when every run shares them).
    window: ([G], [G]) int32 freeze window starts and stops in sequences, one per frozen
      group of ctx.freeze (G = 0 without freezing).
    step: [] int32, the updates done before this one (the step starts at step * B seqs).

  Returns:
    (new flat params [P], new optimizer state, loss [], global gradient norm []).
  """
  B = ctx.batch_size
  loss, grads = jax.value_and_grad(
      lambda p: loss_fn(ctx, ctx.flat.unravel(p), batch, clamps, step * B))(flat_params)
  tx = optim.transformation(ctx.opt_plan, hp, step)
  updates, opt_state = tx.update(grads, opt_state, flat_params)
  new_params = optax.apply_updates(flat_params, updates)
  if ctx.freeze is not None:
    # Frozen groups keep their values by selection: exact by construction.
    frozen_P = freeze_lib.frozen_at(ctx.masks_GP, *window, step * B)
    new_params = jnp.where(frozen_P, flat_params, new_params)
  return new_params, opt_state, loss, optax.tree.norm(grads)


def make_train_chunk(exp: Experiment, max_steps: int, flat_params_out: bool = False
                     ) -> Callable:
  """Jitted (state, n_steps, do_eval, clamps_R, features_V, eval_batches_V)
  -> (state, (losses, gnorms), evals), plus the final params as one flat [R_pad, P_pad]
  array (FlatParams order) with `flat_params_out` (for snapshots: not donated with
  the state, so the host can copy it while the next chunk runs).

  Runs n_steps (dynamic, <= max_steps) optimizer steps in a device loop, then
  evaluates if do_eval (a traced flag, so one compile serves both kinds of
  chunk; skipped evals return zeros). Per-step train loss and gradient norm land
  in [R_pad, max_steps] buffers.
  """
  ctx = step_context(exp)
  B = ctx.batch_size
  task = ctx.task
  flat = ctx.flat
  hp_R = ctx.opt_plan.per_run(exp.run_variant)  # {} unless a number differs between runs
  evaluate = make_evaluate(exp)
  R = exp.num_padded
  rs = runs_sharding(exp)
  constrain = (lambda t: t) if rs is None else \
      (lambda t: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rs), t))
  timed = ctx.timed
  # With several processes, what the host reads back is replicated in the program.
  gather = gathered(exp)
  host_out = (lambda t: t) if gather is None else \
      (lambda t: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, gather), t))

  def sample(key, table, lookup):
    return task.sample(key, table, lookup, B)

  # Variants that differ only in optimizer numbers or freeze schedules (same training
  # seed and data settings) see the same batches: each such group samples once.
  data_ident = [json.dumps([v.cfg.train.train_seed, dataclasses.asdict(v.cfg.data)],
                           sort_keys=True, default=str) for v in exp.variants]
  reps = sorted({data_ident.index(d) for d in data_ident})       # first variant of each group
  group_of_variant = np.asarray([reps.index(data_ident.index(d)) for d in data_ident])
  run_group = jnp.asarray(group_of_variant[np.asarray(exp.run_variant)])
  reps_idx = jnp.asarray(reps)

  # Per-run freeze windows ([R, G] starts and stops; G = 0 when no run freezes).
  if ctx.freeze is not None:
    windows_R = ctx.freeze.per_run(exp.run_variant)
  else:
    windows_R = (jnp.zeros((R, 0), jnp.int32),) * 2
  run_step = functools.partial(train_step, ctx)

  def chunk(state: TrainState, n_steps, do_eval, clamps_R, feats_V, batches_V):
    # The task's sampling inputs: per variant (few-shot: the training rows of each
    # variant's table) and shared (the lookup of those rows).
    table_V, lookup = task.sampling_inputs(feats_V)

    def body(i, carry):
      params, opt_state, data_key_V, losses, gnorms = carry
      keys = jax.vmap(jax.random.split)(data_key_V)
      data_key_V, batch_key_V = keys[:, 0], keys[:, 1]
      # Training sees few distinct exemplars (50 classes x 1 exemplar in the paper):
      # they are embedded once per step and gathered (IndexedFeatures).
      if len(reps) == 1:  # one batch shared by every run (one training seed and data)
        batch = sample(batch_key_V[reps[0]], jax.tree.map(lambda x: x[reps[0]], table_V),
                       lookup)
        batch_axis = None
      else:               # each run trains on its data group's batch
        batch_G = jax.vmap(lambda k, t: sample(k, t, lookup))(
            batch_key_V[reps_idx], jax.tree.map(lambda x: x[reps_idx], table_V))
        batch = jax.tree.map(lambda x: x[run_group], batch_G)
        batch_axis = 0
      params, opt_state, loss_R, gnorm_R = jax.vmap(
          run_step, in_axes=(0, 0, batch_axis, 0, 0, 0, None))(
              params, opt_state, batch, clamps_R, hp_R, windows_R, state.step + i)
      params, opt_state = constrain(params), constrain(opt_state)
      losses = losses.at[:, i].set(loss_R)
      gnorms = gnorms.at[:, i].set(gnorm_R)
      return params, opt_state, data_key_V, losses, gnorms

    # The loop carries flat params and moments (FlatParams); the state keeps its trees.
    params_R, opt_state_R = flat.ravel_state(state.params, state.opt_state)
    buf = jnp.full((R, max_steps), jnp.nan, jnp.float32)
    if rs is not None:
      buf = jax.lax.with_sharding_constraint(buf, rs)
    flat_params, opt_state, data_key, losses, gnorms = jax.lax.fori_loop(
        0, n_steps, body, (params_R, opt_state_R, state.data_key, buf, buf))
    params, opt_state = flat.unravel_state(flat_params, opt_state, state.opt_state)
    if gather is not None:  # the replicated copies below must not make the state replicated
      params, opt_state = constrain(params), constrain(opt_state)
    new_state = TrainState(params, opt_state, data_key, state.step + n_steps)
    seqs_now = new_state.step * B if timed else None  # the evaluation's point
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(evaluate, params, clamps_R, batches_V, seqs_now))
    evals = jax.lax.cond(do_eval, lambda: evaluate(params, clamps_R, batches_V, seqs_now),
                         zeros)
    logs, evals = host_out((losses, gnorms)), host_out(evals)
    if flat_params_out:
      return new_state, logs, evals, host_out(flat_params)
    return new_state, logs, evals

  return jax.jit(chunk, donate_argnums=(0,))
