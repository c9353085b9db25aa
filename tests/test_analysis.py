"""Analysis measures on cases with known answers; timing, toy model, figures, CLI."""
import csv
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from ih_jax import model as model_lib
from ih_jax import plots, toy
from ih_jax.analysis import ablation, circuits, context, measures, scores, timing
from ih_jax.data import evalsets

import numerics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dense(paper_splits):
  idx = evalsets.dense_indices(paper_splits)
  keep = np.random.default_rng(0).choice(idx.classes.shape[0], 300, replace=False)
  return jax.tree.map(lambda x: x[np.sort(keep)], idx)


def one(params):
  return jax.tree.map(lambda x: np.asarray(x)[None], params)


def test_ih_clamp_strength_s_gives_2s_minus_1(params, cfg, feature_table, dense):
  out = measures.measure(one(params), feature_table, dense, cfg,
                         measures.conditions(["ih:L2H3@0.8", "ih:L2H5", "none"], cfg))
  is_QH = out["induction_strength"][0, :, 1]
  np.testing.assert_allclose(is_QH[0, 3], 2 * 0.8 - 1, atol=1e-5)
  np.testing.assert_allclose(is_QH[1, 5], 1.0, atol=1e-5)
  assert abs(is_QH[2, 3]) < 0.2  # an untrained head is not an induction head


def test_perfect_pt_pattern_scores_one(params, cfg, feature_table, dense):
  out = measures.measure(one(params), feature_table, dense, cfg,
                         measures.conditions(["pt:L1H2"], cfg))
  np.testing.assert_allclose(out["pt_score"][0, 0, 0, 2], 1.0, atol=1e-5)
  np.testing.assert_allclose(out["pt_score_labels"][0, 0, 0, 2], 1.0, atol=1e-5)
  np.testing.assert_allclose(out["pt_raw"][0, 0, 0, 2], 1.0, atol=1e-5)


def test_ablating_a_head_equals_zeroing_its_value_weights(params, cfg, feature_table, dense):
  abl = measures.measure(one(params), feature_table, dense, cfg,
                         measures.conditions(["ablate:L2H1"], cfg))
  zeroed = jax.tree.map(np.array, params)
  cols = slice(2 * 64 + 8, 2 * 64 + 16)  # head 1's value columns of layer 1's fused QKV
  zeroed["blocks_1"]["qkv"]["kernel"][:, cols] = 0
  zeroed["blocks_1"]["qkv"]["bias"][cols] = 0
  plain = measures.measure(one(zeroed), feature_table, dense, cfg)
  # Two programs (clamp machinery vs zeroed weights): equal up to rounding; a real
  # difference moves the loss by > 1e-3. The accuracy is exact unless rounding flips the
  # argmax of a near-tied query: allow one of the 300 sequences.
  np.testing.assert_allclose(abl["loss"][0, 0], plain["loss"][0], rtol=1e-5)
  np.testing.assert_allclose(abl["acc"][0, 0], plain["acc"][0], atol=1.01 / 300)


def test_vmapped_over_checkpoints_equals_one_at_a_time(params, cfg, feature_table, dense):
  keys = jax.random.split(jax.random.key(0), 3)
  stack = [jax.tree.map(lambda p, k=k: np.asarray(p) + 0.05 * np.asarray(
      jax.random.normal(k, np.shape(p))), params) for k in keys]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *stack)
  together = measures.measure(stacked, feature_table, dense, cfg, seq_batch=128, ckpt_batch=2,
                              per_sequence=True)  # 300 = 2 x 128 + a padded chunk
  for k, p in enumerate(stack):
    alone = measures.measure(one(p), feature_table, dense, cfg, seq_batch=300,
                             per_sequence=True)
    # Other programs (vmapped, other chunking): rounding only, judged per array against
    # its scale (the attention scores' natural scale is 1: keep 1e-6 as a floor).
    for name in ("loss", "induction_strength", "pt_score", "seq_loss"):
      numerics.assert_close(together[name][k], alone[name][0], rtol=1e-5, rel_atol=1e-5,
                            atol=1e-6, err_msg=name)
    # Exact unless rounding flips the argmax of a near-tied query: allow one of 300.
    np.testing.assert_allclose(together["acc"][k], alone["acc"][0], atol=1.01 / 300)


