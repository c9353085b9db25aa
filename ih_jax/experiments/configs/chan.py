"""The few-shot task with Chan et al. (2022)'s data properties.

Longer contexts (n = 8) with the query class repeated (bursty, k = 3), Zipfian
training classes over 800 classes, and 10% of sequences with fixed class labels
(learnable in the weights). Two extra evaluators separate the two kinds of
learning: `icl_test` (held-out classes, relabelled: only in-context learning
helps) and `iwl_train` (training classes with their fixed labels).

  ih-jax train --config=chan --workdir=/tmp/ih_chan
  ih-jax train --config=chan:zipf=0,bursty=1 ...
"""

from ih_jax.experiments.configs import common


def get_config(arg: str | None = None):
  """n = 8 contexts, bursty (default 3), Zipfian (default exponent 1) over 800 training
  classes, 90% relabelled; arguments bursty, zipf, relabel."""
  args = common.parse_arg(arg)
  cfg = common.base_config()
  cfg.task.num_context = 8
  cfg.task.bursty = int(args.get("bursty", 3))
  cfg.task.zipf_exponent = float(args.get("zipf", 1.0))
  cfg.task.relabel_fraction = float(args.get("relabel", 0.9))
  cfg.task.class_split = (800, -1, 100)
  cfg.model.num_labels = 10
  cfg.train.learning_rate = 1e-4
  cfg.train.num_seqs = 300_000
  cfg.evaluators = [
      dict(name="fsl_train", size=1000),
      dict(name="icl_test", classes="test", size=1000),
      dict(name="iwl_train", labels="fixed", size=1000),
  ]
  return cfg
