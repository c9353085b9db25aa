"""A seconds-long smoke configuration (used by tests and quick checks).

  ih-jax train --config=tiny --workdir=/tmp/ih_tiny
"""

from ih_jax.experiments.configs import common


def get_config(arg: str | None = None):
  """A 3200-sequence run of two conditions x two seeds with small eval sets."""
  del arg
  cfg = common.base_config()
  cfg.train.num_seqs = 3200
  cfg.train.eval_every = 1000
  cfg.sweep.conditions = ("none", "match=ih:L2H0;keep_only:L2H0")
  cfg.sweep.init_seeds = (5, 6)
  cfg.evaluators = [dict(e, size=200) for e in cfg.evaluators]
  return cfg
