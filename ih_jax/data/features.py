"""Feature tables [classes, exemplars, dim] behind one interface.

Sources:
  * "synthetic": an embedded family picked by `family` (no download): "gaussian"
    (correlated Gaussian classes, the paper's family) or "relu" (classes drawn from a
    `latent_dim`-dimensional latent space through a fixed random ReLU layer).
  * "file": a user-supplied `.npy` or HDF5 file in the authors' layout
    (HDF5 dataset path configurable, default `resnet18/224/feat`).
  * "omniglot_pixels", "omniglot_conv": real Omniglot characters (official zip
    archives or tensorflow-datasets) through a pixel projection or a conv encoder
    trained here; see `ih_jax.data.encoders` for the protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax.data import encoders
from ih_jax.data.omniglot import OMNIGLOT_SOURCES

PAPER_NUM_CLASSES = 1623
PAPER_NUM_EXEMPLARS = 5
PAPER_FEATURE_DIM = 512
AUTHORS_H5_DATASET = "resnet18/224/feat"
SOURCES = ("synthetic", "file", *OMNIGLOT_SOURCES)
FAMILIES = ("gaussian", "relu", "lowrank")
# A stored config (config.json) written before data.family existed trained on this family.
LEGACY_FAMILY = "gaussian"


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Where the [classes, exemplars, dim] feature table comes from, and its settings:
  a synthetic family, a user file, or Omniglot images through an encoder."""
  source: str = "synthetic"          # "synthetic" | "file" | "omniglot_pixels" | "omniglot_conv"
  # synthetic families (`synthetic_table` has the formulas)
  # "relu" (default: held-out classes generalise) | "gaussian" (the earlier default; what a
  # stored config without this field means) | "lowrank" (relu's linear twin, for comparison)
  family: str = "relu"
  rho: float = 0.8                   # pairwise cosine of class prototypes ≈ rho
  eta: float = 0.2                   # held-out exemplar perturbation (exemplars 1..)
  feature_seed: int = 0
  latent_dim: int = 64               # relu / lowrank: dimension k of the class latent space
  num_classes: int = PAPER_NUM_CLASSES  # synthetic only (Omniglot: set by the data)
  num_exemplars: int = PAPER_NUM_EXEMPLARS  # synthetic; Omniglot: drawings kept per character
  dim: int = PAPER_FEATURE_DIM       # synthetic; Omniglot: output dim (PCA / random / conv width)
  # file source
  path: str = ""
  h5_dataset: str = AUTHORS_H5_DATASET
  # Omniglot sources (ih_jax/data/encoders.py has the protocol)
  omniglot_reader: str = "archives"  # "archives" (zip files, no TF) | "tfds" (tensorflow-datasets)
  omniglot_dir: str = ""             # folder of official zips: read directly, or TFDS manual_dir
  omniglot_archives: tuple[str, ...] = ()  # zips to read ("" = every official one in the folder)
  tfds_data_dir: str = ""            # TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets)
  tfds_splits: tuple[str, ...] = ("train", "test")  # train + test = all 1623 characters
  tfds_download: bool = False        # let TFDS download the archives (needs internet)
  class_perm_seed: int = 0           # seeded class order (-1 = TFDS label order)
  encoder_holdout: int = 100         # last N classes: never seen by PCA / encoder (>= test split)
  image_size: int = 28               # area-downsampled side (from 105)
  pixel_projection: str = "pca"      # omniglot_pixels: "pca" | "random" | "none" (dim = size^2)
  encoder_width: int = 16            # omniglot_conv: conv widths w, 2w, 4w, 8w
  encoder_steps: int = 1000          # Adam steps (batch below) to train the conv encoder
  encoder_batch_size: int = 64
  encoder_lr: float = 1e-3
  encoder_seed: int = 0              # conv init + batches; "random" projection
  encoder_augment: int = 2           # random shifts up to this many pixels while training
  feature_scale: float = 1.0         # rescale to mean squared norm scale^2 * dim (0 = raw)
  cache_dir: str = ""                # "" = $IH_JAX_CACHE_DIR or ~/.cache/ih_jax; "none" = off

  def __post_init__(self):
    # Checked when the config is built, not when the table is first generated.
    if self.family not in FAMILIES:
      raise ValueError(f"unknown data.family {self.family!r}; allowed: "
                       f"{', '.join(repr(f) for f in FAMILIES)}")
    if self.latent_dim < 1:
      raise ValueError(f"data.latent_dim must be >= 1, got {self.latent_dim}")