def test_loss_only_and_pass_grouped_measures_equal_the_full_program(
    params, cfg, feature_table, dense, monkeypatch):
  # One condition needs a clean pass (pattern-preserving), the others do not (one of them
  # windowed: on at the first checkpoint only). With the threshold at 0 they run as two
  # programs; with head_scores=() the last layer runs at the query position only; the
  # set's 50-odd distinct exemplars go in as a table. The reference is the one program of
  # before: every condition together, gathered features, every head score.
  specs = ["ablate:L2H1", "preserve_pattern;ablate:L1H0-3", "none", "keep_only:L2H5",
           "ablate:L2H2@[0,1000)"]
  stack = jax.tree.map(lambda *xs: np.stack(xs), params,
                       jax.tree.map(lambda p: np.asarray(p) * 1.1, params))
  conds, seqs_K = measures.conditions(specs, cfg), [0, 5000]
  kw = dict(per_sequence=True, seqs_K=seqs_K)
  assert [len(g) for g in measures._pass_groups(conds, 2 * 300)] == [5]  # below threshold
  with monkeypatch.context() as m:
    m.setattr(measures, "_as_table_rows", lambda f, c: (f, c))
    full = measures.measure(stack, feature_table, dense, cfg, conds, **kw)
  monkeypatch.setattr(measures, "MIN_SPLIT_PASSES", 0)
  groups = measures._pass_groups(conds, 2 * 300)
  assert [g.tolist() for g in groups] == [[0, 2, 3, 4], [1]]
  for scores_ in (None, ()):
    got = measures.measure(stack, feature_table, dense, cfg, conds, head_scores=scores_, **kw)
    assert ("induction_strength" in got) == (scores_ is None)
    names = ("loss", "seq_loss") + (("induction_strength", "pt_score", "k_composition")
                                    if scores_ is None else ())
    for name in names:
      assert got[name].shape == full[name].shape, name
      numerics.assert_close(got[name], full[name], rtol=1e-5, rel_atol=1e-5, atol=1e-6,
                            err_msg=name)
    # Exact unless rounding flips the argmax of a near-tied query: allow one of 300.
    np.testing.assert_allclose(got["acc"], full["acc"], atol=1.01 / 300)
  # The conditions really differ (a mix-up of the reassembled order would show), and the
  # windowed ablation acts at the first checkpoint only.
  assert np.ptp(full["loss"][0]) > 1e-3
  assert abs(full["loss"][0, 4] - full["loss"][0, 2]) > 1e-3
  np.testing.assert_allclose(full["loss"][1, 4], full["loss"][1, 2], rtol=1e-6)


def test_learning_time_and_phase_times():
  seqs = np.arange(0, 100_001, 5000)
  assert math.isnan(timing.learning_time(seqs, np.full(len(seqs), 0.69)))
  # Fast fall from chance, a plateau at ln 2, a sharp drop around 60k, convergence.
  loss = np.where(seqs < 10_000, 1.6 - seqs / 10_000 * 0.9,
                  0.69 - 0.6 / (1 + np.exp(-(seqs - 60_000) / 4000)))
  t = timing.phase_times(seqs, loss)
  assert t["learning_time"] == 65_000
  assert 45_000 <= t["plateau_exit"] < t["steepest_descent"] <= t["learning_time"]
  assert abs(t["plateau_loss"] - 0.69) < 0.02
  never = timing.phase_times(seqs, np.full(len(seqs), 0.69))
  assert math.isnan(never["learning_time"]) and math.isnan(never["steepest_descent"])


def test_phase_times_with_a_slow_fall_from_chance():
  # The default features' main run at full scale: a fast fall from chance with a slow
  # tail (steeper per sequence at 15k-25k than the phase change near 400k), then a
  # plateau ~0.72. (Before the fix the tail was taken for the phase change.)
  seqs = np.arange(0, 1_000_001, 5000)
  loss = (np.exp(-seqs / 3e3) + 0.35 * np.exp(-seqs / 40e3)
          + 0.72 / (1 + np.exp((seqs - 400e3) / 40e3)) + 0.002)
  t = timing.phase_times(seqs, loss)
  assert 400_000 <= t["learning_time"] <= 450_000
  assert t["has_plateau"] and abs(t["plateau_loss"] - 0.72) < 0.03
  assert t["plateau_exit"] < t["steepest_descent"] <= t["learning_time"]
  assert 350_000 <= t["steepest_descent"]


