"""Analysis of clamped runs: under the run's own clamps, head choices it could make,
labelled views, and phase timing that never invents a plateau."""
import csv
import math
import os
import re

import jax
import numerics
import numpy as np
import pytest

from ih_jax import clamps as clamps_lib
from ih_jax import train
from ih_jax.analysis import context, heads as heads_lib, measures, report, timing
from conftest import small_sweep

# One worker builds this module's shared runs (a session-scoped fixture, so tests of other
# modules run in between do not tear it down): `make test` passes --dist loadgroup.
pytestmark = pytest.mark.xdist_group("test_analysis_clamped")

CONDITIONS = ("none", "match=ih:L2H3;keep_only:L2H3", "single=keep_only:L2H0")
DENSE = 256
ANALYSIS_LOG: list[str] = []  # what the fixture's analysis logged


@pytest.fixture(scope="session")
def analysed(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("clamped"))
  cfg = small_sweep(CONDITIONS, 1920, 640, train=dict(learning_rate=1e-3))
  train.train_and_evaluate(cfg, wd, verbose=False)
  # (Wiring is left to test_analysis's CLI test: 264 more conditions to compile.)
  summary = report.analyze_workdir(wd, dense_size=DENSE, do_wiring=False, posthoc_size=128,
                                   log=ANALYSIS_LOG.append)
  return wd, summary


def _rows(wd, name):
  with open(os.path.join(wd, "analysis", name)) as f:
    return list(csv.DictReader(f))


def test_progress_measures_are_taken_under_the_run_clamps(analysed):
  """The clamped view of run 1 equals measures.measure under its clamps; the
  clamp-free view equals measure without clamps; the two differ."""
  wd, _ = analysed
  ctx = context.load_context(wd)
  steps = ctx.checkpoint_steps()
  params_K = ctx.stacked_params(1, steps)
  idx = ctx.dense_set(DENSE)
  m = ctx.cfg.model
  want_on = measures.measure(params_K, ctx.features, idx, m,
                             measures.conditions([CONDITIONS[1].split("=", 1)[1]], m))
  want_off = measures.measure(params_K, ctx.features, idx, m)
  rows = _rows(wd, "progress_run1.csv")
  got_on = np.array([float(r["loss"]) for r in rows if r["clamped"] == "1"])
  got_off = np.array([float(r["loss"]) for r in rows if r["clamped"] == "0"])
  numerics.assert_close(got_on, want_on["loss"][:, 0])
  numerics.assert_close(got_off, want_off["loss"])
  assert np.abs(got_on - got_off).max() > 1e-2  # the views really differ
  # The clamped IS of the IH-clamped head is 2s - 1 = 1 by construction.
  np.testing.assert_allclose([float(r["is_L2H3"]) for r in rows if r["clamped"] == "1"], 1.0,
                             atol=1e-5)
  assert all(r["run"] == "1" and r["condition"] == "match" and r["seed"] == "5" for r in rows)


def test_each_step_is_logged_with_its_view(analysed):
  """A full-size analysis runs for minutes per run: each step says what it did and when."""
  steps = [l for l in ANALYSIS_LOG if l.startswith("[analyze]   ")]
  # Run 0 is unclamped (one view, no prefix); runs 1 and 2 have both views.
  assert sum("progress measures (" in l for l in steps) == 1 + 2 + 2
  assert sum(l.startswith("[analyze]   clamped view: post-hoc clamps") for l in steps) == 2
  assert sum(l.startswith("[analyze]   clamp-free view: post-hoc clamps") for l in steps) == 2
  # Only the single-head run has subcircuits (in its clamped view).
  assert sum("subcircuit clamps" in l for l in steps) == 1
  assert all(re.search(r" in \d+\.\ds$", l) for l in steps)


def test_every_csv_names_run_condition_seed_and_view(analysed):
  wd, _ = analysed
  names = [n for n in os.listdir(os.path.join(wd, "analysis")) if n.endswith(".csv")]
  assert "phase_times.csv" in names and "head_ablations_run1.csv" in names
  for name in names:
    rows = _rows(wd, name)
    assert rows, name
    assert {"run", "condition", "seed", "clamped"} <= set(rows[0]), name
    # Subcircuit losses are defined relative to the run's own clamp: clamped view only.
    views = {"1"} if name.startswith("subcircuits_") else {"0", "1"}
    assert {r["clamped"] for r in rows} == views, name


