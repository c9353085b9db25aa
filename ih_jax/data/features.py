"""Feature tables [classes, exemplars, dim] behind one interface (SPEC §1.1, §2).

Sources:
  * "synthetic": the embedded correlated-Gaussian family (no download).
  * "file": a user-supplied `.npy` or HDF5 file in the authors' layout
    (HDF5 dataset path configurable, default `resnet18/224/feat`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PAPER_NUM_CLASSES = 1623
PAPER_NUM_EXEMPLARS = 5
PAPER_FEATURE_DIM = 512
AUTHORS_H5_DATASET = "resnet18/224/feat"


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  source: str = "synthetic"          # "synthetic" | "file"
  # synthetic family (SPEC §2)
  rho: float = 0.8                   # shared-direction fraction: pairwise cosine ≈ rho
  eta: float = 0.2                   # held-out exemplar perturbation (exemplars 1..)
  feature_seed: int = 0
  num_classes: int = PAPER_NUM_CLASSES
  num_exemplars: int = PAPER_NUM_EXEMPLARS
  dim: int = PAPER_FEATURE_DIM
  # file source
  path: str = ""
  h5_dataset: str = AUTHORS_H5_DATASET


def synthetic_features(rho: float = 0.8, eta: float = 0.2, seed: int = 0,
                       num_classes: int = PAPER_NUM_CLASSES,
                       num_exemplars: int = PAPER_NUM_EXEMPLARS,
                       dim: int = PAPER_FEATURE_DIM) -> jax.Array:
  """x_c = sqrt(1-rho) g_c + sqrt(rho) s; exemplar e>0 = sqrt(1-eta) x_c + sqrt(eta) eps."""
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta}")
  shared_key, class_key, noise_key = jax.random.split(jax.random.key(seed), 3)
  shared_F = jax.random.normal(shared_key, (dim,), jnp.float32)
  g_CF = jax.random.normal(class_key, (num_classes, dim), jnp.float32)
  proto_CF = jnp.sqrt(1.0 - rho) * g_CF + jnp.sqrt(rho) * shared_F
  eps_CEF = jax.random.normal(noise_key, (num_classes, num_exemplars - 1, dim), jnp.float32)
  others_CEF = jnp.sqrt(1.0 - eta) * proto_CF[:, None] + jnp.sqrt(eta) * eps_CEF
  # Exemplar 0 is exactly the prototype (it is what training sees).
  return jnp.concatenate([proto_CF[:, None], others_CEF], axis=1)


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


def load_features(cfg: FeatureConfig) -> jax.Array:
  """Returns the [classes, exemplars, dim] float32 feature table on device."""
  if cfg.source == "synthetic":
    return synthetic_features(cfg.rho, cfg.eta, cfg.feature_seed, cfg.num_classes,
                              cfg.num_exemplars, cfg.dim)
  if cfg.source == "file":
    return jnp.asarray(load_feature_file(cfg.path, cfg.h5_dataset))
  raise ValueError(f"unknown data.source {cfg.source!r}; allowed: 'synthetic', 'file'")


def feature_metadata(cfg: FeatureConfig) -> dict[str, Any]:
  if cfg.source == "synthetic":
    return dict(source="synthetic", rho=cfg.rho, eta=cfg.eta, feature_seed=cfg.feature_seed)
  return dict(source="file", path=os.path.abspath(cfg.path), h5_dataset=cfg.h5_dataset)
