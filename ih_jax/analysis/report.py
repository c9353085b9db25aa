"""Everything `ih_jax.experiments.analyze` computes for a finished workdir, as one function.

Writes into WORKDIR/analysis/:
  phase_times.csv             per run and view: learning time (or censored), plateau
                              exit (or no plateau), steepest descent
  progress_run<r>.csv         per checkpoint: dense-set loss / acc, IS per last-layer head,
                              PT scores per first-layer head (and the reported layers of
                              any head score a user registered, ih_jax.analysis.scores)
  head_ablations_run<r>.csv   remove-one / keep-only-one at the final checkpoint
  additivity_run<r>.csv       cumulative add-back in strength order
  mistake_fixing_run<r>.csv   per head: accuracy of keep-only-h, fraction of the strongest
                              head's mistakes it gets right
  perfected_match_run<r>.csv  the same with the kept head IH-clamped (pm_only_h), plus
                              accuracy per output label
  subcircuits_run<r>.csv      single-head runs only: loss under the composite (PT clamp)
                              and copy (IH clamp) subcircuit clamps over training
  layer_contributions_run<r>.csv  per checkpoint: loss with layer 1's direct path removed
                              and with the last layer ablated (post-hoc clamps)
  layer1_set_ablations_run<r>.csv  accuracy with sets of layer-1 heads ablated under
                              pattern- and value-preservation (default: top-3 PT heads, rest)
  wiring_run<r>_*.csv         layer-2 x layer-1 heatmaps (pp / pv, all-but-one / only-one)
  composition_run<r>_*.csv    K/Q/V composition scores (final and initial checkpoints)
and the matching figures (PNG + PDF), plus attention_patterns_run<r> (mean pattern of
every head at the first checkpoint, the learning time and the last) and
loss_pca_run<r> (per-sequence losses over checkpoints on their top 2 PCs).

Every CSV starts with run, condition, seed, clamped columns: clamped = 1 rows are
measured under the run's own clamps (its training condition), clamped = 0 rows with
them removed (for an unclamped run, the same numbers). A clamped run's clamp-free
figures end in `_clampfree`; every figure's title says which run and view it shows.
phase_times.csv also has has_plateau (see ih_jax.analysis.timing).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from ih_jax import clamps as clamps_lib
from ih_jax import plots, workdir as workdir_lib
from ih_jax.analysis import ablation, circuits, context, heads as heads_lib, measures
from ih_jax.analysis import scores as scores_lib, timing


def analyze_workdir(workdir: str, *, runs: list[int] | None = None, num_checkpoints: int = 100,
                    dense_size: int | None = None, wiring_size: int | None = 4096,
                    do_wiring: bool = True, posthoc_size: int | None = 8192,
                    l1_sets: list[str] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
  """Computes and writes the analysis of `workdir`; returns a summary per run.

  Each run is analysed under the clamps it was trained with (clamped = 1, the
  default view, matching its training curve) and, for a clamped run, also with its
  clamps removed (clamped = 0). Every CSV carries run / condition / seed / clamped
  columns; every figure's title names the run, its condition and seed and the view.
  Heads a run ablated, clamped or replaced are never chosen as its induction or
  previous-token head (ih_jax.analysis.heads).
  """
  t0 = time.time()
  ctx = context.load_context(workdir)
  out_dir = os.path.join(workdir, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  cfg = ctx.cfg.model
  run_list = list(range(len(ctx.runs))) if runs is None else list(runs)
  bad = [r for r in run_list if not 0 <= r < len(ctx.runs)]
  if bad:
    raise ValueError(f"runs {bad} do not exist in {workdir!r}: it holds runs "
                     f"0..{len(ctx.runs) - 1}")

  for heads in l1_sets or []:  # checked now, not after minutes of measuring
    named = clamps_lib.parse_heads(heads, cfg.num_layers, cfg.num_heads)
    if any(l != 0 for l, _ in named):
      raise ValueError(f"l1_sets entry {heads!r} names heads outside layer L1; a set lists "
                       "layer-L1 heads, e.g. 'L1H0,L1H3'")
  if not os.path.exists(os.path.join(workdir, workdir_lib.DONE_JSON)):
    log(f"[analyze] note: {workdir} has no {workdir_lib.DONE_JSON}: the run is unfinished or "
        "still training; analysing the checkpoints written so far")

  metrics = workdir_lib.read_metrics(workdir)
  phase = {c: timing.run_phase_table(metrics, clamped=c) for c in (1, 0)}
  _write_rows(os.path.join(out_dir, "phase_times.csv"),
              [dict(r, clamped=c) for c in (1, 0) for r in phase[c]])
  plots.plot_training_curves(workdir)
  if any(r["clamped"] == 0 for r in metrics) and any(
      ctx.run_clamps(r) is not None for r in range(len(ctx.runs))):
    plots.plot_training_curves(workdir, clamped=0, out_name="loss_curves_clampfree")
  if len(phase[1]) > 1:
    plots.plot_learning_times(out_dir, phase[1])

  steps = context.subsample_steps(ctx.checkpoint_steps(), num_checkpoints)
  dense, posthoc = ctx.dense_set(dense_size), ctx.dense_set(posthoc_size)
  # The same sequences for both (e.g. the full dense set at full scale): one object, so
  # the post-hoc baseline reuses the progress measures' loss instead of measuring it again.
  if jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and bool(np.array_equal(a, b)),
                               dense, posthoc)):
    posthoc = dense
  sets = _Sets(dense, ctx.dense_set(wiring_size) if do_wiring else None, posthoc)
  log(f"[analyze] {len(run_list)} run(s); {len(steps)} checkpoint(s) from "
      f"{steps[0]:,d} to {steps[-1]:,d} seqs; dense set of {sets.dense.classes.shape[0]:,d} "
      "sequences")
  summary: dict[str, Any] = {}
  for i, run in enumerate(run_list):
    info = ctx.runs[run]
    run_c = ctx.run_clamps(run)
    t_run = time.time()
    log(f"[analyze] run {run} ({i + 1}/{len(run_list)}): {info['condition']}, seed "
        f"{info['init_seed']}" + ("" if run_c is None else f", clamps {info['spec']!r}"))
    params_K = ctx.stacked_params(run, steps)
    reasons = heads_lib.unusable_reasons(run_c, cfg.num_layers, cfg.num_heads)
    views = [(1, run_c)] if run_c is None else [(1, run_c), (0, None)]
    tables: dict[str, list[dict[str, Any]]] = {}
    per_view = {}
    for clamped, base in views:
      ident = dict(run=run, condition=info["condition"], seed=info["init_seed"],
                   clamped=clamped)
      lt = next((p["learning_time"] for p in phase[clamped] if p["run"] == run), math.nan)
      label = _view_label(run, info, clamped, run_c is not None)
      suffix = "" if clamped else "_clampfree"
      got, view_tables = _analyze_view(ctx, params_K, steps, sets, base, reasons, info, lt,
                                       label, suffix, do_wiring, l1_sets, out_dir, f"run{run}",
                                       log)
      for name, rows in view_tables.items():
        rows = [dict(ident, **r) for r in rows]
        if run_c is None:  # unclamped run: the clamp-free view is the same numbers
          rows += [dict(r, clamped=0) for r in rows]
        tables.setdefault(name, []).extend(rows)
      per_view[clamped] = got
    for name, rows in tables.items():  # "#" marks where the run tag goes in the name
      stem = name.replace("#", f"run{run}") if "#" in name else f"{name}_run{run}"
      _write_rows(os.path.join(out_dir, f"{stem}.csv"), rows)
    s = dict(run=run, condition=info["condition"], seed=info["init_seed"],
             spec=info["spec"], clamped_run=run_c is not None,
             unusable_heads={clamps_lib.head_name(h): why for h, why in sorted(reasons.items())},
             **per_view[1])
    s["clamp_free"] = per_view.get(0, per_view[1])
    summary[f"run{run}"] = s
    log(f"[analyze] run {run} done in {time.time() - t_run:.1f}s"
        + (f"; about {(time.time() - t0) / (i + 1) * (len(run_list) - i - 1):.0f}s left"
           if i + 1 < len(run_list) else ""))
  log(f"[analyze] done in {time.time() - t0:.1f}s; outputs in {out_dir}")
  return summary


@dataclasses.dataclass
class _Sets:
  dense: Any            # progress measures, ablations
  wiring: Any | None    # the 264 wiring conditions
  posthoc: Any          # post-hoc clamps over checkpoints


def _view_label(run: int, info: dict[str, Any], clamped: int, clamped_run: bool) -> str:
  """What every figure of this view says about itself (its suptitle)."""
  who = f"run {run} · {info['condition']} · seed {info['init_seed']}"
  if not clamped_run:
    return f"{who} · no clamps (unclamped run)"
  if clamped:
    return f"{who} · clamps ON as trained ({info['spec']})"
  return f"{who} · clamps OFF (trained with {info['spec']})"


def _analyze_view(ctx: context.RunContext, params_K: Any, steps: list[int], sets: _Sets,
                  base: clamps_lib.Clamps | None, reasons: dict, info: dict[str, Any],
                  lt: float, label: str, suffix: str, do_wiring: bool,
                  l1_sets: list[str] | None, out_dir: str, tag: str,
                  log: Callable[[str], None] = print
                  ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
  """Every per-run measure of one view (base = the run's clamps, or None = clamp-free).

  Returns its summary and its tables (CSV name stem -> rows; "#" in a stem stands for
  the run tag, else it is appended), and writes its figures.
  """
  cfg = ctx.cfg.model
  L, H = cfg.num_layers, cfg.num_heads
  feats = ctx.features
  # Head choices follow what the run could use, in both views.
  usable = heads_lib.mask_from(reasons, L, H)
  tables: dict[str, list[dict[str, Any]]] = {}
  notes: list[str] = []
  fig = lambda stem: f"{stem}_{tag}{suffix}"
  view = "clamp-free view: " if suffix else ("clamped view: " if base is not None else "")
  clock = [time.time()]

  def done(what: str) -> None:  # a line per step: a full-size analysis takes minutes
    log(f"[analyze]   {view}{what} in {time.time() - clock[0]:.1f}s")
    clock[0] = time.time()

  # Windowed clamps act at a checkpoint as they did in training there (seqs_K).
  m = measures.measure_under(params_K, feats, sets.dense, cfg, base,
                             per_sequence=len(steps) >= 3, seqs_K=steps)
  is_KH, pt_KH = m["induction_strength"][:, L - 1], m["pt_score"][:, 0]
  strength = is_KH[-1]
  strongest = heads_lib.strongest(strength, usable[L - 1])
  pt_head = heads_lib.strongest(pt_KH[-1], usable[0])
  if strongest is None:
    notes.append("strongest induction head: " + heads_lib.none_reason(L - 1, reasons, H))
  if pt_head is None:
    notes.append("previous-token head: " + heads_lib.none_reason(0, reasons, H))
  tables["progress"] = _progress_rows(steps, m, L)
  if len(steps) >= 2:
    plots.plot_progress_measures(out_dir, steps, m["loss"], is_KH, pt_KH, layers=(L, 1),
                                 learning_time=lt, name=fig("progress_measures"),
                                 highlight=(strongest, pt_head), title=label)
  if "seq_loss" in m:
    plots.plot_pca_trajectory(out_dir, steps, m["seq_loss"], name=fig("loss_pca"), title=label)
  done(f"progress measures ({len(steps)} checkpoints x {sets.dense.classes.shape[0]:,d} "
       "sequences)")

  # Post-hoc clamps on every checkpoint: layer 1's direct path removed
  # (its heads ablated with patterns and values preserved), and layer 2 ablated.
  contrib_specs = {"layer-1 direct path removed (pp+pv)":
                   f"preserve_pattern;preserve_value;ablate:L1H0-{H - 1}",
                   f"layer-{L} heads ablated": f"ablate:L{L}H0-{H - 1}"}
  ok, skipped = measures.applicable(list(contrib_specs.values()), cfg, base)
  notes += [f"post-hoc {s!r} not applicable: {why}" for s, why in skipped.items()]
  base_loss = (m["loss"] if sets.posthoc is sets.dense else
               measures.measure_under(params_K, feats, sets.posthoc, cfg, base, seqs_K=steps,
                                      head_scores=())["loss"])
  pc = (measures.measure(params_K, feats, sets.posthoc, cfg, measures.conditions(ok, cfg, base),
                         seqs_K=steps, head_scores=()) if ok else None)
  contrib = {lab: (pc["loss"][:, ok.index(sp)] if sp in ok else np.full(len(steps), np.nan))
             for lab, sp in contrib_specs.items()}
  tables["layer_contributions"] = [
      dict(seqs=s_, loss=float(base_loss[k]), **{lab: float(v[k]) for lab, v in
                                                      contrib.items()})
      for k, s_ in enumerate(steps)]
  if len(steps) >= 2:
    plots.plot_layer_contributions(out_dir, steps, base_loss, contrib,
                                   name=fig("layer_contributions"), title=label)

  done(f"post-hoc clamps ({len(steps)} checkpoints x {sets.posthoc.classes.shape[0]:,d} "
       "sequences)")

  # Mean attention patterns at the start, around the learning time and at the end.
  picks = {0, len(steps) - 1}
  if lt == lt:
    picks.add(int(np.argmin(np.abs(np.asarray(steps) - lt))))
  pat_idx = jax.tree.map(lambda x: x[:256], sets.dense)
  patterns = {f"{steps[k]:,d} seqs": measures.mean_patterns(
      jax.tree.map(lambda x, k=k: x[k], params_K), feats, pat_idx, cfg, base, seqs=steps[k])
      for k in sorted(picks)}
  plots.plot_attention_patterns(out_dir, patterns, name=fig("attention_patterns"), title=label)

  final = jax.tree.map(lambda x: x[-1], params_K)
  at_final = dict(seqs_K=[steps[-1]])  # the clamps that acted at the last checkpoint
  abl = ablation.head_ablations(final, feats, sets.dense, cfg, strength, base=base, **at_final)
  abl["usable"] = [bool(u) for u in usable[L - 1]]
  tables["head_ablations"] = _columns_to_rows(abl)
  plots.plot_ablations(out_dir, abl, name=fig("head_ablations"), title=label)
  order = heads_lib.ranked(strength, usable[L - 1])
  add = None
  if order:
    add = ablation.additivity(final, feats, sets.dense, cfg, strength, order=order, base=base,
                              **at_final)
    tables["additivity"] = _columns_to_rows(add)
    for perfected, stem in ((False, "mistake_fixing"), (True, "perfected_match")):
      specs_ok, skip = measures.applicable(
          [f"keep_only:L{L}H{h}" + (f";ih:L{L}H{h}" if perfected else "") for h in range(H)],
          cfg, base)
      if skip:
        notes.append(f"{stem} not applicable: {next(iter(skip.values()))}")
        continue
      tables[stem] = _columns_to_rows(ablation.mistake_fixing(
          final, feats, sets.dense, cfg, strength, perfected=perfected, strongest=strongest,
          base=base, **at_final))
  done("attention patterns and the final checkpoint's head ablations")

  # A single-head run (all other last-layer heads ablated, the paper's "None" clamp baseline):
  # the composite (PT clamp) and copy (IH clamp) subcircuit measures over training.
  kept = _single_kept_head(info["spec"], cfg)
  # Defined relative to the run's own clamp, so in the clamped view only.
  if kept is not None and len(steps) >= 2 and pt_head is not None and not suffix:
    sub_specs = {f"composite subcircuit (PT clamp on L1H{pt_head})":
                 f"keep_only:L{L}H{kept};pt:L1H{pt_head}",
                 f"copy subcircuit (IH clamp on L{L}H{kept})":
                 f"keep_only:L{L}H{kept};ih:L{L}H{kept}"}
    # The reference is the run's own loss, i.e. under its own clamp (REST ablated).
    own = f"keep_only:L{L}H{kept}"
    sub = measures.measure(params_K, feats, sets.posthoc, cfg,
                           measures.conditions([own] + list(sub_specs.values()), cfg),
                           head_scores=())
    tables["subcircuits"] = [dict(seqs=s_, own_loss=float(sub["loss"][k, 0]),
                                  **{lab: float(sub["loss"][k, q + 1])
                                     for q, lab in enumerate(sub_specs)})
                             for k, s_ in enumerate(steps)]
    plots.plot_layer_contributions(
        out_dir, steps, sub["loss"][:, 0], {lab: sub["loss"][:, q + 1] for q, lab in
                                            enumerate(sub_specs)}, name=fig("subcircuits"),
        title=label)
    done("subcircuit clamps over checkpoints")

  # Layer-1 head sets under pattern- / value-preserving ablation: the
  # given sets, or by default the 3 strongest usable PT heads vs the other usable ones.
  pt_order = heads_lib.ranked(pt_KH[-1], usable[0])
  l1 = l1_sets or ([",".join(f"L1H{h}" for h in sorted(pt_order[:3])),
                    ",".join(f"L1H{h}" for h in sorted(pt_order[3:]))] if pt_order else [])
  set_rows = []
  for heads in (h for h in l1 if h):
    ok, skip = measures.applicable([f"preserve_pattern;ablate:{heads}"], cfg, base)
    if skip:
      notes.append(f"layer-1 set ablation of {heads} not applicable: "
                   f"{next(iter(skip.values()))}")
      continue
    set_rows.append(ablation.layer_set_ablation(final, feats, sets.dense, cfg, heads, base=base,
                                                **at_final))
  if set_rows:
    tables["layer1_set_ablations"] = set_rows

  # Composition scores read the weights only: the same in both views.
  comp = circuits.composition_scores(final, H)
  comp0 = circuits.composition_scores(jax.tree.map(lambda x: x[0], params_K), H)
  for x in "qkv":
    tables[f"composition_#_{x}"] = _matrix_rows(comp[x], f"L{L}H", "L1H")
  mats = {f"{x.upper()}-composition (final)": comp[x] for x in "kv"}
  mats.update({f"{x.upper()}-composition (first ckpt)": comp0[x] for x in "kv"})
  plots.plot_heatmaps(out_dir, mats, fig("composition"), f"layer-{L} head", "layer-1 head",
                      title=label)
  wiring_summary, wired = None, False
  if do_wiring and L == 2 and sets.wiring is not None:
    _, skip = measures.applicable(["preserve_pattern;keep_only:L2H0;ablate:L1H0"], cfg, base)
    if skip:
      notes.append(f"wiring not applicable: {next(iter(skip.values()))}")
    else:
      w = ablation.wiring(final, feats, sets.wiring, cfg, base=base, **at_final)
      wired = True
      for key in ("all_but_one_pp", "all_but_one_pv", "only_one_pp", "only_one_pv"):
        tables[f"wiring_#_{key}"] = _matrix_rows(w[key], "L2H", "L1H")
      plots.plot_heatmaps(out_dir, {k.replace("_", " "): w[k] for k in (
          "all_but_one_pv", "all_but_one_pp", "only_one_pv", "only_one_pp")},
          fig("wiring"), "layer-2 head (only one kept)", "layer-1 head", title=label)
      if strongest is not None:
        wiring_summary = dict(
            most_needed_l1_head_pv=int(np.argmin(w["all_but_one_pv"][strongest])),
            most_needed_l1_head_pp=int(np.argmin(w["all_but_one_pp"][strongest])))

  done("layer-1 set ablations, composition" + (" and wiring" if wired else ""))

  got = dict(
      learning_time=lt, final_dense_loss=float(m["loss"][-1]),
      final_dense_acc=float(m["acc"][-1]),
      strongest_heads=[(f"L{L}H{h}", round(float(strength[h]), 3)) for h in order[:3]],
      strongest_head=None if strongest is None else f"L{L}H{strongest}",
      pt_head=None if pt_head is None else f"L1H{pt_head}",
      only_strongest_acc=None if strongest is None else abl["only_acc"][strongest],
      remove_strongest_acc=None if strongest is None else abl["remove_acc"][strongest],
      additive_losses=[] if add is None else [round(x, 4) for x in add["loss"][:4]],
      wiring=wiring_summary,
      layer1_sets={r["heads"]: dict(pp=round(r["pp"], 3), pv=round(r["pv"], 3))
                   for r in set_rows},
      notes=notes)
  return got, tables


def _columns_to_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
  cols = list(table)
  return [{c: table[c][i] for c in cols} for i in range(len(table[cols[0]]))]


def _matrix_rows(matrix: np.ndarray, row_name: str, col_name: str) -> list[dict[str, Any]]:
  return [{"head": f"{row_name}{i}", **{f"{col_name}{j}": float(v) for j, v in enumerate(row)}}
          for i, row in enumerate(matrix)]


def _single_kept_head(spec: str, cfg) -> int | None:
  """The one last-layer head a plain REST-ablation run keeps, else None."""
  if "graft:" in spec:
    return None
  c = clamps_lib.parse(spec, cfg.num_layers, cfg.num_heads)
  keep = np.asarray(c["v_keep"])
  plan = clamps_lib.plan_for(clamps_lib.stack([c]))
  plain = keep[:-1].all() and plan.kinds in ((), ("ablate",))
  kept = np.nonzero(keep[-1])[0]
  return int(kept[0]) if plain and len(kept) == 1 else None


def _write_rows(path: str, rows: list[dict[str, Any]]) -> None:
  if not rows:
    return
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)


def _progress_rows(steps: list[int], m: dict[str, np.ndarray], L: int) -> list[dict[str, Any]]:
  """Loss, acc and each registered head score's reported layers, per checkpoint."""
  rows = []
  for k, s in enumerate(steps):
    row = dict(seqs=s, loss=float(m["loss"][k]), acc=float(m["acc"][k]))
    for score in scores_lib.registered():
      if score.name not in m:
        continue
      H = m[score.name].shape[-1]
      for l in score.layers(L):
        row.update({f"{score.prefix}_L{l + 1}H{h}": float(m[score.name][k, l, h])
                    for h in range(H)})
    rows.append(row)
  return rows


def analyze_sweep(workdir: str, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Learning time per run across every program of a multi-program sweep.

  Writes WORKDIR/analysis/sweep_phase_times.csv and, for each numeric grid field,
  scaling_<field>.png: learning time vs the field's value, one line per condition
  (mean over seeds; censored runs shown as open markers), e.g. the class / label
  scaling curves of a `model.num_labels=5,10,15` grid.
  """
  programs = workdir_lib.read_sweep_index(workdir)
  rows = []
  for prog in programs:
    sub = os.path.join(workdir, prog["workdir"])
    if not os.path.exists(os.path.join(sub, workdir_lib.METRICS_CSV)):
      log(f"[analyze] {sub}: no metrics yet, skipped")
      continue
    for r in timing.run_phase_table(workdir_lib.read_metrics(sub)):
      fields = dict(kv.split("=", 1) for kv in r["variant"].split(";") if "=" in kv)
      rows.append(dict(program=prog["workdir"], **r, **{f"grid:{k}": v for k, v in
                                                        fields.items()}))
  out_dir = os.path.join(workdir, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  keys = sorted({k for r in rows for k in r})
  with open(os.path.join(out_dir, "sweep_phase_times.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  for field in sorted({k for r in rows for k in r if k.startswith("grid:")}):
    try:
      xs = [float(r[field]) for r in rows]
    except (KeyError, ValueError):
      continue  # a non-numeric grid field has no scaling curve
    plots.plot_scaling(out_dir, rows, field[len("grid:"):], xs)
  log(f"[analyze] sweep of {len(programs)} programs, {len(rows)} runs; outputs in {out_dir}")
  return rows