def test_figures_of_both_views(analysed):
  wd, _ = analysed
  names = set(os.listdir(os.path.join(wd, "analysis")))
  for stem in ("progress_measures", "head_ablations", "attention_patterns"):
    assert f"{stem}_run0.png" in names and f"{stem}_run0_clampfree.png" not in names
    assert f"{stem}_run1.png" in names and f"{stem}_run1_clampfree.png" in names
  assert os.path.exists(os.path.join(wd, "loss_curves_clampfree.png"))


def test_heads_the_run_could_not_use_are_never_chosen(analysed):
  _, summary = analysed
  # Run 1 IH-clamped L2H3 and ablated the rest of layer 2: no usable last-layer head.
  s1 = summary["run1"]
  for view in (s1, s1["clamp_free"]):
    assert view["strongest_head"] is None and view["strongest_heads"] == []
    assert view["only_strongest_acc"] is None
    assert any("no usable head in layer L2" in n for n in view["notes"])
    assert view["pt_head"] is not None
  assert s1["unusable_heads"]["L2H3"] == "pattern clamped (ih)"
  assert s1["unusable_heads"]["L2H4"] == "ablated"
  # Run 2 kept only L2H0: it is the only possible choice, in both views, although
  # in the clamp-free view another (ablated) head scores higher.
  s2 = summary["run2"]
  assert s2["strongest_head"] == "L2H0" and s2["clamp_free"]["strongest_head"] == "L2H0"
  assert [h for h, _ in s2["clamp_free"]["strongest_heads"]] == ["L2H0"]
  off = [r for r in _rows(analysed[0], "head_ablations_run2.csv") if r["clamped"] == "0"]
  is_off = [float(r["induction_strength"]) for r in off]
  assert int(np.argmax(is_off)) != 0, "the scenario must tempt an argmax over all heads"


def test_phase_rows_for_both_views(analysed):
  wd, _ = analysed
  rows = _rows(wd, "phase_times.csv")
  assert sorted((r["run"], r["clamped"]) for r in rows) == [
      (str(r), c) for r in range(3) for c in ("0", "1")]
  assert "has_plateau" in rows[0]


def test_unusable_reasons():
  c = clamps_lib.parse("perfect_l1;copy:L2H5;ablate:L2H1", 2, 8)
  why = heads_lib.unusable_reasons(c, 2, 8)
  assert all(why[(0, h)] == "layer L1 replaced by perfect_l1" for h in range(8))
  assert why[(1, 5)] == "output replaced (perfect copy)" and why[(1, 1)] == "ablated"
  assert (1, 0) not in why
  assert heads_lib.unusable_reasons(None, 2, 8) == {}
  usable = heads_lib.usable_mask(c, 2, 8)
  assert heads_lib.strongest(np.arange(8.0), usable[1]) == 7
  assert heads_lib.strongest(np.arange(8.0), usable[0]) is None
  assert heads_lib.strongest([0.1, 0.9, 0.5], [True, False, True]) == 2
  assert heads_lib.ranked([0.1, 0.9, 0.5], [True, False, True]) == [2, 0]


