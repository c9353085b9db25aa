"""One entry per experiment of the paper and its appendix.

An entry declares its runs as stages (each a sweep: conditions x seeds x grid, so
related runs share one compiled program) built from the head choices of each
seed's own main run (never hard-coded), and turns the trained results into
figures and code-computed verdicts (ih_jax.analysis.verdicts).

  entry.stages(study, heads)            -> [(stage name, ExperimentConfig)]
  entry.analyze(study, results, heads)  -> Outcome
`heads` maps init seed -> Study.heads(seed) (STRONGEST, PT head order, scores).
"""

from __future__ import annotations

import csv
import math
import os

import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import plots, toy
from ih_jax.analysis import context, measures, report as report_lib, timing
from ih_jax.analysis import verdicts as V
from ih_jax.experiments.paper import beyond, dynamics, llc_entry, tokens_entry
from ih_jax.experiments.paper.registry_base import Entry, Outcome, Stages, curve_figure, lt_table, png
from ih_jax.experiments.paper.registry_base import clamp_stage as _clamp_stage
from ih_jax.experiments.paper.registry_base import pt_head_name as _P, strongest_name as _S
from ih_jax.experiments.paper.study import PAPER_SEED, Study, curves, horizon, learning_times

# Short names used throughout this module.
_curve_figure, _lt_table, _png = curve_figure, lt_table, png

def _versus_none(study: Study, res: list, claim: str, baseline: str, fig: str, title: str,
                 note: str = "") -> Outcome:
  """Every condition of a program against its "none" run: verdict, table and curves."""
  lts, hz = {k[0]: v for k, v in learning_times(res).items()}, horizon(res)
  out = Outcome([V.earlier_than(claim, {k: v for k, v in lts.items() if k != "none"},
                                baseline, lts["none"], hz)])
  out.notes.append(note + _lt_table(learning_times(res), hz))
  out.figures += _curve_figure(study, fig, {k[0]: v for k, v in curves(res).items()}, title)
  return out


# ============================================================================ main run

def _main_stages(study: Study, heads: dict) -> Stages:
  del heads
  return [("main", study.main_config((PAPER_SEED,), dense=True))]


def _read_matrix(path: str) -> np.ndarray:
  """[Layer-2 head, Layer-1 head] of a wiring CSV, under the run's own clamps."""
  with open(path) as f:
    rows = [r for r in csv.DictReader(f) if r.get("clamped", "1") == "1"]
  cols = [c for c in rows[0] if c.startswith("L1H")]
  return np.array([[float(r[c]) for c in cols] for r in rows])


def _main_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  res = results["main"]
  wd = study.stage_dir("main")
  sc = study.scale
  summary = report_lib.analyze_workdir(
      wd, num_checkpoints=sc.num_checkpoints, dense_size=sc.dense_size,
      wiring_size=sc.wiring_size, posthoc_size=sc.dense_size, log=study.log)["run0"]
  (seqs, loss), = curves(res).values()
  an = os.path.join(wd, "analysis")
  progress = list(csv.DictReader(open(os.path.join(an, "progress_run0.csv"))))
  pt_final = max(float(v) for k, v in progress[-1].items() if k.startswith("pt_L1H"))
  only_one_pv = _read_matrix(os.path.join(an, "wiring_run0_only_one_pv.csv"))
  strongest, s_is = summary["strongest_heads"][0]
  out = Outcome([
      V.plateau_then_drop("Fig. 3a: the loss sits on a plateau near ln 2, then drops abruptly "
                          "(a phase change)", seqs, loss),
      V.at_least(f"Fig. 3b/4a: an induction head forms in Layer 2 (here {strongest})", s_is,
                 V.STRONG_IS, f"final induction strength of {strongest}"),
      V.at_least("App. 11: the strongest induction head alone carries the task",
                 summary["only_strongest_acc"], V.CARRIES_ACC,
                 f"accuracy with only {strongest} active in Layer 2"),
      V.at_least("App. 11: induction heads are redundant (removing the strongest one leaves "
                 "the task largely solved)", summary["remove_strongest_acc"], V.REDUNDANT_ACC,
                 f"accuracy with {strongest} ablated"),
      V.additive("App. 12: induction heads are additive (each head added back in strength "
                 "order lowers the loss)", summary["additive_losses"]),
      V.at_least("App. 13: Layer 1 has a previous-token head", pt_final, 0.5,
                 "best final previous-token score in Layer 1"),
      V.many_to_many("App. 13: previous-token -> induction wiring is many-to-many "
                     "(value-preserving, only-one ablations)", only_one_pv),
  ])
  lt = summary["learning_time"]
  out.notes.append(f"Learning time {lt:,.0f} sequences; final dense-set loss "
                   f"{summary['final_dense_loss']:.4f}, accuracy {summary['final_dense_acc']:.3f}; "
                   f"strongest heads {summary['strongest_heads']}; PT head {summary['pt_head']}; "
                   f"Layer-1 set ablations {summary['layer1_sets']}.")
  out.figures += [os.path.join(wd, "loss_curves.png")] + sorted(
      os.path.join(an, f) for f in os.listdir(an) if f.endswith(".png"))
  return out


