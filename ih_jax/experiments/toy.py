"""The rank-1 toy model of the phase change (the paper's Fig. 5a and its appendix figure).

  python -m ih_jax.experiments.toy --out=/tmp/toy            # figures + toy_curves.csv
  python -m ih_jax.experiments.toy --out=/tmp/toy --steps=2000 --seed=3
"""

import csv
import os

from absl import app, flags

from ih_jax.experiments import cli

_OUT = flags.DEFINE_string("out", "toy_out", "Folder for toy_model.{png,pdf} and toy_curves.csv.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Gradient-descent iterations.")
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the true and initial vectors.")
_LR = flags.DEFINE_float("lr", 1.0, "Learning rate.")


def main(argv):
  """Trains the toy model; writes toy_curves.csv and the figures to --out."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ih_jax import plots, toy  # pylint: disable=g-import-not-at-top
  curves = toy.run(steps=_STEPS.value, lr=_LR.value, seed=_SEED.value)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "toy_curves.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["iteration", "condition", "loss", "pm1", "pm2"])
    for q, cond in enumerate(curves.conditions):
      for i in range(curves.loss.shape[1]):
        w.writerow([i, cond, f"{curves.loss[q, i]:.6g}", f"{curves.pm1[q, i]:.6g}",
                    f"{curves.pm2[q, i]:.6g}"])
  for path in plots.plot_toy(_OUT.value, curves):
    print(f"[toy] wrote {path}")
  for q, cond in enumerate(curves.conditions):
    below = (curves.loss[q] < 1e-3).nonzero()[0]
    when = f"iteration {below[0]}" if below.size else "never"
    print(f"[toy] {cond}: loss < 1e-3 at {when}")


if __name__ == "__main__":
  cli.run(main)
