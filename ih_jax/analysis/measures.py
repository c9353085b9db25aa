"""Progress measures on a fixed set of sequences, vmapped over checkpoints and clamps.

`measure(params_K, ...)` evaluates a stack of K checkpoints (leading axis) on an
index-form sequence set (e.g. the 78,400-sequence dense analysis set),
optionally under a stack of Q clamp conditions, in ONE compiled program: a
`lax.map` over checkpoints (vmapped in groups of `ckpt_batch`), a `vmap` over
conditions, and a `lax.scan` over sequence chunks whose features are gathered per
chunk (the dense set's features never exist all at once; a set with few distinct
exemplars passes them as a small table that each chunk embeds once). Conditions that
need fewer forward passes than the rest of the stack may get their own program
(`MIN_SPLIT_PASSES`).

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
from ih_jax import tasks as tasks_lib
from ih_jax.analysis import pointmap
from ih_jax.interventions import core
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
  # Without pattern scores only the query logits matter: the last layer then runs at
  # the query position alone (the eval path of training; same numbers up to rounding).
  pattern_scores = any(s.source == "pattern" for s in head_scores)
  sites = tuple(f"blocks.{l}.pattern" for l in range(L)) if pattern_scores else ()
  query_only = not pattern_scores and tasks_lib.for_model(cfg).supports_query_only
  logits, aux = model_lib.apply(params, batch, clamps, cfg, plan, sites,
                                query_only=query_only, seqs=seqs)
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


# (sequences per chunk, checkpoints vmapped at a time). On CPU small chunks of one
# checkpoint keep the activations in cache (and use the model's sliced attention, for
# batches up to model.SLICE_MAX_B): 100 checkpoints' progress measures on the 78,400
# dense set 1.7x faster than 2048 x 4, loss-only measures 1.9x (BUILD_NOTES.md,
# session 15). Accelerators keep the larger work units (not measured there).
_DEFAULT_BATCHES = {True: (256, 1), False: (2048, 4)}


def _as_table_rows(features_CEF: jax.Array, chunk_idx: sampler.SequenceIndices
                   ) -> tuple[jax.Array, sampler.SequenceIndices | sampler.Batch]:
  """The set's distinct (class, exemplar) rows as a table [U, F] and the chunks as row
  ids (a Batch of ids [S/b, b, N] and labels), when U is below one chunk's exemplar
  count: the model then embeds each distinct exemplar once per chunk instead of every
  token (the dense set has 50 rows for 78,400 x 3 exemplars). Else unchanged."""
  tokens = np.asarray(chunk_idx.classes[0]).size
  as_rows = sampler.indexed_set(jnp.asarray(features_CEF)[None], chunk_idx)  # V = 1
  table, ids = as_rows.x.table[0], as_rows.x.ids[0]
  if table.shape[0] >= tokens:
    return features_CEF, chunk_idx
  return table, sampler.Batch(x=ids, y=chunk_idx.labels)


def measure(params_K: Any, features_CEF: jax.Array, idx: sampler.SequenceIndices,
            cfg: model_lib.ModelConfig, clamps_Q: clamps_lib.Clamps | None = None, *,
            seq_batch: int | None = None, ckpt_batch: int | None = None,
            per_sequence: bool = False,
            head_scores: Sequence[str | scores_lib.HeadScore] | None = None,
            seqs_K: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Measures for K stacked checkpoints (x Q stacked clamp conditions, if given).

  Returns host arrays: loss, acc [K(, Q)]; each head score (`head_scores`, default:
  every registered one, ih_jax.analysis.scores) [K(, Q), L, H]; and with
  per_sequence=True, seq_loss and seq_correct (0/1) [K(, Q), S].
  seq_batch, ckpt_batch: sequences per chunk and checkpoints vmapped at a time (default:
  256 x 1 on CPU, 2048 x 4 elsewhere); the numbers do not depend on them beyond rounding.
  seqs_K: each checkpoint's sequences seen; needed when a condition has windows (a run
  trained with `pt:L1H3@[0,200000)` is measured at each checkpoint under the clamps
  that acted there).
  """
  K = jax.tree.leaves(params_K)[0].shape[0]
  default_seq, default_ckpt = _DEFAULT_BATCHES[jax.default_backend() == "cpu"]
  seq_batch, ckpt_batch = seq_batch or default_seq, ckpt_batch or default_ckpt
  if clamps_Q is not None:
    groups = _pass_groups(clamps_Q, K * idx.classes.shape[0])
    if len(groups) > 1:
      kw = dict(seq_batch=seq_batch, ckpt_batch=ckpt_batch, per_sequence=per_sequence,
                head_scores=head_scores, seqs_K=seqs_K)
      parts = [measure(params_K, features_CEF, idx, cfg,
                       jax.tree.map(lambda x, rows=rows: np.asarray(x)[rows], clamps_Q), **kw)
               for rows in groups]
      back = np.argsort(np.concatenate(groups))  # the callers' condition order
      return {k: np.concatenate([p[k] for p in parts], axis=1)[:, back] for k in parts[0]}
  chosen = scores_lib.resolve(head_scores)
  chunk_idx, chunk_w, S = _chunks(idx, seq_batch)
  # A score a user registered may read batch.x as gathered features: keep them then.
  if all(any(s is b for b in scores_lib.BUILTINS) for s in chosen if s.source == "pattern"):
    features_CEF, chunk_idx = _as_table_rows(features_CEF, chunk_idx)
  plan = clamps_lib.NO_CLAMPS if clamps_Q is None else clamps_lib.plan_for(clamps_Q)
  timed = bool(plan.scheduled)
  if timed and seqs_K is None:
    raise ValueError(f"the conditions apply {', '.join(plan.scheduled)} inside windows of "
                     "training: pass seqs_K (each checkpoint's sequences seen)")
  if seqs_K is not None and len(seqs_K) != K:
    raise ValueError(f"seqs_K has {len(seqs_K)} entries for {K} checkpoints")
  seqs_dev = jnp.asarray(seqs_K if timed else np.zeros(K), jnp.int32)
  run = _measure_program(cfg, plan, clamps_Q is not None, per_sequence, min(ckpt_batch, K),
                         tuple(s for s in chosen if s.source == "pattern"),
                         isinstance(chunk_idx, sampler.Batch))
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


