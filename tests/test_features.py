"""Feature tables: embedded synthetic family and file sources."""
import h5py
import numpy as np
import pytest

from ih_jax.config import ExperimentConfig
from ih_jax.data.features import (AUTHORS_H5_DATASET, FeatureConfig, feature_metadata,
                                  latent_features, load_feature_file, load_features,
                                  relu_bias, synthetic_features)


@pytest.fixture(scope="module")
def feats():
  """The Gaussian family (the earlier default), named: its recorded values below."""
  return np.asarray(load_features(FeatureConfig(family="gaussian")))


@pytest.fixture(scope="module")
def relu_feats():
  return np.asarray(load_features(FeatureConfig()))


def _mean_offdiag_cosine(x_CF):
  u = x_CF / np.linalg.norm(x_CF, axis=-1, keepdims=True)
  c = u @ u.T
  k = len(c)
  return (c.sum() - np.trace(c)) / (k * (k - 1))


def test_shape_dtype(feats):
  assert feats.shape == (1623, 5, 512)
  assert feats.dtype == np.float32
  assert np.isfinite(feats).all()


def test_golden_values(feats):
  # Pinned from feature_seed=0, rho=0.8, eta=0.2 (JAX 0.10.2, threefry partitionable).
  # A failure here means the JAX PRNG stream changed: the default data changed.
  # Recorded on another machine: threefry's bits are integer ops (identical everywhere);
  # the float32 normal transform (XLA's erf_inv polynomial, FMA-contracted or not per CPU)
  # and the numpy arithmetic after it (IEEE, one op at a time) can differ by a few ulps, so
  # atol 1e-5 (~40 ulps at |x| ~ 2; the float64 mean/std average such noise away), far
  # below the O(1) change of a different stream.
  np.testing.assert_allclose(feats[0, 0, :3], [-0.19428182, -1.72103667, -0.57726341], atol=1e-5)
  np.testing.assert_allclose(feats[1622, 4, 511], -0.34918350, atol=1e-5)
  np.testing.assert_allclose(feats[17, 2, 100], -2.08749580, atol=1e-5)
  np.testing.assert_allclose(feats.mean(dtype=np.float64), -0.03597845, atol=1e-5)
  np.testing.assert_allclose(feats.std(dtype=np.float64), 1.00539583, atol=1e-5)


def test_statistics(feats):
  protos = feats[:, 0]
  assert abs((protos ** 2).sum(-1).mean() / 512 - 1) < 0.1
  assert abs(_mean_offdiag_cosine(protos) - 0.8) < 0.05
  u = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  cos_to_proto = (u[:, 1:] * u[:, :1]).sum(-1)
  assert abs(cos_to_proto.mean() - np.sqrt(1 - 0.2)) < 0.02
  assert not np.array_equal(feats[:, 1], feats[:, 0])


def test_exemplar0_is_prototype_and_seed_controls_it():
  small = dict(num_classes=20, dim=64)
  a = np.asarray(synthetic_features(rho=0.5, eta=0.0, seed=3, **small))
  b = np.asarray(synthetic_features(rho=0.5, eta=0.7, seed=3, **small))
  c = np.asarray(synthetic_features(rho=0.5, eta=0.7, seed=4, **small))
  np.testing.assert_array_equal(a[:, 0], b[:, 0])  # exemplar 0 ignores eta
  np.testing.assert_array_equal(a, np.broadcast_to(a[:, :1], a.shape))  # eta=0: identical
  assert not np.allclose(b[:, 0], c[:, 0])
  np.testing.assert_array_equal(b, synthetic_features(rho=0.5, eta=0.7, seed=3, **small))


def test_rho_zero_gives_uncorrelated_prototypes():
  protos = np.asarray(synthetic_features(rho=0.0, num_exemplars=1))[:, 0]
  assert abs(_mean_offdiag_cosine(protos)) < 0.01


@pytest.mark.parametrize("kw", [dict(rho=1.5), dict(rho=-0.1), dict(eta=2.0)])
def test_bad_rho_eta(kw):
  with pytest.raises(ValueError, match="rho|eta"):
    synthetic_features(num_classes=4, dim=8, **kw)


def test_default_family_is_relu():
  assert FeatureConfig().family == "relu" and FeatureConfig().latent_dim == 64


