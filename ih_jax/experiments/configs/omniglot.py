r"""The paper's main run on real Omniglot features.

Arguments (after ':'): encoder=conv|pixels (default conv), reader=archives|tfds
(default archives), dir=FOLDER of official zip archives (reader archives: default
$IH_JAX_OMNIGLOT_DIR, else, in a development checkout, ../shared/data/omniglot beside
the repository, which holds the two small archives = 242 distinct characters; reader tfds: the manual_dir for an
offline build, default none). Classes: 50 train / the rest unused / 100 test;
the encoder never sees the 100 test characters (data.encoder_holdout).

  ih-jax train --config=omniglot --workdir=/tmp/ih_omni_conv
  ih-jax train --config=omniglot:encoder=pixels \
      --workdir=/tmp/ih_omni_pixels
  # all 1623 characters from the four official archives, or through TFDS:
  ih-jax train --config=omniglot:dir=/data/omniglot \
      --workdir=/tmp/ih_omni_full
  ih-jax train --config=omniglot:reader=tfds \
      --config.data.tfds_download=True --workdir=/tmp/ih_omni_tfds
"""

import os

from ih_jax.experiments.configs import common

OMNIGLOT_DIR_ENV = "IH_JAX_OMNIGLOT_DIR"
# In a development checkout, the shared data folder beside the repository.
_CHECKOUT_SHARED = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4, "shared", "data", "omniglot"))


def default_archive_dir() -> str:
  """$IH_JAX_OMNIGLOT_DIR, else the checkout's shared folder when it exists, else ''
  (then loading the features says how to get the archives)."""
  if os.environ.get(OMNIGLOT_DIR_ENV):
    return os.environ[OMNIGLOT_DIR_ENV]
  return _CHECKOUT_SHARED if os.path.isdir(_CHECKOUT_SHARED) else ""


def get_config(arg: str | None = None):
  """The main run on Omniglot features; arguments encoder, reader, dir."""
  args = common.parse_arg(arg)
  encoder = args.get("encoder", "conv")
  if encoder not in ("conv", "pixels"):
    raise ValueError(f"encoder must be conv or pixels, got {encoder!r}")
  cfg = common.base_config()
  cfg.data.source = f"omniglot_{encoder}"
  cfg.data.omniglot_reader = args.get("reader", "archives")
  # For TFDS the folder is the manual_dir of an offline build (all four archives);
  # without dir= TFDS uses an already built copy or downloads (data.tfds_download).
  default_dir = default_archive_dir() if cfg.data.omniglot_reader == "archives" else ""
  cfg.data.omniglot_dir = args.get("dir", default_dir)
  cfg.data.encoder_holdout = 100
  cfg.task.class_split = (50, -1, 100)   # -1: every character not in train or test
  cfg.train.num_seqs = 1_000_000
  cfg.train.eval_every = 5000
  cfg.sweep.conditions = ("none",)
  cfg.sweep.init_seeds = (5,)
  cfg.checkpoint.every = 10_000          # --config.checkpoint.every=1000 for the progress measures
  return cfg