# ============================================================================ 4b single heads

def _single_stages(study: Study, heads: dict) -> Stages:
  del heads
  conds = tuple(f"L2H{h}=keep_only:L2H{h}" for h in range(8))
  return [("single_head", study.config(paper_seqs=1_000_000, paper_eval_every=5000,
                                       conditions=conds))]


def _final_is(study: Study, stage: str, results: list) -> dict[tuple[str, int], float]:
  """Final induction strength of each run's kept head (dense subset)."""
  wd = study.stage_dir(stage)
  _, stacked = ckpt_lib.load_stacked_params(wd)
  res = results[0]
  ctx = context.load_context(wd)
  idx = ctx.dense_set(study.scale.head_size)
  # The runs axis stands in for measure()'s checkpoint axis.
  m = measures.measure(jax.tree.map(np.asarray, stacked), ctx.features, idx, ctx.cfg.model)
  out = {}
  for run in res.runs:
    h = int(run.condition[3:]) if run.condition.startswith("L2H") else None
    if h is not None:
      out[(run.condition, run.init_seed)] = float(m["induction_strength"][run.index, 1, h])
  return out


def _single_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  res = results["single_head"]
  lts = learning_times(res)
  hz = horizon(res)
  iss = _final_is(study, "single_head", res)
  learned = {k[0]: not math.isnan(v) for k, v in lts.items()}
  finite = [v for v in lts.values() if not math.isnan(v)]
  spread = max(finite) / min(finite) if len(finite) >= 2 else math.nan
  out = Outcome([
      V.fraction_at_least("Fig. 4b: each Layer-2 head, as the only active one, learns the task "
                          "(becomes an induction head)", learned, 0.75, "learned within the run"),
      V.at_least("Fig. 4b: the heads' phase changes come at different times", spread, 1.2,
                 "latest / earliest learning time among the heads that learned"),
  ])
  out.notes.append(_lt_table(lts, hz))
  out.notes.append("Final induction strength of the kept head: " + ", ".join(
      f"{k[0]} {v:.2f}" for k, v in iss.items()) + f". The main run's STRONGEST is {_S(heads)}.")
  out.figures += _png(plots.plot_learning_times(study.figure_dir, timing.run_phase_table(
      res[0].metrics), name="fig4b_learning_times"))
  out.figures.append(os.path.join(study.stage_dir("single_head"), "loss_curves.png"))
  return out


# ============================================================================ 5a toy

def _toy_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del results, heads
  c = toy.run()
  t = {}
  for q, cond in enumerate(c.conditions):
    below = np.nonzero(c.loss[q] < 1e-3)[0]
    t[cond] = int(below[0]) if below.size else math.nan
  ok = all(not math.isnan(v) for v in t.values()) and t["none"] > t["clamp c"] > t["clamp b, c"]
  crit = ("iterations to loss < 1e-3: none > clamp c > clamp b, c (and the unclamped loss "
          "changes by < 10% over 100 iterations somewhere before its drop: a plateau)")
  none = c.loss[c.conditions.index("none")]
  stop = int(t["none"]) if not math.isnan(t["none"]) else len(none) - 1
  flat = any(abs(none[i + 100] - none[i]) < 0.1 * none[i] and none[i] > 10 * 1e-3
             for i in range(10, max(10, stop - 100)))
  v = V.Verdict("Fig. 5a: in the toy model a * b * c the loss plateaus and then drops abruptly; "
                "clamping c shortens the plateau and clamping b and c removes it",
                ", ".join(f"{k}: {v}" for k, v in t.items()) + f"; plateau found: {flat}",
                crit, bool(ok and flat))
  return Outcome([v], figures=_png(plots.plot_toy(study.figure_dir, c, name="fig5a_toy")))