def test_toy_plateau_removed_by_clamping():
  curves = toy.run()
  def time_to(q, level=1e-3):
    below = np.nonzero(curves.loss[q] < level)[0]
    return below[0] if below.size else math.inf
  none, c, bc = (curves.conditions.index(k) for k in ("none", "clamp c", "clamp b, c"))
  assert time_to(bc) < time_to(c) < time_to(none) < math.inf
  # The unclamped run sits on a plateau: 100+ iterations with < 1% relative change,
  # far above zero, before collapsing; clamping b and c leaves no such stretch.
  def plateau_len(q):
    l = curves.loss[q]
    flat = (np.abs(np.diff(l)) / np.maximum(l[1:], 1e-12) < 0.01 / 100) & (l[1:] > 0.1 * l[0])
    best = run = 0
    for f in flat:
      run = run + 1 if f else 0
      best = max(best, run)
    return best
  assert plateau_len(none) >= 100 and plateau_len(bc) == 0
  assert curves.pm1[none][-1] < 1e-3 and curves.pm1[none][100] > 0.5  # a aligns late
  with pytest.raises(ValueError, match="unknown toy condition"):
    toy.run(conditions=("clamp a",))


def test_composition_scores_on_constructed_weights(params):
  p = jax.tree.map(np.array, params)
  p["blocks_0"]["out"]["kernel"][:] = 0
  p["blocks_1"]["qkv"]["kernel"][:] = 0
  p["blocks_0"]["out"]["kernel"][8, 0] = 2.0          # head 1 writes residual dim 0
  p["blocks_0"]["out"]["kernel"][16, 1] = 1.0         # head 2 writes dim 1
  p["blocks_1"]["qkv"]["kernel"][0, 64 + 24] = 3.0    # K of layer-2 head 3 reads dim 0
  p["blocks_1"]["qkv"]["kernel"][1, 128 + 40] = 1.0   # V of layer-2 head 5 reads dim 1
  s = circuits.composition_scores(p, 8)
  # Rank-1 blocks reading exactly what is written: score 1; disjoint dims: 0.
  np.testing.assert_allclose(s["k"][3, 1], 1.0, atol=1e-6)
  np.testing.assert_allclose(s["k"][3, 2], 0.0, atol=1e-6)
  np.testing.assert_allclose(s["v"][5, 2], 1.0, atol=1e-6)
  assert s["q"].max() == 0.0  # all-zero query blocks score 0, not NaN
  # The registry's per-head entries: layer 2's heads, their best layer-1 partner.
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], p)
  w = scores.weight_scores(stacked, model_lib.ModelConfig(), scores.resolve(
      ["k_composition", "v_composition", "q_composition"]))
  assert w["k_composition"].shape == (1, 2, 8)
  np.testing.assert_array_equal(w["k_composition"][0, 0], 0.0)  # layer 1: nothing before
  np.testing.assert_allclose(w["k_composition"][0, 1], s["k"].max(-1), rtol=1e-6)
  np.testing.assert_allclose(w["v_composition"][0, 1, 5], 1.0, atol=1e-6)