def test_relu_golden_values(relu_feats):
  # Pinned from the default (family relu, latent_dim 64, rho 0.8, eta 0.2, feature_seed 0;
  # JAX 0.10.2, threefry partitionable). atol 1e-5 as for the Gaussian values: the normal
  # transform and numpy's float32 matmul may differ by a few ulps across CPUs.
  x = relu_feats
  assert x.shape == (1623, 5, 512) and x.dtype == np.float32
  np.testing.assert_allclose(x[0, 0, :3], [1.2150552, 0.89331377, 1.1621896], atol=1e-5)
  np.testing.assert_allclose(x[1622, 4, 511], 1.761137, atol=1e-5)
  np.testing.assert_allclose(x[17, 2, 100], 0.9391899, atol=1e-5)
  np.testing.assert_allclose(x.mean(dtype=np.float64), 0.89456936, atol=1e-5)
  np.testing.assert_allclose(x.std(dtype=np.float64), 0.44686123, atol=1e-5)


def test_relu_statistics(relu_feats):
  x = relu_feats
  assert (x >= 0).all()  # non-negative, like CNN (ResNet avgpool) features
  protos = x[:, 0]
  assert abs((protos ** 2).sum(-1).mean() / 512 - 1) < 0.05
  assert abs(_mean_offdiag_cosine(protos) - 0.8) < 0.02  # rho keeps its meaning
  # Exemplars are perturbed in the latent space: cosine to the prototype
  # ~ rho + (1 - rho) sqrt(1 - eta) (the shared offset is not perturbed).
  u = x / np.linalg.norm(x, axis=-1, keepdims=True)
  cos_to_proto = (u[:, 1:] * u[:, :1]).sum(-1).mean()
  assert abs(cos_to_proto - (0.8 + 0.2 * np.sqrt(0.8))) < 0.01, cos_to_proto
  # The whole table lies near a 64-dim latent space (+ the offset): the 50 training
  # classes cover most of what the held-out classes use (the point of the family).
  centred = protos - protos.mean(0)
  sv = np.linalg.svd(centred, compute_uv=False) ** 2
  assert sv[:65].sum() / sv.sum() > 0.95


@pytest.mark.parametrize("rho", [0.2, 1 / np.pi, 0.5, 0.95])
def test_relu_bias_gives_cosine_rho(rho):
  protos = np.asarray(latent_features("relu", rho=rho, num_exemplars=1, num_classes=300))[:, 0]
  assert abs(_mean_offdiag_cosine(protos) - rho) < 0.03
  assert abs(relu_bias(1 / np.pi)) < 1e-9  # b = 0 gives 1/pi


def test_latent_families_deterministic_and_seeded():
  small = dict(num_classes=20, dim=64, latent_dim=16)
  for fam in ("relu", "lowrank"):
    a = np.asarray(latent_features(fam, rho=0.5, eta=0.0, seed=3, **small))
    b = np.asarray(latent_features(fam, rho=0.5, eta=0.7, seed=3, **small))
    c = np.asarray(latent_features(fam, rho=0.5, eta=0.7, seed=4, **small))
    np.testing.assert_array_equal(a[:, 0], b[:, 0])  # exemplar 0 ignores eta
    # eta=0: every exemplar is its class's z mapped by one BLAS matmul; BLAS may round
    # rows in different kernel blocks differently (seen: 4.8e-7 of ~2), so not bitwise.
    np.testing.assert_allclose(a, np.broadcast_to(a[:, :1], a.shape), rtol=0,
                               atol=1e-5 * np.abs(a).max())
    assert not np.allclose(b[:, 0], c[:, 0])
    np.testing.assert_array_equal(b, latent_features(fam, rho=0.5, eta=0.7, seed=3, **small))


def test_family_errors():
  with pytest.raises(ValueError, match="unknown data.family 'cnn'"):
    FeatureConfig(family="cnn")  # refused when the config is built
  with pytest.raises(ValueError, match="data.latent_dim must be >= 1"):
    ExperimentConfig.from_dict({"data": {"latent_dim": 0}})
  with pytest.raises(ValueError, match="needs rho in"):
    latent_features("relu", rho=0.0, num_classes=4, dim=8)
  with pytest.raises(ValueError, match="latent_dim"):
    latent_features("relu", latent_dim=0, num_classes=4, dim=8)


