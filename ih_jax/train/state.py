"""The training state of a program (TrainState), its initialisation and its optimizer."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ih_jax import optim
from ih_jax import warmstart
from ih_jax.config import ExperimentConfig
from ih_jax.train.experiment import Experiment, init_params
from ih_jax.train.placement import place_state

# pylint: disable=invalid-name


class TrainState(NamedTuple):
  """The training state of every run of a program, stacked on the runs axis."""
  params: Any          # runs-stacked params [R_pad, ...]
  opt_state: Any       # runs-stacked Adam state
  data_key: jax.Array  # [V] training-stream keys, one per data variant
  step: jax.Array      # updates done (int32 scalar)


def make_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
  """One config's optimizer (with the defaults, plain Adam: a zero gradient leaves a
  parameter unchanged, which the frozen parts of clamped runs rely on)."""
  return optim.transformation(optim.plan_for([cfg.train]))


def optimizer_plan(exp: Experiment) -> optim.OptimizerPlan:
  """The program's optimizer: static kind, numbers shared or per data variant."""
  return optim.plan_for([v.cfg.train for v in exp.variants])


def init_state(exp: Experiment, warm_start: bool = True) -> TrainState:
  """The initial TrainState: every run's params from its init seed (or, with
  train.init_from and `warm_start`, from that workdir's params except train.reinit's
  groups) with fresh optimizer state, one training-stream key per data variant (from
  its train_seed), step 0, placed on the device(s)."""
  cfg = exp.cfg
  init = lambda key: init_params(key, cfg, exp.features.shape[-1])
  donor = None
  if warm_start and cfg.train.init_from:
    donor = warmstart.load(cfg.train.init_from, jax.eval_shape(lambda: init(jax.random.key(0))))

  @jax.jit  # one compiled program (eagerly, the optimizer's init is dozens of dispatches)
  def params_and_opt_state(seeds, donor):
    params = jax.vmap(lambda s: init(jax.random.key(s)))(seeds)
    if donor is not None:
      params = warmstart.combine(params, donor, cfg.train.reinit, cfg.model.num_heads)
    return params, jax.vmap(optim.transformation(optimizer_plan(exp)).init)(params)

  params, opt_state = params_and_opt_state(jnp.asarray(exp.run_init_seeds), donor)
  # Per variant: train_seed -> (data key, model key); the model key is unused (no dropout).
  data_keys = jnp.stack([jax.random.split(jax.random.key(v.cfg.train.train_seed))[0]
                         for v in exp.variants])
  return place_state(exp, TrainState(params, opt_state, data_keys, jnp.zeros((), jnp.int32)))