# ============================================================================ 5b clamps

def _clamp_verdicts(lts: dict, hz: float, seed: int) -> list[V.Verdict]:
  lt = {k[0]: v for k, v in lts.items()}
  return [
      # A whole subcircuit: A (steps 1, 2) = perfect L1, C (3v, 5) = perfect copy. The PT
      # clamp fixes step 1 only; its learning time is reported without a claim.
      V.earlier_than(f"Fig. 5b (seed {seed}, our reading): clamping one whole subcircuit (A = perfect L1, "
                     "or C = perfect copy) shortens the plateau",
                     {k: lt[k] for k in ("perfect_l1", "copy")},
                     "none (REST ablated)", lt["none"], hz),
      V.earlier_than(f"Fig. 5b (seed {seed}): clamping two subcircuits (perfect match = A+B; "
                     "perfect L1 + copy = A+C) removes the plateau",
                     {k: lt[k] for k in ("match", "l1_copy")}, "none (REST ablated)",
                     lt["none"], hz, fraction=V.REMOVES_FRACTION),
  ]


def _5b_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  res = results[f"clamps_s{PAPER_SEED}"]
  lts, hz = learning_times(res), horizon(res)
  out = Outcome(_clamp_verdicts(lts, hz, PAPER_SEED))
  out.notes.append(f"STRONGEST = {_S(heads)}, PT head = {_P(heads)} (from the main run).\n\n"
                   + _lt_table(lts, hz))
  out.figures += _curve_figure(study, "fig5b_clamps", {k[0]: v for k, v in curves(res).items()},
                               "Fig. 5b: training under subcircuit clamps")
  return out


# ============================================================================ 6 scaling

_CLASSES = "task.class_split=(50,1473,100),(100,1423,100),(200,1323,100)"
_LABELS = "model.num_labels=10,15"


def _scaling_stages(study: Study, heads: dict) -> Stages:
  S = _S(heads)
  normal = (f"none=keep_only:{S}",)
  clamped = (f"l1_copy=perfect_l1;copy:{S}", f"match=ih:{S};keep_only:{S}",
             f"perfect_l1=perfect_l1;keep_only:{S}")
  kw = lambda seqs, every, conds, grid: study.config(
      paper_seqs=seqs, paper_eval_every=every, conditions=conds, grid=(grid,))
  return [("scaling_classes", kw(2_000_000, 5000, normal, _CLASSES)),
          ("scaling_labels", kw(2_000_000, 5000, normal, _LABELS)),
          ("scaling_clamped_classes", kw(300_000, 1000, clamped, _CLASSES)),
          ("scaling_clamped_labels", kw(300_000, 1000, clamped, _LABELS))]


def _variant_lts(results: list) -> dict[tuple[str, str], float]:
  return {(k[0], k[2]): v for k, v in learning_times(results).items()}


def _6_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  cl, lb = _variant_lts(results["scaling_classes"]), _variant_lts(results["scaling_labels"])
  hz = horizon(results["scaling_classes"])
  base = next(v for (c, var), v in cl.items() if "(50," in var)
  c200 = next(v for (c, var), v in cl.items() if "(200," in var)
  l15 = next(v for (c, var), v in lb.items() if "=15" in var)
  out = Outcome([V.ratio_greater("Fig. 6: more labels delay the phase change far more than "
                                 "more classes do", "15 labels", l15, "200 classes", c200, base,
                                 hz)])
  rows = ["| condition | variant | learning time |", "|---|---|---|"]
  for name in ("scaling_classes", "scaling_labels", "scaling_clamped_classes",
               "scaling_clamped_labels"):
    for (c, var), v in _variant_lts(results[name]).items():
      rows.append(f"| {c} | {var or 'base'} | {'censored' if math.isnan(v) else f'{v:,.0f}'} |")
  out.notes.append("\n".join(rows))
  for name in ("scaling_classes", "scaling_labels"):
    report_lib.analyze_sweep(study.stage_dir(name), log=study.log)
    an = os.path.join(study.stage_dir(name), "analysis")
    out.figures += sorted(os.path.join(an, f) for f in os.listdir(an) if f.endswith(".png"))
  return out


