"""Everything `experiments.analyze` computes for a finished workdir, as one function.

Writes into WORKDIR/analysis/:
  phase_times.csv             per run: learning time (or censored), plateau exit, steepest descent
  progress_run<r>.csv         per checkpoint: dense-set loss / acc, IS per last-layer head,
                              PT score per first-layer head
  head_ablations_run<r>.csv   remove-one / keep-only-one at the final checkpoint
  additivity_run<r>.csv       cumulative add-back in strength order
  layer_contributions_run<r>.csv  per checkpoint: loss with layer 1's direct path removed
                              and with the last layer ablated (post-hoc clamps)
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
        additive_losses=[round(x, 4) for x in add["loss"][:4]], wiring=wiring_summary)
  log(f"[analyze] done in {time.time() - t0:.1f}s; outputs in {out_dir}")
  return summary


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