def synthetic_features(rho: float = 0.8, eta: float = 0.2, seed: int = 0,
                       num_classes: int = PAPER_NUM_CLASSES,
                       num_exemplars: int = PAPER_NUM_EXEMPLARS,
                       dim: int = PAPER_FEATURE_DIM) -> jax.Array:
  """x_c = sqrt(1-rho) g_c + sqrt(rho) s; exemplar e>0 = sqrt(1-eta) x_c + sqrt(eta) eps."""
  _check_rho_eta(rho, eta)
  shared_F, g_CF, eps_CEF = (np.asarray(a) for a in _normal_draws(
      jax.random.key(seed), num_classes, num_exemplars, dim))
  # The arithmetic in numpy, one float32 op at a time: the same values as unfused (eager)
  # JAX ops, pinned by tests/test_features.py; a fused XLA program may contract the
  # multiply-adds and round differently. (First call, compiles included: 0.83 -> 0.55 s
  # on 2 CPU cores.)
  root = lambda a: np.sqrt(np.float32(a))
  proto_CF = root(1.0 - rho) * g_CF + root(rho) * shared_F
  others_CEF = root(1.0 - eta) * proto_CF[:, None] + root(eta) * eps_CEF
  # Exemplar 0 is exactly the prototype (it is what training sees).
  return jnp.asarray(np.concatenate([proto_CF[:, None], others_CEF], axis=1))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_draws(key: jax.Array, num_classes: int, num_exemplars: int, dim: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three standard-normal draws of synthetic_features, from one compiled program."""
  shared_key, class_key, noise_key = jax.random.split(key, 3)
  return (jax.random.normal(shared_key, (dim,), jnp.float32),
          jax.random.normal(class_key, (num_classes, dim), jnp.float32),
          jax.random.normal(noise_key, (num_classes, num_exemplars - 1, dim), jnp.float32))


def load_feature_file(path: str, h5_dataset: str = AUTHORS_H5_DATASET) -> np.ndarray:
  """Loads a [classes, exemplars, dim] float table from `.npy` or HDF5."""
  if not path:
    raise ValueError("data.source='file' needs data.path (a .npy or .h5/.hdf5 file)")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"feature file {path!r} does not exist. Pass a .npy or HDF5 file of shape "
        f"[classes, exemplars, dim] (the authors' layout: HDF5 dataset {AUTHORS_H5_DATASET!r}), "
        f"or use data.source='synthetic' for the embedded default")
  if path.endswith(".npy"):
    try:
      arr = np.load(path, allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"could not read {path!r} as a .npy array: {e}") from e
  else:
    import h5py  # pylint: disable=g-import-not-at-top
    try:
      f = h5py.File(path, "r")
    except OSError as e:
      raise ValueError(f"could not open {path!r} as HDF5 ({e}); pass a .npy or HDF5 file") from e
    with f:
      if h5_dataset not in f or not isinstance(f[h5_dataset], h5py.Dataset):
        found: list[str] = []
        f.visit(lambda name: found.append(name) if isinstance(f[name], h5py.Dataset) else None)
        raise KeyError(f"HDF5 file {path!r} has no dataset {h5_dataset!r}; datasets found: "
                       f"{found[:20]}. Set data.h5_dataset to one of them")
      arr = np.asarray(f[h5_dataset])
  if arr.ndim != 3:
    raise ValueError(f"feature table in {path!r} has shape {arr.shape}; expected 3 dims "
                     "[classes, exemplars, dim]")
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"feature table in {path!r} has dtype {arr.dtype}; expected floats")
  if not np.isfinite(arr).all():
    raise ValueError(f"feature table in {path!r} contains NaN or inf values")
  return arr.astype(np.float32)


def _check_rho_eta(rho: float, eta: float) -> None:
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta}")


def _relu_moments(b: float) -> tuple[float, float]:
  """E[relu(u)], E[relu(u)^2] for u ~ N(b, 1)."""
  pdf = math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
  cdf = 0.5 * (1 + math.erf(b / math.sqrt(2)))
  return b * cdf + pdf, (b * b + 1) * cdf + b * pdf


def relu_bias(rho: float) -> float:
  """The pre-activation offset b whose ReLU units give independent classes cosine rho.

  For two independent latents the units' pre-activations are independent N(b, 1), so
  the cosine of the two feature vectors tends to m1(b)^2 / m2(b) (increasing in b:
  1/pi at b = 0). Solved by bisection so `rho` keeps its Gaussian-family meaning.
  """
  lo, hi = -6.0, 60.0
  f = lambda b: _relu_moments(b)[0] ** 2 / _relu_moments(b)[1]
  if not f(lo) < rho < f(hi):
    raise ValueError(f"family 'relu' needs rho in ({f(lo):.1e}, {f(hi):.4f}), got {rho}")
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if f(mid) < rho else (lo, mid)
  return 0.5 * (lo + hi)


def latent_features(family: str, rho: float = 0.8, eta: float = 0.2, seed: int = 0,
                    latent_dim: int = 64, num_classes: int = PAPER_NUM_CLASSES,
                    num_exemplars: int = PAPER_NUM_EXEMPLARS,
                    dim: int = PAPER_FEATURE_DIM) -> jax.Array:
  """Classes from a k-dimensional latent space (k = latent_dim), mapped into `dim`.

  z_c ~ N(0, I_k); exemplar e > 0 has z = sqrt(1-eta) z_c + sqrt(eta) eps (exemplar 0 is
  z_c); W ~ N(0, 1/k) is a fixed [k, dim] map, so u = z W has N(0, 1) units.
    relu:    x = relu(u + b) / sqrt(m2(b)), b = relu_bias(rho) (cosine of classes ≈ rho)
    lowrank: x = sqrt(1-rho) u + sqrt(rho) s (the Gaussian family with g_c = z_c W)
  Both have mean squared norm ≈ dim. Every class lies in the same k-dim latent space,
  so the 50 training classes span most of the directions held-out classes use (the
  Gaussian family's independent g_c span only 50 of 512: held-out classes never
  generalise there; BUILD_NOTES.md "Synthetic features").
  """
  _check_rho_eta(rho, eta)
  if family not in ("relu", "lowrank"):
    raise ValueError(f"latent_features: family must be 'relu' or 'lowrank', got {family!r}")
  if latent_dim < 1:
    raise ValueError(f"data.latent_dim must be >= 1, got {latent_dim}")
  z_CK, eps_CEK, w_KF, shared_F = (np.asarray(a) for a in _latent_draws(
      jax.random.key(seed), num_classes, num_exemplars, latent_dim, dim))
  root = lambda a: np.sqrt(np.float32(a))
  z_CEK = np.concatenate([z_CK[:, None], root(1.0 - eta) * z_CK[:, None] + root(eta) * eps_CEK],
                         axis=1)
  u_CEF = (z_CEK @ w_KF) / root(latent_dim)
  if family == "relu":
    b = relu_bias(rho)
    x = np.maximum(u_CEF + np.float32(b), 0) / root(_relu_moments(b)[1])
  else:
    x = root(1.0 - rho) * u_CEF + root(rho) * shared_F
  return jnp.asarray(x.astype(np.float32))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _latent_draws(key: jax.Array, num_classes: int, num_exemplars: int, latent_dim: int,
                  dim: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  z_key, noise_key, map_key, shared_key = jax.random.split(key, 4)
  return (jax.random.normal(z_key, (num_classes, latent_dim), jnp.float32),
          jax.random.normal(noise_key, (num_classes, num_exemplars - 1, latent_dim), jnp.float32),
          jax.random.normal(map_key, (latent_dim, dim), jnp.float32),
          jax.random.normal(shared_key, (dim,), jnp.float32))


def synthetic_table(cfg: FeatureConfig) -> jax.Array:
  """The embedded table data.family names (data.source='synthetic')."""
  if cfg.family == "gaussian":
    return synthetic_features(cfg.rho, cfg.eta, cfg.feature_seed, cfg.num_classes,
                              cfg.num_exemplars, cfg.dim)
  if cfg.family in FAMILIES:
    return latent_features(cfg.family, cfg.rho, cfg.eta, cfg.feature_seed, cfg.latent_dim,
                           cfg.num_classes, cfg.num_exemplars, cfg.dim)
  raise ValueError(f"unknown data.family {cfg.family!r}; allowed: "
                   f"{', '.join(repr(f) for f in FAMILIES)}")


def load_features(cfg: FeatureConfig) -> jax.Array:
  """Returns the [classes, exemplars, dim] float32 feature table on device."""
  if cfg.source == "synthetic":
    return synthetic_table(cfg)
  if cfg.source == "file":
    return jnp.asarray(load_feature_file(cfg.path, cfg.h5_dataset))
  if cfg.source in OMNIGLOT_SOURCES:
    feats, _ = encoders.omniglot_features(cfg)
    return jnp.asarray(feats)
  raise ValueError(f"unknown data.source {cfg.source!r}; allowed: "
                   f"{', '.join(repr(s) for s in SOURCES)}")


def table_fingerprint(table: Any) -> str:
  """SHA-256 of a feature table as float32 (shape included): what a run trained on.

  Hashing the loaded table, not the file, ignores HDF5 metadata and other datasets
  in the same file while catching any change of the values used.
  """
  arr = np.ascontiguousarray(np.asarray(table, np.float32))
  h = hashlib.sha256(repr(arr.shape).encode())
  h.update(arr.tobytes())
  return h.hexdigest()


def feature_metadata(cfg: FeatureConfig) -> dict[str, Any]:
  """What identifies a feature table, for the run metadata: the synthetic settings, the
  Omniglot table settings with their cache key, or a file's absolute path and dataset."""
  if cfg.source == "synthetic":
    out = dict(source="synthetic", family=cfg.family, rho=cfg.rho, eta=cfg.eta,
               feature_seed=cfg.feature_seed)
    if cfg.family != "gaussian":
      out["latent_dim"] = cfg.latent_dim
    return out
  if cfg.source in OMNIGLOT_SOURCES:
    settings = encoders.table_settings(cfg, encoders.image_source_id(cfg))
    return dict(source=cfg.source, cache_key=encoders.digest(settings), **settings)
  return dict(source="file", path=os.path.abspath(cfg.path), h5_dataset=cfg.h5_dataset)


def check_class_split(cfg: FeatureConfig, class_split: tuple[int, ...]) -> None:
  """Omniglot encoders must not see the task's test classes (the last class_split[-1])."""
  if cfg.source not in OMNIGLOT_SOURCES:
    return
  if len(class_split) != 3 or class_split[-1] < 0:
    raise ValueError(f"with data.source={cfg.source!r}, task.class_split must be "
                     f"(train, val, test) with an explicit test size; got {tuple(class_split)}")
  if class_split[-1] > cfg.encoder_holdout:
    raise ValueError(
        f"task.class_split puts {class_split[-1]} classes in the test split, but the Omniglot "
        f"encoder only holds out the last data.encoder_holdout={cfg.encoder_holdout}: test "
        "classes would be seen by the encoder. Raise data.encoder_holdout to at least "
        f"{class_split[-1]}")
