"""Beyond the paper: the local learning coefficient (LLC) over training.

  ih-jax reproduce --figure=llc --scale=quick --workdir=/tmp/repro_llc

SGLD estimates (ih_jax.analysis.llc) at the saved checkpoints of
(a) the main run (seed 5; 50 checkpoints): where does the LLC trace turn, relative
    to the loss plateau and the phase change?
(b) each head of the main run (SGLD moves only that head's Q/K/V/O): do the strongest
    induction head and the top previous-token head separate from the other heads of
    their layer, and when?
(c) the Fig. 5b runs of seed 5, each under its own clamps: how does clamping a
    subcircuit change the trace?

All points of a section (checkpoints x runs) are one compiled program; the estimates
are cached in WORKDIR/llc.json, so a rerun of the report does not sample again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from matplotlib import ticker

from ih_jax import clamps as clamps_lib
from ih_jax import plots
from ih_jax.analysis import context, llc, measures, timing
from ih_jax.analysis import verdicts as V
from ih_jax.experiments.paper.registry_base import (Entry, Outcome, Stages, clamp_stage,
                                                    png, pt_head_name, strongest_name)
from ih_jax.experiments.paper.study import PAPER_SEED, Study, curves

# pylint: disable=invalid-name

# SGLD settings, chosen on the quick-scale main run (BUILD_NOTES.md "LLC registry
# entries"): with gamma = 1000 and step 1e-4 the chains settle within ~50 steps at every
# checkpoint after the first and none diverges; larger steps or n*beta blow up after the
# phase change, smaller gamma lets chains slide off the non-minimal plateau points.
SGLD = llc.SGLDConfig(step_size=1e-4, gamma=1000.0, num_samples=10_000, num_chains=4,
                      num_draws=150, num_burnin=50, batch_size=64)
TRACE_POINTS = 50        # checkpoints of the main-run trace (a)
FEW_POINTS = 10          # checkpoints of the per-head (b) and clamped (c) traces
FEW_CHAINS = 2           # chains per point in (b) and (c)
RISE = 1.5               # "the LLC rises at the phase change": post / plateau median above this
FLAT = 0.25              # "flat on the plateau": its range below this fraction of the rise
NEAR = 0.1               # "coincides with": within this fraction of the run's length
MOST = 2 / 3             # fraction of runs for a "most runs" verdict


def _settings(study: Study) -> tuple[llc.SGLDConfig, int, int]:
  """(SGLD settings, trace points, few points) at this scale (smoke: tests only)."""
  if study.scale.name == "smoke":
    return dataclasses.replace(SGLD, num_chains=2, num_draws=6, num_burnin=2), 4, 2
  return SGLD, TRACE_POINTS, FEW_POINTS


def _stages(study: Study, heads: dict) -> Stages:
  return [("main", study.main_config((PAPER_SEED,), dense=True)),
          clamp_stage(study, heads, PAPER_SEED)]


def _points(steps: list[int], num: int) -> list[int]:
  """`num` checkpoints spread over the run, the initialisation left out (w* there is
  not a minimum of anything: SGLD slides downhill and the estimate is negative)."""
  return context.subsample_steps([s for s in steps if s > 0], num)


def _estimate(study: Study, key: str, fn) -> dict[str, Any]:
  """fn() -> a JSON-able dict, computed once per key (WORKDIR/llc.json)."""
  return study.cached("llc.json", key, fn)


def _summ(r: llc.LLCResult, cfg: llc.SGLDConfig) -> dict[str, Any]:
  warns = llc.diagnose(r, cfg)
  return dict(llc=r.llc.tolist(), std=r.llc_std.tolist(), loss_star=r.loss_star.tolist(),
              warnings=warns[:6] + ([f"... {len(warns) - 6} more"] if len(warns) > 6 else []),
              num_warnings=len(warns))


def _settings_note(cfg: llc.SGLDConfig) -> str:
  return (f"SGLD: step size {cfg.step_size:g}, gamma {cfg.gamma:g}, n*beta {cfg.effective_nbeta:.0f} "
          f"(n = {cfg.num_samples:,d}), batch {cfg.batch_size}, {cfg.num_burnin} burn-in + "
          f"{cfg.num_draws} draws per chain")


# ------------------------------------------------------------------ (a) the main run's trace

def _trace(study: Study, cfg: llc.SGLDConfig, num: int) -> dict[str, Any]:
  ctx = context.load_context(study.stage_dir("main"))
  steps = _points(ctx.checkpoint_steps(), num)
  P = ctx.stacked_params(0, steps)
  loss_fn, sample, _ = llc.model_loss_and_sampler(ctx.cfg)
  study.log(f"[llc] main run: {len(steps)} checkpoints x {cfg.num_chains} chains")
  r = llc.estimate(loss_fn, P, sample, jax.random.key(0), cfg)
  m = measures.measure(P, ctx.features, ctx.dense_set(study.scale.head_size), ctx.cfg.model)
  L = ctx.cfg.model.num_layers
  return dict(steps=steps, **_summ(r, cfg),
              induction_strength=m["induction_strength"][:, L - 1].tolist(),
              pt_score=m["pt_score"][:, 0].tolist())


def _settled(steps: np.ndarray, y: np.ndarray) -> int:
  """Index of the first point after the leading negative estimates: early checkpoints
  (still falling from chance) are not local minima, the chains slide downhill and the
  estimate is negative; they are left out of the stage analysis (and said so)."""
  k = 0
  while k < len(y) and y[k] < 0:
    k += 1
  return k


def _steepest_rise(steps: np.ndarray, y: np.ndarray) -> float:
  """Sequences at the steepest rise of a 3-point-smoothed trace after its leading
  negative estimates (NaN if it never rises)."""
  k0 = _settled(steps, y)
  steps, y = steps[k0:], y[k0:]
  if len(y) < 3:
    return math.nan
  sm = np.convolve(np.pad(y, 1, mode="edge"), np.ones(3) / 3, mode="valid")
  slope = np.diff(sm) / np.maximum(np.diff(steps), 1e-12)
  k = int(np.argmax(slope))
  return float(0.5 * (steps[k] + steps[k + 1])) if slope[k] > 0 else math.nan


def _turns(steps: np.ndarray, y: np.ndarray, frac: float = 0.1) -> list[tuple[float, str]]:
  """Stage boundaries (Hoogland et al.: where the LLC trace changes direction), as
  (sequences, 'peak' | 'trough'): a zigzag over the trace after its leading negative
  estimates, a turn counting only once the trace has moved `frac` of its range back
  from it (smaller wiggles are the chains' noise)."""
  k0 = _settled(steps, y)
  steps, y = steps[k0:], y[k0:]
  if len(y) < 3:
    return []
  thr = frac * float(y.max() - y.min())
  out: list[tuple[float, str]] = []
  ext, direction = 0, 0            # index of the running extreme; +1 rising, -1 falling
  for k in range(1, len(y)):
    if direction == 0:
      if abs(y[k] - y[0]) > thr:
        direction, ext = (1 if y[k] > y[0] else -1), k
    elif (y[k] - y[ext]) * direction >= 0:
      ext = k                      # the trace goes on in its direction
    elif abs(y[k] - y[ext]) > thr:
      out.append((float(steps[ext]), "peak" if direction > 0 else "trough"))
      direction, ext = -direction, k
  return out


def _trace_analyze(study: Study, results: dict, heads: dict, cfg: llc.SGLDConfig,
                   num: int, out: Outcome) -> None:
  (seqs, loss), = curves(results["main"]).values()
  t = _estimate(study, f"trace:{num}:{cfg}", lambda: _trace(study, cfg, num))
  steps, y = np.asarray(t["steps"], float), np.asarray(t["llc"])
  ph = timing.phase_times(seqs, loss)
  lt, exit_ = ph["learning_time"], ph["plateau_exit"]
  hz = float(seqs.max())
  claim = ("Q: is the LLC low and flat on the loss plateau, and does it rise at the phase "
           "change (median after the learning time / median on the plateau)?")
  crit = (f"ratio > {RISE}, and the plateau's own range below {FLAT:.0%} of the rise "
          "(leading negative estimates left out)")
  usable = np.arange(len(y)) >= _settled(steps, y)
  if lt == lt and exit_ == exit_:
    on = y[usable & (steps >= 0.5 * exit_) & (steps <= exit_)]
    after = y[usable & (steps >= lt)]
    if len(on) and len(after) and np.median(on) > 0:
      ratio = float(np.median(after) / np.median(on))
      rise_ = float(np.median(after) - np.median(on))
      flat = float(on.max() - on.min())
      out.verdicts.append(V.Verdict(claim, f"plateau ({0.5 * exit_:,.0f}-{exit_:,.0f}) median "
                                    f"{np.median(on):.0f} (range {flat:.0f}), after {lt:,.0f} "
                                    f"median {np.median(after):.0f}: ratio {ratio:.2f}", crit,
                                    bool(ratio > RISE and flat < FLAT * rise_)))
    else:
      out.verdicts.append(V.Verdict(claim, "no positive estimate on the plateau, or no "
                                    "checkpoint after the learning time", crit, None))
  else:
    out.verdicts.append(V.Verdict(claim, f"the main run has no plateau / phase change "
                                  f"(learning time {lt}, plateau exit {exit_})", crit, None))
  rise = _steepest_rise(steps, y)
  lo, hi = (exit_ if exit_ == exit_ else lt), lt
  # A trace that never rises fails (it has no boundary at the phase change).
  ok = None if lt != lt else bool(rise == rise and lo - NEAR * hz <= rise <= hi + NEAR * hz)
  out.verdicts.append(V.Verdict(
      "Q: is the LLC trace's steepest rise (a stage boundary) at the phase change?",
      f"steepest rise at {rise:,.0f}; plateau exit {exit_:,.0f}, learning time {lt:,.0f}",
      f"within {NEAR:.0%} of the run's length of [plateau exit, learning time]", ok))
  turns = _turns(steps, y)
  out.notes.append(
      f"(a) LLC trace of the main run, seed {PAPER_SEED}: {len(steps)} checkpoints x "
      f"{cfg.num_chains} chains. {_settings_note(cfg)}. Loss: plateau exit {exit_:,.0f}, "
      f"steepest descent {ph['steepest_descent']:,.0f}, learning time {lt:,.0f}. Leading "
      f"checkpoints with a negative estimate (not local minima: still falling from chance), "
      f"left out of the stage analysis: {_settled(steps, y)}. Turns of the trace (stage "
      "boundaries: where it reverses by more than 10% of its range): "
      + (", ".join(f"{kind} at {s:,.0f}" for s, kind in turns) or "none") + ". "
      + f"Diagnostics: {t['num_warnings']} warning(s)"
      + (": " + "; ".join(t["warnings"]) if t["warnings"] else "") + ".\n\n"
      + "| seqs | LLC | spread (std over chains) | loss at w* |\n|---|---|---|---|\n"
      + "\n".join(f"| {s:,.0f} | {v:.1f} | {e:.1f} | {ls:.3f} |" for s, v, e, ls in
                  zip(steps, y, t["std"], t["loss_star"])))
  fig, axes = plots.subplots(3, 1, figsize=(7, 7.5), sharex=True)
  axes[0].plot(seqs, loss, lw=1.3)
  axes[0].set_ylabel("fsl_train loss")
  is_ = np.asarray(t["induction_strength"])
  pt = np.asarray(t["pt_score"])
  axes[1].plot(steps, is_.max(-1), label="induction strength (best layer-2 head)")
  axes[1].plot(steps, pt.max(-1), label="PT score (best layer-1 head)")
  axes[1].legend(fontsize=7)
  axes[2].errorbar(steps, y, yerr=t["std"], lw=1.3, capsize=2)
  axes[2].set_ylabel("LLC")
  axes[2].set_xlabel("sequences seen")
  for ax in axes:
    for x in (exit_, lt):
      if x == x:
        ax.axvline(x, color="gray", ls=":", lw=1)
    ax.grid(alpha=0.3)
  axes[0].set_title(f"LLC over the main run (seed {PAPER_SEED}); dotted: plateau exit, "
                    "learning time", fontsize=9)
  out.figures += png(plots._save(fig, study.figure_dir, "llc_trace"))  # pylint: disable=protected-access


# ------------------------------------------------------------------ (b) per-head LLCs

def _per_head(study: Study, cfg: llc.SGLDConfig, num: int) -> dict[str, Any]:
  ctx = context.load_context(study.stage_dir("main"))
  steps = _points(ctx.checkpoint_steps(), num)
  P = ctx.stacked_params(0, steps)
  loss_fn, sample, _ = llc.model_loss_and_sampler(ctx.cfg)
  m = ctx.cfg.model
  template = jax.tree.map(lambda x: x[0], P)
  names = [f"L{l + 1}H{h}" for l in range(m.num_layers) for h in range(m.num_heads)]
  K = len(steps)
  # Every head at every checkpoint in one program: points head-major, one mask each.
  masks = [llc.restrict_mask(template, (n,), m.num_heads) for n in names]
  masks_K = jax.tree.map(lambda *ms: np.repeat(np.stack(ms), K, axis=0), *masks)
  P_all = jax.tree.map(lambda x: np.tile(np.asarray(x), (len(names),) + (1,) * (x.ndim - 1)), P)
  study.log(f"[llc] per-head: {len(names)} heads x {K} checkpoints x {cfg.num_chains} chains")
  s = _summ(llc.estimate(loss_fn, P_all, sample, jax.random.key(1), cfg, restrict_K=masks_K),
            cfg)
  out: dict[str, Any] = dict(steps=steps, warnings=s["warnings"], num_warnings=s["num_warnings"])
  for i, n in enumerate(names):
    out[n] = dict(llc=s["llc"][i * K:(i + 1) * K], std=s["std"][i * K:(i + 1) * K])
  return out


def _per_head_analyze(study: Study, results: dict, heads: dict, cfg: llc.SGLDConfig,
                      num: int, out: Outcome) -> None:
  (seqs, loss), = curves(results["main"]).values()
  lt = timing.learning_time(seqs, loss)
  t = _estimate(study, f"heads:{num}:{cfg}", lambda: _per_head(study, cfg, num))
  steps = np.asarray(t["steps"], float)
  names = [k for k in t if k not in ("steps", "warnings", "num_warnings")]
  S, Pn = strongest_name(heads), pt_head_name(heads)
  for layer, head, role in ((2, S, "strongest induction head"), (1, Pn, "top previous-token head")):
    mine = np.asarray(t[head]["llc"])
    spread = np.asarray(t[head]["std"])
    rest = [t[n]["llc"] for n in names if n.startswith(f"L{layer}H") and n != head]
    if not rest:  # a one-head layer: nothing to separate from
      continue
    others = np.max(rest, axis=0)
    apart = np.nonzero(mine - spread > others)[0]
    # "Separates" from the first checkpoint after which it stays above every other head.
    first = next((int(k) for k in apart if all(j in apart for j in range(k, len(steps)))), None)
    when = f"{steps[first]:,.0f}" if first is not None else "never"
    out.verdicts.append(V.Verdict(
        f"Q: does the {role} ({head}) have the largest per-head LLC of layer {layer} at the "
        "end, and from when does it stay apart?",
        f"final {head} {mine[-1]:.1f} ± {spread[-1]:.1f} vs the other layer-{layer} heads' "
        f"largest {others[-1]:.1f}; apart (by more than its chains' spread) from {when}; "
        f"loss learning time {lt:,.0f}",
        "its final LLC minus its spread above every other head of its layer",
        bool(mine[-1] - spread[-1] > others[-1])))
  out.notes.append(
      f"(b) Per-head LLCs (SGLD moves one head's Q/K/V/O, the rest stays at w*), "
      f"{len(steps)} checkpoints x {cfg.num_chains} chains; STRONGEST {S}, PT head {Pn}; "
      f"diagnostics: {t['num_warnings']} warning(s).\n\n"
      + "| seqs | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1) + "\n"
      + "\n".join(f"| {s:,.0f} | " + " | ".join(f"{t[n]['llc'][k]:.1f}" for n in names) + " |"
                  for k, s in enumerate(steps)))
  fig, axes = plots.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  for ax, layer, special in ((axes[0], 1, Pn), (axes[1], 2, S)):
    for n in (n for n in names if n.startswith(f"L{layer}H")):
      ax.plot(steps, t[n]["llc"], lw=2.2 if n == special else 1.0, label=n)
    if lt == lt:
      ax.axvline(lt, color="gray", ls=":", lw=1)
    ax.set_title(f"layer {layer} (bold: {special})", fontsize=9)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
    ax.set_xlabel("sequences seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("per-head LLC")
  out.figures += png(plots._save(fig, study.figure_dir, "llc_per_head"))  # pylint: disable=protected-access


# ------------------------------------------------------------------ (c) clamped runs

def _clamped(study: Study, cfg: llc.SGLDConfig, num: int) -> dict[str, Any]:
  wd = study.stage_dir(f"clamps_s{PAPER_SEED}")
  ctx = context.load_context(wd)
  m = ctx.cfg.model
  steps = _points(ctx.checkpoint_steps(), num)
  runs = list(range(len(ctx.runs)))
  per_run = [ctx.run_clamps(r) or clamps_lib.identity(m.num_layers, m.num_heads) for r in runs]
  stacked = clamps_lib.stack(per_run)
  plan = clamps_lib.plan_for(stacked)
  loss_fn, sample, _ = llc.model_loss_and_sampler(ctx.cfg, plan)
  K = len(steps)
  # All runs x checkpoints in one program: points run-major, each with its run's clamps.
  P = jax.tree.map(lambda *xs: np.concatenate(xs),
                   *[ctx.stacked_params(r, steps) for r in runs])
  extras = llc.point_extras(jax.tree.map(lambda x: np.repeat(np.asarray(x), K, axis=0), stacked),
                            steps * len(runs), plan)
  study.log(f"[llc] clamped runs: {len(runs)} runs x {K} checkpoints x {cfg.num_chains} chains")
  r = llc.estimate(loss_fn, P, sample, jax.random.key(2), cfg, extras_K=extras)
  s = _summ(r, cfg)
  out: dict[str, Any] = dict(steps=steps, warnings=s["warnings"], num_warnings=s["num_warnings"])
  for i, run in enumerate(runs):
    out[ctx.runs[run]["condition"]] = dict(llc=s["llc"][i * K:(i + 1) * K],
                                           std=s["std"][i * K:(i + 1) * K])
  return out


def _clamped_analyze(study: Study, results: dict, heads: dict, cfg: llc.SGLDConfig,
                     num: int, out: Outcome) -> None:
  res = results[f"clamps_s{PAPER_SEED}"]
  cur = {k[0]: v for k, v in curves(res).items()}
  t = _estimate(study, f"clamped:{num}:{cfg}", lambda: _clamped(study, cfg, num))
  steps = np.asarray(t["steps"], float)
  conds = [c for c in t if c not in ("steps", "warnings", "num_warnings")]
  hz = float(max(s.max() for s, _ in cur.values()))
  lts = {c: timing.learning_time(*cur[c]) for c in conds}
  near, unresolved = {}, []
  for c in conds:
    y = np.asarray(t[c]["llc"])
    first = _settled(steps, y)
    rise = _steepest_rise(steps, y)
    if lts[c] != lts[c] or first + 1 >= len(steps) or lts[c] <= steps[first]:
      # Never learned, or learned at or before the first checkpoint with a positive
      # estimate: a rise at the learning time cannot be seen at this spacing.
      unresolved.append(c)
    elif rise != rise:  # a trace that never rises counts against the claim
      near[f"{c} (no rise, learned {lts[c]:,.0f})"] = False
    else:
      near[f"{c} (rise {rise:,.0f}, learned {lts[c]:,.0f})"] = abs(rise - lts[c]) <= 2 * NEAR * hz
  v = V.fraction_at_least(
      "Q: under clamps too, does each run's LLC rise where its own loss learns?", near, MOST,
      f"steepest LLC rise within {2 * NEAR:.0%} of the run's length of its learning time")
  if unresolved:
    v = dataclasses.replace(v, measured=v.measured + "; not resolved at this checkpoint "
                            "spacing (learned at or before the first checkpoint with a positive "
                            "estimate, or never): " + ", ".join(unresolved))
  out.verdicts.append(v)
  claim = "Q: does clamping a subcircuit leave a lower final LLC than the 'none' run (REST ablated)?"
  if "none" in t:
    base = t["none"]["llc"][-1]
    lower = {f"{c} ({t[c]['llc'][-1]:.0f})": t[c]["llc"][-1] < base for c in conds if c != "none"}
    out.verdicts.append(V.fraction_at_least(
        claim + f" (its final LLC {base:.0f}; point estimates, {cfg.num_chains} chains; copy "
        "and l1_copy keep REST, so their loss is another model's)", lower, MOST,
        "final LLC below the 'none' run's"))
  else:
    out.verdicts.append(V.Verdict(claim, "no 'none' run in the stage", "-", None))
  out.notes.append(
      f"(c) LLC of the Fig. 5b runs (seed {PAPER_SEED}; STRONGEST {strongest_name(heads)}, PT "
      f"head {pt_head_name(heads)}), each under its own clamps (the loss they trained on): "
      f"{len(steps)} checkpoints x {cfg.num_chains} chains; diagnostics: {t['num_warnings']} "
      "warning(s).\n\n| seqs | " + " | ".join(conds) + " |\n|" + "---|" * (len(conds) + 1) + "\n"
      + "\n".join(f"| {s:,.0f} | " + " | ".join(f"{t[c]['llc'][k]:.1f}" for c in conds) + " |"
                  for k, s in enumerate(steps))
      + "\n\nLearning times: " + ", ".join(
          f"{c} {'censored' if lts[c] != lts[c] else f'{lts[c]:,.0f}'}" for c in conds))
  fig, axes = plots.subplots(2, 1, figsize=(7, 6), sharex=True)
  for c in conds:
    line, = axes[0].plot(*cur[c], lw=1.1, label=c)
    axes[1].plot(steps, t[c]["llc"], lw=1.3, color=line.get_color(), marker=".")
  axes[0].set_ylabel("fsl_train loss (own clamps)")
  axes[0].legend(fontsize=7)
  axes[1].set_ylabel("LLC (own clamps)")
  axes[1].set_xlabel("sequences seen")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].set_title(f"Fig. 5b runs (seed {PAPER_SEED}): loss and LLC under each run's clamps",
                    fontsize=9)
  out.figures += png(plots._save(fig, study.figure_dir, "llc_clamped"))  # pylint: disable=protected-access


def _analyze(study: Study, results: dict, heads: dict) -> Outcome:
  cfg, num, few = _settings(study)
  few_cfg = dataclasses.replace(cfg, num_chains=min(cfg.num_chains, FEW_CHAINS))
  out = Outcome([])
  _trace_analyze(study, results, heads, cfg, num, out)
  _per_head_analyze(study, results, heads, few_cfg, few, out)
  _clamped_analyze(study, results, heads, few_cfg, few, out)
  return out


ENTRIES = (
    Entry("llc", ("X-llc",), "Beyond: the local learning coefficient over training (main "
          "run, per head, clamped runs)", lambda study: (PAPER_SEED,), _stages, _analyze),
)
