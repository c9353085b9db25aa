"""Beyond the paper: training-dynamics controls (clamps released after a window, layer 1
frozen at initialisation for a while).

  ih-jax reproduce --figure=release --scale=quick --workdir=/tmp/repro_dyn
  ih-jax reproduce --figure=freeze_l1 --scale=quick --workdir=/tmp/repro_dyn

release: perfect match (`ih:S`) or perfect Layer 1 + perfect copy (`perfect_l1;
copy:S`), S the seed's STRONGEST head (its own main run's strongest induction head), is
clamped for the first 10 / 25 / 50% of the main run's length and then released; every
run also logs its clamp-free loss. Does the induction circuit persist after the
release, and does the clamp-free loss reach 0.4 ln 2 sooner than a run that was never
clamped? All windows x seeds train in one program: each clamped condition is bound to
its seed (`match10[5]=ih:L2H2@[0,100000)`), so the head may differ by seed.

freeze_l1: layer 1 is frozen at its initialisation for the first 0 / 10 / 25 / 50% of
the run (`train.freeze=L1@[0,s)`), one program. How does the plateau depend on s?

lr_law: learning time against the learning rate (6 values, 1e-5 to 3e-4) x weight
decay (0, 1e-4, 1e-2) x 3 seeds, one program (the optimizer's numbers are per-run data;
on a CPU split into programs of at most 12 runs per core).
A power law lt = c * lr^-alpha is fitted to the uncensored runs without weight decay.
"""

from __future__ import annotations

import math

import numpy as np

from ih_jax import plots
from ih_jax.analysis import timing
from ih_jax.analysis import verdicts as V
from ih_jax.experiments.paper.registry_base import Entry, Outcome, Stages, curve_figure, lt_table
from ih_jax.experiments.paper.registry_base import strongest_name
from ih_jax.experiments.paper.study import PAPER_SEED, Study, curves, horizon, learning_times

MAIN_SEQS = 1_000_000                # the paper's main-run length
FRACTIONS = (0.1, 0.25, 0.5)         # of the run: the clamp / freeze windows
PERSIST_FRACTION = 2 / 3             # released runs that must stay learned for "persists"


def _seeds(study: Study) -> tuple[int, ...]:
  return (PAPER_SEED,) + study.scale.extra_seeds[:2]


def _windows(study: Study) -> dict[str, int]:
  length = study.scale.seqs(MAIN_SEQS)
  return {f"{round(f * 100)}": max(100, int(round(f * length / 100)) * 100) for f in FRACTIONS}


def _release_conditions(study: Study, heads: dict) -> tuple[str, ...]:
  """'none' for every seed; each clamped condition once per seed, on its STRONGEST head."""
  out = ["none"]
  for pct, w in _windows(study).items():
    for kind in ("match", "l1copy"):
      for seed in _seeds(study):
        head = strongest_name(heads, seed)
        spec = (f"ih:{head}@[0,{w})" if kind == "match"
                else f"perfect_l1@[0,{w});copy:{head}@[0,{w})")
        out.append(f"{kind}{pct}[{seed}]={spec}")
  return tuple(out)


def _release_names(study: Study) -> list[str]:
  return ["none"] + [f"{kind}{pct}" for pct in _windows(study) for kind in ("match", "l1copy")]


def _release_stages(study: Study, heads: dict) -> Stages:
  return [("release", study.config(paper_seqs=MAIN_SEQS, paper_eval_every=5000,
                                   conditions=_release_conditions(study, heads),
                                   seeds=_seeds(study)))]


def _clamp_free(results: list) -> dict[tuple[str, int, str], tuple[np.ndarray, np.ndarray]]:
  """Each run's clamp-free loss curve (an unclamped run's own curve)."""
  own, free = curves(results), curves(results, clamped=0)
  return {k: free.get(k, v) for k, v in own.items()}


