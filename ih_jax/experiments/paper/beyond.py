"""Registry entries beyond the paper: deeper models, capacity, vocabulary size.

Each asks a question the paper leaves open, with the same machinery as the paper's
entries: stages are sweeps, head choices come from each model's own unclamped run
(never constants), and every verdict is computed by code. Claims are phrased as the
question asked ("Q: ..."); "did not hold" is an answer, not a failure.

  deep      a 6-layer model, attention-only and with MLPs: where do the previous-
            token and induction heads form, and do the paper's subcircuit clamps
            still shorten the plateau?
  capacity  width x heads (L = 2) and depth: which models form induction heads,
            how learning time scales, whether redundancy tracks spare heads.
  vocab     labels x classes, wider than Fig. 6: how each slows the phase change.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from ih_jax import plots
from ih_jax.analysis import context, heads as heads_lib, measures
from ih_jax.analysis import verdicts as V
from ih_jax.experiments.paper.registry_base import Entry, Outcome, Stages, curve_figure, lt_table
from ih_jax.experiments.paper.study import PAPER_SEED, Study, curves, horizon, learning_times

PT_HEAD = 0.5   # a head with final previous-token score above this is a PT head

# pylint: disable=invalid-name


def _name(layer: int, head: int) -> str:
  """Paper numbering: layers 1-based, heads 0-based."""
  return f"L{layer + 1}H{head}"


def _final_scores(study: Study, results: list) -> list[dict[str, Any]]:
  """Per run of the results: condition, seed, variant, final IS and PT score [L, H] (under
  the run's own clamps) and `usable` [L, H] (the heads it could use; see heads_lib)."""
  out = []
  for res in results:
    ctx = context.load_context(res.workdir)
    dense = ctx.dense_set(study.scale.head_size)
    m_all = measures.measure(res.params, ctx.features, dense, ctx.cfg.model)
    L, H = ctx.cfg.model.num_layers, ctx.cfg.model.num_heads
    for run in res.runs:
      run_c = ctx.run_clamps(run.index)
      if run_c is None:
        m = {k: v[run.index] for k, v in m_all.items()}
      else:  # a clamped run is measured as it was trained
        one = jax.tree.map(lambda x, i=run.index: np.asarray(x)[i:i + 1], res.params)
        m = {k: v[0] for k, v in measures.measure_under(
            one, ctx.features, dense, ctx.cfg.model, run_c,
            seqs_K=[ctx.cfg.train.num_seqs]).items()}  # final params
      out.append(dict(condition=run.condition, seed=run.init_seed, variant=run.variant,
                      model=ctx.cfg.model, induction_strength=m["induction_strength"],
                      pt_score=m["pt_score"],
                      usable=heads_lib.usable_mask(run_c, L, H)))
  return out


def _count_ih(is_LH: np.ndarray, usable_LH: np.ndarray | None = None) -> int:
  """Induction heads: final IS above STRONG_IS in any layer but the first, among the
  heads the run could use."""
  strong = np.asarray(is_LH)[1:] > V.STRONG_IS
  if usable_LH is not None:
    strong &= np.asarray(usable_LH)[1:]
  return int(strong.sum())


def _median_lt(lts: list[float], hz: float) -> float:
  """Upper median learning time over seeds (censored runs count as past the horizon).

  With an even count the upper of the two middle values is taken, so a censored run
  is never averaged into a learning time that no run had (with 2 seeds, one censored
  run makes the median censored).
  """
  eff = sorted(V.effective_lt(v, hz) for v in lts)
  med = eff[len(eff) // 2]
  return math.nan if med > hz else med


# ============================================================================ deep

DEEP_LAYERS = 6
DEEP_MLP = (0, 4)


def _deep_seeds(study: Study) -> tuple[int, ...]:
  return (PAPER_SEED,) + study.scale.extra_seeds[:2]


def _deep_none_stage(study: Study, mlp: int) -> tuple[str, Any]:
  return (f"deep_mlp{mlp}_none", study.config(
      paper_seqs=1_000_000, paper_eval_every=5000, conditions=("none",),
      seeds=_deep_seeds(study), model=dict(num_layers=DEEP_LAYERS, mlp_ratio=mlp)))


def deep_heads(study: Study, mlp: int) -> dict[str, dict[str, Any]]:
  """Per seed: the strongest PT head (any layer but the last), the strongest induction
  head (any layer but the first) and the last layer's strongest head, from the seed's
  own unclamped 6-layer run (trained here if needed; cached in deep_heads.json)."""
  return study.cached("deep_heads.json", f"mlp{mlp}", lambda: _measure_deep_heads(study, mlp))


def _measure_deep_heads(study: Study, mlp: int) -> dict[str, dict[str, Any]]:
  name, cfg = _deep_none_stage(study, mlp)
  scores = _final_scores(study, study.stage(name, cfg))
  info = {}
  for s in scores:
    is_LH, pt_LH = np.asarray(s["induction_strength"]), np.asarray(s["pt_score"])
    L = is_LH.shape[0]
    pt = heads_lib.strongest_in(pt_LH, s["usable"], range(L - 1))
    ih = heads_lib.strongest_in(is_LH, s["usable"], range(1, L))
    last = heads_lib.strongest(is_LH[-1], s["usable"][-1])
    if pt is None or ih is None or last is None:
      raise ValueError(f"deep run (seed {s['seed']}): no usable head to choose")
    info[str(s["seed"])] = dict(
        pt=_name(*pt), ih=_name(*ih), last=_name(DEEP_LAYERS - 1, last),
        induction_strength=np.round(is_LH, 4).tolist(), pt_score=np.round(pt_LH, 4).tolist())
  return info


def _deep_conditions(h: dict[str, Any]) -> tuple[str, ...]:
  return ("none", f"pt=pt:{h['pt']}", f"match=ih:{h['ih']}", "perfect_l1=perfect_l1",
          f"l1_copy=perfect_l1;copy:{h['last']}")


def _deep_stages(study: Study, heads: dict) -> Stages:
  out = []
  for mlp in DEEP_MLP:
    out.append(_deep_none_stage(study, mlp))
    per_seed = heads.get("deep", {}).get(f"mlp{mlp}") or deep_heads(study, mlp)
    for seed in _deep_seeds(study):
      out.append((f"deep_mlp{mlp}_clamps_s{seed}", study.config(
          paper_seqs=1_000_000, paper_eval_every=5000,
          conditions=_deep_conditions(per_seed[str(seed)]), seeds=(seed,),
          model=dict(num_layers=DEEP_LAYERS, mlp_ratio=mlp))))
  return out


def _layer_table(h: dict[str, Any]) -> str:
  is_LH, pt_LH = np.asarray(h["induction_strength"]), np.asarray(h["pt_score"])
  rows = ["| layer | max PT score | PT heads (> %.1f) | max IS | induction heads (IS > %.1f) |"
          % (PT_HEAD, V.STRONG_IS), "|---|---|---|---|---|"]
  for l in range(is_LH.shape[0]):
    rows.append(f"| {l + 1} | {pt_LH[l].max():.2f} | {int((pt_LH[l] > PT_HEAD).sum())} | "
                f"{is_LH[l].max():.2f} | {int((is_LH[l] > V.STRONG_IS).sum()) if l else '-'} |")
  return "\n".join(rows)


def _deep_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  out = Outcome([])
  for mlp in DEEP_MLP:
    tag = f"{DEEP_LAYERS} layers, {'MLP ratio %d' % mlp if mlp else 'attention-only'}"
    per_seed = deep_heads(study, mlp)
    base = curves(results[f"deep_mlp{mlp}_none"])
    for seed in _deep_seeds(study):
      h = per_seed[str(seed)]
      (seqs, loss), = [v for k, v in base.items() if k[1] == seed]
      out.verdicts.append(V.plateau_then_drop(
          f"Q ({tag}, seed {seed}): is there still a plateau near ln 2, then a phase change?",
          seqs, loss))
      is_LH, pt_LH = np.asarray(h["induction_strength"]), np.asarray(h["pt_score"])
      out.verdicts.append(V.at_least(
          f"Q ({tag}, seed {seed}): does an induction head form? (strongest: {h['ih']})",
          float(is_LH[1:].max()), V.STRONG_IS, f"final IS of {h['ih']}"))
      out.verdicts.append(V.at_least(
          f"Q ({tag}, seed {seed}): does a previous-token head form? (strongest: {h['pt']})",
          float(pt_LH[:-1].max()), PT_HEAD, f"final PT score of {h['pt']}"))
      res = results[f"deep_mlp{mlp}_clamps_s{seed}"]
      lts, hz = {k[0]: v for k, v in learning_times(res).items()}, horizon(res)
      for cond in ("pt", "match", "perfect_l1", "l1_copy"):
        spec = next(c for c in _deep_conditions(h) if c.startswith(cond + "="))
        out.verdicts.append(V.earlier_than(
            f"Q ({tag}, seed {seed}): does the clamp {spec.split('=', 1)[1]} shorten the "
            "plateau?", {cond: lts[cond]}, "none", lts["none"], hz))
      out.notes.append(f"**{tag}, seed {seed}**: final scores per layer of the unclamped "
                       f"run (heads chosen: PT {h['pt']}, induction {h['ih']}, last-layer "
                       f"{h['last']}):\n\n{_layer_table(h)}\n\n" + lt_table(learning_times(res), hz))
      out.figures += curve_figure(study, f"deep_mlp{mlp}_s{seed}",
                                  {k[0]: v for k, v in curves(res).items()},
                                  f"{tag}, seed {seed}: clamps vs none")
  return out


# ============================================================================ capacity

CAP_WIDTHS = (16, 32, 64, 128)
CAP_HEADS = (1, 2, 4, 8)
CAP_DEPTHS = (1, 2, 3, 4)


def _cap_seeds(study: Study) -> tuple[int, ...]:
  return (PAPER_SEED,) + study.scale.extra_seeds


def _cap_stages(study: Study, heads: dict) -> Stages:
  del heads
  kw = dict(paper_seqs=1_000_000, paper_eval_every=5000, conditions=("none",),
            seeds=_cap_seeds(study))
  return [("cap_width_heads", study.config(grid=(
              "model.d_model=" + ",".join(map(str, CAP_WIDTHS)),
              "model.num_heads=" + ",".join(map(str, CAP_HEADS))), **kw)),
          ("cap_depth", study.config(grid=(
              "model.num_layers=" + ",".join(map(str, CAP_DEPTHS)),), **kw))]


def _cap_rows(study: Study, results: list) -> list[dict[str, Any]]:
  """One row per run: model shape, learning time, induction-head count."""
  lts, hz = learning_times(results), horizon(results)
  rows = []
  for s in _final_scores(study, results):
    m = s["model"]
    rows.append(dict(d_model=m.d_model, num_heads=m.num_heads, num_layers=m.num_layers,
                     seed=s["seed"], lt=lts[(s["condition"], s["seed"], s["variant"])],
                     ih=_count_ih(s["induction_strength"], s["usable"]),
                     max_is=float(np.where(s["usable"][1:], s["induction_strength"][1:],
                                           -np.inf).max())
                     if m.num_layers > 1 else math.nan, horizon=hz))
  return rows


def _group(rows: list[dict], key: tuple[str, ...]) -> dict[tuple, list[dict]]:
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(r[k] for k in key), []).append(r)
  return dict(sorted(out.items()))


def _cap_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  wh = _cap_rows(study, results["cap_width_heads"])
  # The depth axis passes through (64, 8, L = 2), which the width x heads grid already
  # trained with the same seeds (identical runs): count each shape and seed once.
  dp = [r for r in _cap_rows(study, results["cap_depth"]) if r["num_layers"] != 2] + [
      r for r in wh if (r["d_model"], r["num_heads"]) == (64, 8)]
  every = wh + [r for r in dp if r["num_layers"] != 2]
  hz = wh[0]["horizon"]
  out = Outcome([])
  deep_enough = {f"d{r['d_model']} H{r['num_heads']} L{r['num_layers']} s{r['seed']}":
                 not math.isnan(r["lt"]) and r["ih"] >= 1
                 for r in every if r["num_layers"] >= 2}
  out.verdicts.append(V.fraction_at_least(
      "Q: does every model with L >= 2 (width 16-128, 1-8 heads, depth 2-4) learn the task "
      "and form an induction head within the horizon?", deep_enough, 1.0,
      f"learned (loss < 0.4 ln 2) and >= 1 head with IS > {V.STRONG_IS}"))
  one_layer = [r for r in dp if r["num_layers"] == 1]
  out.verdicts.append(V.Verdict(
      "Q: does a 1-layer model fail to learn the task (no two-layer induction circuit)?",
      "learning times " + ", ".join("censored" if math.isnan(r["lt"]) else f"{r['lt']:,.0f}"
                                    for r in one_layer),
      "every 1-layer run censored (loss never below 0.4 ln 2)",
      all(math.isnan(r["lt"]) for r in one_layer) if one_layer else None))
  by_w = _group([r for r in wh if r["num_heads"] == max(CAP_HEADS)], ("d_model",))
  out.verdicts.append(V.decreasing_trend(
      f"Q: do wider models (L = 2, {max(CAP_HEADS)} heads) learn sooner?", [k[0] for k in by_w],
      [_median_lt([r["lt"] for r in v], hz) for v in by_w.values()], hz, "width (median lt)"))
  by_h = _group([r for r in wh if r["d_model"] == 64], ("num_heads",))
  out.verdicts.append(V.decreasing_trend(
      "Q: do models with more heads (L = 2, width 64) learn sooner?", [k[0] for k in by_h],
      [_median_lt([r["lt"] for r in v], hz) for v in by_h.values()], hz,
      "heads (median lt)"))
  by_d = _group([r for r in dp if r["num_layers"] >= 2], ("num_layers",))
  out.verdicts.append(V.decreasing_trend(
      "Q: do deeper models (width 64, 8 heads) learn sooner?", [k[0] for k in by_d],
      [_median_lt([r["lt"] for r in v], hz) for v in by_d.values()], hz, "depth (median lt)"))
  by_hw = _group(wh, ("num_heads",))
  out.verdicts.append(V.increasing_trend(
      "Q: does redundancy track spare capacity — do models with more heads per layer end "
      "with more induction heads (all widths, L = 2)?", [k[0] for k in by_hw],
      [float(np.mean([r["ih"] for r in v])) for v in by_hw.values()], "heads",
      "mean induction-head count"))
  frac = ", ".join(f"{k[0]} heads: {np.mean([r['ih'] for r in v]) / k[0]:.2f}"
                   for k, v in by_hw.items())
  out.notes.append("The count is bounded by the heads per layer, so the rising count above is "
                   "partly mechanical; the share of layer-2 heads that become induction heads "
                   f"(all widths, L = 2): {frac}.")
  table = ["| width | heads | depth | runs learned | median learning time | induction heads "
           "per run | max IS per run |", "|---|---|---|---|---|---|---|"]
  for key, v in _group(every, ("d_model", "num_heads", "num_layers")).items():
    med = _median_lt([r["lt"] for r in v], hz)
    table.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                 f"{sum(not math.isnan(r['lt']) for r in v)}/{len(v)} | "
                 f"{'censored' if math.isnan(med) else f'{med:,.0f}'} | "
                 f"{', '.join(str(r['ih']) for r in v)} | "
                 f"{', '.join(_fmt_is(r['max_is']) for r in v)} |")
  out.notes.append(f"Horizon {hz:,.0f} sequences; seeds {list(_cap_seeds(study))}.\n\n"
                   + "\n".join(table))
  out.figures += _cap_figure(study, wh, hz)
  return out


