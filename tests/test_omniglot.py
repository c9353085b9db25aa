"""Omniglot: archive and TFDS readers, encoders, feature cache, config.

Real-data tests read the two small official archives from ../shared/data/omniglot
and skip when that folder is absent. TFDS tests use tfds.testing.mock_data (no
download, no TensorFlow) and skip when tensorflow-datasets is not installed.
"""
import json
import os
import time
import zipfile

import jax
import numpy as np
import pytest

from conftest import train_at_default_opt
from ih_jax.config import ExperimentConfig
from ih_jax.data import encoders, omniglot
from ih_jax.data.features import FeatureConfig, feature_metadata, load_features
from ih_jax.data.splits import make_splits

import numerics

# IH_JAX_OMNIGLOT_ARCHIVES overrides the location (e.g. a checkout elsewhere).
SHARED = os.environ.get("IH_JAX_OMNIGLOT_ARCHIVES") or os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"))
SMALL = ("images_background_small1", "images_background_small2")
LN2 = float(np.log(2))


def _need_shared():
  if not all(os.path.exists(os.path.join(SHARED, a + ".zip")) for a in SMALL):
    pytest.skip(f"the shared Omniglot archives ({', '.join(a + '.zip' for a in SMALL)}) are not "
                f"in {SHARED}; see ../shared/data/omniglot/README.md, or set IH_JAX_OMNIGLOT_ARCHIVES")