# ============================================================================ App. 7 graft

def _graft_seeds(study: Study) -> tuple[int, ...]:
  return (PAPER_SEED,) + study.scale.extra_seeds[:2]


def _graft_stages(study: Study, heads: dict) -> Stages:
  del heads
  donors, conds, stages = [], ["none"], {}
  for seed in _graft_seeds(study):  # the donors' main runs are trained first
    name, cfg, run = study.main_location(seed)
    stages[name] = cfg
    donors.append(f"s{seed}={study.stage_dir(name)}:{run}")
    conds.append(f"graft_s{seed}=graft:s{seed}")
  return list(stages.items()) + [("graft", study.config(
      paper_seqs=800_000, paper_eval_every=1000, conditions=tuple(conds),
      donors=tuple(donors)))]


def _graft_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  return _versus_none(
      study, results["graft"],
      "App. 7: grafting in a fully trained Layer 1 (with its embeddings), from the same seed "
      "or another, shortens the plateau", "none (all heads, no graft)", "appendix7_graft",
      "App. 7: graft-in of a trained Layer 1")


# ============================================================================ App. 8 PT variants

def _pt_stages(study: Study, heads: dict) -> Stages:
  S = _S(heads)
  top3 = ",".join(_P(heads, rank=r) for r in range(3))
  conds = (f"none=keep_only:{S}", f"pt_other=pt:{_P(heads, rank=1)};keep_only:{S}",
           f"pt_set=pt:{top3};keep_only:{S}", f"pt_all=pt:L1H*;keep_only:{S}")
  return [("pt_variants", study.config(paper_seqs=800_000, paper_eval_every=5000,
                                       conditions=conds))]


def _pt_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  return _versus_none(
      study, results["pt_variants"],
      "App. 8 (our reading): a PT clamp on another Layer-1 head, on a set of PT heads, or on "
      "all Layer-1 heads also shortens the plateau", "none (REST ablated)",
      "appendix8_pt_variants", "App. 8: PT clamps on other / several / all Layer-1 heads",
      note=f"PT heads by score: {heads[PAPER_SEED]['pt_order']}.\n\n")


# ============================================================================ App. 10 progress measures

def _a10_stages(study: Study, heads: dict) -> Stages:
  return [_clamp_stage(study, heads, PAPER_SEED)]


def _a10_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  stage = f"clamps_s{PAPER_SEED}"
  wd = study.stage_dir(stage)
  ctx = context.load_context(wd)
  S, P = _S(heads), _P(heads)
  steps = context.subsample_steps(ckpt_lib.list_steps(wd), study.scale.num_checkpoints)
  params_K = ctx.stacked_params(0, steps)   # run 0 = "none" (REST ablated)
  idx = ctx.dense_set(study.scale.head_size)
  specs = {"own loss (REST ablated)": f"keep_only:{S}",
           f"composite subcircuit (PT clamp on {P})": f"keep_only:{S};pt:{P}",
           f"copy subcircuit (IH clamp on {S})": f"keep_only:{S};ih:{S}"}
  m = measures.measure(params_K, ctx.features, idx, ctx.cfg.model,
                       measures.conditions(list(specs.values()), ctx.cfg.model), head_scores=())
  loss = {k: m["loss"][:, q] for q, k in enumerate(specs)}
  lt = {k: timing.learning_time(steps, v) for k, v in loss.items()}
  own = "own loss (REST ablated)"
  hz = float(steps[-1])
  out = Outcome([V.earlier_than(
      "App. 10 (our reading): measured on the unclamped baseline's checkpoints, the subcircuit clamps reveal "
      "progress before the baseline's own loss drops", {k: v for k, v in lt.items() if k != own},
      "the baseline's own dense-set loss", lt[own], hz)])
  res = results[stage]
  trained = {k[0]: v for k, v in curves(res).items()}
  groups = {f"measure: {k}": (np.asarray(steps, float), v) for k, v in loss.items()}
  groups.update({f"trained with clamp: {k}": trained[k] for k in ("pt", "match")})
  out.figures += _curve_figure(study, "appendix10_progress_measures", groups,
                               "App. 10: subcircuit progress measures vs clamped training")
  out.notes.append("| measure | learning time on the baseline's checkpoints |\n|---|---|\n" +
                   "\n".join(f"| {k} | {'censored' if math.isnan(v) else f'{v:,.0f}'} |"
                             for k, v in lt.items()))
  return out


