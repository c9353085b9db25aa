"""Omniglot images -> the task's [classes, exemplars, dim] feature table.

Protocol (sources "omniglot_pixels" and "omniglot_conv"):
  1. Read the characters (`ih_jax.data.omniglot`), in label order; permute them
     with `class_perm_seed` (hash order, like the paper's seeded permutation).
  2. The last `encoder_holdout` characters of that order are never seen by any
     fitted part (PCA basis, conv encoder, feature scale). The task's test classes
     are the last `class_split[2]` characters, so holdout >= class_split[2] keeps
     them unseen (checked by `ExperimentConfig`). The fit set is the rest (the
     task's train + unused middle classes), all 20 drawings each.
  3. Exemplars are the first `num_exemplars` drawings of each character in
     content order (exemplar 0 trains the task; 1.. feed `fsl_train_valex`).
  4. Encode: area-downsample to `image_size`^2 ink fractions, then
       pixels: project onto the fit set's top-`dim` principal axes ("pca", the
               uncentred projection, so the shared mean direction stays as in
               raw pixels), a fixed seeded Gaussian map ("random"), or nothing ("none");
       conv:   a small CNN trained here (Flax; four 3x3 conv blocks, global average,
               ReLU(Dense(dim)), classifier; Adam, seeded, random shifts) to classify
               the fit characters; its penultimate layer ReLU(Dense(dim)) is the
               feature (non-negative, like the paper's ResNet-18 avgpool features).
  5. Scale by one global constant so that the fit rows have mean squared norm
     `feature_scale`^2 * dim (the synthetic family's scale; 0 = raw). The model
     itself never normalises its inputs.
Tables are cached as `.npz` and trained encoders as Orbax checkpoints under
`cache_dir`, keyed by everything that determines them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ih_jax.data import omniglot
from ih_jax.data.omniglot import OMNIGLOT_SOURCES
CACHE_VERSION = 1        # bump when the pipeline's output changes for the same settings
PIXEL_PROJECTIONS = ("pca", "random", "none")
READERS = ("archives", "tfds")


# ----------------------------------------------------------------------------- cache

def cache_root(cache_dir: str) -> str | None:
  """The cache folder: cache_dir, else $IH_JAX_CACHE_DIR, else ~/.cache/ih_jax ("none" = off)."""
  if cache_dir == "none":
    return None
  root = cache_dir or os.environ.get("IH_JAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "ih_jax")
  return os.path.abspath(root)


def digest(obj: Any) -> str:
  """A short (20 hex digit) SHA-256 of `obj`'s canonical JSON: a cache key."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def image_source_id(cfg: Any) -> dict[str, Any]:
  """What identifies the images (part of every cache key and of the run metadata)."""
  if cfg.omniglot_reader == "archives":
    paths = omniglot.find_archives(cfg.omniglot_dir, cfg.omniglot_archives)
    return dict(reader="archives", archives=sorted(
        [os.path.basename(p), omniglot.file_sha256(p)] for p in paths))
  if cfg.omniglot_reader == "tfds":
    return dict(reader="tfds", name=omniglot.TFDS_NAME, version="3.0.0",
                splits=list(cfg.tfds_splits),
                data_dir=os.path.abspath(cfg.tfds_data_dir) if cfg.tfds_data_dir else "")
  raise ValueError(f"unknown data.omniglot_reader {cfg.omniglot_reader!r}; allowed: {READERS}")


def encoder_settings(cfg: Any) -> dict[str, Any]:
  """The encoder settings that determine an Omniglot table (pixel projection or conv encoder)."""
  s = dict(encoder=cfg.source.removeprefix("omniglot_"), image_size=cfg.image_size, dim=cfg.dim)
  if cfg.source == "omniglot_pixels":
    s.update(projection=cfg.pixel_projection)
    if cfg.pixel_projection == "random":
      s.update(seed=cfg.encoder_seed)
    if cfg.pixel_projection == "none":
      s.update(dim=cfg.image_size ** 2)
  else:
    s.update(width=cfg.encoder_width, steps=cfg.encoder_steps,
             batch_size=cfg.encoder_batch_size, lr=cfg.encoder_lr, seed=cfg.encoder_seed,
             augment=cfg.encoder_augment)
  return s


