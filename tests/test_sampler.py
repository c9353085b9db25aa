"""On-device sequence sampler invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ih_jax.data import evalsets
from ih_jax.data.sampler import (BURSTY, DISTRACTOR, OTHER, QUERY, SamplerSpec, sample_batch,
                                 sample_indices)
from ih_jax.data.splits import make_splits

B = 512
SPLITS = make_splits(1623, 5, 5)
TRAIN_PAIRS = {tuple(int(v) for v in p) for p in SPLITS.train_pairs}
# Small random table in the paper's layout (the sampler only gathers from it).
FEATS = jnp.asarray(np.random.default_rng(0).normal(size=(1623, 5, 16)), jnp.float32)


def _train_spec():
  return evalsets.train_spec(SPLITS)


_jit_indices = jax.jit(sample_indices, static_argnums=(2, 3))
_jit_batch = jax.jit(sample_batch, static_argnums=(3, 4))


def _sample(n, key=0, spec=None, batch=B):
  idx = _jit_indices(jax.random.key(key), spec or _train_spec(), batch, n)
  return jax.tree.map(np.asarray, idx)


@pytest.fixture(scope="module", params=[2, 4])
def n_idx(request):
  return request.param, _sample(request.param)


def test_shapes_and_dtypes(n_idx):
  n, _ = n_idx
  batch = _jit_batch(jax.random.key(1), FEATS, _train_spec(), B, n)
  assert batch.x.shape == (B, n + 1, 16) and batch.x.dtype == jnp.float32
  assert batch.y.shape == (B, n + 1) and batch.y.dtype == jnp.int32
  idx = _sample(n, key=1)
  for a in idx:
    assert a.shape == (B, n + 1) and a.dtype == np.int32
  np.testing.assert_array_equal(batch.y, idx.labels)
  np.testing.assert_array_equal(batch.x, np.asarray(FEATS)[idx.classes, idx.exemplars])


def test_types(n_idx):
  n, idx = n_idx
  assert (idx.types[:, -1] == QUERY).all()
  ctx = idx.types[:, :-1]
  assert ((ctx == BURSTY).sum(1) == 1).all()
  assert ((ctx == DISTRACTOR).sum(1) == 1).all()
  assert ((ctx == OTHER).sum(1) == n - 2).all()


def _bursty(a, types):
  return a[:, :-1][types[:, :-1] == BURSTY]


def test_classes(n_idx):
  _, idx = n_idx
  q = idx.classes[:, -1]
  np.testing.assert_array_equal(_bursty(idx.classes, idx.types), q)
  non_bursty = idx.types[:, :-1] != BURSTY
  assert (idx.classes[:, :-1] != q[:, None])[non_bursty].all()
  assert np.isin(idx.classes, SPLITS.train_classes).all()


def test_labels(n_idx):
  _, idx = n_idx
  l1 = idx.labels[:, -1]
  np.testing.assert_array_equal(_bursty(idx.labels, idx.types), l1)
  non_bursty = idx.types[:, :-1] != BURSTY
  ctx = idx.labels[:, :-1]
  assert (ctx != l1[:, None])[non_bursty].all()
  # All non-bursty context items share the second label of the pair.
  l2 = np.where(non_bursty, ctx, -1).max(1)
  assert (np.where(non_bursty, ctx, l2[:, None]) == l2[:, None]).all()
  pairs = {(min(a, b), max(a, b)) for a, b in zip(l1.tolist(), l2.tolist())}
  assert pairs <= TRAIN_PAIRS


def test_train_exemplar_query_is_identical_to_its_twin(n_idx):
  n, _ = n_idx
  batch = _jit_batch(jax.random.key(0), FEATS, _train_spec(), B, n)
  idx = _sample(n)
  assert (idx.exemplars == 0).all()
  twin = np.asarray(batch.x)[:, :-1][idx.types[:, :-1] == BURSTY]
  np.testing.assert_array_equal(twin, np.asarray(batch.x)[:, -1])


def test_both_context_orders_and_label_orders_occur(n_idx):
  n, idx = n_idx
  pos = np.argmax(idx.types[:, :-1] == BURSTY, axis=1)
  assert set(pos.tolist()) == set(range(n))
  l1 = idx.labels[:, -1]
  l2 = idx.labels[:, :-1][idx.types[:, :-1] == DISTRACTOR]
  assert (l1 < l2).any() and (l1 > l2).any()


def test_class_to_label_map_varies_across_sequences(n_idx):
  _, idx = n_idx
  q, l1 = idx.classes[:, -1], idx.labels[:, -1]
  counts = np.bincount(q)
  common = np.nonzero(counts >= 8)[0]
  assert len(common) > 10
  for c in common:
    assert len(set(l1[q == c].tolist())) >= 2, c


def test_restricted_spec_is_respected():
  spec = SamplerSpec(jnp.array([3, 10, 77, 500], jnp.int32), jnp.array([2, 4], jnp.int32),
                     jnp.array([[1, 3], [0, 2]], jnp.int32))
  idx = _sample(3, spec=spec, batch=1024)
  assert set(np.unique(idx.classes).tolist()) == {3, 10, 77, 500}
  assert set(np.unique(idx.exemplars).tolist()) == {2, 4}
  assert set(np.unique(idx.labels).tolist()) == {0, 1, 2, 3}
  l1 = idx.labels[:, -1]
  l2 = idx.labels[:, :-1][idx.types[:, :-1] == DISTRACTOR]
  assert {(min(a, b), max(a, b)) for a, b in zip(l1.tolist(), l2.tolist())} == {(1, 3), (0, 2)}


def test_coverage_and_heldout_exemplar_match_rate():
  spec = evalsets.spec_for(SPLITS, "train", "val", "train")
  idx = _sample(2, spec=spec, batch=4096)
  q = idx.classes[:, -1]
  d = idx.classes[:, :-1][idx.types[:, :-1] == DISTRACTOR]
  assert set(q.tolist()) == set(d.tolist()) == set(range(50))
  assert set(np.unique(idx.exemplars).tolist()) == {1, 2, 3, 4}
  twin_ex = idx.exemplars[:, :-1][idx.types[:, :-1] == BURSTY]
  assert abs((twin_ex == idx.exemplars[:, -1]).mean() - 0.25) < 0.04


def test_deterministic_per_key():
  a, b, c = _sample(2, key=7), _sample(2, key=7), _sample(2, key=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.classes, c.classes)
  assert not np.array_equal(a.labels, c.labels)


def test_jit_matches_eager():
  spec, key = _train_spec(), jax.random.key(3)
  for n in (2, 4):
    eager = sample_batch(key, FEATS, spec, B, n)
    jitted = _jit_batch(key, FEATS, spec, B, n)
    np.testing.assert_array_equal(eager.x, jitted.x)
    np.testing.assert_array_equal(eager.y, jitted.y)


def test_num_context_below_two_rejected():
  with pytest.raises(ValueError, match="num_context"):
    sample_indices(jax.random.key(0), _train_spec(), 8, 1)