def _release_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  res = results["release"]
  hz = horizon(res)
  free = _clamp_free(res)
  windows = _windows(study)
  lt = {k: timing.learning_time(s, l) for k, (s, l) in free.items()}
  final = {k: float(l[-1]) for k, (_, l) in free.items()}
  seeds = _seeds(study)
  median = lambda c: float(  # noqa: E731
      np.median([V.effective_lt(lt[(c, s, "")], hz) for s in seeds]))
  window_of = lambda c: windows[c.removeprefix("match").removeprefix("l1copy")]  # noqa: E731
  clamped = [(c, s) for (c, s, _) in free if c != "none"]
  formed = {f"{c} seed {s}": lt[(c, s, "")] <= window_of(c) for c, s in clamped}
  learned = {f"{c} seed {s}": final[(c, s, "")] < timing.THRESHOLD for c, s in clamped}
  out = Outcome([])
  out.verdicts.append(V.fraction_at_least(
      "Q: has the model formed a circuit of its own while the clamp acted (its clamp-free "
      "loss below 0.4 ln 2 by the release)?", formed, PERSIST_FRACTION,
      "clamp-free learning time <= the release point"))
  out.verdicts.append(V.fraction_at_least(
      "Q: after the release, does the model end up solving the task without the clamp "
      "(final loss below 0.4 ln 2, no clamp acting)?", learned, PERSIST_FRACTION,
      "final loss < 0.4 ln 2 after the release"))
  base = median("none")
  for kind in ("match", "l1copy"):
    named = {f"{kind}{p}": median(f"{kind}{p}") for p in windows}
    out.verdicts.append(V.earlier_than(
        f"Q: does clamping {'perfect match' if kind == 'match' else 'perfect L1 + copy'} "
        "first make the clamp-free loss reach 0.4 ln 2 sooner than never clamping "
        "(median over seeds)?", named, "never clamped", base if base < hz else math.nan, hz))
  out.notes.append(
      f"Windows (sequences): {windows}; heads (each seed's STRONGEST): "
      + ", ".join(f"seed {s} {strongest_name(heads, s)}" for s in seeds)
      + f"; horizon {hz:,.0f}. "
      "Learning time here is of the clamp-free loss (the model evaluated without its "
      "clamps); inside the window the clamped loss is lower.\n\n" + lt_table(lt, hz))
  out.notes.append("Clamp-free learning time minus the release point (negative: formed "
                   "under the clamp): " + ", ".join(
                       f"{c} s{s} {V.effective_lt(lt[(c, s, '')], hz) - window_of(c):+,.0f}"
                       for c, s in sorted(clamped)))
  out.notes.append("Final clamp-free loss: " + ", ".join(
      f"{c} s{s} {final[(c, s, v)]:.3f}" for (c, s, v) in sorted(final)))
  groups = {c: free[(c, PAPER_SEED, "")] for c in _release_names(study)}
  out.figures += curve_figure(
      study, "release_clamp_free", groups,
      f"clamp-free loss, seed {PAPER_SEED} (clamps released at 10/25/50%)",
      ylabel="fsl_train query loss without the clamps")
  return out


def _freeze_stages(study: Study, heads: dict) -> Stages:
  del heads
  values = "()," + ",".join(f"L1@[0,{w})" for w in _windows(study).values())
  return [("freeze_l1", study.config(paper_seqs=MAIN_SEQS, paper_eval_every=5000,
                                     conditions=("none",), seeds=_seeds(study),
                                     grid=(f"train.freeze={values}",)))]


def _freeze_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  res = results["freeze_l1"]
  hz = horizon(res)
  lts = learning_times(res)
  frozen = {"train.freeze=()": 0}
  frozen.update({f"train.freeze=L1@[0,{w})": w for w in _windows(study).values()})
  med: dict[int, float] = {}
  for variant, s in frozen.items():
    vals = [V.effective_lt(lt, hz) for (c, _, v), lt in lts.items() if v == variant]
    med[s] = float(np.median(vals)) if vals else math.nan
  xs = sorted(med)
  out = Outcome([V.increasing_trend(
      "Q: does freezing layer 1 at its initialisation for longer delay the phase change?",
      xs, [med[x] for x in xs], "sequences frozen", "median learning time")])
  lines = ["| layer 1 frozen for | median learning time | after unfreezing |", "|---|---|---|"]
  for x in xs:
    shown = f"{med[x]:,.0f}" + (" (censored)" if med[x] >= hz else "")
    lines.append(f"| {x:,d} | {shown} | {med[x] - x:,.0f} |")
  out.notes.append(f"Seeds {list(_seeds(study))}, horizon {hz:,.0f} (censored counts as the "
                   "horizon).\n\n" + "\n".join(lines) + "\n\n" + lt_table(lts, hz))
  seed_curves = {v.partition("=")[2] or "none frozen": c
                 for (cond, s, v), c in curves(res).items() if s == PAPER_SEED}
  out.figures += curve_figure(
      study, "freeze_l1", seed_curves,
      f"layer 1 frozen at init for the first s sequences, seed {PAPER_SEED}")
  return out


LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 3e-4)
WDS = (0.0, 1e-4, 1e-2)
FIT_R2 = 0.9                         # a power law "fits" above this R^2 (log-log)
WD_EFFECT = 0.2                      # weight decay "matters" beyond a 20% change


def _lr_stages(study: Study, heads: dict) -> Stages:
  del heads
  grid = ("train.learning_rate=" + ",".join(f"{x:g}" for x in LRS),
          "train.weight_decay=" + ",".join(f"{x:g}" for x in WDS))
  return [("lr_law", study.config(paper_seqs=MAIN_SEQS, paper_eval_every=5000,
                                  conditions=("none",), seeds=_seeds(study), grid=grid))]


def power_law(lrs: list[float], lts: list[float]) -> tuple[float, float, float]:
  """(alpha, c, R^2) of lt = c * lr^-alpha, least squares in log-log."""
  x, y = np.log(np.asarray(lrs)), np.log(np.asarray(lts))
  slope, intercept = np.polyfit(x, y, 1)
  r2 = 1.0 - np.sum((y - (slope * x + intercept)) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12)
  return float(-slope), float(np.exp(intercept)), float(r2)