# ============================================================================ App. 15 IS sweep

STRENGTHS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1,
             0.0)


def _is_stages(study: Study, heads: dict) -> Stages:
  S = _S(heads)
  conds = tuple(f"s{s:g}=ih:{S}@{s:g}" for s in STRENGTHS)
  return [("is_sweep", study.config(paper_seqs=600_000, paper_eval_every=5000,
                                    conditions=conds))]


def _is_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  res = results["is_sweep"]
  lts, hz = {float(k[0][1:]): v for k, v in learning_times(res).items()}, horizon(res)
  xs = [s for s in STRENGTHS if s >= 0.5]
  out = Outcome([V.decreasing_trend(
      "App. 15: the stronger the clamped match (s >= 0.5), the earlier the phase change",
      xs, [lts[s] for s in xs], hz, "clamp strength s")])
  fig, ax = plots.subplots(figsize=(6, 4))
  ax.plot(STRENGTHS, [V.effective_lt(lts[s], hz) for s in STRENGTHS], "o-")
  ax.set_xlabel("IH clamp strength s (IS = 2s - 1)")
  ax.set_ylabel("learning time (censored drawn at the horizon)")
  ax.set_title("App. 15: induction-strength sweep")
  ax.grid(alpha=0.3)
  out.figures += _png(plots._save(fig, study.figure_dir, "appendix15_is_sweep"))  # pylint: disable=protected-access
  out.notes.append(_lt_table(learning_times(res), hz))
  return out


# ============================================================================ App. 17 pairs

def _pairs_stages(study: Study, heads: dict) -> Stages:
  s = heads[PAPER_SEED]["strongest"]
  conds = tuple(f"pair_L2H{h}=keep_only:L2H{s},L2H{h}" for h in range(8) if h != s)
  return [("pairs", study.config(paper_seqs=1_000_000, paper_eval_every=5000,
                                 conditions=conds))] + _single_stages(study, heads)


def _pairs_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  res = results["pairs"]
  lts, hz = learning_times(res), horizon(res)
  alone = {k[0]: v for k, v in learning_times(results["single_head"]).items()}[_S(heads)]
  med = float(np.median([V.effective_lt(v, hz) for v in lts.values()]))
  med = math.nan if med > hz else med  # most pairs censored: the median is censored too
  out = Outcome([V.earlier_than(
      "App. 17 (our reading): with STRONGEST plus one other Layer-2 head active, the phase "
      "change comes no later than with STRONGEST alone", {"median over pairs": med},
      f"{_S(heads)} alone (Fig. 4b run)", alone, hz)])
  out.notes.append(_lt_table(lts, hz))
  out.figures += _curve_figure(study, "appendix17_pairs", {k[0]: v for k, v in curves(res).items()},
                               f"App. 17: {_S(heads)} plus one other head")
  return out


# ============================================================================ App. 18 seeds

def _seed_list(study: Study) -> tuple[int, ...]:
  return study.scale.extra_seeds


def _seeds_stages(study: Study, heads: dict) -> Stages:
  seeds = _seed_list(study)
  conds = tuple(f"L2H{h}=keep_only:L2H{h}" for h in range(8))
  out = [("seeds", study.main_config(seeds, dense=False)),
         ("single_head_seeds", study.config(paper_seqs=1_000_000, paper_eval_every=5000,
                                            conditions=conds, seeds=seeds))]
  return out + [_clamp_stage(study, heads, s) for s in seeds]


