r"""Analyse a finished run or sweep: progress measures, ablations, wiring, figures.

  ih-jax analyze --workdir=demo_workdir
  ih-jax analyze --workdir=/tmp/ih_main --num_checkpoints=100 --dense_size=20000
  ih-jax analyze --workdir=/tmp/ih_grid/program_0 --runs=0,3 --nowiring
  ih-jax analyze --workdir=/tmp/ih_grid    # a multi-program sweep: scaling curves

Writes WORKDIR/analysis/*.csv and figures (PNG + PDF) and prints a summary per run
(learning time, strongest induction heads, key ablation numbers). See
ih_jax/analysis/report.py for the file list.
"""

import json

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (with config.json).")
_RUNS = flags.DEFINE_list("runs", None, "Run indices to analyse (default: all).")
_NUM_CKPT = flags.DEFINE_integer("num_checkpoints", 100, "Checkpoints subsampled for the "
                                 "progress measures (closest to an even grid).")
_DENSE = flags.DEFINE_integer("dense_size", None, "Use a fixed random subset of the dense set "
                              "(default: all 78,400 sequences).")
_WIRING_SIZE = flags.DEFINE_integer("wiring_size", 4096, "Sequences for the 264 wiring "
                                    "conditions (0 = the whole dense set).")
_WIRING = flags.DEFINE_bool("wiring", True, "Compute the wiring heatmaps.")
_POSTHOC = flags.DEFINE_integer("posthoc_size", 8192, "Sequences for the post-hoc clamp "
                                "measures over checkpoints (0 = the whole dense set).")
_L1_SETS = flags.DEFINE_list("l1_sets", None, "Layer-1 head sets for the pp/pv set ablations, "
                             "separated by '|', e.g. --l1_sets='L1H3,L1H6|L1H0-2' (default: "
                             "the 3 strongest PT heads, and the rest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  """Analyses --workdir and prints a summary per run; a multi-program sweep gets only
  its learning times (and scaling curves)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from ih_jax.analysis import report  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  from ih_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if workdir_lib.is_sweep(workdir):
    # A multi-program sweep: learning times across programs and scaling curves; the
    # per-checkpoint analysis runs per program (--workdir=WORKDIR/program_<k>).
    rows = report.analyze_sweep(workdir)
    for r in rows:
      lt = r["learning_time"]
      print(f"[analyze] {r['program']} run {r['run']} {r['condition']} seed {r['seed']} "
            f"[{r['variant']}]: learning time {'never' if lt != lt else f'{lt:,.0f}'}")
    return
  summary = report.analyze_workdir(
      workdir, runs=_runs(),
      num_checkpoints=_NUM_CKPT.value, dense_size=_DENSE.value,
      wiring_size=_WIRING_SIZE.value or None, do_wiring=_WIRING.value,
      posthoc_size=_POSTHOC.value or None, l1_sets=_l1_sets())
  for tag, s in summary.items():
    print(f"[analyze] {tag} ({s['condition']}, seed {s['seed']}"
          + (f", trained with clamps {s['spec']!r})" if s["clamped_run"] else ", unclamped)"))
    if s["unusable_heads"]:
      by_reason: dict[str, list[str]] = {}
      for head, why in s["unusable_heads"].items():
        by_reason.setdefault(why, []).append(head)
      print("          heads the run could not use (never chosen): " + "; ".join(
          f"{why}: {','.join(heads)}" for why, heads in by_reason.items()))
    views = [("clamps on", s), ("clamps off", s["clamp_free"])] if s["clamped_run"] else \
        [("", s)]
    for name, v in views:
      _print_view(name, v)


def _print_view(name: str, v: dict) -> None:
  pre = f"          [{name}] " if name else "          "
  lt = v["learning_time"]
  print(f"{pre}learning time {'never (censored)' if lt != lt else f'{lt:,.0f} seqs'}; "
        f"final dense loss {v['final_dense_loss']:.3f} acc {v['final_dense_acc']:.3f}")
  print(f"{pre}strongest induction heads {v['strongest_heads'] or 'none'}; PT head "
        f"{v['pt_head'] or 'none'}")
  if v["only_strongest_acc"] is not None:
    print(f"{pre}keep only strongest: acc {v['only_strongest_acc']:.3f}; remove it: acc "
          f"{v['remove_strongest_acc']:.3f}; add-back losses {v['additive_losses']}")
  if v["layer1_sets"]:
    print(f"{pre}layer-1 set ablations (acc): {json.dumps(v['layer1_sets'])}")
  if v["wiring"]:
    print(f"{pre}wiring: {json.dumps(v['wiring'])}")
  for note in v["notes"]:
    print(f"{pre}note: {note}")


def _runs() -> list[int] | None:
  if not _RUNS.value:
    return None
  bad = [r for r in _RUNS.value if not r.strip().isdigit()]
  if bad:
    raise ValueError(f"--runs: {bad} are not run indices; give e.g. --runs=0,3")
  return [int(r) for r in _RUNS.value]


def _l1_sets():
  # DEFINE_list splits on commas, but a set is itself a comma list: sets are separated
  # by '|' instead, e.g. --l1_sets="L1H3,L1H6|L1H0-2".
  if not _L1_SETS.value:
    return None
  return [s.strip() for s in ",".join(_L1_SETS.value).split("|") if s.strip()]


if __name__ == "__main__":
  from ih_jax.experiments import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
