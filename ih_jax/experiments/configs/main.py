r"""The paper's main run: 1e6 sequences, eval every 5000, init seed 5, no clamps.

Checkpoints every 1000 sequences (dense, for the progress measures).

  ih-jax train --config=main --workdir=/tmp/ih_main
  ih-jax train --config=main \
      --config.sweep.init_seeds="(5,6,7,8,9)" --workdir=/tmp/ih_main_seeds
"""

from ih_jax.experiments.configs import common


def get_config(arg: str | None = None):
  """The paper's main run (no arguments)."""
  del arg
  cfg = common.base_config()
  cfg.train.num_seqs = 1_000_000
  cfg.train.eval_every = 5000
  cfg.sweep.conditions = ("none",)
  cfg.sweep.init_seeds = (5,)
  cfg.checkpoint.every = 1000
  return cfg