# A condition stacked with others runs every forward pass any of them needs (e.g. the
# clean pass of a pattern-preserving ablation). Conditions needing fewer passes get
# their own program when that saves at least this many sequence forward passes (on a
# 2-core CPU one loss-only pass over 10^6 sequences takes ~4 s, about one compile).
MIN_SPLIT_PASSES = 2_000_000


def _pass_groups(clamps_Q: clamps_lib.Clamps, points: int) -> list[np.ndarray]:
  """Condition rows grouped by the forward passes each needs (the clean pass, the
  kinds' own extra passes): one group unless splitting saves MIN_SPLIT_PASSES passes
  over `points` (checkpoints x sequences)."""
  Q = jax.tree.leaves(clamps_Q)[0].shape[0]
  most = clamps_lib.plan_for(clamps_Q).num_passes
  if (most - 1) * Q * points < MIN_SPLIT_PASSES:  # cannot save enough: skip per-row plans
    return [np.arange(Q)]
  row = lambda i: {k: np.asarray(v)[i:i + 1] for k, v in clamps_Q.items() if k != "graft_params"}
  plans = [clamps_lib.plan_for(row(i)) for i in range(Q)]
  saved = sum(most - p.num_passes for p in plans) * points
  if saved < MIN_SPLIT_PASSES:
    return [np.arange(Q)]
  passes = lambda p: (p.needs_clean_pass,
                      tuple(k for k in p.kinds if core.get(k).extra_passes))
  keys = [passes(p) for p in plans]
  return [np.array([i for i in range(Q) if keys[i] == k]) for k in dict.fromkeys(keys)]


@functools.lru_cache(maxsize=64)
def _measure_program(cfg: model_lib.ModelConfig, plan: clamps_lib.ClampPlan, clamped: bool,
                     per_sequence: bool, ckpt_batch: int,
                     head_scores: tuple[scores_lib.HeadScore, ...], table_rows: bool):
  """The jitted measure program, one per static setting: an analysis calls `measure`
  dozens of times (checkpoints, runs, clamp sets) with few distinct shapes, and a fresh
  closure per call would recompile every time (seconds each)."""

  timed = bool(plan.scheduled)

  def chunk_batch(feats, ix) -> sampler.Batch:
    if table_rows:  # feats is the set's table [U, F], ix a Batch of row ids and labels
      return sampler.Batch(x=sampler.IndexedFeatures(feats, ix.x), y=ix.y)
    return sampler.gather_features(feats, ix)

  def one_condition(params, clamps, feats, chunk_idx, chunk_w, seqs):
    seqs = seqs if timed else None
    def body(acc, inputs):
      ix, w = inputs
      sums, loss_B = batch_measures(params, chunk_batch(feats, ix), w, cfg,
                                    clamps, plan, head_scores, seqs)
      return jax.tree.map(jnp.add, acc, sums), (loss_B if per_sequence else None)
    first = jax.tree.map(lambda x: x[0], chunk_idx)
    zero = jax.eval_shape(lambda: batch_measures(
        params, chunk_batch(feats, first), chunk_w[0], cfg, clamps, plan,
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
