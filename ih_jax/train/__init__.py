"""Training: a sweep's programs of stacked runs, compiled, trained and evaluated.

`train_and_evaluate(cfg, workdir)` is the entry point (ih_jax.run wraps it for
notebooks). The package, one job per module, bottom up:

  experiment.py   a program's runs and inputs (Experiment, Run, setup_experiment)
  placement.py    the ('runs',) device mesh and the shardings on it
  state.py        TrainState, its initialisation, the optimizer
  flat.py         FlatParams: one run's params as one flat vector
  evaluation.py   every run on the eval sets, under its clamps and clamp-free
  step.py         train_step (one run's step, pure) and the compiled training chunk
  driver.py       the host loop: schedule, snapshots, checkpoints, resume, signals
"""

from ih_jax.train.driver import (TrainResult, TrainingInterrupted, load_result,
                                 train_and_evaluate, train_program)

__all__ = ["TrainResult", "TrainingInterrupted", "load_result", "train_and_evaluate",
           "train_program"]