def _tfds():
  return pytest.importorskip(
      "tensorflow_datasets", reason="tensorflow-datasets not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def images():
  _need_shared()
  return omniglot.read_archives(omniglot.find_archives(SHARED))


def _cfg(tmp_path, **kw):
  return FeatureConfig(**{"source": "omniglot_pixels", "omniglot_dir": SHARED,
                          "cache_dir": str(tmp_path / "cache"), **kw})


# ----------------------------------------------------------------------------- archives

def test_archive_reader_on_shared_archives(images):
  assert images.ink.shape == (242, 20, 105, 105) and images.ink.dtype == bool
  assert (np.diff(images.labels) > 0).all()
  assert len(set(images.names)) == 242
  counts = {a: images.alphabets.count(a) for a in set(images.alphabets)}
  assert len(counts) == 8 and counts["Greek"] == 24 and counts["Latin"] == 26
  # Global TFDS label = file-name id - 1: images_background_small1/Balinese/character01/0108_01.png
  i = images.names.index("Balinese/character01")
  assert images.labels[i] == 107
  assert 0.05 < images.ink.mean() < 0.12  # ~90% of pixels are background
  assert all(len({omniglot.drawing_key(d) for d in c}) == 20 for c in images.ink[:5])


def test_archive_subsets_agree_and_overlap_counts_once(images):
  one = omniglot.read_archives([os.path.join(SHARED, SMALL[0] + ".zip")])
  two = omniglot.read_archives([os.path.join(SHARED, SMALL[1] + ".zip")])
  assert (len(one.labels), len(two.labels)) == (136, 156)
  assert len(set(one.labels) & set(two.labels)) == 50  # Greek + Latin in both
  for sub in (one, two):
    idx = np.searchsorted(images.labels, sub.labels)
    np.testing.assert_array_equal(images.ink[idx], sub.ink)
  # The order archives are read in does not matter.
  rev = omniglot.read_archives(omniglot.find_archives(SHARED, SMALL[::-1]))
  np.testing.assert_array_equal(rev.ink, images.ink)
  assert rev.names == images.names


def test_pixel_conventions_give_one_mask():
  rng = np.random.default_rng(0)
  ink = rng.random((105, 105)) < 0.1
  white01 = (~ink).astype(np.uint8)                       # PIL/numpy decode: {0, 1}
  white255 = np.repeat(white01[..., None] * 255, 3, -1)   # TF / OpenCV decode: {0, 255} RGB
  for img in (white01, white255, ~ink, white01[..., None], white255.astype(np.float32) / 255):
    np.testing.assert_array_equal(omniglot.ink_mask(img), ink)


def test_missing_data_errors_say_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="omniglot_dir is not set.*tfds"):
    omniglot.find_archives("")
  with pytest.raises(FileNotFoundError, match="does not exist.*images_background.zip"):
    load_features(_cfg(tmp_path, omniglot_dir=str(tmp_path / "nope")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no official Omniglot archive.*tfds_download"):
    omniglot.find_archives(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="images_evaluation"):
    omniglot.find_archives(str(tmp_path / "empty"), ["images_evaluation"])


def test_bad_archive_layout(tmp_path):
  path = tmp_path / "images_background_small1.zip"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("flat.png", b"x")
  with pytest.raises(ValueError, match="unexpected member"):
    omniglot.read_archives([str(path)])


# ----------------------------------------------------------------------------- TFDS

def _tfds_records(images, names, white=255, seed=0):
  """TFDS-style records (shuffled) of these characters, as the data source yields them."""
  recs = []
  for c in range(len(images.labels)):
    for ink in images.ink[c]:
      recs.append(dict(image=np.repeat((~ink)[..., None], 3, -1).astype(np.uint8) * white,
                       label=np.int64(images.labels[c]),
                       alphabet=np.int64(names.index(images.alphabets[c])),
                       alphabet_char_id=np.int64(int(images.characters[c][9:]) - 1)))
  order = np.random.default_rng(seed).permutation(len(recs))
  return names, [recs[i] for i in order]


def _mock_source(split_images):
  """as_data_source_fn: split name -> records; sets alphabet names as the builder does."""
  def as_data_source(self, split, **kwargs):
    del kwargs
    names, recs = split_images[split]
    self.info.features["alphabet"].names = names
    return recs
  return as_data_source


def test_tfds_reader_under_mock_data():
  tfds = _tfds()
  with tfds.testing.mock_data(num_examples=4):
    im = omniglot.read_tfds(("train",), download=True)  # download_and_prepare is a no-op here
    assert im.ink.dtype == bool and im.ink.shape[2:] == (105, 105)
    assert im.ink.shape[0] * im.ink.shape[1] == 4 and (im.labels < 1623).all()
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds_download"):
      omniglot.read_tfds()
    with pytest.raises(FileNotFoundError, match="needs all four.*images_evaluation"):
      omniglot.read_tfds(manual_dir=SHARED)


def test_tfds_and_archive_paths_give_identical_arrays(images, tmp_path):
  tfds = _tfds()
  one = omniglot.read_archives([os.path.join(SHARED, SMALL[0] + ".zip")])
  two = omniglot.read_archives([os.path.join(SHARED, SMALL[1] + ".zip")])
  # small1 as TF decodes it ({0,255}), small2 as PIL does ({0,1}); overlap counted once.
  names = sorted(set(images.alphabets))
  names += [f"other{i}" for i in range(50 - len(names))]  # TFDS has 50 alphabet names
  splits = {"small1": _tfds_records(one, names, 255, 1), "small2": _tfds_records(two, names, 1, 2)}
  with tfds.testing.mock_data(as_data_source_fn=_mock_source(splits)):
    via_tfds = omniglot.read_tfds(("small1", "small2"), download=True)
    np.testing.assert_array_equal(via_tfds.ink, images.ink)
    np.testing.assert_array_equal(via_tfds.labels, images.labels)
    assert via_tfds.names == images.names
    # ... and so the whole feature pipeline gives the same table.
    cfg = _cfg(tmp_path, omniglot_reader="tfds", tfds_splits=("small1", "small2"), omniglot_dir="",
               tfds_download=True, dim=64)
    np.testing.assert_array_equal(load_features(cfg), load_features(_cfg(tmp_path, dim=64)))


def test_tfds_real_build_from_manual_dir_matches_archives(tmp_path):
  """A real TFDS build (TensorFlow) from the four official archives, read back without TF
  and compared with the archive reader. Needs IH_JAX_OMNIGLOT_FULL_DIR = a folder with all
  four archives (TFDS's builder reads every split and checks their checksums)."""
  full = os.environ.get("IH_JAX_OMNIGLOT_FULL_DIR", "")
  if not full or not all(os.path.exists(os.path.join(full, n + ".zip"))
                         for n in omniglot.OFFICIAL_ARCHIVES):
    pytest.skip("set IH_JAX_OMNIGLOT_FULL_DIR to a folder holding all four official Omniglot "
                "archives to build TFDS omniglot for real (not available offline here)")
  _tfds()
  pytest.importorskip("tensorflow", reason="building TFDS omniglot needs TensorFlow "
                      "(pip install -e '.[omniglot]')")
  via_tfds = omniglot.read_tfds(("train", "test"), data_dir=str(tmp_path / "tfds"),
                                manual_dir=full)
  via_zip = omniglot.read_archives(omniglot.find_archives(full, ["images_background",
                                                                 "images_evaluation"]))
  assert via_tfds.ink.shape == (1623, 20, 105, 105)
  np.testing.assert_array_equal(via_tfds.labels, via_zip.labels)
  assert via_tfds.names == via_zip.names
  np.testing.assert_array_equal(via_tfds.ink, via_zip.ink)


# ----------------------------------------------------------------------------- order, pixels

def test_class_order_is_seeded_and_subset_stable():
  labels = np.arange(0, 1623, 3)
  full = labels[omniglot.class_order(labels, 0)]
  sub = labels[::4]
  np.testing.assert_array_equal(sub[omniglot.class_order(sub, 0)], [l for l in full if l in sub])
  np.testing.assert_array_equal(omniglot.class_order(labels, -1), np.arange(len(labels)))
  assert not np.array_equal(omniglot.class_order(labels, 1), omniglot.class_order(labels, 0))


def test_downsample_is_an_area_average():
  ink = np.random.default_rng(0).random((3, 105, 105)) < 0.2
  for size in (28, 21, 15):
    small = omniglot.downsample(ink, size)
    assert small.shape == (3, size, size)
    np.testing.assert_allclose(small.mean((1, 2)), ink.mean((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(omniglot.downsample(ink, 21)[:, 0, 0], ink[:, :5, :5].mean((1, 2)),
                             rtol=1e-6)
  np.testing.assert_array_equal(omniglot.downsample(ink, 105), ink)


# ----------------------------------------------------------------------------- features, cache

def test_pixel_features_cache_and_metadata(images, tmp_path):
  cfg = _cfg(tmp_path, dim=48)
  t0 = time.time()
  a, info = encoders.omniglot_features(cfg, progress=False)
  t1 = time.time()
  b, info2 = encoders.omniglot_features(cfg, progress=False)
  hit_s = time.time() - t1
  assert (info["cache"], info2["cache"]) == ("miss", "hit") and info["key"] == info2["key"]
  np.testing.assert_array_equal(a, b)
  assert hit_s < min(1.0, t1 - t0)
  assert a.shape == (242, 5, 48) and a.dtype == np.float32
  np.testing.assert_array_equal(load_features(cfg), a)
  # Scale: mean squared norm = dim over the fit (non-held-out) classes.
  np.testing.assert_allclose((a[:142] ** 2).sum(-1).mean(), 48, rtol=1e-4)
  # Table order = class_order of the labels; exemplars = first drawings in content order.
  order = omniglot.class_order(images.labels, 0)
  assert info2["labels"] == images.labels[order].tolist()
  flat = omniglot.downsample(images.ink[order][:, :5], 28).reshape(242, 5, -1)
  none, _ = encoders.omniglot_features(_cfg(tmp_path, pixel_projection="none"), progress=False)
  assert none.shape == flat.shape
  ratio = none[flat > 0] / flat[flat > 0]   # raw pixels times one global scale
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
  np.testing.assert_array_equal(none[flat == 0], 0)
  # Another setting is another cache entry; cache_dir="none" writes nothing.
  _, info3 = encoders.omniglot_features(_cfg(tmp_path, dim=48, class_perm_seed=1),
                                        progress=False)
  assert info3["cache"] == "miss" and info3["key"] != info["key"]
  _, info4 = encoders.omniglot_features(_cfg(tmp_path, dim=48, cache_dir="none"), progress=False)
  assert info4["cache"] == "off"
  assert len(os.listdir(tmp_path / "cache" / "features")) == 3  # dim 48, "none", seed 1
  # The run metadata (config.json) names the archives by content and the cache entry.
  meta = feature_metadata(cfg)
  assert meta["source"] == "omniglot_pixels" and meta["encoder"] == "pixels"
  assert [n for n, _ in meta["images"]["archives"]] == [n + ".zip" for n in SMALL]
  assert meta["images"]["archives"][0][1] == omniglot.ARCHIVE_SHA256[SMALL[0]]
  assert meta["cache_key"] == info["key"]


def test_held_out_classes_never_fit(images, tmp_path):
  # Changing the held-out characters' images must not change the fit classes' features.
  cfg = _cfg(tmp_path, dim=32)
  feats, _, _ = encoders.build_table(cfg, images, {}, progress=False)
  order = omniglot.class_order(images.labels, 0)
  ink = images.ink.copy()
  ink[order[-100:]] = ~ink[order[-100:]]
  altered = omniglot.OmniglotImages(ink, images.labels, images.alphabets, images.characters)
  feats2, _, _ = encoders.build_table(cfg, altered, {}, progress=False)
  np.testing.assert_allclose(feats2[:142], feats[:142], rtol=1e-5, atol=1e-5)
  assert not np.allclose(feats2[142:], feats[142:])


# ----------------------------------------------------------------------------- conv encoder

def test_conv_encoder_training_is_deterministic(images):
  x = omniglot.downsample(images.ink[:10], 28)
  kw = dict(width=4, dim=16, steps=20, batch_size=16, lr=1e-3, seed=3, augment=2, progress=False)
  args = (x.reshape(-1, 28, 28), np.repeat(np.arange(10), 20), 10)
  p1, _ = encoders.train_conv_encoder(*args, **kw)
  p2, _ = encoders.train_conv_encoder(*args, **kw)
  p3, _ = encoders.train_conv_encoder(*args, **dict(kw, seed=4))
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(p1["penultimate"]["kernel"], p3["penultimate"]["kernel"])


def test_conv_features_separate_held_out_classes(images, tmp_path):
  """Encoder trained on the 142 fit characters; 1-NN on the 100 held-out ones, 19 new
  drawings each against drawing 0: far above chance (1%) and above raw pixels."""
  cfg = _cfg(tmp_path, source="omniglot_conv", encoder_width=8, encoder_steps=300, dim=64)
  order = omniglot.class_order(images.labels, 0)
  x = omniglot.downsample(images.ink[order], 28)
  src = encoders.image_source_id(cfg)
  params, info = encoders.load_or_train_encoder(cfg, x[:142], images.labels[order][:142], src,
                                                progress=False)
  assert info["cache"] == "miss"
  held = encoders.conv_features(params, x[142:].reshape(-1, 28, 28)).reshape(100, 20, -1)
  acc = encoders.nearest_neighbour_accuracy(held)
  pixel_acc = encoders.nearest_neighbour_accuracy(x[142:].reshape(100, 20, -1))
  assert acc > 0.1 and acc > pixel_acc, (acc, pixel_acc)
  # The Orbax cache returns the same weights; the table uses them (encoder cache hit).
  again, info2 = encoders.load_or_train_encoder(cfg, x[:142], images.labels[order][:142], src,
                                                progress=False)
  assert info2["cache"] == "hit"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  table, tinfo = encoders.omniglot_features(cfg, progress=False)
  assert tinfo["encoder"]["cache"] == "hit" and table.shape == (242, 5, 64)
  assert (table >= 0).all()  # post-ReLU, like the paper's ResNet features
  direct = encoders.conv_features(params, x[:, 0])   # exemplar 0 = drawing 0
  # One global scale. The two come from other batches of the encoder (rounding need not
  # match), so compare table = s * direct against the array's scale rather than per-entry
  # ratios (a post-ReLU entry near 0 has no stable ratio).
  s = np.median(table[:, 0][direct > 0] / direct[direct > 0])
  numerics.assert_close(table[:, 0], s * direct, rtol=1e-4, rel_atol=1e-5)


# ----------------------------------------------------------------------------- config, splits

def test_class_split_rest_and_fit_errors():
  s = make_splits(242, 5, 5, class_split=(50, -1, 100))
  assert (len(s.train_classes), len(s.val_classes), len(s.test_classes)) == (50, 92, 100)
  with pytest.raises(ValueError, match=r"has 242 classes.*-1"):
    make_splits(242, 5, 5)
  data = {"source": "omniglot_conv", "encoder_holdout": 50}
  with pytest.raises(ValueError, match="encoder_holdout"):
    ExperimentConfig.from_dict({"data": data})
  with pytest.raises(ValueError, match="explicit test size"):
    ExperimentConfig.from_dict({"data": {"source": "omniglot_pixels"},
                                "task": {"class_split": [50, 100, -1]}})
  ExperimentConfig.from_dict({"data": dict(data, encoder_holdout=100)})
  with pytest.raises(ValueError, match="pixel_projection"):
    encoders.validate(FeatureConfig(source="omniglot_pixels", pixel_projection="pcaa"))


def test_omniglot_config_arguments():
  from ih_jax.experiments.configs import common, omniglot as omni_cfg
  cfg = common.to_experiment(omni_cfg.get_config(None))
  assert cfg.data.source == "omniglot_conv" and cfg.data.omniglot_reader == "archives"
  assert cfg.task.class_split == (50, -1, 100) and cfg.data.encoder_holdout == 100
  tf = common.to_experiment(omni_cfg.get_config("reader=tfds,encoder=pixels"))
  assert tf.data.omniglot_dir == "" and tf.data.source == "omniglot_pixels"  # no manual_dir
  assert omni_cfg.get_config("reader=tfds,dir=/x").data.omniglot_dir == "/x"
  with pytest.raises(ValueError, match="encoder"):
    omni_cfg.get_config("encoder=resnet")


def test_experiment_config_and_short_training(tmp_path):
  """ih_jax/experiments/configs/omniglot.py, shortened, through train_and_evaluate."""
  _need_shared()
  from ih_jax.experiments.configs import common, omniglot as omni_cfg
  from ih_jax import train
  cfg = omni_cfg.get_config("encoder=pixels")
  assert os.path.samefile(cfg.data.omniglot_dir, SHARED)
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.data.dim = 64
  cfg.train.num_seqs = 640
  cfg.train.eval_every = 320
  cfg.checkpoint.every = 0
  cfg.evaluators = [dict(e, size=64) for e in cfg.evaluators]
  result = train_at_default_opt(common.to_experiment(cfg), str(tmp_path / "wd"))
  losses = [r["loss"] for r in result.metrics if r["eval_set"] == "fsl_train"]
  assert len(losses) == 3 and np.isfinite(losses).all()
  with open(tmp_path / "wd" / "config.json") as f:
    meta = json.load(f)
  assert meta["features"][0]["source"] == "omniglot_pixels"
  assert meta["features"][0]["images"]["archives"][0][0] == SMALL[0] + ".zip"


@pytest.mark.slow
def test_science_conv_features_plateau_and_phase_change(tmp_path):
  """Main configuration on conv features of the shared archives (default encoder):
  a plateau near ln 2, then the phase change; held-out classes generalise."""
  _need_shared()
  from ih_jax.experiments.configs import common, omniglot as omni_cfg
  from ih_jax.analysis.timing import learning_time
  cfg = omni_cfg.get_config("encoder=conv")
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.train.num_seqs = 400_000
  cfg.train.eval_every = 10_000
  cfg.checkpoint.every = 0
  result = train_at_default_opt(common.to_experiment(cfg), str(tmp_path / "wd"))
  rows = {(r["eval_set"], r["seqs"]): r["loss"] for r in result.metrics}
  seqs = sorted({s for _, s in rows})
  train_loss = np.asarray([rows["fsl_train", s] for s in seqs])
  lt = learning_time(seqs, train_loss.tolist())
  # The plateau is judged from 80k: the fall from chance still ends around 50-60k (0.816
  # at 50k on AMD EPYC), and the conv encoder is itself trained on this CPU, so its
  # features (and this curve) differ a little between CPUs; 60k sat 0.02 inside the band.
  plateau = train_loss[(np.asarray(seqs) >= 80_000) & (np.asarray(seqs) <= 120_000)]
  assert np.all(np.abs(plateau - LN2) < 0.12), plateau      # on the ln 2 plateau
  assert 120_000 < lt < 350_000, lt                           # then the phase change
  assert rows["fsl_train", seqs[-1]] < 0.15
  assert rows["fsl_test_class", seqs[-1]] < 0.3               # held-out characters generalise
