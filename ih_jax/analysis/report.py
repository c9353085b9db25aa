"""Everything `experiments.analyze` computes for a finished workdir, as one function.

Writes into WORKDIR/analysis/:
  phase_times.csv             per run: learning time (or censored), plateau exit, steepest descent
  progress_run<r>.csv         per checkpoint: dense-set loss / acc, IS per last-layer head,
                              PT score per first-layer head
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
"""

from __future__ import annotations

import csv
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from ih_jax import plots, workdir as workdir_lib
from ih_jax.analysis import ablation, composition, context, measures, timing


def analyze_workdir(workdir: str, *, runs: list[int] | None = None, num_checkpoints: int = 100,
                    dense_size: int | None = None, wiring_size: int | None = 4096,
                    do_wiring: bool = True, posthoc_size: int | None = 8192,
                    l1_sets: list[str] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
  """Computes and writes the analysis of `workdir`; returns a summary per run."""
  t0 = time.time()
  ctx = context.load_context(workdir)
  out_dir = os.path.join(workdir, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  cfg = ctx.cfg.model
  L, H = cfg.num_layers, cfg.num_heads

  phase = timing.run_phase_table(workdir_lib.read_metrics(workdir))
  _write_rows(os.path.join(out_dir, "phase_times.csv"), phase)
  plots.plot_training_curves(workdir)
  if len(phase) > 1:
    plots.plot_learning_times(out_dir, phase)

  steps = context.subsample_steps(ctx.checkpoint_steps(), num_checkpoints)
  idx = ctx.dense_set(dense_size)
  wiring_idx = ctx.dense_set(wiring_size) if do_wiring else None
  posthoc_idx = ctx.dense_set(posthoc_size)
  log(f"[analyze] {len(ctx.runs)} run(s); {len(steps)} checkpoint(s) from "
      f"{steps[0]:,d} to {steps[-1]:,d} seqs; dense set of {idx.classes.shape[0]:,d} sequences")
  summary: dict[str, Any] = {}
  for run in runs if runs is not None else range(len(ctx.runs)):
    info = ctx.runs[run]
    tag = f"run{run}"
    params_K = ctx.stacked_params(run, steps)
    m = measures.measure(params_K, ctx.features, idx, cfg, per_sequence=len(steps) >= 3)
    is_KH, pt_KH = m["induction_strength"][:, L - 1], m["pt_score"][:, 0]
    _write_progress(os.path.join(out_dir, f"progress_{tag}.csv"), steps, m, L)
    lt = next((p["learning_time"] for p in phase if p["run"] == run), math.nan)
    if len(steps) >= 2:
      plots.plot_progress_measures(out_dir, steps, m["loss"], is_KH, pt_KH, layers=(L, 1),
                                   learning_time=lt, name=f"progress_measures_{tag}")
    if "seq_loss" in m:
      plots.plot_pca_trajectory(out_dir, steps, m["seq_loss"], name=f"loss_pca_{tag}")

    # Post-hoc clamps on every checkpoint (SPEC §6.6): layer 1's direct path removed
    # (its heads ablated with patterns and values preserved), and layer 2 ablated.
    contrib_specs = {"layer-1 direct path removed (pp+pv)":
                     f"preserve_pattern;preserve_value;ablate:L1H0-{H - 1}",
                     f"layer-{L} heads ablated": f"ablate:L{L}H0-{H - 1}"}
    pc = measures.measure(params_K, ctx.features, posthoc_idx, cfg,
                          measures.conditions(list(contrib_specs.values()), cfg))
    base = measures.measure(params_K, ctx.features, posthoc_idx, cfg)
    with open(os.path.join(out_dir, f"layer_contributions_{tag}.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["seqs", "loss"] + list(contrib_specs))
      for k, s_ in enumerate(steps):
        w.writerow([s_, f"{base['loss'][k]:.6g}"] + [f"{pc['loss'][k, q]:.6g}"
                                                    for q in range(len(contrib_specs))])
    if len(steps) >= 2:
      plots.plot_layer_contributions(
          out_dir, steps, base["loss"],
          {lab: pc["loss"][:, q] for q, lab in enumerate(contrib_specs)},
          name=f"layer_contributions_{tag}")

    # Mean attention patterns at the start, around the learning time and at the end.
    picks = {0, len(steps) - 1}
    if lt == lt:
      picks.add(int(np.argmin(np.abs(np.asarray(steps) - lt))))
    pat_idx = jax.tree.map(lambda x: x[:256], idx)
    patterns = {f"{steps[k]:,d} seqs": measures.mean_patterns(
        jax.tree.map(lambda x, k=k: x[k], params_K), ctx.features, pat_idx, cfg)
        for k in sorted(picks)}
    plots.plot_attention_patterns(out_dir, patterns, name=f"attention_patterns_{tag}")

    final = jax.tree.map(lambda x: x[-1], params_K)
    strength = is_KH[-1]
    abl = ablation.head_ablations(final, ctx.features, idx, cfg, strength)
    ablation.write_csv(os.path.join(out_dir, f"head_ablations_{tag}.csv"), abl)
    plots.plot_ablations(out_dir, abl, name=f"head_ablations_{tag}")
    add = ablation.additivity(final, ctx.features, idx, cfg, strength)
    ablation.write_csv(os.path.join(out_dir, f"additivity_{tag}.csv"), add)
    for perfected, stem in ((False, "mistake_fixing"), (True, "perfected_match")):
      ablation.write_csv(os.path.join(out_dir, f"{stem}_{tag}.csv"), ablation.mistake_fixing(
          final, ctx.features, idx, cfg, strength, perfected=perfected))

    # A single-head run (all other last-layer heads ablated, SPEC's "None" condition):
    # the composite (PT clamp) and copy (IH clamp) subcircuit measures over training.
    kept = _single_kept_head(info["spec"], cfg)
    if kept is not None and len(steps) >= 2:
      pt_head = int(np.argmax(pt_KH[-1]))
      sub_specs = {f"composite subcircuit (PT clamp on L1H{pt_head})":
                   f"keep_only:L{L}H{kept};pt:L1H{pt_head}",
                   f"copy subcircuit (IH clamp on L{L}H{kept})":
                   f"keep_only:L{L}H{kept};ih:L{L}H{kept}"}
      # The reference is the run's own loss, i.e. under its own clamp (REST ablated).
      own = f"keep_only:L{L}H{kept}"
      sub = measures.measure(params_K, ctx.features, posthoc_idx, cfg,
                             measures.conditions([own] + list(sub_specs.values()), cfg))
      ablation.write_csv(os.path.join(out_dir, f"subcircuits_{tag}.csv"), dict(
          seqs=list(steps), own_loss=sub["loss"][:, 0].tolist(),
          **{lab: sub["loss"][:, q + 1].tolist() for q, lab in enumerate(sub_specs)}))
      plots.plot_layer_contributions(
          out_dir, steps, sub["loss"][:, 0], {lab: sub["loss"][:, q + 1] for q, lab in
                                              enumerate(sub_specs)}, name=f"subcircuits_{tag}")

    # Layer-1 head sets under pattern- / value-preserving ablation (SPEC §6.4): the
    # given sets, or by default the 3 strongest PT heads vs the rest.
    pt_order = [int(h) for h in np.argsort(-pt_KH[-1])]
    sets = l1_sets or [",".join(f"L1H{h}" for h in sorted(pt_order[:3])),
                       ",".join(f"L1H{h}" for h in sorted(pt_order[3:]))]
    set_rows = [ablation.layer_set_ablation(final, ctx.features, idx, cfg, heads)
                for heads in sets]
    _write_rows(os.path.join(out_dir, f"layer1_set_ablations_{tag}.csv"), set_rows)

    comp = composition.composition_scores(final, H)
    comp0 = composition.composition_scores(jax.tree.map(lambda x: x[0], params_K), H)
    for x in "qkv":
      ablation.write_matrix_csv(os.path.join(out_dir, f"composition_{tag}_{x}.csv"), comp[x],
                                f"L{L}H", "L1H")
    mats = {f"{x.upper()}-composition (final)": comp[x] for x in "kv"}
    mats.update({f"{x.upper()}-composition (first ckpt)": comp0[x] for x in "kv"})
    plots.plot_heatmaps(out_dir, mats, f"composition_{tag}", f"layer-{L} head",
                        "layer-1 head")
    wiring_summary = None
    if do_wiring and L == 2:
      w = ablation.wiring(final, ctx.features, wiring_idx, cfg)
      for key in ("all_but_one_pp", "all_but_one_pv", "only_one_pp", "only_one_pv"):
        ablation.write_matrix_csv(os.path.join(out_dir, f"wiring_{tag}_{key}.csv"), w[key],
                                  "L2H", "L1H")
      plots.plot_heatmaps(out_dir, {k.replace("_", " "): w[k] for k in (
          "all_but_one_pv", "all_but_one_pp", "only_one_pv", "only_one_pp")},
          f"wiring_{tag}", "layer-2 head (only one kept)", "layer-1 head")
      strongest = int(np.argmax(strength))
      wiring_summary = dict(
          most_needed_l1_head_pv=int(np.argmin(w["all_but_one_pv"][strongest])),
          most_needed_l1_head_pp=int(np.argmin(w["all_but_one_pp"][strongest])))

    order = np.argsort(-strength)
    summary[tag] = dict(
        condition=info["condition"], seed=info["init_seed"], learning_time=lt,
        final_dense_loss=float(m["loss"][-1]), final_dense_acc=float(m["acc"][-1]),
        strongest_heads=[(f"L{L}H{h}", round(float(strength[h]), 3)) for h in order[:3]],
        pt_head=f"L1H{int(np.argmax(pt_KH[-1]))}",
        only_strongest_acc=abl["only_acc"][order[0]],
        remove_strongest_acc=abl["remove_acc"][order[0]],
        additive_losses=[round(x, 4) for x in add["loss"][:4]], wiring=wiring_summary,
        layer1_sets={r["heads"]: dict(pp=round(r["pp"], 3), pv=round(r["pv"], 3))
                     for r in set_rows})
  log(f"[analyze] done in {time.time() - t0:.1f}s; outputs in {out_dir}")
  return summary


def _single_kept_head(spec: str, cfg) -> int | None:
  """The one last-layer head a plain REST-ablation run keeps, else None."""
  from ih_jax import clamps as clamps_lib  # pylint: disable=g-import-not-at-top
  if "graft:" in spec:
    return None
  c = clamps_lib.parse(spec, cfg.num_layers, cfg.num_heads)
  keep = np.asarray(c["v_keep"])
  plain = (keep[:-1].all() and not np.asarray(c["pt_on"]).any() and
           not np.asarray(c["ih_on"]).any() and not np.asarray(c["copy_on"]).any() and
           not float(c["perfect_l1"]) and not float(c["preserve_pattern"]) and
           not float(c["preserve_value"]))
  kept = np.nonzero(keep[-1])[0]
  return int(kept[0]) if plain and len(kept) == 1 else None


def _write_rows(path: str, rows: list[dict[str, Any]]) -> None:
  if not rows:
    return
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def _write_progress(path: str, steps: list[int], m: dict[str, np.ndarray], L: int) -> None:
  H = m["induction_strength"].shape[-1]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["seqs", "loss", "acc"] + [f"is_L{L}H{h}" for h in range(H)] +
               [f"pt_L1H{h}" for h in range(H)] + [f"pt_labels_L1H{h}" for h in range(H)])
    for k, s in enumerate(steps):
      w.writerow([s, f"{m['loss'][k]:.6g}", f"{m['acc'][k]:.6g}"] +
                 [f"{v:.6g}" for v in m["induction_strength"][k, L - 1]] +
                 [f"{v:.6g}" for v in m["pt_score"][k, 0]] +
                 [f"{v:.6g}" for v in m["pt_score_labels"][k, 0]])


def analyze_sweep(workdir: str, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Learning time per run across every program of a multi-program sweep.

  Writes WORKDIR/analysis/sweep_phase_times.csv and, for each numeric grid field,
  scaling_<field>.png: learning time vs the field's value, one line per condition
  (mean over seeds; censored runs shown as open markers), e.g. the class / label
  scaling curves of a `model.num_labels=5,10,15` grid.
  """
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "sweep.json")) as f:
    programs = json.load(f)
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
