"""The paper's main run on real Omniglot features.

Arguments (after ':'): encoder=conv|pixels (default conv), reader=archives|tfds
(default archives), dir=FOLDER of official zip archives (reader archives: default
the shared folder ../shared/data/omniglot next to the repository, which holds the
two small archives = 242 distinct characters; reader tfds: the manual_dir for an
offline build, default none). Classes: 50 train / the rest unused / 100 test;
the encoder never sees the 100 test characters (data.encoder_holdout).

  python -m experiments.train --config=experiments/configs/omniglot.py --workdir=/tmp/ih_omni_conv
  python -m experiments.train --config=experiments/configs/omniglot.py:encoder=pixels \
      --workdir=/tmp/ih_omni_pixels
  # all 1623 characters from the four official archives, or through TFDS:
  python -m experiments.train --config=experiments/configs/omniglot.py:dir=/data/omniglot \
      --workdir=/tmp/ih_omni_full
  python -m experiments.train --config=experiments/configs/omniglot.py:reader=tfds \
      --config.data.tfds_download=True --workdir=/tmp/ih_omni_tfds
"""

import os

from experiments.configs import common

SHARED_OMNIGLOT = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "omniglot"))


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  encoder = args.get("encoder", "conv")
  if encoder not in ("conv", "pixels"):
    raise ValueError(f"encoder must be conv or pixels, got {encoder!r}")
  cfg = common.base_config()
  cfg.data.source = f"omniglot_{encoder}"
  cfg.data.omniglot_reader = args.get("reader", "archives")
  # For TFDS the folder is the manual_dir of an offline build (all four archives);
  # without dir= TFDS uses an already built copy or downloads (data.tfds_download).
  default_dir = SHARED_OMNIGLOT if cfg.data.omniglot_reader == "archives" else ""
  cfg.data.omniglot_dir = args.get("dir", default_dir)
  cfg.data.encoder_holdout = 100
  cfg.task.class_split = (50, -1, 100)   # -1: every character not in train or test
  cfg.train.num_seqs = 1_000_000
  cfg.train.eval_every = 5000
  cfg.sweep.conditions = ("none",)
  cfg.sweep.init_seeds = (5,)
  cfg.checkpoint.every = 10_000          # --config.checkpoint.every=1000 for the progress measures
  return cfg