def table_settings(cfg: Any, source_id: dict[str, Any]) -> dict[str, Any]:
  """Everything that determines the feature table (its cache key)."""
  return dict(version=CACHE_VERSION, images=source_id, class_perm_seed=cfg.class_perm_seed,
              encoder_holdout=cfg.encoder_holdout, num_exemplars=cfg.num_exemplars,
              feature_scale=cfg.feature_scale, **encoder_settings(cfg))


def validate(cfg: Any) -> None:
  """Raises ValueError for an Omniglot data config with an unknown or out-of-range setting."""
  if cfg.source not in OMNIGLOT_SOURCES:
    raise ValueError(f"not an Omniglot source: {cfg.source!r}")
  if cfg.omniglot_reader not in READERS:
    raise ValueError(f"unknown data.omniglot_reader {cfg.omniglot_reader!r}; allowed: {READERS}")
  if cfg.pixel_projection not in PIXEL_PROJECTIONS:
    raise ValueError(f"unknown data.pixel_projection {cfg.pixel_projection!r}; allowed: "
                     f"{PIXEL_PROJECTIONS}")
  for name in ("image_size", "dim", "num_exemplars", "encoder_width", "encoder_steps",
               "encoder_batch_size"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"data.{name} must be >= 1, got {getattr(cfg, name)}")
  if cfg.encoder_holdout < 0 or cfg.encoder_augment < 0 or cfg.feature_scale < 0:
    raise ValueError("data.encoder_holdout, data.encoder_augment and data.feature_scale must be "
                     ">= 0")


# ----------------------------------------------------------------------------- pixels

def pixel_projection(x_NP: np.ndarray, dim: int, kind: str, seed: int = 0) -> np.ndarray:
  """[P, dim] projection matrix fitted on the rows of x_NP (or fixed, for "random")."""
  n, p = x_NP.shape
  if kind == "random":
    return (np.random.default_rng(seed).standard_normal((p, dim)) / np.sqrt(p)).astype(np.float32)
  if kind == "pca":
    if dim > min(n, p):
      raise ValueError(f"pixel PCA to dim={dim} needs at least {dim} pixels and fit images; "
                       f"have {p} pixels (image_size^2) and {n} images. Lower data.dim or raise "
                       "data.image_size")
    x = x_NP.astype(np.float64)
    xc = x - x.mean(0)
    _, evecs = np.linalg.eigh(xc.T @ xc)                     # ascending eigenvalues
    vt = evecs[:, ::-1][:, :dim].T
    # Fix each axis' sign (arbitrary in eigh): the larger-magnitude loading positive.
    signs = np.sign(vt[np.arange(dim), np.abs(vt).argmax(1)])
    return (vt * signs[:, None]).T.astype(np.float32)
  raise ValueError(f"unknown pixel projection {kind!r}; allowed: {PIXEL_PROJECTIONS}")


# ----------------------------------------------------------------------------- conv

