"""Code-computed verdicts on the paper's qualitative claims.

Each check takes measured numbers (curves, learning times, accuracies), applies a
threshold stated here, and returns a `Verdict` whose `measured` text quotes the
numbers. `held` is None when the claim could not be evaluated (e.g. a run is
missing), never a guess. The reproduction report (ih_jax/experiments/paper) only prints
these; no verdict is written by hand.

Censored learning times (the threshold never crossed) are treated as "later than
the run's horizon": a clamp that learns within its run beats a baseline that
never learned, but two censored runs compare as undecided.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from ih_jax.analysis import timing

LN2 = math.log(2)

# Thresholds (stated in the report next to each verdict).
PLATEAU_TOL = 0.15            # plateau loss within this of ln 2
STEEP_DROP = 0.3              # loss falls by > this within STEEP_WINDOW of the run before lt
STEEP_WINDOW = 0.25
REMOVES_FRACTION = 0.25       # "removes the plateau": lt <= this x the baseline's lt
STRONG_IS = 0.4               # a head with final induction strength above this is an IH
CARRIES_ACC = 0.9             # a head "alone carries the task" above this accuracy
REDUNDANT_ACC = 0.75          # removing the strongest head leaves accuracy above this
TREND_RHO = -0.5              # Spearman correlation for "stronger clamp -> earlier"
RISING_RHO = 0.5              # Spearman correlation for "y grows with x"
WIRING_ACC = 0.75             # only-one accuracy above this counts as a working pair


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One qualitative claim checked against a run: what was measured, the test, the outcome."""
  claim: str            # the paper's qualitative claim (paraphrased)
  measured: str         # what this run measured, with numbers
  criterion: str        # the test applied, with its threshold
  held: bool | None     # None: could not be evaluated

  @property
  def label(self) -> str:
    """`held` in words: "held", "did not hold" or "not evaluated"."""
    return {True: "held", False: "did not hold", None: "not evaluated"}[self.held]


def _fmt_lt(lt: float, horizon: float | None = None) -> str:
  if math.isnan(lt):
    return "censored" + (f" (> {horizon:,.0f})" if horizon else "")
  return f"{lt:,.0f}"


def effective_lt(lt: float, horizon: float) -> float:
  """A censored learning time counts as just past the run's horizon."""
  return horizon * 1.0001 if math.isnan(lt) else lt


def plateau_then_drop(claim: str, seqs: Sequence[float], loss: Sequence[float], *,
                      level: float = LN2, level_name: str = "ln 2",
                      min_drop: float = STEEP_DROP) -> Verdict:
  """A loss plateau near `level` followed by an abrupt drop below 0.4 x level.

  The paper's task: level ln 2 (a guess between the two context labels). The
  token task (ih_jax.data.tokens) passes level ln V (uniform over the vocabulary).
  """
  seqs, loss = np.asarray(seqs, float), np.asarray(loss, float)
  pt = timing.phase_times(seqs, loss, threshold=0.4 * level)
  lt, plateau = pt["learning_time"], pt["plateau_loss"]
  crit = (f"plateau loss within {PLATEAU_TOL} of {level_name} = {level:.3f}; loss crosses "
          f"0.4 {level_name}; it falls by > {min_drop:.3g} within the last {STEEP_WINDOW:.0%} "
          "of the run's length before crossing")
  if len(seqs) < 4:
    return Verdict(claim, f"only {len(seqs)} evaluation points", crit, None)
  drop = math.nan
  if not math.isnan(lt):
    window = (seqs >= lt - STEEP_WINDOW * seqs.max()) & (seqs <= lt)
    drop = float(loss[window][0] - loss[window][-1])
  ok = (not math.isnan(lt) and not math.isnan(plateau) and abs(plateau - level) < PLATEAU_TOL
        and drop > min_drop)
  measured = (f"plateau at {plateau:.3f}, learning time {_fmt_lt(lt, seqs.max())}, "
              f"drop {drop:.2f} before it; final loss {loss[-1]:.3f}")
  return Verdict(claim, measured, crit, bool(ok))


