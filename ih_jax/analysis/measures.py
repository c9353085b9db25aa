"""Progress measures on a fixed set of sequences, vmapped over checkpoints and clamps.

`measure(params_K, ...)` evaluates a stack of K checkpoints (leading axis) on an
index-form sequence set (e.g. the 78,400-sequence dense analysis set),
optionally under a stack of Q clamp conditions, in ONE compiled program: a
`lax.map` over checkpoints (vmapped in groups of `ckpt_batch`), a `vmap` over
conditions, and a `lax.scan` over sequence chunks whose features are gathered per
chunk (the dense set's features never exist all at once).

Measures: loss / acc (query cross-entropy and accuracy), every registered head score
per layer and head ([L, H]; ih_jax.analysis.scores: induction strength, previous-token
scores, detection scores, composition, and any a user registers; weights scores are
computed on the host) and, if asked, per-sequence losses.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import clamps as clamps_lib
from ih_jax import model as model_lib
from ih_jax.analysis import pointmap
from ih_jax.analysis import scores as scores_lib
from ih_jax.data import sampler

# pylint: disable=invalid-name


def batch_measures(params: Any, batch: sampler.Batch, weight_B: jax.Array,
                   cfg: model_lib.ModelConfig, clamps: clamps_lib.Clamps | None = None,
                   plan: clamps_lib.ClampPlan = clamps_lib.NO_CLAMPS,
                   head_scores: tuple[scores_lib.HeadScore, ...] | None = None,
                   seqs: jax.Array | None = None) -> tuple[dict, jax.Array]:
  """Weighted sums of loss, accuracy and each head score ([L, H]) over one batch, and
  per-sequence [loss, correct] [B, 2]. `seqs`: the checkpoint's sequences seen, which
  decides which windowed clamps act (needed when `plan.scheduled`)."""
  head_scores = scores_lib.registered(source="pattern") if head_scores is None else head_scores
  L = cfg.num_layers
  sites = tuple(f"blocks.{l}.pattern" for l in range(L))
  logits, aux = model_lib.apply(params, batch, clamps, cfg, plan, sites, seqs=seqs)
  logp_BC = jax.nn.log_softmax(logits[:, -1], axis=-1)
  target_B = batch.y[:, -1]
  loss_B = -jnp.take_along_axis(logp_BC, target_B[:, None], axis=1)[:, 0]
  correct_B = (jnp.argmax(logp_BC, axis=-1) == target_B).astype(jnp.float32)
  wsum = lambda x_B: jnp.einsum("b,b...->...", weight_B, x_B)
  sums = dict(loss=wsum(loss_B), acc=wsum(correct_B))
  for score in head_scores:
    if score.source != "pattern":  # weights scores: `measure` computes them on the host
      continue
    per_layer = [score.fn(aux[s], batch) for s in sites]          # L x [B, H]
    sums[score.name] = wsum(jnp.stack(per_layer, 1))
  return sums, jnp.stack([loss_B, correct_B], axis=-1)


def _chunks(idx: sampler.SequenceIndices, seq_batch: int):
  """Pads the set to a multiple of seq_batch; returns ([S/b, b] indices, [S/b, b] weights)."""
  S = idx.classes.shape[0]
  b = min(seq_batch, S)
  pad = -S % b
  padded = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]), idx)
  weight = jnp.concatenate([jnp.ones(S), jnp.zeros(pad)])
  shape = lambda x: x.reshape((-1, b) + x.shape[1:])
  return jax.tree.map(shape, padded), shape(weight), S


def measure(params_K: Any, features_CEF: jax.Array, idx: sampler.SequenceIndices,
            cfg: model_lib.ModelConfig, clamps_Q: clamps_lib.Clamps | None = None, *,
            seq_batch: int = 2048, ckpt_batch: int = 4, per_sequence: bool = False,
            head_scores: Sequence[str | scores_lib.HeadScore] | None = None,
            seqs_K: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Measures for K stacked checkpoints (x Q stacked clamp conditions, if given).

  Returns host arrays: loss, acc [K(, Q)]; each head score (`head_scores`, default:
  every registered one, ih_jax.analysis.scores) [K(, Q), L, H]; and with
  per_sequence=True, seq_loss and seq_correct (0/1) [K(, Q), S].
  seqs_K: each checkpoint's sequences seen; needed when a condition has windows (a run
  trained with `pt:L1H3@[0,200000)` is measured at each checkpoint under the clamps
  that acted there).
  """
  chunk_idx, chunk_w, S = _chunks(idx, seq_batch)
  plan = clamps_lib.NO_CLAMPS if clamps_Q is None else clamps_lib.plan_for(clamps_Q)
  K = jax.tree.leaves(params_K)[0].shape[0]
  timed = bool(plan.scheduled)
  if timed and seqs_K is None:
    raise ValueError(f"the conditions apply {', '.join(plan.scheduled)} inside windows of "
                     "training: pass seqs_K (each checkpoint's sequences seen)")
  if seqs_K is not None and len(seqs_K) != K:
    raise ValueError(f"seqs_K has {len(seqs_K)} entries for {K} checkpoints")
  seqs_dev = jnp.asarray(seqs_K if timed else np.zeros(K), jnp.int32)
  chosen = scores_lib.resolve(head_scores)
  run = _measure_program(cfg, plan, clamps_Q is not None, per_sequence, min(ckpt_batch, K),
                         tuple(s for s in chosen if s.source == "pattern"))
  clamps_dev = None if clamps_Q is None else jax.tree.map(jnp.asarray, clamps_Q)
  out = jax.tree.map(np.asarray, run(params_K, clamps_dev, features_CEF, chunk_idx, chunk_w,
                                     seqs_dev))
  # Weights scores do not depend on the sequences or the conditions: [K, L, H] (x Q).
  for name, v_KLH in scores_lib.weight_scores(params_K, cfg, chosen).items():
    out[name] = v_KLH if clamps_Q is None else np.repeat(
        v_KLH[:, None], jax.tree.leaves(clamps_Q)[0].shape[0], axis=1)
  if per_sequence:  # drop the padding rows
    out["seq_loss"], out["seq_correct"] = out["seq_loss"][..., :S], out["seq_correct"][..., :S]
  return out