def _lr_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  res = results["lr_law"]
  hz = horizon(res)
  lts = learning_times(res)
  by: dict[tuple[float, float], list[float]] = {}
  for (_, _, variant), lt in lts.items():
    fields = dict(item.split("=") for item in variant.split(";"))
    by.setdefault((float(fields["train.learning_rate"]), float(fields["train.weight_decay"])),
                  []).append(lt)
  med = {k: float(np.median([V.effective_lt(v, hz) for v in vals])) for k, vals in by.items()}
  uncensored = [(lr, lt) for (lr, wd), vals in by.items() if wd == 0
                for lt in vals if not math.isnan(lt)]
  out = Outcome([])
  claim = ("Q: does the learning time fall as a power of the learning rate (runs without "
           "weight decay that learned within the horizon)?")
  crit = f"log-log least squares over >= 3 learning rates, R^2 > {FIT_R2}"
  if len({lr for lr, _ in uncensored}) >= 3:
    alpha, c, r2 = power_law(*zip(*uncensored))
    out.verdicts.append(V.Verdict(claim, f"alpha = {alpha:.2f}, c = {c:.3g}, R^2 = {r2:.3f} "
                                  f"over {len(uncensored)} runs", crit, bool(r2 > FIT_R2)))
    out.notes.append(f"Fit: learning time ~ {c:.3g} x lr^-{alpha:.2f}; at lr 1e-5 it predicts "
                     f"{c * 1e-5 ** -alpha:,.0f} sequences, at 1e-4 {c * 1e-4 ** -alpha:,.0f} "
                     f"(ratio {10 ** alpha:.1f}).")
  else:
    out.verdicts.append(V.Verdict(claim, "fewer than 3 learning rates learned", crit, None))
  base = {lr: med[(lr, 0.0)] for lr in LRS}
  ok = [lr for lr in LRS if base[lr] < hz]
  if len(ok) >= 2:  # the slope between neighbouring learning rates: where the law bends
    out.notes.append("Local exponent between neighbouring learning rates (median learning "
                     "times, no weight decay): " + ", ".join(
                         f"{a:g} -> {b:g}: {math.log(base[a] / base[b]) / math.log(b / a):.2f}"
                         for a, b in zip(ok, ok[1:])) + ".")
  if base.get(1e-5, hz) < hz and base.get(1e-4, hz) < hz:
    out.notes.append(f"Measured: lr 1e-4 learns {base[1e-5] / base[1e-4]:.1f}x sooner than "
                     "lr 1e-5 (median over seeds; quick scale's 10x learning rate).")
  strong = {lr: med[(lr, max(WDS))] for lr in LRS}
  changes = {lr: abs(strong[lr] / base[lr] - 1) for lr in LRS if base[lr] < hz}
  out.verdicts.append(V.Verdict(
      f"Q: does weight decay {max(WDS):g} change the learning time by more than "
      f"{WD_EFFECT:.0%} (median over seeds, learning rates whose run learned)?",
      ", ".join(f"lr {lr:g}: {base[lr]:,.0f} -> {strong[lr]:,.0f}" for lr in LRS),
      f"|lt(wd) / lt(0) - 1| > {WD_EFFECT:g} at some learning rate",
      bool(max(changes.values()) > WD_EFFECT) if changes else None))
  lines = ["| lr \\ wd | " + " | ".join(f"{w:g}" for w in WDS) + " |", "|---|" + "---|" * len(WDS)]
  for lr in LRS:
    lines.append(f"| {lr:g} | " + " | ".join(
        "censored" if med[(lr, w)] >= hz else f"{med[(lr, w)]:,.0f}" for w in WDS) + " |")
  out.notes.append(f"Median learning time over seeds {list(_seeds(study))} (horizon {hz:,.0f}; "
                   "censored counts as the horizon):\n\n" + "\n".join(lines))
  fig, ax = plots.subplots(figsize=(5.5, 4))
  for w in WDS:
    xs = [lr for lr in LRS if med[(lr, w)] < hz]
    ax.loglog(xs, [med[(lr, w)] for lr in xs], "o-", label=f"weight decay {w:g}")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("median learning time (sequences)")
  ax.set_title("learning time vs learning rate (uncensored medians)", fontsize=9)
  ax.legend(fontsize=8)
  saved = plots._save(fig, study.figure_dir, "lr_law")  # pylint: disable=protected-access
  out.figures += [p for p in saved if p.endswith(".png")]
  return out


def _none(study: Study) -> tuple[int, ...]:
  del study
  return ()


ENTRIES = (
    Entry("release", ("X-release",), "Beyond: clamps released after 10/25/50% of the run",
          lambda study: _seeds(study), _release_stages, _release_analyze),
    Entry("freeze_l1", ("X-freeze",), "Beyond: layer 1 frozen at initialisation until s",
          _none, _freeze_stages, _freeze_analyze),
    Entry("lr_law", ("X-lr",), "Beyond: learning time vs learning rate x weight decay",
          _none, _lr_stages, _lr_analyze),
)