def test_combine_applies_posthoc_clamps_on_top_of_the_run():
  base = clamps_lib.parse("ih:L2H3;keep_only:L2H3", 2, 8)
  both = clamps_lib.combine(base, clamps_lib.parse("ablate:L1H2;pt:L1H0@0.5", 2, 8))
  assert both["v_keep"][1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
  assert both["v_keep"][0, 2] == 0 and both["ih_on"][1, 3] and both["pt_on"][0, 0]
  assert both["pt_strength"][0, 0] == 0.5
  with pytest.raises(ValueError, match="replaces layer L1"):
    clamps_lib.combine(clamps_lib.parse("perfect_l1", 2, 8),
                       clamps_lib.parse("ablate:L1H0", 2, 8))


# ------------------------------------------------------------------ phase timing

SEQS = np.arange(0, 200_001, 4000)


def test_a_run_that_learns_straight_away_has_no_plateau():
  # The reported case: a clamped subcircuit run falls from chance to ~0 without ever
  # sitting still above the learning threshold.
  for loss in (0.05 + 2.2 * np.exp(-SEQS / 12_000),
               np.maximum(0.04, 1.6 - SEQS / 25_000)):
    t = timing.phase_times(SEQS, loss)
    assert not t["has_plateau"], t
    assert math.isnan(t["plateau_exit"]) and math.isnan(t["plateau_loss"])
    assert t["learning_time"] == t["learning_time"]


def test_a_flat_stretch_below_the_threshold_is_not_a_plateau():
  # Learned by 40k, then a slow creep from 0.23: flat, but already learned.
  loss = np.where(SEQS <= 40_000, 1.6 - SEQS / 40_000 * 1.37, 0.23 - (SEQS - 40_000) * 1e-6)
  t = timing.phase_times(SEQS, loss)
  assert not t["has_plateau"] and math.isnan(t["plateau_exit"]), t


def test_plateau_then_phase_change():
  loss = np.where(SEQS < 12_000, 1.6 - SEQS / 12_000 * 0.9,
                  0.69 - 0.65 / (1 + np.exp(-(SEQS - 100_000) / 6000)))
  t = timing.phase_times(SEQS, loss)
  assert t["has_plateau"] and abs(t["plateau_loss"] - 0.69) < 0.02
  assert t["plateau_exit"] < t["steepest_descent"] and t["plateau_exit"] < t["learning_time"]


def test_plateau_exit_never_follows_the_learning_time():
  rng = np.random.default_rng(0)
  for _ in range(200):
    drop_at = rng.uniform(10_000, 190_000)
    width = rng.uniform(1000, 40_000)
    level = rng.uniform(0.2, 1.2)
    loss = level - (level - rng.uniform(0.0, 0.2)) / (1 + np.exp(-(SEQS - drop_at) / width))
    loss = loss + rng.normal(0, 0.01, SEQS.shape)
    t = timing.phase_times(SEQS, loss)
    if t["has_plateau"]:
      assert t["plateau_loss"] >= timing.THRESHOLD
      if t["learning_time"] == t["learning_time"]:
        assert t["plateau_exit"] < t["learning_time"], t
    else:
      assert math.isnan(t["plateau_exit"]) and math.isnan(t["plateau_loss"])


def test_bad_layer1_sets_are_refused_before_measuring(analysed):
  wd, _ = analysed
  with pytest.raises(ValueError, match="unknown head 'L1H9'"):
    report.analyze_workdir(wd, l1_sets=["L1H9"], log=lambda _: None)
  with pytest.raises(ValueError, match="outside layer L1"):
    report.analyze_workdir(wd, l1_sets=["L1H0,L2H3"], log=lambda _: None)
  with pytest.raises(ValueError, match=r"runs \[7\] do not exist.*0..2"):
    report.analyze_workdir(wd, runs=[7], log=lambda _: None)


def test_a_registered_head_score_is_measured_and_reported(tmp_path, analysed):
  """A score defined outside ih_jax is computed by measure (all layers) and lands in the
  progress CSV for its reported layers, without editing the library."""
  from ih_jax.analysis import scores  # pylint: disable=g-import-not-at-top
  wd, _ = analysed
  ctx = context.load_context(wd)
  params_K = ctx.stacked_params(0, ctx.checkpoint_steps()[-1:])
  idx = ctx.dense_set(64)
  mine = scores.HeadScore("query_to_first", lambda A, batch: A[:, :, -1, 0],
                          "attention from the query to the first token", "last")
  scores.register(mine)
  try:
    m = measures.measure(params_K, ctx.features, idx, ctx.cfg.model)
    base = measures.measure(params_K, ctx.features, idx, ctx.cfg.model,
                            head_scores=["induction_strength"])
    assert set(base) == {"loss", "acc", "induction_strength"}
    sites = ("blocks.0.pattern", "blocks.1.pattern")
    from ih_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    from ih_jax.data import sampler  # pylint: disable=g-import-not-at-top
    batch = sampler.gather_features(ctx.features, idx)
    _, aux = model_lib.apply(jax.tree.map(lambda x: x[0], params_K), batch, None,
                             ctx.cfg.model, sites=sites)
    want = np.stack([np.asarray(aux[s])[:, :, -1, 0].mean(0) for s in sites])
    numerics.assert_close(m["query_to_first"][0], want)  # scan over chunks vs one batch
    rows = report._progress_rows([0], {k: v for k, v in m.items()}, 2)  # pylint: disable=protected-access
    assert "query_to_first_L2H7" in rows[0] and "query_to_first_L1H0" not in rows[0]
    assert "is_L2H0" in rows[0] and "pt_L1H0" in rows[0]
    with pytest.raises(ValueError, match="already registered"):
      scores.register(mine)
  finally:
    scores.unregister("query_to_first")
  with pytest.raises(ValueError, match="unknown head score"):
    measures.measure(params_K, ctx.features, idx, ctx.cfg.model, head_scores=["nope"])


def test_a_curve_that_never_falls_has_no_plateau_exit():
  # A clamp-free view of a run that needs its clamps: flat near chance to the end.
  loss = 2.15 - 0.02 * SEQS / SEQS[-1]
  t = timing.phase_times(SEQS, loss)
  assert not t["has_plateau"] and math.isnan(t["plateau_exit"]), t
