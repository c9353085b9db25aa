r"""Train a sweep of runs (clamp conditions x init seeds x data grid) in compiled programs.

  ih-jax train --config=main --workdir=/tmp/ih_main
  ih-jax train --config=main \
      --config.train.num_seqs=300000 --workdir=/tmp/ih_short
  ih-jax train --config=clamps:head=3 --workdir=/tmp/ih_cl

Writes config.json, metrics.csv, train_log.csv, snapshots/, resume/ (Orbax) and
loss_curves.{png,pdf} into --workdir (into --workdir/program_<k>/ when the sweep
needs several programs). Interrupt with Ctrl-C (or SIGTERM) and rerun the same
command to resume from the latest checkpoint. With --coordinator_address /
--num_processes / --process_id (or --distributed) several processes share the sweep
(docs/multihost.md).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ih_jax.experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config by name (main, tiny, clamps:head=3, tokens, omniglot, "
    "chan; `ih-jax --help` lists them) or a .py config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace results already in --workdir "
                               "(by default a workdir with the same config is resumed).")
_PLOT = flags.DEFINE_bool("plot", True, "Write loss_curves.png/pdf at the end.")
flags.mark_flags_as_required(["config", "workdir"])
MULTIPROCESS = True  # takes cli's --coordinator_address / --num_processes / --process_id


def main(argv):
  """Trains --config into --workdir; writes loss curves (--plot) and prints a summary per run."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  # Imported here so `--help` is fast and flags parse before JAX starts.
  from ih_jax import plots, train  # pylint: disable=g-import-not-at-top
  from ih_jax.experiments.configs import common  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  print(f"[ih_jax] process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local device(s): {jax.devices()[0].platform}", flush=True)
  cfg = common.to_experiment(_CONFIG.value)
  try:
    results = train.train_and_evaluate(cfg, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except train.TrainingInterrupted as e:
    print(f"[ih_jax] {e}", flush=True)
    sys.exit(130)
  if jax.process_index() != 0:  # process 0 writes the plots and prints the summary
    return
  for result in results if isinstance(results, list) else [results]:
    if _PLOT.value:
      for path in plots.plot_training_curves(result.workdir):
        print(f"[ih_jax] wrote {path}")
    summarise(result)


def summarise(result) -> None:
  """Prints each run's final loss and accuracy (or token-task scores) and learning time."""
  from ih_jax.analysis.timing import learning_time  # pylint: disable=g-import-not-at-top
  for run in result.runs:
    tok = [r for r in result.metrics if r["run"] == run.index
           and r["eval_set"] == "tokens" and r["clamped"] == 1]
    if tok:  # the token task: loss on the positions predictable by induction
      f = tok[-1]
      print(f"[ih_jax] run {run.index} {run.condition} seed {run.init_seed}: final tokens "
            f"loss {f['loss']:.3f}, loss_repeated {f['loss_repeated']:.3f}, icl_score "
            f"{f['icl_score']:.3f}, prev_token_max {f['prev_token_max']:.2f}, "
            f"prefix_match_max {f['prefix_match_max']:.2f}")
      continue
    rows = [r for r in result.metrics if r["run"] == run.index
            and r["eval_set"] == "fsl_train" and r["clamped"] == 1]
    if not rows:
      continue
    lt = learning_time([r["seqs"] for r in rows], [r["loss"] for r in rows])
    final = rows[-1]
    lt_text = "never (censored)" if lt != lt else f"{lt:,.0f} seqs"
    variant = f" [{run.variant}]" if run.variant else ""
    print(f"[ih_jax] run {run.index} {run.condition} seed {run.init_seed}{variant}: final "
          f"fsl_train loss {final['loss']:.3f} acc {final['acc']:.3f}; learning time {lt_text}")


if __name__ == "__main__":
  cli.run(main)
