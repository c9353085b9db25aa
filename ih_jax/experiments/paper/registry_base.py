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
from ih_jax.experiments.paper.study import Study

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