def earlier_than(claim: str, named: dict[str, float], baseline_name: str, baseline_lt: float,
                 horizon: float, fraction: float = 1.0, strict: bool = False) -> Verdict:
  """Every named learning time is <= (strict: <) fraction x the baseline's (censored = past
  horizon)."""
  base = effective_lt(baseline_lt, horizon)
  crit = (f"learning time {'<' if strict else '<='} {fraction:g} x {baseline_name}'s "
          f"({'censored counts as ' + format(horizon, ',.0f') if math.isnan(baseline_lt) else 'measured'})"
          " for every listed run")
  if not named:
    return Verdict(claim, "no runs", crit, None)
  if math.isnan(baseline_lt) and all(math.isnan(v) for v in named.values()):
    return Verdict(claim, "baseline and every run censored", crit, None)
  le = (lambda a, b: a < b) if strict else (lambda a, b: a <= b)
  ok = all(not math.isnan(v) and le(v, fraction * base) for v in named.values())
  measured = ", ".join(f"{k}: {_fmt_lt(v)}" for k, v in named.items())
  measured += f"; {baseline_name}: {_fmt_lt(baseline_lt, horizon)}"
  return Verdict(claim, measured, crit, bool(ok))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman rank correlation (average ranks for ties)."""
  def ranks(a):
    a = np.asarray(a, float)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    for v in np.unique(a):  # average ties
      r[a == v] = r[a == v].mean()
    return r
  if len(x) < 3:  # two points always correlate +-1: no evidence of a trend
    return math.nan
  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return math.nan
  return float(np.corrcoef(rx, ry)[0, 1])


def decreasing_trend(claim: str, xs: Sequence[float], lts: Sequence[float], horizon: float,
                     x_name: str) -> Verdict:
  """Learning time falls as x grows: Spearman(x, lt) <= TREND_RHO (censored = past horizon)."""
  eff = [effective_lt(v, horizon) for v in lts]
  rho = spearman(xs, eff)
  crit = f"Spearman correlation of {x_name} and learning time <= {TREND_RHO}"
  pairs = ", ".join(f"{x:g}: {_fmt_lt(v)}" for x, v in zip(xs, lts))
  if math.isnan(rho):
    return Verdict(claim, f"no variation ({pairs})", crit, None)
  return Verdict(claim, f"rho = {rho:.2f} ({x_name}: learning time {pairs})", crit,
                 bool(rho <= TREND_RHO))


def increasing_trend(claim: str, xs: Sequence[float], ys: Sequence[float], x_name: str,
                     y_name: str) -> Verdict:
  """y grows with x: Spearman(x, y) >= RISING_RHO (NaN values must be replaced by the caller)."""
  rho = spearman(xs, ys)
  crit = f"Spearman correlation of {x_name} and {y_name} >= {RISING_RHO}"
  fmt = lambda y: f"{y:,.0f}" if abs(y) >= 100 else f"{y:.3g}"
  pairs = ", ".join(f"{x:g}: {fmt(y)}" for x, y in zip(xs, ys))
  if math.isnan(rho):
    return Verdict(claim, f"no variation ({x_name}: {y_name} {pairs})", crit, None)
  return Verdict(claim, f"rho = {rho:.2f} ({x_name}: {y_name} {pairs})", crit,
                 bool(rho >= RISING_RHO))


def ratio_greater(claim: str, a_name: str, a_lt: float, b_name: str, b_lt: float,
                  base_lt: float, horizon: float) -> Verdict:
  """Slow-down a (lt_a / lt_base) exceeds slow-down b, and a slows down at all (> 1)."""
  crit = (f"lt({a_name}) / lt(base) > lt({b_name}) / lt(base) and > 1 "
          "(censored = past the horizon)")
  if math.isnan(base_lt):
    return Verdict(claim, f"the base run never learned ({_fmt_lt(base_lt, horizon)})", crit,
                   None)
  ra = effective_lt(a_lt, horizon) / base_lt
  rb = effective_lt(b_lt, horizon) / base_lt
  measured = (f"base {_fmt_lt(base_lt)}; {a_name} {_fmt_lt(a_lt, horizon)} (x{ra:.2f}); "
              f"{b_name} {_fmt_lt(b_lt, horizon)} (x{rb:.2f})")
  if math.isnan(a_lt) and math.isnan(b_lt):
    return Verdict(claim, measured, crit, None)
  return Verdict(claim, measured, crit, bool(ra > rb and ra > 1))


def at_least(claim: str, value: float, threshold: float, what: str) -> Verdict:
  """A Verdict that `value` (named `what`) exceeds `threshold`; not evaluated if None or NaN."""
  crit = f"{what} > {threshold:g}"
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return Verdict(claim, f"{what}: not measured", crit, None)
  return Verdict(claim, f"{what} = {value:.3f}", crit, bool(value > threshold))


def fraction_at_least(claim: str, flags: dict[str, bool], fraction: float, what: str) -> Verdict:
  """A Verdict that at least `fraction` of the runs in `flags` ({run: passed}) passed;
  not evaluated when there are no runs."""
  crit = f"{what} for at least {fraction:.0%} of the runs"
  if not flags:
    return Verdict(claim, "no runs", crit, None)
  got = sum(flags.values()) / len(flags)
  return Verdict(claim, f"{sum(flags.values())}/{len(flags)} ({', '.join(k for k, v in flags.items() if v) or 'none'})",
                 crit, bool(got >= fraction))


def many_to_many(claim: str, only_one_acc_ij: np.ndarray, threshold: float = WIRING_ACC
                 ) -> Verdict:
  """Wiring [i = layer-2 head, j = layer-1 head]: some layer-1 head works with >= 2 layer-2
  heads AND some layer-2 head works with >= 2 layer-1 heads (only-one accuracy > threshold)."""
  m = np.asarray(only_one_acc_ij) > threshold
  per_l2, per_l1 = m.sum(1), m.sum(0)
  crit = (f"a pair works if only-one accuracy > {threshold}; some layer-1 head pairs with "
          ">= 2 layer-2 heads and some layer-2 head pairs with >= 2 layer-1 heads")
  measured = (f"{int(m.sum())} working pairs; layer-2 heads' partner counts {per_l2.tolist()}; "
              f"layer-1 heads' partner counts {per_l1.tolist()}")
  return Verdict(claim, measured, crit, bool(per_l2.max() >= 2 and per_l1.max() >= 2))


def additive(claim: str, losses: Sequence[float]) -> Verdict:
  """Adding heads back in strength order lowers the loss at every one of the first steps."""
  losses = [float(v) for v in losses]
  crit = "loss decreases with each of the first 3 heads added back (strength order)"
  if len(losses) < 2:
    return Verdict(claim, "fewer than 2 points", crit, None)
  first = losses[:4]
  ok = all(b < a for a, b in zip(first, first[1:]))
  return Verdict(claim, "add-back losses " + " -> ".join(f"{v:.4f}" for v in first), crit, ok)