@functools.lru_cache(maxsize=64)
def _measure_program(cfg: model_lib.ModelConfig, plan: clamps_lib.ClampPlan, clamped: bool,
                     per_sequence: bool, ckpt_batch: int,
                     head_scores: tuple[scores_lib.HeadScore, ...]):
  """The jitted measure program, one per static setting: an analysis calls `measure`
  dozens of times (checkpoints, runs, clamp sets) with few distinct shapes, and a fresh
  closure per call would recompile every time (seconds each)."""

  timed = bool(plan.scheduled)

  def one_condition(params, clamps, feats, chunk_idx, chunk_w, seqs):
    seqs = seqs if timed else None
    def body(acc, inputs):
      ix, w = inputs
      sums, loss_B = batch_measures(params, sampler.gather_features(feats, ix), w, cfg,
                                    clamps, plan, head_scores, seqs)
      return jax.tree.map(jnp.add, acc, sums), (loss_B if per_sequence else None)
    first = jax.tree.map(lambda x: x[0], chunk_idx)
    zero = jax.eval_shape(lambda: batch_measures(
        params, sampler.gather_features(feats, first), chunk_w[0], cfg, clamps, plan,
        head_scores, seqs)[0])
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    sums, losses = jax.lax.scan(body, init, (chunk_idx, chunk_w))
    out = jax.tree.map(lambda x: x / chunk_w.sum(), sums)  # sum of weights = set size
    if per_sequence:
      flat = losses.reshape(-1, 2)
      out["seq_loss"], out["seq_correct"] = flat[:, 0], flat[:, 1]
    return out

  @jax.jit
  def run(params_K, clamps_Q, feats, chunk_idx, chunk_w, seqs_K):
    def one_ckpt(point, shared):
      params, seqs = point
      clamps, feats, chunk_idx, chunk_w = shared
      if not clamped:
        return one_condition(params, None, feats, chunk_idx, chunk_w, seqs)
      return jax.vmap(one_condition, in_axes=(None, 0, None, None, None, None))(
          params, clamps, feats, chunk_idx, chunk_w, seqs)
    # Checkpoints split over the local devices (one per CPU core), ckpt_batch at a time.
    return pointmap.map_points(one_ckpt, (params_K, seqs_K),
                               (clamps_Q, feats, chunk_idx, chunk_w), ckpt_batch)

  return run