class ConvEncoder(nn.Module):
  """3x3 conv blocks of width w, 2w, 4w, 8w (ReLU; 2x2 max-pool between), global
  average, then the penultimate layer ReLU(Dense(dim)) -> classifier."""
  width: int
  dim: int
  num_classes: int

  @nn.compact
  def __call__(self, x_BHW: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x_BHW[..., None]
    for i in range(4):
      if i:
        h = nn.max_pool(h, (2, 2), (2, 2), padding="SAME")
      h = nn.relu(nn.Conv(self.width * 2 ** i, (3, 3))(h))
    feat_BF = nn.relu(nn.Dense(self.dim, name="penultimate")(h.mean(axis=(1, 2))))
    return nn.Dense(self.num_classes, name="classifier")(feat_BF), feat_BF


def _shift(x_BHW: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Random integer translations by up to max_shift pixels (zero fill)."""
  if max_shift == 0:
    return x_BHW
  b, hgt, wid = x_BHW.shape
  pad = jnp.pad(x_BHW, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
  off = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1]), (hgt, wid))
  return jax.vmap(crop)(pad, off)


@functools.lru_cache(maxsize=8)
def _train_step(width: int, dim: int, num_classes: int, batch_size: int, lr: float,
                augment: int) -> tuple[ConvEncoder, optax.GradientTransformation, Callable]:
  """The jitted training step for these settings (compiled once per process)."""
  model = ConvEncoder(width, dim, num_classes)
  tx = optax.adam(lr)

  def loss_fn(p, xb, yb):
    logits, _ = model.apply({"params": p}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  # Called from a Python loop: XLA:CPU ran these convolutions ~9x slower inside a
  # lax.fori_loop / scan than as a plain jitted call.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, opt, data_key, i, x, y):
    k_idx, k_shift = jax.random.split(jax.random.fold_in(data_key, i))
    idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])
    loss, g = jax.value_and_grad(loss_fn)(p, _shift(x[idx], k_shift, augment), y[idx])
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  return model, tx, step


def train_conv_encoder(x_NHW: np.ndarray, y_N: np.ndarray, num_classes: int, *, width: int,
                       dim: int, steps: int, batch_size: int, lr: float, seed: int, augment: int,
                       progress: bool = True) -> tuple[dict[str, Any], dict[str, float]]:
  """Trains ConvEncoder to classify x_NHW; returns (params, stats). Deterministic per seed."""
  model, tx, step = _train_step(width, dim, num_classes, batch_size, lr, augment)
  x = jnp.asarray(x_NHW, jnp.float32)
  y = jnp.asarray(y_N, jnp.int32)
  init_key, data_key = jax.random.split(jax.random.key(seed))
  params = model.init(init_key, x[:1])["params"]
  opt = tx.init(params)
  bar = _Progress(steps, "training the Omniglot conv encoder", "step", progress)
  t0, losses = time.time(), []
  for i in range(steps):
    params, opt, loss = step(params, opt, data_key, i, x, y)
    losses.append(loss)
    if (i + 1) % 50 == 0 or i + 1 == steps:
      bar.update(50 if (i + 1) % 50 == 0 else steps % 50, loss=float(loss))
  bar.close()
  last = float(np.mean(jax.device_get(losses[-50:])))
  return params, dict(train_loss=last, train_seconds=time.time() - t0)


@functools.lru_cache(maxsize=8)
def _feature_fn(width: int, dim: int, num_classes: int) -> Callable[..., jax.Array]:
  model = ConvEncoder(width, dim, num_classes)
  return jax.jit(lambda p, xb: model.apply({"params": p}, xb)[1])


def conv_features(params: dict[str, Any], x_NHW: np.ndarray, progress: bool = False,
                  batch: int = 512) -> np.ndarray:
  """Penultimate features [N, dim] of a trained ConvEncoder (sizes read from params)."""
  width = params["Conv_0"]["kernel"].shape[-1]
  dim, num_classes = params["classifier"]["kernel"].shape
  fn = _feature_fn(width, dim, num_classes)
  n = x_NHW.shape[0]
  out = np.zeros((n, dim), np.float32)
  bar = _Progress(n, "encoding Omniglot images", "img", progress)
  for s in range(0, n, batch):
    xb = np.zeros((batch, *x_NHW.shape[1:]), np.float32)  # one shape: one compile
    xb[:min(batch, n - s)] = x_NHW[s:s + batch]
    out[s:s + batch] = np.asarray(fn(params, xb))[:min(batch, n - s)]
    bar.update(min(batch, n - s))
  bar.close()
  return out


def _load_cached_params(path: str, model: ConvEncoder, x1: np.ndarray) -> dict[str, Any] | None:
  """Cached encoder params, or None (with a warning) when unreadable or of another shape."""
  from orbax.checkpoint import v1 as ocp  # pylint: disable=g-import-not-at-top
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), x1)["params"])
  try:
    params = jax.tree.map(np.asarray, ocp.load(os.path.join(path, "params")))
  except Exception as e:  # pylint: disable=broad-except
    params, why = None, f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
  else:
    same = (jax.tree.structure(params) == jax.tree.structure(expected) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected))))
    why = "" if same else "of another architecture"
  if why:
    print(f"[ih_jax] cached encoder {path} is {why}; retraining", file=sys.stderr)
    shutil.rmtree(path, ignore_errors=True)
    return None
  return params


def load_or_train_encoder(cfg: Any, x_CDHW: np.ndarray, fit_labels: np.ndarray,
                          source_id: dict[str, Any], progress: bool = True
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The conv encoder for these fit characters: from the Orbax cache, or trained and saved."""
  settings = dict(version=CACHE_VERSION, images=source_id,
                  fit_labels=digest([int(v) for v in fit_labels]), **encoder_settings(cfg))
  root = cache_root(cfg.cache_dir)
  path = os.path.join(root, "encoders", digest(settings)) if root else None
  c, d = x_CDHW.shape[:2]
  model = ConvEncoder(cfg.encoder_width, cfg.dim, c)
  if path and os.path.exists(os.path.join(path, "info.json")):
    params = _load_cached_params(path, model, x_CDHW[0, :1])
    if params is not None:
      with open(os.path.join(path, "info.json")) as f:
        info = json.load(f)
      return params, dict(info, cache="hit", path=path)
  params, stats = train_conv_encoder(
      x_CDHW.reshape(c * d, *x_CDHW.shape[2:]), np.repeat(np.arange(c), d), c,
      width=cfg.encoder_width, dim=cfg.dim, steps=cfg.encoder_steps,
      batch_size=cfg.encoder_batch_size, lr=cfg.encoder_lr, seed=cfg.encoder_seed,
      augment=cfg.encoder_augment, progress=progress)
  params = jax.tree.map(np.asarray, params)
  info = dict(settings=settings, **stats)
  if path:
    from orbax.checkpoint import v1 as ocp  # pylint: disable=g-import-not-at-top
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ocp.save(os.path.join(tmp, "params"), params)
    with open(os.path.join(tmp, "info.json"), "w") as f:
      json.dump(info, f, indent=1)
    try:
      os.replace(tmp, path)
    except OSError:  # another process cached it first
      shutil.rmtree(tmp, ignore_errors=True)
  return params, dict(info, cache="miss" if path else "off", path=path)


# ----------------------------------------------------------------------------- the table

_IMAGES: dict[str, omniglot.OmniglotImages] = {}   # the last images read (one entry)


def load_images(cfg: Any, source_id: dict[str, Any] | None = None) -> omniglot.OmniglotImages:
  """The characters of cfg's image source (the last one read is kept in memory)."""
  key = digest(source_id or image_source_id(cfg))
  if key not in _IMAGES:
    if cfg.omniglot_reader == "archives":
      images = omniglot.read_archives(
          omniglot.find_archives(cfg.omniglot_dir, cfg.omniglot_archives))
    else:
      images = omniglot.read_tfds(cfg.tfds_splits, cfg.tfds_data_dir, cfg.omniglot_dir,
                                  cfg.tfds_download)
    _IMAGES.clear()
    _IMAGES[key] = images
  return _IMAGES[key]


def build_table(cfg: Any, images: omniglot.OmniglotImages, source_id: dict[str, Any],
                progress: bool = True) -> tuple[np.ndarray, omniglot.OmniglotImages, dict]:
  """(features [C, E, F], the characters in table order, info) for these images."""
  order = omniglot.class_order(images.labels, cfg.class_perm_seed)
  images = images.take(order)
  c, d = images.ink.shape[:2]
  if cfg.num_exemplars > d:
    raise ValueError(f"data.num_exemplars={cfg.num_exemplars} but characters have {d} drawings")
  if cfg.encoder_holdout >= c:
    raise ValueError(f"data.encoder_holdout={cfg.encoder_holdout} leaves no characters to fit "
                     f"the encoder on ({c} characters)")
  n_fit = c - cfg.encoder_holdout
  x = omniglot.downsample(images.ink, cfg.image_size)            # [C, D, s, s]
  info: dict[str, Any] = dict(num_classes=c, fit_classes=n_fit)
  if cfg.source == "omniglot_pixels":
    flat = x.reshape(c, d, -1)
    if cfg.pixel_projection == "none":
      feats = flat[:, :cfg.num_exemplars]
    else:
      w = pixel_projection(flat[:n_fit].reshape(n_fit * d, -1), cfg.dim, cfg.pixel_projection,
                           cfg.encoder_seed)
      feats = flat[:, :cfg.num_exemplars] @ w
  else:
    params, enc_info = load_or_train_encoder(cfg, x[:n_fit], images.labels[:n_fit], source_id,
                                             progress)
    info["encoder"] = {k: v for k, v in enc_info.items() if k != "settings"}
    e = cfg.num_exemplars
    feats = conv_features(params, x[:, :e].reshape(c * e, *x.shape[2:]),
                          progress).reshape(c, e, cfg.dim)
  feats = np.asarray(feats, np.float32)
  if cfg.feature_scale > 0:
    ms = float((feats[:n_fit].astype(np.float64) ** 2).sum(-1).mean())
    feats *= np.float32(cfg.feature_scale * np.sqrt(feats.shape[-1] / max(ms, 1e-30)))
  return feats, images, info


def omniglot_features(cfg: Any, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
  """The feature table for an Omniglot source, from the .npz cache or built (and cached)."""
  validate(cfg)
  source_id = image_source_id(cfg)
  settings = table_settings(cfg, source_id)
  key = digest(settings)
  root = cache_root(cfg.cache_dir)
  path = os.path.join(root, "features", f"{cfg.source}-{key}.npz") if root else None
  if path and os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      return z["features"], dict(cache="hit", path=path, key=key,
                                 **json.loads(str(z["info"])))
  t0 = time.time()
  images = load_images(cfg, source_id)
  feats, images, info = build_table(cfg, images, source_id, progress)
  info.update(build_seconds=time.time() - t0, labels=images.labels.tolist(),
              names=images.names)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, features=feats, info=np.asarray(json.dumps(info)),
             settings=np.asarray(json.dumps(settings)))
    os.replace(tmp, path)
  return feats, dict(cache="miss" if path else "off", path=path, key=key, **info)


def nearest_neighbour_accuracy(feats_CDF: np.ndarray) -> float:
  """1-shot nearest-neighbour accuracy (cosine): drawing 0 of each class is the reference,
  every other drawing is classified among the C references. Chance is 1/C."""
  f = np.asarray(feats_CDF, np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  sims = np.einsum("cdf,kf->cdk", f[:, 1:], f[:, 0])
  return float((sims.argmax(-1) == np.arange(len(f))[:, None]).mean())


# ----------------------------------------------------------------------------- progress

class _Progress:
  """A tqdm bar on stderr when wanted (silent if tqdm is missing)."""

  def __init__(self, total: int, desc: str, unit: str, enabled: bool):
    self._bar = None
    if enabled:
      try:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm(total=total, desc=f"[ih_jax] {desc}", unit=unit, file=sys.stderr,
                         dynamic_ncols=True, mininterval=1.0)
      except ImportError:
        self._bar = None

  def update(self, n: int, **postfix: float) -> None:
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
