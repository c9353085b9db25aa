"""Matplotlib figures of training runs (PNG + PDF)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from ih_jax import workdir as workdir_lib  # pylint: disable=wrong-import-position

LN2 = math.log(2)


def _reference_lines(ax) -> None:
  ax.axhline(LN2, color="grey", ls="--", lw=0.8, label="ln 2 (guess between context labels)")
  ax.axhline(0.4 * LN2, color="grey", ls=":", lw=0.8, label="0.4 ln 2 (learning-time threshold)")


def plot_training_curves(workdir: str, eval_sets: Sequence[str] | None = None,
                         clamped: int = 1, out_name: str = "loss_curves") -> list[str]:
  """One panel per eval set: query loss vs sequences seen, one line per run.

  Returns the paths written (PNG and PDF in the workdir).
  """
  rows = [r for r in workdir_lib.read_metrics(workdir) if r["clamped"] == clamped]
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
  colors = {c: plt.cm.tab10(i % 10) for i, c in enumerate(conditions)}
  styles = ["-", "--", "-.", ":"]

  ncols = min(len(sets), 2)
  nrows = math.ceil(len(sets) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4 * nrows), squeeze=False)
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
  fig.tight_layout()
  paths = []
  for ext in ("png", "pdf"):
    path = os.path.join(workdir, f"{out_name}.{ext}")
    fig.savefig(path, dpi=120)
    paths.append(path)
  plt.close(fig)
  return paths
