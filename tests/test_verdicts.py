"""Verdict logic on synthetic curves that should and should not pass."""
import math

import numpy as np
import pytest

from ih_jax.analysis import verdicts as V

LN2 = math.log(2)
SEQS = np.arange(0, 200_001, 2000, dtype=float)


def _phase_change(t_drop: float, width: float = 4000.0) -> np.ndarray:
  """Fast fall to ln 2, a plateau, then a sigmoid drop to ~0 at t_drop."""
  early = 1.5 * np.exp(-SEQS / 5000.0)
  return LN2 / (1 + np.exp((SEQS - t_drop) / width)) + early + 0.01


def test_plateau_then_drop_holds_for_a_phase_change():
  v = V.plateau_then_drop("c", SEQS, _phase_change(120_000))
  assert v.held, v
  assert "plateau at 0.7" in v.measured


@pytest.mark.parametrize("loss, why", [
    (0.7 * np.exp(-SEQS / 30_000.0) + 0.01, "smooth exponential decay: no plateau"),
    (np.full(SEQS.shape, LN2) + 0.02 * np.sin(SEQS), "never drops"),
    (np.full(SEQS.shape, 1.2) - SEQS / 200_000 * 1.1, "slow linear drift from far above ln 2"),
])
def test_plateau_then_drop_rejects(loss, why):
  assert V.plateau_then_drop("c", SEQS, loss).held is False, why


def test_plateau_then_drop_needs_points():
  assert V.plateau_then_drop("c", [0, 1], [1, 0]).held is None


def test_earlier_than_and_censoring():
  nan = math.nan
  assert V.earlier_than("c", {"a": 10_000, "b": 20_000}, "base", 50_000, 90_000).held
  assert V.earlier_than("c", {"a": 10_000, "b": 60_000}, "base", 50_000, 90_000).held is False
  # A censored baseline counts as past the horizon: learning at all beats it...
  assert V.earlier_than("c", {"a": 80_000}, "base", nan, 90_000).held
  # ...but a censored clamped run never does, and all censored is undecided.
  assert V.earlier_than("c", {"a": nan}, "base", 50_000, 90_000).held is False
  assert V.earlier_than("c", {"a": nan}, "base", nan, 90_000).held is None
  # "Removes the plateau": within a quarter of the baseline's learning time.
  assert V.earlier_than("c", {"a": 12_000}, "base", 50_000, 90_000, fraction=0.25).held
  assert V.earlier_than("c", {"a": 13_000}, "base", 50_000, 90_000, fraction=0.25).held is False


def test_spearman_and_trend():
  assert V.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert V.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert V.spearman([1, 2, 3], [5, 5, 5]) != V.spearman([1, 2, 3], [5, 5, 5])  # NaN
  s = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
  assert V.decreasing_trend("c", s, [1e4, 2e4, 3e4, 4e4, 5e4, math.nan], 9e4, "s").held
  assert V.decreasing_trend("c", s, [6e4, 5e4, 4e4, 3e4, 2e4, 1e4], 9e4, "s").held is False
  assert V.decreasing_trend("c", s, [math.nan] * 6, 9e4, "s").held is None


def test_ratio_greater():
  assert V.ratio_greater("c", "labels", 300_000, "classes", 120_000, 100_000, 4e5).held
  assert V.ratio_greater("c", "labels", 110_000, "classes", 150_000, 100_000, 4e5).held is False
  assert V.ratio_greater("c", "labels", math.nan, "classes", 150_000, 100_000, 4e5).held
  assert V.ratio_greater("c", "labels", 1, "classes", 1, math.nan, 4e5).held is None


def test_many_to_many_and_additive():
  m = np.full((8, 8), 0.5)
  m[0, 0] = m[0, 1] = m[1, 0] = 0.9          # L1H0 feeds 2 L2 heads; L2H0 uses 2 L1 heads
  assert V.many_to_many("c", m).held
  one_to_one = np.full((8, 8), 0.5)
  one_to_one[np.arange(8), np.arange(8)] = 0.9
  assert V.many_to_many("c", one_to_one).held is False
  assert V.additive("c", [0.01, 0.005, 0.003, 0.0029]).held
  assert V.additive("c", [0.01, 0.012, 0.003]).held is False


def test_at_least_and_fraction():
  assert V.at_least("c", 0.95, 0.9, "acc").held
  assert V.at_least("c", 0.85, 0.9, "acc").held is False
  assert V.at_least("c", math.nan, 0.9, "acc").held is None
  assert V.fraction_at_least("c", {"a": True, "b": True, "c": True, "d": False}, 0.75, "x").held
  assert V.fraction_at_least("c", {"a": True, "b": False}, 0.75, "x").held is False


def test_increasing_trend():
  up = V.increasing_trend("c", [1, 2, 4, 8], [0.1, 0.5, 0.4, 2.0], "heads", "IH count")
  assert up.held and "rho = 0.80" in up.measured
  assert V.increasing_trend("c", [1, 2, 4], [3, 2, 1], "x", "y").held is False
  assert V.increasing_trend("c", [1, 2, 4], [1, 1, 1], "x", "y").held is None


def test_earlier_than_strict_refuses_ties():
  assert V.earlier_than("c", {"a": 4e4}, "b", 4e4, 1e5).held is True
  tie = V.earlier_than("c", {"a": 4e4}, "b", 4e4, 1e5, strict=True)
  assert tie.held is False and "< 1 x b's" in tie.criterion
  assert V.earlier_than("c", {"a": 3e4}, "b", 4e4, 1e5, strict=True).held is True