def _fmt_is(x: float) -> str:
  return "-" if math.isnan(x) else f"{x:.2f}"


def _cap_figure(study: Study, rows: list[dict], hz: float) -> list[str]:
  fig, axes = plots.subplots(1, 2, figsize=(10, 4))
  grid_lt = np.full((len(CAP_WIDTHS), len(CAP_HEADS)), np.nan)
  grid_ih = np.zeros_like(grid_lt)
  for (w, h), v in _group(rows, ("d_model", "num_heads")).items():
    i, j = CAP_WIDTHS.index(w), CAP_HEADS.index(h)
    grid_lt[i, j] = _median_lt([r["lt"] for r in v], hz)
    grid_ih[i, j] = np.mean([r["ih"] for r in v])
  for ax, g, title in ((axes[0], grid_lt, "median learning time (blank = censored)"),
                       (axes[1], grid_ih, "mean number of induction heads")):
    im = ax.imshow(g, origin="lower", cmap="viridis")
    ax.set_xticks(range(len(CAP_HEADS)), [str(h) for h in CAP_HEADS])
    ax.set_yticks(range(len(CAP_WIDTHS)), [str(w) for w in CAP_WIDTHS])
    ax.set_xlabel("heads per layer")
    ax.set_ylabel("width (d_model)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
  return [p for p in plots._save(fig, study.figure_dir, "capacity_grid")  # pylint: disable=protected-access
          if p.endswith(".png")]


# ============================================================================ vocab

VOCAB_LABELS = (5, 10, 20, 40)
VOCAB_CLASSES = (10, 50, 200, 800)


def _vocab_stages(study: Study, heads: dict) -> Stages:
  del heads
  splits = ",".join(f"({c},-1,100)" for c in VOCAB_CLASSES)
  return [("vocab_grid", study.config(
      paper_seqs=2_000_000, paper_eval_every=5000, conditions=("none",),
      seeds=(PAPER_SEED,) + study.scale.extra_seeds[:1],
      grid=("model.num_labels=" + ",".join(map(str, VOCAB_LABELS)),
            "task.class_split=" + splits)))]


def _vocab_analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  res = results["vocab_grid"]
  hz = horizon(res)
  lt_by: dict[tuple[int, int], list[float]] = {}
  for r in res:  # one program per (labels, classes): read them from its config
    cfg = context.load_context(r.workdir).cfg
    lt_by.setdefault((cfg.model.num_labels, cfg.task.class_split[0]), []).extend(
        learning_times([r]).values())
  med = {k: _median_lt(v, hz) for k, v in lt_by.items()}
  eff = lambda v: V.effective_lt(v, hz)
  base_c = 50
  out = Outcome([])
  out.verdicts.append(V.increasing_trend(
      f"Q: does the phase change come later with more labels ({base_c} classes)?",
      VOCAB_LABELS, [eff(med[(l, base_c)]) for l in VOCAB_LABELS], "labels",
      "median learning time (censored = horizon)"))
  out.verdicts.append(V.increasing_trend(
      "Q: does the phase change come later with more classes (5 labels)?",
      VOCAB_CLASSES, [eff(med[(5, c)]) for c in VOCAB_CLASSES], "classes",
      "median learning time (censored = horizon)"))
  out.verdicts.append(V.ratio_greater(
      f"Q (the paper's open question on vocabulary size): do labels slow the phase change "
      f"more than classes, at the grid's edge ({max(VOCAB_LABELS)} labels vs "
      f"{max(VOCAB_CLASSES)} classes)?", f"{max(VOCAB_LABELS)} labels",
      med[(max(VOCAB_LABELS), base_c)], f"{max(VOCAB_CLASSES)} classes",
      med[(5, max(VOCAB_CLASSES))], med[(5, base_c)], hz))
  table = ["| labels \\ classes | " + " | ".join(map(str, VOCAB_CLASSES)) + " |",
           "|---|" + "---|" * len(VOCAB_CLASSES)]
  for l in VOCAB_LABELS:
    cells = [("censored" if math.isnan(med[(l, c)]) else f"{med[(l, c)]:,.0f}")
             for c in VOCAB_CLASSES]
    table.append(f"| {l} | " + " | ".join(cells) + " |")
  out.notes.append(f"Upper-median learning time over seeds "
                   f"{[PAPER_SEED] + list(study.scale.extra_seeds[:1])} (horizon {hz:,.0f}; "
                   "censored if the upper-median run is):\n\n" + "\n".join(table))
  fig, ax = plots.subplots(figsize=(5.5, 4))
  g = np.array([[med[(l, c)] for c in VOCAB_CLASSES] for l in VOCAB_LABELS])
  im = ax.imshow(g, origin="lower", cmap="magma")
  ax.set_xticks(range(len(VOCAB_CLASSES)), [str(c) for c in VOCAB_CLASSES])
  ax.set_yticks(range(len(VOCAB_LABELS)), [str(l) for l in VOCAB_LABELS])
  ax.set_xlabel("training classes")
  ax.set_ylabel("labels")
  ax.set_title("median learning time (blank = censored)", fontsize=9)
  fig.colorbar(im, ax=ax)
  out.figures += [p for p in plots._save(fig, study.figure_dir, "vocab_grid")  # pylint: disable=protected-access
                  if p.endswith(".png")]
  return out


_none = lambda study: ()

ENTRIES = (
    Entry("deep", ("X-deep",), "Beyond: 6-layer models (with / without MLPs) under the "
          "paper's clamps", _none, _deep_stages, _deep_analyze),
    Entry("capacity", ("X-capacity",), "Beyond: width x heads x depth capacity grid",
          _none, _cap_stages, _cap_analyze),
    Entry("vocab", ("X-vocab",), "Beyond: labels x classes grid (vocabulary size)", _none,
          _vocab_stages, _vocab_analyze),
)
