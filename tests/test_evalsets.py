"""Fixed evaluation sets and the dense analysis set."""
import itertools

import jax
import numpy as np
import pytest

from ih_jax.data import evalsets
from ih_jax.data.evalsets import PAPER_EVALUATORS, EvaluatorConfig, dense_indices, make_eval_indices
from ih_jax.data.sampler import BURSTY, DISTRACTOR, QUERY, sample_indices
from ih_jax.data.splits import make_splits

SPLITS = make_splits(1623, 5, 5)
TRAIN_PAIRS = {tuple(int(v) for v in p) for p in SPLITS.train_pairs}


def _np(idx):
  return type(idx)(*(np.asarray(a) for a in idx))


@pytest.fixture(scope="module")
def ev():
  return {k: _np(v) for k, v in make_eval_indices(1, SPLITS, PAPER_EVALUATORS, 2).items()}


@pytest.fixture(scope="module")
def dense():
  return _np(dense_indices(SPLITS))


def _label_pairs(idx):
  l = idx.labels
  return {(min(a, b), max(a, b)) for a, b in zip(l[:, 0].tolist(), l[:, 1].tolist())}


def test_paper_evaluators(ev):
  assert list(ev) == ["fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class"]
  for idx in ev.values():
    for a in idx:
      assert a.shape == (1000, 3)


def test_evaluator_contents(ev):
  tr = ev["fsl_train"]
  assert np.isin(tr.classes, np.arange(50)).all() and (tr.exemplars == 0).all()
  assert _label_pairs(tr) == TRAIN_PAIRS
  tc = ev["fsl_test_class"]
  assert np.isin(tc.classes, np.arange(1523, 1623)).all() and (tc.exemplars == 0).all()
  assert _label_pairs(tc) == TRAIN_PAIRS
  vx = ev["fsl_train_valex"]
  assert np.isin(vx.classes, np.arange(50)).all()
  assert set(np.unique(vx.exemplars).tolist()) == {1, 2, 3, 4}
  vr = ev["fsl_val_rl"]
  assert np.isin(vr.classes, np.arange(50)).all() and (vr.exemplars == 0).all()
  assert _label_pairs(vr) == {(1, 3), (0, 2)}


def test_deterministic_from_eval_seed(ev):
  again = make_eval_indices(1, SPLITS, PAPER_EVALUATORS, 2)
  other = make_eval_indices(2, SPLITS, PAPER_EVALUATORS, 2)
  for name in ev:
    for a, b in zip(ev[name], again[name]):
      np.testing.assert_array_equal(a, b)
    assert not np.array_equal(ev[name].classes, np.asarray(other[name].classes))
  # One key per evaluator: same split choices but different evaluator slots differ.
  assert not np.array_equal(ev["fsl_train"].classes, ev["fsl_val_rl"].classes)


def test_key_derivation(ev):
  # eval_seed -> (data, model); data key split once per evaluator, in order.
  data_key, _ = jax.random.split(jax.random.key(1))
  key = jax.random.split(data_key, 4)[2]
  spec = evalsets.spec_for(SPLITS, "train", "val", "train")
  want = sample_indices(key, spec, 1000, 2)
  for a, b in zip(ev["fsl_train_valex"], want):
    np.testing.assert_array_equal(a, b)


def test_evaluator_errors():
  bad = (EvaluatorConfig("x", classes="holdout"),)
  with pytest.raises(ValueError, match=r"'x'.*classes='holdout'.*allowed"):
    make_eval_indices(1, SPLITS, bad, 2)
  with pytest.raises(ValueError, match="pairs='bogus'"):
    evalsets.spec_for(SPLITS, "train", "train", "bogus")
  with pytest.raises(ValueError, match="exemplar split is empty"):
    make_eval_indices(1, SPLITS, (EvaluatorConfig("t", exemplars="test"),), 2)
  with pytest.raises(ValueError, match="relabel-pair split is empty"):
    make_eval_indices(1, SPLITS, (EvaluatorConfig("t", pairs="test"),), 2)
  with pytest.raises(ValueError, match="unique"):
    make_eval_indices(1, SPLITS, (EvaluatorConfig("a"), EvaluatorConfig("a")), 2)


def test_dense_size_and_uniqueness(dense):
  assert dense.classes.shape == (78_400, 3)
  rows = np.concatenate([dense.classes, dense.labels], axis=1)
  assert len(np.unique(rows, axis=0)) == 78_400
  assert (dense.exemplars == 0).all()
  assert np.isin(dense.classes, np.arange(50)).all()


def test_dense_invariants(dense):
  c, l, t = dense.classes, dense.labels, dense.types
  assert (c[:, 0] != c[:, 1]).all() and (l[:, 0] != l[:, 1]).all()
  assert (t[:, 2] == QUERY).all()
  assert (np.sort(t[:, :2], axis=1) == [BURSTY, DISTRACTOR]).all()
  twin = np.where(t[:, 0] == BURSTY, 0, 1)
  rows = np.arange(len(c))
  np.testing.assert_array_equal(c[rows, twin], c[:, 2])
  np.testing.assert_array_equal(l[rows, twin], l[:, 2])
  assert (c[rows, 1 - twin] != c[:, 2]).all()
  assert set(twin.tolist()) == {0, 1}


def test_dense_covers_all_combinations(dense):
  got = {tuple(r) for r in np.concatenate([dense.classes, dense.labels], axis=1).tolist()}
  ordered_pairs = TRAIN_PAIRS | {(b, a) for a, b in TRAIN_PAIRS}
  assert len(ordered_pairs) == 16
  want = {(a, b, q, la, lb, la if q == a else lb)
          for a, b in itertools.permutations(range(50), 2)
          for la, lb in ordered_pairs for q in (a, b)}
  assert got == want
