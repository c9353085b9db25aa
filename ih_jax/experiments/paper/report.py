"""Runs registry entries in a Study and writes WORKDIR/REPORT.md from their stored outcomes.

Each entry's outcome is stored as WORKDIR/results/<entry>.json when it finishes, so
REPORT.md always covers every entry ever reproduced in that workdir, and running
one more figure later adds to it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
import traceback

import jax

from ih_jax.analysis.verdicts import Verdict
from ih_jax.experiments.paper.registry import ENTRIES, Entry, Outcome
from ih_jax.experiments.paper.study import Study


def run_entry(study: Study, entry: Entry) -> tuple[Outcome, float, str | None]:
  """(outcome, seconds, error text or None). Training happens here (or is reused)."""
  t = time.time()
  try:
    heads = {s: study.heads(s) for s in entry.head_seeds(study)}
    results = {name: study.stage(name, cfg) for name, cfg in entry.stages(study, heads)}
    outcome = entry.analyze(study, results, heads)
    return outcome, time.time() - t, None
  except KeyboardInterrupt:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # One failing figure must not lose the others: report it and go on.
    err = "".join(traceback.format_exception_only(type(e), e)).strip()
    study.log(f"[reproduce] {entry.key} FAILED:\n{traceback.format_exc()}")
    return Outcome([Verdict(f"{entry.title}", f"error: {err}", "-", None)]), time.time() - t, err


def save_outcome(study: Study, entry: Entry, outcome: Outcome, seconds: float,
                 error: str | None) -> None:
  """Stores an entry's outcome (verdicts, figures, notes, time, error) as results/<key>.json."""
  os.makedirs(os.path.join(study.root, "results"), exist_ok=True)
  rec = dict(key=entry.key, figures=list(entry.figures), title=entry.title, seconds=seconds,
             error=error, finished=datetime.datetime.now().isoformat(timespec="seconds"),
             verdicts=[dataclasses.asdict(v) for v in outcome.verdicts],
             figure_paths=[os.path.relpath(p, study.root) for p in outcome.figures
                           if os.path.exists(p)],
             notes=outcome.notes)
  with open(os.path.join(study.root, "results", f"{entry.key}.json"), "w") as f:
    json.dump(rec, f, indent=1)


def load_outcomes(root: str) -> list[dict]:
  """The stored outcome records under ROOT/results/, in registry order."""
  out = []
  for key in ENTRIES:  # registry order
    path = os.path.join(root, "results", f"{key}.json")
    if os.path.exists(path):
      with open(path) as f:
        out.append(json.load(f))
  return out


def _label(held: bool | None) -> str:
  return {True: "**held**", False: "**did not hold**", None: "not evaluated"}[held]


def write_report(study: Study, command: str) -> str:
  """Writes REPORT.md from every stored outcome (a summary table, then one section per
  entry); returns its path."""
  recs = load_outcomes(study.root)
  sc = study.scale
  total = sum(r["seconds"] for r in recs)
  lines = [
      "# ih_jax reproduction report: Singh et al. 2024",
      "",
      f"- scale: `{sc.name}` (learning rate {sc.learning_rate:g}, {sc.length:g} x the paper's "
      f"sequence counts, extra seeds {list(sc.extra_seeds)}; see ih_jax/experiments/paper/scales.py)",
      f"- features: `{study.features}`",
      f"- command: `{command}`",
      f"- written {datetime.datetime.now().isoformat(timespec='seconds')}; jax {jax.__version__} "
      f"on {jax.devices()[0].platform} ({jax.device_count()} device(s)); Python "
      f"{platform.python_version()}",
      f"- time spent by the entries below (training, reuse and analysis): {total / 60:.1f} min",
      "",
      "Every verdict is computed by `ih_jax/analysis/verdicts.py` from this workdir's runs; the "
      "criterion and its threshold are printed next to it. A censored learning time means the "
      "loss never crossed 0.4 ln 2 within the run. Claims are paraphrased from the paper; "
      "those marked *our reading* are our interpretation of a figure whose text we could not "
      "quote exactly. At `quick` scale they are tested on shorter, faster-learning runs (see "
      "the scale).",
      "",
      "## Summary",
      "",
      "| entry | paper figures | claim | verdict |",
      "|---|---|---|---|",
  ]
  for r in recs:
    for v in r["verdicts"]:
      lines.append(f"| {r['key']} | {', '.join(r['figures'])} | {v['claim']} | "
                   f"{_label(v['held'])} |")
  for r in recs:
    lines += ["", f"## {r['key']}: {r['title']} (paper {', '.join(r['figures'])})", "",
              f"Finished {r['finished']} in {r['seconds']:.0f} s."]
    if r["error"]:
      lines += ["", f"**Error:** `{r['error']}` (see the log; rerun to retry)."]
    for v in r["verdicts"]:
      lines += ["", f"- **Claim:** {v['claim']}", f"  - measured: {v['measured']}",
                f"  - criterion: {v['criterion']}", f"  - verdict: {_label(v['held'])}"]
    for note in r["notes"]:
      lines += ["", note]
    if r["figure_paths"]:
      lines += [""] + [f"![{os.path.basename(p)}]({p})" for p in r["figure_paths"]]
  path = os.path.join(study.root, "REPORT.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
