"""Evaluation of a program: every run on the fixed eval sets, under its own clamps and
(with train.eval_unclamped) clamp-free, inside the compiled training chunk."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import clamps as clamps_lib
from ih_jax import model as model_lib
from ih_jax import tasks as tasks_lib
from ih_jax.train.experiment import Experiment

# pylint: disable=invalid-name


def _variant_slices(exp: Experiment) -> list[tuple[int, int, int]]:
  """(variant, start, stop) of the contiguous run blocks of each variant."""
  out = []
  for v in range(len(exp.variants)):
    idx = np.nonzero(exp.run_variant == v)[0]
    out.append((v, int(idx[0]), int(idx[-1]) + 1))
  return out


def make_forward(model_cfg: model_lib.ModelConfig, task: tasks_lib.Task, params: Any,
                 clamps: Any, plan: clamps_lib.ClampPlan, seqs: Any) -> tasks_lib.Forward:
  """One run's forward pass under its interventions, as the task's `loss` / `evaluate`
  call it: forward(batch, *, sites=(), query_only=False) -> (logits, aux)."""
  def forward(batch, *, sites=(), query_only=False):
    return model_lib.apply(params, batch, clamps, model_cfg, plan, sites=sites,
                           query_only=query_only, seqs=seqs, task=task)
  return forward


def make_evaluate(exp: Experiment, stack_sets: bool = True) -> Callable:
  """(params_R, clamps_R, eval_batches_V, seqs) -> {set: {'clamped'|'unclamped': {metric:
  [R_pad]}}}; `seqs` (sequences seen) decides which windowed clamps act.

  With `stack_sets`, when every eval set has the same shapes they share one compiled
  body (a loop over the sets); otherwise each set is its own part of the program.
  """
  cfg = exp.cfg
  unclamped_too = cfg.train.eval_unclamped and exp.plan != clamps_lib.NO_CLAMPS
  blocks = _variant_slices(exp)

  task = exp.task
  many_runs = exp.num_padded > 1

  def one_run(params, clamps, batch, clamped: bool, seqs):
    forward = make_forward(cfg.model, task, params, clamps if clamped else None,
                           exp.plan if clamped else clamps_lib.NO_CLAMPS,
                           seqs if clamped else None)
    return task.evaluate(forward, batch, many_runs)

  def block(params_R, clamps_R, batch, seqs):
    res = {"clamped": jax.vmap(lambda p, c: one_run(p, c, batch, True, seqs))(params_R, clamps_R)}
    if unclamped_too:
      res["unclamped"] = jax.vmap(lambda p: one_run(p, None, batch, False, None))(params_R)
    return res

  def one_set(params_R, clamps_R, batch_V, seqs):
    parts = []
    for v, lo, hi in blocks:  # each variant's runs share that variant's eval batch
      sl = lambda t, lo=lo, hi=hi: jax.tree.map(lambda x: x[lo:hi], t)
      parts.append(block(sl(params_R) if len(blocks) > 1 else params_R,
                         sl(clamps_R) if len(blocks) > 1 else clamps_R,
                         jax.tree.map(lambda x, v=v: x[v], batch_V), seqs))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)

  def evaluate(params_R, clamps_R, batches_V, seqs=None):
    names = list(batches_V)
    if stack_sets and len(names) > 1 and _same_shapes(list(batches_V.values())):
      # Sets of one shape: one evaluation body, looped over the stacked sets. Each set's
      # own body compiled again would cost ~1.3 s of compile per set (clamped and
      # clamp-free) and compute the same.
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches_V.values())
      per_set = jax.lax.map(lambda b: one_set(params_R, clamps_R, b, seqs), stacked)
      return {n: jax.tree.map(lambda x, i=i: x[i], per_set) for i, n in enumerate(names)}
    return {n: one_set(params_R, clamps_R, b, seqs) for n, b in batches_V.items()}

  return evaluate


def _same_shapes(batches: list[Any]) -> bool:
  """Whether every batch has the same tree structure and leaf shapes and dtypes."""
  sig = lambda b: (jax.tree.structure(b),
                   [(x.shape, x.dtype) for x in jax.tree.leaves(b)])
  first = sig(batches[0])
  return all(sig(b) == first for b in batches[1:])
