"""Class / exemplar splits and relabel pairs.

All of this is host-side numpy: it is fixed per experiment and becomes constant
index arrays for the on-device sampler.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Sequence

import numpy as np

# The paper's split of the 10 unordered pairs of 5 labels. It was produced by a
# seeded permutation whose result depends on the JAX PRNG implementation, so we
# hard-code it.
PAPER_TRAIN_PAIRS_C5 = ((1, 2), (2, 3), (0, 4), (0, 3), (0, 1), (2, 4), (1, 4), (3, 4))
PAPER_VAL_PAIRS_C5 = ((1, 3), (0, 2))


@dataclasses.dataclass(frozen=True)
class Splits:
  """Index ranges of one experiment's train / val / test partitions."""
  train_classes: np.ndarray   # [n_train] class ids
  val_classes: np.ndarray
  test_classes: np.ndarray
  train_exemplars: np.ndarray  # exemplar ids allowed in training
  val_exemplars: np.ndarray
  test_exemplars: np.ndarray
  train_pairs: np.ndarray      # [P_train, 2] label pairs (a < b)
  val_pairs: np.ndarray
  test_pairs: np.ndarray


def _split_range(sizes: Sequence[int], total: int, what: str) -> list[np.ndarray]:
  sizes = list(sizes)
  if sizes.count(-1) == 1:  # -1: whatever the others leave (e.g. (50, -1, 100))
    sizes[sizes.index(-1)] = total - sum(s for s in sizes if s != -1)
  if any(s < 0 for s in sizes):
    raise ValueError(f"{what} split sizes must be non-negative, got {tuple(sizes)}")
  if sum(sizes) != total:
    raise ValueError(
        f"{what} split sizes {tuple(sizes)} sum to {sum(sizes)}, but the feature table "
        f"has {total} {what}; they must sum exactly to {total} (one size may be -1 for "
        "the rest, e.g. task.class_split=(50, -1, 100))")
  edges = np.cumsum([0, *sizes])
  return [np.arange(edges[i], edges[i + 1]) for i in range(len(sizes))]


def _hash_order(seed: int, salt: int, pair: tuple[int, int]) -> bytes:
  # A JAX- and numpy-version-independent deterministic ordering of pairs.
  return hashlib.sha256(f"{seed}:{salt}:{pair[0]},{pair[1]}".encode()).digest()


def relabel_pairs(num_labels: int, weights: Sequence[float] = (0.8, 0.2, 0.0),
                  seed: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Train/val/test relabel pairs for `num_labels` labels.

  For 5 labels this returns the paper's hard-coded split. Otherwise the pairs are
  ordered by a SHA-256 hash of (seed, salt, pair), split with sizes
  floor(P * w_i / sum w) (train absorbs the remainder), and the salt is bumped
  until every label appears in some train pair.
  """
  if num_labels < 2:
    raise ValueError(f"num_labels must be >= 2, got {num_labels}")
  all_pairs = list(itertools.combinations(range(num_labels), 2))
  n_pairs = len(all_pairs)
  w = np.asarray(weights, dtype=np.float64)
  if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"relabel weights must be 3 non-negative numbers, got {tuple(weights)}")
  sizes = [int(np.floor(n_pairs * wi / w.sum())) for wi in w]
  sizes[0] += n_pairs - sum(sizes)

  if num_labels == 5 and sizes == [8, 2, 0]:
    train, val = PAPER_TRAIN_PAIRS_C5, PAPER_VAL_PAIRS_C5
    return (np.asarray(train, np.int32), np.asarray(val, np.int32),
            np.zeros((0, 2), np.int32))

  for salt in range(1000):
    ordered = sorted(all_pairs, key=lambda p: _hash_order(seed, salt, p))
    train = ordered[:sizes[0]]
    if set(itertools.chain(*train)) == set(range(num_labels)):
      val = ordered[sizes[0]:sizes[0] + sizes[1]]
      test = ordered[sizes[0] + sizes[1]:]
      as_arr = lambda ps: np.asarray(ps, np.int32).reshape(-1, 2)
      return as_arr(train), as_arr(val), as_arr(test)
  raise ValueError(f"could not find a relabel split for {num_labels} labels with weights "
                   f"{tuple(weights)} in which every label appears in a train pair")


def make_splits(num_classes: int, num_exemplars: int, num_labels: int,
                class_split: Sequence[int] = (50, 1473, 100),
                exemplar_split: Sequence[int] = (1, 4, 0),
                pair_weights: Sequence[float] = (0.8, 0.2, 0.0)) -> Splits:
  """Builds the splits, checking the sizes against the feature table's shape."""
  tr_c, va_c, te_c = _split_range(class_split, num_classes, "classes")
  tr_e, va_e, te_e = _split_range(exemplar_split, num_exemplars, "exemplars")
  if len(tr_c) < 2:
    raise ValueError(f"need at least 2 train classes (query + distractor), got {len(tr_c)}")
  if len(tr_e) < 1:
    raise ValueError("need at least 1 train exemplar")
  tr_p, va_p, te_p = relabel_pairs(num_labels, pair_weights)
  return Splits(tr_c, va_c, te_c, tr_e, va_e, te_e, tr_p, va_p, te_p)
