"""The registry's building blocks: an Entry, its Outcome, and shared report helpers.

Kept apart from registry.py so entry modules (registry.py, beyond.py, ...) can all
use them without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from ih_jax import plots
from ih_jax.analysis import verdicts as V
from ih_jax.experiments.paper.study import PAPER_SEED, Study

Stages = list[tuple[str, Any]]


@dataclasses.dataclass
class Outcome:
  """What an entry produced: its verdicts, figure paths (PNG) and markdown notes."""
  verdicts: list[V.Verdict]
  figures: list[str] = dataclasses.field(default_factory=list)   # paths (PNG)
  notes: list[str] = dataclasses.field(default_factory=list)      # measured tables, in markdown


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registry entry: the paper figures it reproduces, the seeds whose head choices
  it needs, its stages (name, config) and its analysis into an Outcome."""
  key: str
  figures: tuple[str, ...]     # the paper's figure ids it reproduces
  title: str
  head_seeds: Callable[[Study], tuple[int, ...]]   # seeds whose main-run heads it needs
  stages: Callable[[Study, dict], Stages]
  analyze: Callable[[Study, dict, dict], Outcome]


def png(paths: list[str]) -> list[str]:
  """The PNG paths among `paths`."""
  return [p for p in paths if p.endswith(".png")]


def lt_table(lts: dict, horizon_: float) -> str:
  """Markdown table of learning times keyed (condition, seed, variant)."""
  lines = ["| run | learning time |", "|---|---|"]
  for (cond, seed, variant), lt in lts.items():
    name = cond + (f" [{variant}]" if variant else "") + f" (seed {seed})"
    shown = f"censored (> {horizon_:,.0f})" if math.isnan(lt) else f"{lt:,.0f}"
    lines.append(f"| {name} | {shown} |")
  return "\n".join(lines)


def curve_figure(study: Study, name: str, groups: dict[str, tuple[np.ndarray, np.ndarray]],
                 title: str, ylabel: str = "fsl_train query loss (under the run's clamps)"
                 ) -> list[str]:
  """Loss curves of several runs in one PNG under the study's figure folder."""
  fig, ax = plots.subplots(figsize=(7, 4.2))
  for label, (s, l) in groups.items():
    ax.plot(s, l, label=label, lw=1.3)
  plots._reference_lines(ax)  # pylint: disable=protected-access
  ax.set_xlabel("sequences seen")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return png(plots._save(fig, study.figure_dir, name))  # pylint: disable=protected-access


# ------------------------------------------------------------------ heads and the Fig. 5b stage

def strongest_name(heads: dict, seed: int = PAPER_SEED) -> str:
  """The STRONGEST induction head of `seed`'s main run, e.g. "L2H3"."""
  return f"L2H{heads[seed]['strongest']}"


def pt_head_name(heads: dict, seed: int = PAPER_SEED, rank: int = 0) -> str:
  """The `rank`-th previous-token head of `seed`'s main run, e.g. "L1H1"."""
  return f"L1H{heads[seed]['pt_order'][rank]}"


def clamp_conditions(heads: dict, seed: int) -> tuple[str, ...]:
  """The Fig. 5b conditions for `seed`, on its main run's STRONGEST head and top PT head:
  none, pt, perfect_l1, match, copy, l1_copy (all but the copy ones ablate REST)."""
  S, P = strongest_name(heads, seed), pt_head_name(heads, seed)
  return (f"none=keep_only:{S}", f"pt=pt:{P};keep_only:{S}",
          f"perfect_l1=perfect_l1;keep_only:{S}", f"match=ih:{S};keep_only:{S}",
          f"copy=copy:{S}", f"l1_copy=perfect_l1;copy:{S}")


def clamp_stage(study: Study, heads: dict, seed: int) -> tuple[str, Any]:
  """The Fig. 5b stage of `seed` (all conditions in one program)."""
  # Dense checkpoints for the "None" baseline's progress measures (App. 10); the runs
  # share one stacked checkpoint.
  return (f"clamps_s{seed}", study.config(
      paper_seqs=600_000, paper_eval_every=1000, conditions=clamp_conditions(heads, seed),
      seeds=(seed,), ckpt_every=study.scale.clamp_ckpt_every if seed == PAPER_SEED else 0))
