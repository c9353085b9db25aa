"""Class / exemplar splits and relabel pairs."""
import itertools

import numpy as np
import pytest

from ih_jax.data.splits import make_splits, relabel_pairs

PAPER_TRAIN = {(1, 2), (2, 3), (0, 4), (0, 3), (0, 1), (2, 4), (1, 4), (3, 4)}
PAPER_VAL = {(1, 3), (0, 2)}


def _pairs(arr):
  return [tuple(int(v) for v in p) for p in np.asarray(arr)]


def test_paper_splits():
  s = make_splits(1623, 5, 5)
  np.testing.assert_array_equal(s.train_classes, np.arange(50))
  np.testing.assert_array_equal(s.val_classes, np.arange(50, 1523))
  np.testing.assert_array_equal(s.test_classes, np.arange(1523, 1623))
  np.testing.assert_array_equal(s.train_exemplars, [0])
  np.testing.assert_array_equal(s.val_exemplars, [1, 2, 3, 4])
  assert s.test_exemplars.size == 0
  assert set(_pairs(s.train_pairs)) == PAPER_TRAIN


@pytest.mark.parametrize("class_split", [(100, 1423, 100), (200, 1323, 100)])
def test_scaling_class_splits_keep_test_classes(class_split):
  s = make_splits(1623, 5, 5, class_split=class_split)
  assert len(s.train_classes) == class_split[0]
  np.testing.assert_array_equal(s.test_classes, np.arange(1523, 1623))


def test_class_split_must_sum_to_table_size():
  with pytest.raises(ValueError, match=r"\(50, 1473, 99\).*1622.*1623"):
    make_splits(1623, 5, 5, class_split=(50, 1473, 99))


def test_exemplar_split_must_sum_to_table_size():
  with pytest.raises(ValueError, match=r"\(1, 4, 1\).*6.*5"):
    make_splits(1623, 5, 5, exemplar_split=(1, 4, 1))


def test_negative_and_too_small_splits_rejected():
  with pytest.raises(ValueError, match="non-negative"):
    make_splits(1623, 5, 5, class_split=(60, -10, 1573))
  with pytest.raises(ValueError, match="2 train classes"):
    make_splits(1623, 5, 5, class_split=(1, 1522, 100))
  with pytest.raises(ValueError, match="1 train exemplar"):
    make_splits(1623, 5, 5, exemplar_split=(0, 5, 0))
  with pytest.raises(ValueError, match="num_labels"):
    relabel_pairs(1)


def test_c5_pairs_are_the_papers_exactly():
  train, val, test = relabel_pairs(5)
  assert _pairs(train) == [(1, 2), (2, 3), (0, 4), (0, 3), (0, 1), (2, 4), (1, 4), (3, 4)]
  assert _pairs(val) == [(1, 3), (0, 2)]
  assert test.shape == (0, 2)
  assert train.dtype == val.dtype == np.int32


@pytest.mark.parametrize("num_labels,sizes", [(10, (36, 9, 0)), (15, (84, 21, 0))])
def test_generated_pairs(num_labels, sizes):
  train, val, test = relabel_pairs(num_labels)
  assert (len(train), len(val), len(test)) == sizes
  assert test.shape == (0, 2)
  tr, va = set(_pairs(train)), set(_pairs(val))
  assert len(tr) == len(train) and len(va) == len(val)  # no duplicates
  assert not tr & va
  assert tr | va == set(itertools.combinations(range(num_labels), 2))  # all a < b
  assert set(itertools.chain(*tr)) == set(range(num_labels))
  again = relabel_pairs(num_labels)
  for x, y in zip((train, val, test), again):
    np.testing.assert_array_equal(x, y)


def test_generated_pairs_depend_on_seed():
  a, _, _ = relabel_pairs(10, seed=20)
  b, _, _ = relabel_pairs(10, seed=21)
  assert _pairs(a) != _pairs(b)
