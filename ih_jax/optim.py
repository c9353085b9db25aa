"""Optimizer settings as per-run data: one compiled program trains a learning-rate x
weight-decay x seed grid.

The optimizer of a program is static in its *kind* (Adam or SGD, the learning-rate
schedule's shape, whether weight decay is on anywhere) and per-run in its *numbers*
(`NUMERIC_FIELDS`: learning rate, weight decay, Adam's b1 / b2 / eps, SGD momentum,
warmup length, final learning-rate fraction). A number that is the same for every run
of a program stays a compile-time constant; only numbers that differ become a [R]
array the vmapped training step reads per run. A program with the default settings
(constant learning rate, no weight decay, Adam) therefore builds exactly
`optax.adam(learning_rate)`, as ih_jax always has.

Weight decay is decoupled (AdamW; for SGD the decayed weights are added before the
learning-rate scaling). The learning rate at step t (sequences seen = t x batch size):
a linear warmup over `warmup_seqs`, then `constant`, or a `cosine` / `linear` decay
to `final_lr_fraction` x the peak at the end of the run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ih_jax.config import TrainConfig

KINDS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
# TrainConfig fields that may differ between the runs of one program.
NUMERIC_FIELDS = ("learning_rate", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "momentum",
                  "warmup_seqs", "final_lr_fraction")


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
  """A program's optimizer: its static kind and, per numeric field, either the one value
  all runs share (`shared`) or the per-variant values (`varying`, each [V])."""
  kind: str
  schedule: str
  decay: bool                              # weight decay > 0 in some run
  total_steps: int
  batch_size: int
  shared: Mapping[str, float]
  varying: Mapping[str, np.ndarray]

  @property
  def is_plain_adam(self) -> bool:
    """optax.adam with constants: the program ih_jax has always compiled."""
    return (self.kind == "adam" and not self.varying and not self.decay
            and self.schedule == "constant" and self.shared["warmup_seqs"] == 0)

  def per_run(self, run_variant: np.ndarray) -> dict[str, jax.Array]:
    """The varying fields' values for each run: {field: [R] float32}."""
    return {f: jnp.asarray(v[run_variant], jnp.float32) for f, v in self.varying.items()}

  def describe(self) -> str:
    """One line for the progress output, e.g. 'adam, learning_rate per run (3 values)'."""
    parts = [self.kind if self.schedule == "constant" else f"{self.kind}, {self.schedule} schedule"]
    for f in NUMERIC_FIELDS:
      if f in self.varying:
        parts.append(f"{f} per run ({len(set(self.varying[f].tolist()))} values)")
      elif f == "learning_rate" or (f in ("weight_decay", "warmup_seqs") and self.shared[f]):
        parts.append(f"{f} {self.shared[f]:g}")
    return ", ".join(parts)


def plan_for(trains: Sequence[TrainConfig]) -> OptimizerPlan:
  """The plan of a program whose data variants have these train settings (variant order)."""
  first = trains[0]
  for t in trains[1:]:
    for f in ("optimizer", "lr_schedule", "batch_size", "num_seqs"):
      if getattr(t, f) != getattr(first, f):
        raise ValueError(f"train.{f} must be the same for every run of a program "
                         f"({getattr(first, f)!r} vs {getattr(t, f)!r})")
  shared, varying = {}, {}
  for f in NUMERIC_FIELDS:
    values = np.asarray([float(getattr(t, f)) for t in trains])
    if np.all(values == values[0]):
      shared[f] = float(values[0])
    else:
      varying[f] = values
  return OptimizerPlan(kind=first.optimizer, schedule=first.lr_schedule,
                       decay=any(t.weight_decay > 0 for t in trains),
                       total_steps=max(1, first.num_seqs // first.batch_size),
                       batch_size=first.batch_size, shared=shared, varying=varying)


def learning_rate_at(plan: OptimizerPlan, hp: Mapping[str, jax.Array | float],
                     step: jax.Array) -> jax.Array | float:
  """The learning rate of optimizer step `step` (0-based) under this run's settings."""
  peak = hp["learning_rate"]
  if plan.schedule == "constant" and "warmup_seqs" not in plan.varying \
      and plan.shared["warmup_seqs"] == 0:
    return peak
  t = jnp.asarray(step, jnp.float32)
  warmup = jnp.asarray(hp["warmup_seqs"], jnp.float32) / plan.batch_size
  scale = jnp.where(warmup > 0, jnp.minimum(1.0, (t + 1.0) / jnp.maximum(warmup, 1.0)), 1.0)
  if plan.schedule != "constant":
    frac = jnp.clip((t - warmup) / jnp.maximum(plan.total_steps - warmup, 1.0), 0.0, 1.0)
    final = hp["final_lr_fraction"]
    if plan.schedule == "cosine":
      decay = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    else:
      decay = 1.0 - (1.0 - final) * frac
    scale = scale * decay
  return peak * scale


def transformation(plan: OptimizerPlan, hp_run: Mapping[str, jax.Array] | None = None,
                   step: jax.Array | None = None) -> optax.GradientTransformation:
  """One run's optimizer. `hp_run` holds this run's varying fields (scalars, inside the
  vmapped step) and `step` the optimizer step; both may be None for `init`, whose state
  does not depend on them."""
  hp = dict(plan.shared)
  hp.update({f: (hp_run[f] if hp_run is not None else float(v[0]))
             for f, v in plan.varying.items()})
  if plan.is_plain_adam:
    return optax.adam(hp["learning_rate"], b1=hp["adam_b1"], b2=hp["adam_b2"],
                      eps=hp["adam_eps"])
  lr = learning_rate_at(plan, hp, step if step is not None else 0)
  if plan.kind == "adam":
    parts = [optax.scale_by_adam(b1=hp["adam_b1"], b2=hp["adam_b2"], eps=hp["adam_eps"])]
  else:  # momentum 0 is plain SGD (the trace is then the gradient itself)
    parts = [optax.trace(decay=hp["momentum"])]
  if plan.decay:
    parts.append(optax.add_decayed_weights(hp["weight_decay"]))
  parts.append(_scale_by(lr))
  return optax.chain(*parts)


def _scale_by(lr: jax.Array | float) -> optax.GradientTransformation:
  """updates -> -lr * updates, with lr a constant or a traced per-run / per-step value
  (the state is empty either way, so init needs no value)."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u: -lr * u, updates), state))