def test_stored_config_without_family_is_gaussian():
  # A config.json written before data.family existed trained on the Gaussian family.
  old = ExperimentConfig().to_dict()
  del old["data"]["family"], old["data"]["latent_dim"]
  assert ExperimentConfig.from_stored(old).data.family == "gaussian"
  assert ExperimentConfig.from_dict(old).data.family == "relu"  # a new config: the default
  # Resume / reuse compare configs this way (ih_jax.workdir.workdir_status): the old
  # workdir matches a Gaussian config and is refused for the new default.
  from ih_jax import workdir as wd  # pylint: disable=g-import-not-at-top
  as_new = lambda cfg: wd._relevant(wd._as_json(cfg.to_dict()))  # pylint: disable=protected-access
  stored = wd._relevant(wd._with_defaults(wd._as_json(old)))  # pylint: disable=protected-access
  gauss = ExperimentConfig.from_dict(dict(old, data=dict(old["data"], family="gaussian")))
  assert wd.config_diff(stored, as_new(gauss)) == []
  assert "data.family" in wd.config_diff(stored, as_new(ExperimentConfig()))
  assert feature_metadata(FeatureConfig(family="gaussian"))["family"] == "gaussian"
  assert feature_metadata(FeatureConfig())["latent_dim"] == 64


def _table():
  return np.random.default_rng(0).normal(size=(7, 3, 4)).astype(np.float32)


def test_npy_roundtrip(tmp_path):
  p = tmp_path / "f.npy"
  np.save(p, _table().astype(np.float64))
  out = load_features(FeatureConfig(source="file", path=str(p)))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, _table())
  assert feature_metadata(FeatureConfig(source="file", path=str(p)))["path"] == str(p)


@pytest.mark.parametrize("dataset", [AUTHORS_H5_DATASET, "my/feats"])
def test_h5_roundtrip(tmp_path, dataset):
  assert AUTHORS_H5_DATASET == "resnet18/224/feat"
  p = tmp_path / "f.h5"
  with h5py.File(p, "w") as f:
    f.create_dataset(dataset, data=_table())
    f.create_dataset("decoy", data=np.zeros((7, 3, 4), np.float32))
  cfg = FeatureConfig(source="file", path=str(p))
  if dataset != AUTHORS_H5_DATASET:
    cfg = FeatureConfig(source="file", path=str(p), h5_dataset=dataset)
  np.testing.assert_array_equal(load_features(cfg), _table())


def test_missing_file(tmp_path):
  p = str(tmp_path / "nope.npy")
  with pytest.raises(FileNotFoundError, match="nope.npy"):
    load_features(FeatureConfig(source="file", path=p))
  with pytest.raises(ValueError, match="data.path"):
    load_features(FeatureConfig(source="file", path=""))


def test_wrong_ndim(tmp_path):
  p = tmp_path / "f.npy"
  np.save(p, np.zeros((7, 12), np.float32))
  with pytest.raises(ValueError, match=r"\(7, 12\).*3 dims"):
    load_features(FeatureConfig(source="file", path=str(p)))


def test_missing_h5_dataset_lists_found(tmp_path):
  p = tmp_path / "f.hdf5"
  with h5py.File(p, "w") as f:
    f.create_dataset("grp/other", data=_table())
  with pytest.raises(KeyError, match=r"resnet18/224/feat.*grp/other"):
    load_features(FeatureConfig(source="file", path=str(p)))


def test_not_hdf5(tmp_path):
  p = tmp_path / "f.h5"
  p.write_text("not hdf5")
  with pytest.raises(ValueError, match="HDF5"):
    load_features(FeatureConfig(source="file", path=str(p)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(tmp_path, bad):
  t = _table()
  t[3, 1, 2] = bad
  p = tmp_path / "f.npy"
  np.save(p, t)
  with pytest.raises(ValueError, match="NaN or inf"):
    load_features(FeatureConfig(source="file", path=str(p)))


def test_integer_table_rejected(tmp_path):
  p = tmp_path / "f.npy"
  np.save(p, np.zeros((2, 2, 2), np.int64))
  with pytest.raises(ValueError, match="dtype"):
    load_features(FeatureConfig(source="file", path=str(p)))


def test_unknown_source():
  with pytest.raises(ValueError, match=r"'imagenet'.*synthetic.*file"):
    load_features(FeatureConfig(source="imagenet"))


def test_h5_group_instead_of_dataset_lists_datasets(tmp_path):
  path = tmp_path / "grp.h5"
  with h5py.File(path, "w") as f:
    f.create_dataset("resnet18/224/feat", data=np.zeros((3, 2, 4), np.float32))
  with pytest.raises(KeyError, match="resnet18/224/feat"):
    load_feature_file(str(path), "resnet18/224")
