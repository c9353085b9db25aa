"""Phase-change timing from loss curves (any run's metrics.csv).

  learning_time      first eval seqs with loss < 0.4 ln 2; NaN (censored) if never
  steepest_descent   eval seqs where the (3-point median smoothed) loss falls fastest
                     per sequence seen, after the initial fall from chance (in a run
                     that learned: within PHASE_WINDOW of the run's length before the
                     learning time)
  has_plateau        whether the curve sits on a plateau and then leaves it: the
                     smoothed loss at its flattest point (smallest |slope| per sequence)
                     before the steepest descent is above the learning threshold, the
                     final loss is at least PLATEAU_MIN_DROP below it, and at least
                     PLATEAU_MIN_POINTS consecutive eval points stay within 10% (of the
                     plateau-to-final drop) of that level, all before the learning time
  plateau_loss       that level; NaN when there is no plateau
  plateau_exit       the last eval seqs of that stretch (never after the learning
                     time); NaN when there is no plateau
A run that learns straight away (e.g. a clamped subcircuit) has no plateau: it is
reported as such rather than given a plateau below the threshold or after it learned.
All return NaN rather than a misleading index 0 when the curve has no such point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

THRESHOLD = 0.4 * math.log(2)


def learning_time(seqs: Any, loss: Any, threshold: float = THRESHOLD) -> float:
  """The first `seqs` value whose loss is below `threshold`; NaN (censored) if none is."""
  below = np.nonzero(np.asarray(loss) < threshold)[0]
  return float(np.asarray(seqs)[below[0]]) if below.size else float("nan")


def _smooth(loss: np.ndarray) -> np.ndarray:
  if len(loss) < 3:
    return loss.astype(float)
  padded = np.concatenate([loss[:1], loss, loss[-1:]])
  return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


PLATEAU_MIN_POINTS = 3
PLATEAU_MIN_DROP = 0.1   # nats from the plateau to the final loss: a plateau is left
PHASE_WINDOW = 0.25      # of the run's length: where the phase change is sought before it learned


def phase_times(seqs: Any, loss: Any, threshold: float = THRESHOLD) -> dict[str, Any]:
  """learning_time, steepest_descent, has_plateau, plateau_exit, plateau_loss of one curve."""
  seqs = np.asarray(seqs, float)
  loss = np.asarray(loss, float)
  order = np.argsort(seqs)
  seqs, loss = seqs[order], loss[order]
  lt = learning_time(seqs, loss, threshold)
  out = dict(learning_time=lt, steepest_descent=math.nan, has_plateau=False,
             plateau_exit=math.nan, plateau_loss=math.nan)
  if len(seqs) < 4:
    return out
  sm = _smooth(loss)
  slope = np.diff(sm) / np.maximum(np.diff(seqs), 1e-12)     # per sequence, between points
  # Ignore the initial fall from chance: look only after the first local flattening.
  start = int(np.argmax(slope > -abs(slope).max() * 0.05)) if (slope < 0).any() else 0
  if start >= len(slope) - 1:
    return out
  # The phase change is the steepest drop after the start; in a run that learned, the
  # steepest one within PHASE_WINDOW of the run's length before the learning time (a
  # slow fall from chance early in the run can be steeper per sequence than the phase
  # change itself: the default features' main run falls 0.89 -> 0.80 over 30k-50k).
  lo_k = start
  if lt == lt:
    lo_k = max(start, int(np.searchsorted(seqs, lt - PHASE_WINDOW * seqs.max())))
    lo_k = min(lo_k, max(start, int(np.searchsorted(seqs, lt)) - 1))
  k = lo_k + int(np.argmin(slope[lo_k:]))                   # steepest drop after the start
  if slope[k] >= 0:
    return out
  out["steepest_descent"] = float(0.5 * (seqs[k] + seqs[k + 1]))
  flat = start + int(np.argmin(np.abs(slope[start:k + 1])))
  plateau = float(sm[flat])
  drop = plateau - float(sm[-1])
  if plateau < threshold or drop < PLATEAU_MIN_DROP:
    return out  # flattest point already learned, or no real fall after it: no plateau
  # The stretch of points around the flattest one that stay near its level, cut at
  # the learning time (a plateau ends before the run has learned).
  near = np.abs(sm - plateau) <= 0.1 * drop
  before = seqs < lt if lt == lt else np.ones_like(near)
  lo = flat
  while lo > start and near[lo - 1] and before[lo - 1]:
    lo -= 1
  hi = flat
  while hi < k and near[hi + 1] and before[hi + 1]:
    hi += 1
  if not (near[flat] and before[flat]) or hi - lo + 1 < PLATEAU_MIN_POINTS:
    return out
  out.update(has_plateau=True, plateau_loss=plateau, plateau_exit=float(seqs[hi]))
  return out


def run_phase_table(metrics: list[dict[str, Any]], eval_set: str = "fsl_train",
                    clamped: int = 1) -> list[dict[str, Any]]:
  """One row per run of a metrics.csv: condition, seed, variant and its phase times."""
  runs: dict[int, list[dict[str, Any]]] = {}
  for r in metrics:
    if r["eval_set"] == eval_set and r["clamped"] == clamped:
      runs.setdefault(r["run"], []).append(r)
  table = []
  for run, rows in sorted(runs.items()):
    times = phase_times([r["seqs"] for r in rows], [r["loss"] for r in rows])
    final = max(rows, key=lambda r: r["seqs"])
    table.append(dict(run=run, condition=rows[0]["condition"], seed=rows[0]["seed"],
                      variant=rows[0].get("variant", ""), final_loss=final["loss"],
                      final_acc=final["acc"], learned=not math.isnan(times["learning_time"]),
                      **times))
  return table