def test_score_registry_is_per_task(params, cfg, feature_table, dense):
  """A few-shot and a token score share a name; task "any" claims it for both; measure
  returns weights scores (not per sequence) beside the pattern scores, x conditions."""
  fs, tok = scores.resolve(["induction_strength"]), scores.resolve(["induction_strength"],
                                                                   task="tokens")
  assert fs[0].task == "fewshot" and tok[0].task == "tokens" and fs[0] is not tok[0]
  names = {s.name for s in scores.registered("tokens")}
  assert {"prev_token", "prefix_matching", "induction_strength", "copying",
          "k_composition"} <= names and "pt_score" not in names
  with pytest.raises(ValueError, match="already registered"):
    scores.register(scores.HeadScore("pt_score", lambda A, b: A[:, :, 0, 0], task="any"))
  with pytest.raises(ValueError, match="unknown head score 'copying' for the fewshot task"):
    scores.resolve(["copying"])
  with pytest.raises(ValueError, match="source='grads'"):
    scores.HeadScore("x", lambda A, b: A, source="grads")
  with pytest.raises(ValueError, match="built-in"):
    scores.unregister("k_composition")
  idx = jax.tree.map(lambda x: x[:64], dense)
  params_K = jax.tree.map(lambda x: np.stack([x, x]), params)
  m = measures.measure(params_K, feature_table, idx, cfg,
                       measures.conditions(["none", "ablate:L1H0"], cfg),
                       head_scores=["induction_strength", "k_composition"])
  assert m["induction_strength"].shape == m["k_composition"].shape == (2, 2, 2, 8)
  np.testing.assert_array_equal(m["k_composition"][:, 0], m["k_composition"][:, 1])


def test_subsample_steps():
  steps = list(range(0, 1_000_001, 1000))
  sub = context.subsample_steps(steps, 100)
  assert len(sub) == 100 and sub[0] == 0 and sub[-1] == 1_000_000
  assert context.subsample_steps([0, 10, 20], 100) == [0, 10, 20]


def test_figures_are_written(tmp_path):
  out = str(tmp_path)
  seqs = np.linspace(0, 1e5, 12)
  rng = np.random.default_rng(0)
  files = plots.plot_progress_measures(out, seqs, rng.random(12), rng.random((12, 8)),
                                       rng.random((12, 8)), learning_time=5e4)
  files += plots.plot_pca_trajectory(out, seqs, rng.random((12, 50)))
  files += plots.plot_toy(out, toy.run(steps=50))
  files += plots.plot_heatmaps(out, {"a": rng.random((8, 8)) - 0.5}, "heat", "i", "j")
  table = dict(head=[f"L2H{h}" for h in range(8)], induction_strength=rng.random(8),
               remove_acc=rng.random(8), only_acc=rng.random(8), remove_loss=rng.random(8),
               only_loss=rng.random(8), full_acc=[1.0] * 8, full_loss=[0.0] * 8)
  files += plots.plot_ablations(out, table)
  assert len(files) == 10 and all(os.path.getsize(f) > 1000 for f in files)