def conditions(specs: list[str], cfg: model_lib.ModelConfig,
               base: clamps_lib.Clamps | None = None) -> clamps_lib.Clamps:
  """Clamp spec strings -> a stacked clamp pytree (one row per spec).

  With `base` (a run's own clamps), each spec is applied on top of it
  (`clamps.combine`): the post-hoc condition measured on the run as it was trained.
  """
  rows = [clamps_lib.parse(s, cfg.num_layers, cfg.num_heads) for s in specs]
  if base is None:
    return clamps_lib.stack(rows)
  rows = [clamps_lib.combine(base, r) for r in rows]
  donor = rows[0].pop("graft_params", None)
  for r in rows[1:]:
    r.pop("graft_params", None)
  out = clamps_lib.stack(rows)
  if donor is not None:  # the grafted run's donor, the same for every condition
    out["graft_params"] = jax.tree.map(lambda x: np.stack([np.asarray(x)] * len(rows)), donor)
  return out


def applicable(specs: list[str], cfg: model_lib.ModelConfig,
               base: clamps_lib.Clamps | None) -> tuple[list[str], dict[str, str]]:
  """The specs that can be applied on top of `base`, and why the others cannot."""
  if base is None:
    return list(specs), {}
  ok, skipped = [], {}
  for s in specs:
    try:
      clamps_lib.combine(base, clamps_lib.parse(s, cfg.num_layers, cfg.num_heads))
      ok.append(s)
    except ValueError as e:
      skipped[s] = str(e)
  return ok, skipped


def measure_under(params_K: Any, features_CEF: jax.Array, idx: sampler.SequenceIndices,
                  cfg: model_lib.ModelConfig, base: clamps_lib.Clamps | None,
                  **kw) -> dict[str, np.ndarray]:
  """`measure` of K checkpoints under one condition (a run's own clamps, or None)."""
  if base is None:
    return measure(params_K, features_CEF, idx, cfg, **kw)
  out = measure(params_K, features_CEF, idx, cfg, conditions(["none"], cfg, base), **kw)
  return {k: v[:, 0] for k, v in out.items()}


def mean_patterns(params: Any, features_CEF: jax.Array, idx: sampler.SequenceIndices,
                  cfg: model_lib.ModelConfig, base: clamps_lib.Clamps | None = None,
                  seqs: int | None = None) -> np.ndarray:
  """[L, H, T, T] attention patterns averaged over the given sequences (under `base`,
  at `seqs` sequences seen when it has windows)."""
  batch = sampler.gather_features(features_CEF, idx)
  sites = tuple(f"blocks.{l}.pattern" for l in range(cfg.num_layers))
  if base is None:
    clamps, plan = None, clamps_lib.NO_CLAMPS
  else:
    stacked = conditions(["none"], cfg, base)
    plan = clamps_lib.plan_for(stacked)
    clamps = jax.tree.map(lambda x: jnp.asarray(x)[0], stacked)
  seqs = seqs if plan.scheduled else None
  _, aux = jax.jit(lambda p, c, b, s: model_lib.apply(p, b, c, cfg, plan, sites=sites, seqs=s))(
      params, clamps, batch, seqs)
  return np.stack([np.asarray(aux[s]).mean(0) for s in sites])
