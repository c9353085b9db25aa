"""Matplotlib figures of training runs (PNG + PDF)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ih_jax import workdir as workdir_lib

# Figures are built with matplotlib's object API (no pyplot state, no backend switch):
# they save headless, and importing this module does not break a notebook's inline plots.
TAB10 = colormaps["tab10"]


def subplots(*args, figsize=None, **kwargs):
  """(Figure, axes) like pyplot.subplots, without touching pyplot."""
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(*args, **kwargs)

LN2 = math.log(2)


def _reference_lines(ax) -> None:
  ax.axhline(LN2, color="grey", ls="--", lw=0.8, label="ln 2 (guess between context labels)")
  ax.axhline(0.4 * LN2, color="grey", ls=":", lw=0.8, label="0.4 ln 2 (learning-time threshold)")


def plot_training_curves(workdir: str, eval_sets: Sequence[str] | None = None,
                         clamped: int = 1, out_name: str = "loss_curves") -> list[str]:
  """One panel per eval set: query loss vs sequences seen, one line per run.

  Returns the paths written (PNG and PDF in the workdir).
  """
  fig = training_curves_figure(workdir_lib.read_metrics(workdir), workdir, eval_sets, clamped)
  return _save(fig, workdir, out_name, "each run under its own clamps (as trained)" if clamped
               else "every run with its clamps removed")


def training_curves_figure(metrics_rows: Sequence[dict], workdir: str = "",
                           eval_sets: Sequence[str] | None = None, clamped: int = 1) -> Figure:
  """The figure of plot_training_curves from metrics rows (not saved)."""
  rows = [r for r in metrics_rows if r["clamped"] == clamped]
  if not rows:
    raise ValueError(f"no {'clamped' if clamped else 'unclamped'} metrics in {workdir!r}")
  sets = list(eval_sets or dict.fromkeys(r["eval_set"] for r in rows))
  curves: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
  # A data variant (sweep.grid) counts as part of the condition for colouring.
  cond_of = lambda r: f"{r['condition']} [{r['variant']}]" if r.get("variant") else r["condition"]
  for r in rows:
    curves[(r["eval_set"], cond_of(r), r["seed"])].append((r["seqs"], r["loss"]))
  conditions = list(dict.fromkeys(cond_of(r) for r in rows))
  seeds = list(dict.fromkeys(r["seed"] for r in rows))
  colors = {c: TAB10(i % 10) for i, c in enumerate(conditions)}
  styles = ["-", "--", "-.", ":"]

  ncols = min(len(sets), 2)
  nrows = math.ceil(len(sets) / ncols)
  fig, axes = subplots(nrows, ncols, figsize=(6.5 * ncols, 4 * nrows), squeeze=False)
  for ax, s in zip(axes.flat, sets):
    for cond in conditions:
      for j, seed in enumerate(seeds):
        pts = sorted(curves.get((s, cond, seed), []))
        if not pts:
          continue
        label = cond if len(seeds) == 1 else f"{cond} (seed {seed})"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[cond],
                ls=styles[j % len(styles)], lw=1.4, label=label)
    _reference_lines(ax)
    ax.set_title(f"{s}" + ("" if clamped else " (clamps removed)"))
    ax.set_xlabel("sequences seen")
    ax.set_ylabel("query cross-entropy (nats)")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(sets):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8, loc="upper right")
  return fig


def _save(fig, out_dir: str, name: str, title: str | None = None) -> list[str]:
  """Writes PNG + PDF; `title` (e.g. which run, condition, seed, clamps on/off) tops it."""
  os.makedirs(out_dir, exist_ok=True)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  paths = []
  for ext in ("png", "pdf"):
    path = os.path.join(out_dir, f"{name}.{ext}")
    fig.savefig(path, dpi=120)
    paths.append(path)
  return paths


def _head_lines(ax, seqs, values_KH, prefix: str, highlight: int | None = None) -> None:
  H = values_KH.shape[1]
  for h in range(H):
    strong = h == highlight
    ax.plot(seqs, values_KH[:, h], lw=2.2 if strong else 1.2, color=TAB10(h % 10),
            label=f"{prefix}H{h}" + (" (strongest)" if strong else ""))


def plot_progress_measures(out_dir: str, seqs, loss_K, is_KH, pt_KH, *,
                           layers: tuple[int, int] = (2, 1), learning_time: float | None = None,
                           name: str = "progress_measures",
                           highlight: tuple[int | None, int | None] | None = None,
                           title: str | None = None) -> list[str]:
  """Dense-set loss, induction strength per last-layer head, PT score per first-layer head.

  `highlight`: the (induction, previous-token) heads to mark as strongest (None: not
  marked, e.g. no head the run could use); default: the highest final score.
  """
  if highlight is None:
    highlight = (int(np.argmax(is_KH[-1])), int(np.argmax(pt_KH[-1])))
  fig, axes = subplots(1, 3, figsize=(17, 4.2))
  ax = axes[0]
  ax.plot(seqs, loss_K, color="black", lw=1.6, label="dense-set query loss")
  _reference_lines(ax)
  ax.set_ylabel("query cross-entropy (nats)")
  ax.set_title("dense-set loss")
  ax = axes[1]
  _head_lines(ax, seqs, is_KH, f"L{layers[0]}", highlight[0])
  ax.set_ylabel("induction strength (−1 … 1)")
  ax.set_title(f"induction strength, layer-{layers[0]} heads")
  ax = axes[2]
  _head_lines(ax, seqs, pt_KH, f"L{layers[1]}", highlight[1])
  ax.set_ylabel("previous-token score")
  ax.set_title(f"previous-token score, layer-{layers[1]} heads")
  for ax in axes:
    ax.set_xlabel("sequences seen")
    ax.grid(alpha=0.3)
    if learning_time is not None and learning_time == learning_time:
      ax.axvline(learning_time, color="red", ls=":", lw=1, label="learning time")
    ax.legend(fontsize=7, loc="best")
  return _save(fig, out_dir, name, title)


def plot_ablations(out_dir: str, table: dict, name: str = "head_ablations",
                   title: str | None = None) -> list[str]:
  """Accuracy and loss of remove-one / keep-only-one ablations vs final induction strength."""
  s = np.asarray(table["induction_strength"])
  fig, axes = subplots(1, 2, figsize=(11, 4.2))
  for ax, metric, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "query loss (nats)")):
    ax.scatter(s, table[f"remove_{metric}"], marker="o", label="remove head h")
    ax.scatter(s, table[f"only_{metric}"], marker="^", label="keep only head h")
    for i, h in enumerate(table["head"]):
      ax.annotate(h, (s[i], table[f"only_{metric}"][i]), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
    ax.axhline(table[f"full_{metric}"][0], color="grey", ls="--", lw=1, label="unablated")
    ax.set_xlabel("final induction strength of h")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out_dir, name, title)


def plot_heatmaps(out_dir: str, mats: dict[str, np.ndarray], name: str, row_label: str,
                  col_label: str, title: str | None = None) -> list[str]:
  """One annotated heatmap per matrix (e.g. the wiring and composition matrices)."""
  n = len(mats)
  fig, axes = subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
  for ax, (title, m) in zip(axes[0], mats.items()):
    lim = np.abs(m).max() or 1.0
    signed = (m < 0).any()
    im = ax.imshow(m, cmap="RdBu_r" if signed else "viridis", vmin=-lim if signed else None,
                   vmax=lim if signed else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    fig.colorbar(im, ax=ax, fraction=0.046)
  return _save(fig, out_dir, name, title)


def plot_pca_trajectory(out_dir: str, seqs, seq_loss_KS: np.ndarray,
                        name: str = "loss_pca_trajectory", title: str | None = None
                        ) -> list[str]:
  """Per-sequence losses over checkpoints projected on their top-2 PCs (Olsson et al.)."""
  X = seq_loss_KS - seq_loss_KS.mean(0)
  u, sv, _ = np.linalg.svd(X, full_matrices=False)
  pcs = u[:, :2] * sv[:2]
  var = (sv ** 2 / (sv ** 2).sum())[:2]
  fig, ax = subplots(figsize=(5.5, 4.6))
  ax.plot(pcs[:, 0], pcs[:, 1], color="grey", lw=0.8)
  sc = ax.scatter(pcs[:, 0], pcs[:, 1], c=np.asarray(seqs), cmap="viridis", s=14)
  fig.colorbar(sc, ax=ax, label="sequences seen")
  ax.set_xlabel(f"PC1 ({100 * var[0]:.0f}% of variance)")
  ax.set_ylabel(f"PC2 ({100 * var[1]:.0f}% of variance)")
  ax.set_title("per-sequence loss, checkpoint trajectory")
  ax.grid(alpha=0.3)
  return _save(fig, out_dir, name, title)


def plot_toy(out_dir: str, curves, name: str = "toy_model") -> list[str]:
  """Toy-model loss per condition, and the two progress measures without clamps."""
  fig, axes = subplots(1, 2, figsize=(11, 4.2))
  steps = np.arange(curves.loss.shape[1])
  for q, cond in enumerate(curves.conditions):
    axes[0].plot(steps, curves.loss[q], label=cond)
  axes[0].set_title("toy model loss")
  axes[0].set_ylabel("loss")
  q0 = curves.conditions.index("none") if "none" in curves.conditions else 0
  axes[1].plot(steps, curves.loss[q0], color="black", label="loss (no clamp)")
  axes[1].plot(steps, curves.pm1[q0], label="PM1 = 1 − cos²(a, a*)")
  axes[1].plot(steps, curves.pm2[q0], label="PM2 = loss if b, c were perfect")
  axes[1].set_title("progress measures (no clamp)")
  for ax in axes:
    ax.set_xlabel("gradient-descent iterations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out_dir, name)


def plot_attention_patterns(out_dir: str, patterns: dict[str, np.ndarray],
                            name: str = "attention_patterns", title: str | None = None
                            ) -> list[str]:
  """Mean attention pattern of every head (rows) at chosen checkpoints.

  `patterns` maps a label (e.g. "430,016 seqs") to [L, H, T, T]; one row of
  panels per (checkpoint, layer), one column per head; query on y, key on x.
  """
  labels = list(patterns)
  L, H, T, _ = patterns[labels[0]].shape
  fig, axes = subplots(len(labels) * L, H, figsize=(1.6 * H, 1.7 * len(labels) * L),
                           squeeze=False)
  tokens = [("x" if t % 2 == 0 else "y") + str(t // 2) for t in range(T - 1)] + ["q"]
  for r, lab in enumerate(labels):
    for l in range(L):
      for h in range(H):
        ax = axes[r * L + l, h]
        ax.imshow(patterns[lab][l, h], vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels(tokens, fontsize=6)
        ax.set_yticklabels(tokens, fontsize=6)
        if r * L + l == 0:
          ax.set_title(f"head {h}", fontsize=8)
        if h == 0:
          ax.set_ylabel(f"{lab}\nlayer {l + 1}", fontsize=7)
  return _save(fig, out_dir, name, title)


def plot_layer_contributions(out_dir: str, seqs, base_loss, measures: dict[str, np.ndarray],
                             name: str = "layer_contributions", title: str | None = None
                             ) -> list[str]:
  """Dense-set loss under post-hoc clamps minus the unclamped loss, over training."""
  fig, ax = subplots(figsize=(6.5, 4.2))
  for label, loss in measures.items():
    ax.plot(seqs, np.asarray(loss) - np.asarray(base_loss), label=label)
  ax.axhline(0, color="grey", lw=0.8)
  ax.set_xlabel("sequences seen")
  ax.set_ylabel("loss increase over the reference (nats)")
  ax.set_title("post-hoc clamps over training")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out_dir, name, title)


def plot_learning_times(out_dir: str, phase_rows: list[dict], name: str = "learning_times"
                        ) -> list[str]:
  """Learning time per run (censored runs drawn at the right edge as open markers)."""
  conds = list(dict.fromkeys(r["condition"] + (f" [{r['variant']}]" if r.get("variant") else "")
                             for r in phase_rows))
  finite = [r["learning_time"] for r in phase_rows if r["learning_time"] == r["learning_time"]]
  edge = max(finite) * 1.1 if finite else 1.0
  fig, ax = subplots(figsize=(7, 0.45 * len(conds) + 1.6))
  for r in phase_rows:
    label = r["condition"] + (f" [{r['variant']}]" if r.get("variant") else "")
    y = conds.index(label)
    lt = r["learning_time"]
    if lt == lt:
      ax.scatter(lt, y, color="tab:blue")
    else:
      ax.scatter(edge, y, facecolors="none", edgecolors="tab:red")
  ax.scatter([], [], facecolors="none", edgecolors="tab:red", label="never (censored)")
  ax.set_yticks(range(len(conds)))
  ax.set_yticklabels(conds, fontsize=8)
  ax.set_xlabel("learning time (sequences seen to fsl_train loss < 0.4 ln 2, "
                "under each run's own clamps)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out_dir, name)


def plot_scaling(out_dir: str, rows: list[dict], field: str, xs: list[float]) -> list[str]:
  """Learning time vs a grid field's value, one line per condition (mean over seeds)."""
  fig, ax = subplots(figsize=(6.5, 4.2))
  conds = list(dict.fromkeys(r["condition"] for r in rows))
  top = max([r["learning_time"] for r in rows if r["learning_time"] == r["learning_time"]],
            default=1.0) * 1.15
  for i, cond in enumerate(conds):
    color = TAB10(i % 10)
    pts = [(x, r["learning_time"]) for x, r in zip(xs, rows) if r["condition"] == cond]
    for x, lt in pts:
      if lt == lt:
        ax.scatter(x, lt, color=color, s=14, alpha=0.6)
      else:
        ax.scatter(x, top, facecolors="none", edgecolors=color, s=30)
    grid = sorted({x for x, _ in pts})
    means = [np.mean([lt for x2, lt in pts if x2 == x and lt == lt] or [np.nan]) for x in grid]
    ax.plot(grid, means, color=color, marker="o", label=cond)
  ax.axhline(top, color="grey", ls=":", lw=0.8, label="never (censored), drawn here")
  ax.set_xlabel(field)
  ax.set_ylabel("learning time (sequences seen)")
  ax.set_title(f"learning time vs {field}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out_dir, f"scaling_{field.replace('.', '_')}")