def _seeds_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  seeds = _seed_list(study)
  main = curves(results["seeds"])
  out = Outcome([])
  for s in seeds:
    (seqs, loss), = [v for k, v in main.items() if k[1] == s]
    out.verdicts.append(V.plateau_then_drop(f"App. 18 (seed {s}): plateau near ln 2, then a "
                                            "phase change", seqs, loss))
  single = learning_times(results["single_head_seeds"])
  for s in seeds:
    learned = {k[0]: not math.isnan(v) for k, v in single.items() if k[1] == s}
    out.verdicts.append(V.fraction_at_least(f"App. 18 (seed {s}): each Layer-2 head alone "
                                            "learns the task", learned, 0.75,
                                            "learned within the run"))
  for s in seeds:
    res = results[f"clamps_s{s}"]
    out.verdicts += _clamp_verdicts(learning_times(res), horizon(res), s)
  out.notes.append("Heads per seed (from each seed's main run): " + "; ".join(
      f"seed {s}: STRONGEST {_S(heads, s)}, PT {_P(heads, s)}" for s in seeds))
  out.figures.append(os.path.join(study.stage_dir("seeds"), "loss_curves.png"))
  return out


# ============================================================================ the registry


_paper_only = lambda study: (PAPER_SEED,)
_none = lambda study: ()

ENTRIES: dict[str, Entry] = {e.key: e for e in (
    Entry("main", ("3a", "3b", "4a", "A11", "A12", "A13", "A14", "A16"),
          "Main run: phase change, induction and previous-token heads, ablations, wiring",
          _none, _main_stages, _main_analyze),
    Entry("4b", ("4b",), "Single Layer-2 head runs", _paper_only, _single_stages,
          _single_analyze),
    Entry("5a", ("5a", "A9"), "Toy model a * b * c", _none, lambda s, h: [], _toy_analyze),
    Entry("5b", ("5b",), "Training with subcircuits clamped", _paper_only,
          lambda study, heads: [_clamp_stage(study, heads, PAPER_SEED)], _5b_analyze),
    Entry("6", ("6",), "Class and label scaling", _paper_only, _scaling_stages, _6_analyze),
    Entry("A7", ("A7",), "Graft-in of a trained Layer 1", _none, _graft_stages, _graft_analyze),
    Entry("A8", ("A8",), "PT clamps on other / several / all Layer-1 heads", _paper_only,
          _pt_stages, _pt_analyze),
    Entry("A10", ("A10",), "Progress measures under clamps", _paper_only, _a10_stages,
          _a10_analyze),
    Entry("A15", ("A15",), "Induction-strength sweep", _paper_only, _is_stages, _is_analyze),
    Entry("A17", ("A17",), "Head pairs", _paper_only, _pairs_stages, _pairs_analyze),
    Entry("A18", ("A18",), "Extra seeds", lambda study: study.scale.extra_seeds, _seeds_stages,
          _seeds_analyze),
    tokens_entry.ENTRY,
) + beyond.ENTRIES + dynamics.ENTRIES + llc_entry.ENTRIES}


# Entries beyond the paper: run with --figure=beyond (not part of "all").
BEYOND = ("tokens",) + tuple(e.key for e in beyond.ENTRIES + dynamics.ENTRIES
                              + llc_entry.ENTRIES)


def resolve(figure: str) -> list[Entry]:
  """'5b' / 'A7' / '3a' / 'main' / 'all' (the paper) / 'beyond' -> entries, in order."""
  if figure == "all":
    return [e for e in ENTRIES.values() if e.key not in BEYOND]
  if figure == "beyond":
    return [ENTRIES[k] for k in BEYOND]
  out = []
  for f in (s.strip() for s in figure.split(",")):
    found = [e for e in ENTRIES.values() if f.lower() == e.key.lower()
             or f.lower() in (x.lower() for x in e.figures)]
    if not found:
      known = sorted({x for e in ENTRIES.values() for x in (e.key,) + e.figures})
      raise ValueError(f"unknown figure {f!r}; known: {', '.join(known)}, 'all' (the paper) "
                       "or 'beyond' (experiments beyond the paper)")
    out += [e for e in found if e not in out]
  return out
