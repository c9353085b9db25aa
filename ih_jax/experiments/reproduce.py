r"""Reproduce a figure of Singh et al. 2024 (or all of them) with one command.

  ih-jax reproduce --figure=5b --scale=quick --workdir=/tmp/repro
  ih-jax reproduce --figure=all --scale=quick --workdir=/tmp/repro
  ih-jax reproduce --figure=all --scale=full --workdir=/data/repro_full
  ih-jax reproduce --figure=beyond --scale=quick --workdir=/tmp/beyond
  ih-jax reproduce --list

Trains what the figure needs (its main run first when head choices depend on it),
reusing finished runs and resuming interrupted ones in --workdir, then writes the
figures and WORKDIR/REPORT.md with a code-computed verdict per claim.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

import ih_jax  # noqa: F401  (CPU XLA flags before JAX starts)
from ih_jax.experiments import cli
from ih_jax.experiments.paper import registry, report, scales
from ih_jax.experiments.paper.study import Study

FLAGS = flags.FLAGS
flags.DEFINE_string("figure", None, "entry or paper figure id (e.g. 5b, 3a, A7, main, "
                    "deep), a comma-separated list, 'all' (the paper's figures) or 'beyond' "
                    "(tokens, deep, capacity, vocab)")
flags.DEFINE_enum("scale", "quick", sorted(scales.SCALES), "quick: CPU-sized (minutes); "
                  "medium: quick's lr, 2x its length, 5 seeds; full: the paper's lengths and "
                  "seeds; smoke: tests only")
flags.DEFINE_string("features", "synthetic", "synthetic (embedded default family) | gaussian "
                    "| relu | lowrank (an embedded family, optionally FAMILY:field=value,...) | "
                    "h5:PATH | a data.source name such as omniglot_conv, optionally "
                    "SOURCE:field=value,...")
flags.DEFINE_string("workdir", None, "reproduction folder (runs are reused from here)")
flags.DEFINE_bool("list", False, "list the registry and exit")
flags.DEFINE_bool("quiet", False, "no per-run training progress lines")


def main(argv):
  """Runs the --figure entries in --workdir, rewriting REPORT.md after each (or lists
  the entries); returns 1 if any entry failed."""
  del argv
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  if FLAGS.list:
    for e in registry.ENTRIES.values():
      print(f"{e.key:5s} paper {', '.join(e.figures):32s} {e.title}")
    return 0
  if not FLAGS.figure or not FLAGS.workdir:
    raise app.UsageError("--figure and --workdir are required (or --list)")
  try:
    entries = registry.resolve(FLAGS.figure)
    study = Study(FLAGS.workdir, scales.get(FLAGS.scale), FLAGS.features,
                  verbose=not FLAGS.quiet)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  command = "ih-jax reproduce " + " ".join(sys.argv[1:])
  failed = []
  for e in entries:
    print(f"[reproduce] === {e.key}: {e.title} (paper {', '.join(e.figures)})", flush=True)
    outcome, seconds, error = report.run_entry(study, e)
    report.save_outcome(study, e, outcome, seconds, error)
    path = report.write_report(study, command)
    for v in outcome.verdicts:
      print(f"[reproduce] {e.key}: {v.label:13s} {v.claim}\n             measured: {v.measured}",
            flush=True)
    print(f"[reproduce] {e.key} done in {seconds:.0f} s; report: {path}", flush=True)
    if error:
      failed.append(e.key)
  if failed:
    print(f"[reproduce] FAILED entries: {failed} (see the errors above and in REPORT.md)")
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main)