def test_analyze_cli_end_to_end(tmp_path):
  wd = str(tmp_path / "run")
  common = [sys.executable, "-m"]
  train = subprocess.run(
      common + ["ih_jax.experiments.train", "--config=tiny", f"--workdir={wd}",
                "--config.train.num_seqs=3200", "--config.checkpoint.every=1000",
                "--config.sweep.conditions=('none','single=keep_only:L2H0')",
                "--config.sweep.init_seeds=(5,)"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-2000:]
  # The train launcher's own end-to-end checks (merged here from
  # test_train.test_launcher_end_to_end, which kept only its bad-flag check, so the suite
  # trains one tiny CLI workdir instead of two): it plots the curves and reports learning
  # times.
  assert os.path.exists(os.path.join(wd, "loss_curves.png"))
  assert "learning time" in train.stdout
  proc = subprocess.run(
      common + ["ih_jax.experiments.analyze", f"--workdir={wd}", "--dense_size=256",
                "--wiring_size=64", "--posthoc_size=128", "--l1_sets=L1H0,L1H3|L1H5"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "strongest induction heads" in proc.stdout and "learning time" in proc.stdout
  names = set(os.listdir(os.path.join(wd, "analysis")))
  for f in ("phase_times.csv", "progress_run0.csv", "head_ablations_run0.csv",
            "additivity_run0.csv", "wiring_run0_all_but_one_pv.csv", "composition_run0_k.csv",
            "progress_measures_run0.png", "wiring_run0.png", "loss_pca_run0.png",
            "layer_contributions_run0.csv", "layer_contributions_run0.png",
            "attention_patterns_run0.png", "mistake_fixing_run0.csv",
            "perfected_match_run1.csv", "learning_times.png", "layer1_set_ablations_run0.csv", "subcircuits_run1.csv",
            "subcircuits_run1.png"):
    assert f in names, f
  assert "subcircuits_run0.csv" not in names  # run 0 is not a single-head run
  with open(os.path.join(wd, "analysis", "layer1_set_ablations_run0.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["heads"], r["clamped"]) for r in rows] == [
      ("L1H0,L1H3", "1"), ("L1H5", "1"), ("L1H0,L1H3", "0"), ("L1H5", "0")]
  with open(os.path.join(wd, "analysis", "progress_run0.csv")) as f:
    rows = f.read().strip().splitlines()
  # header + checkpoints 0, 1024, 2016, 3008, 3200, in both views (the same numbers:
  # run 0 is unclamped)
  assert len(rows) == 1 + 2 * 5
  assert "[clamps on]" in proc.stdout and "[clamps off]" in proc.stdout  # run 1 is clamped
  assert "wiring_run1_clampfree.png" in names
  # The registry's main entry reads the wiring table back as a [L2 head, L1 head] matrix
  # (a format change once broke it at full scale only).
  from ih_jax.experiments.paper import registry  # pylint: disable=g-import-not-at-top
  only_one_pv = registry._read_matrix(os.path.join(wd, "analysis", "wiring_run0_only_one_pv.csv"))
  assert only_one_pv.shape == (8, 8) and np.isfinite(only_one_pv).all()


def test_mistake_fixing_invariants(params, cfg, feature_table, dense):
  strength = np.arange(8.0)  # pretend head 7 is the strongest
  t = ablation.mistake_fixing(params, feature_table, dense, cfg, strength)
  wrong = t["strongest_mistakes"][0]
  assert 0 < wrong <= 300
  assert t["fixes_strongest_mistakes"][7] == 0.0  # a head never fixes its own mistakes
  np.testing.assert_allclose(t["acc"][7], 1 - wrong / 300, atol=1e-6)
  pm = ablation.mistake_fixing(params, feature_table, dense, cfg, strength, perfected=True)
  assert {f"acc_label{c}" for c in range(5)} <= set(pm)


def test_sweep_scaling_figure(tmp_path):
  from ih_jax import train  # pylint: disable=g-import-not-at-top
  from ih_jax.analysis import report  # pylint: disable=g-import-not-at-top
  from ih_jax.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  cfg = ExperimentConfig.from_dict({
      "train": {"num_seqs": 640, "eval_every": 320, "progress_every_s": 0},
      "sweep": {"conditions": ["none"], "init_seeds": [5, 6],
                "grid": ["model.num_labels=5,10"]},
      "evaluators": [{"name": "fsl_train", "size": 64}]})
  wd = str(tmp_path / "grid")
  train.train_and_evaluate(cfg, wd, verbose=False)
  rows = report.analyze_sweep(wd, log=lambda _: None)
  assert sorted((r["grid:model.num_labels"], r["seed"]) for r in rows) == [
      ("10", 5), ("10", 6), ("5", 5), ("5", 6)]
  assert all(math.isnan(r["learning_time"]) for r in rows)  # 640 seqs: nothing learned
  out = os.path.join(wd, "analysis")
  assert os.path.getsize(os.path.join(out, "scaling_model_num_labels.png")) > 1000
  assert os.path.exists(os.path.join(out, "sweep_phase_times.csv"))


def test_guide_head_score_runs_beside_the_builtins(params, cfg, feature_table, dense):
  """docs/extending.md's head-score example, run as written: its score is measured for
  every layer and head and equals the mean pattern entry it reads."""
  text = open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "extending.md")).read()
  section = text[text.index("## Your own head score"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  idx = jax.tree.map(lambda x: x[:128], dense)
  namespace = dict(params_K=jax.tree.map(lambda x: np.asarray(x)[None], params),
                   features=feature_table, idx=idx, model_cfg=cfg)
  try:
    exec(compile(code, "docs/extending.md", "exec"), namespace)  # pylint: disable=exec-used
    m = namespace["m"]
    assert m["query_to_first"].shape == (1, 2, 8)
    assert "induction_strength" in m and "k_composition" in m
    want = measures.mean_patterns(params, feature_table, idx, cfg)[:, :, -1, 0]
    numerics.assert_close(m["query_to_first"][0], want, rtol=1e-4, rel_atol=1e-5)
  finally:
    scores.unregister("query_to_first")
