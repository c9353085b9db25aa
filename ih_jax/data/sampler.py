"""On-device few-shot sequence sampler.

A sequence has `n` context (exemplar, label) pairs followed by a query exemplar.
The context holds the query's class k times ("bursty"; k = 1 in the paper), one
distractor class, and, when n > k + 1, further non-query classes ("other"; they
may repeat each other). Labels come from a relabel pair (l1, l2) drawn per
sequence: the bursty items and the query get l1, all other context items get l2,
so the task is solvable only in context.

Classes are uniform over the split by default; `zipf_exponent` a > 0 draws them
from a Zipfian law over the split's order, p(rank r) ~ (r + 1)^-a (Chan et al.
2022), the non-query classes from the same law restricted to the other classes.

Everything here is pure JAX and jit-able; shapes depend only on static sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Item type tags, per position of [context..., query].
BURSTY, DISTRACTOR, OTHER, QUERY = 0, 1, 2, 3


class SequenceIndices(NamedTuple):
  """Index form of a batch: gather features with `gather_features`."""
  classes: jax.Array    # [B, n+1] int32 class ids (last = query)
  exemplars: jax.Array  # [B, n+1] int32 exemplar ids
  labels: jax.Array     # [B, n+1] int32 labels in [0, C)
  types: jax.Array      # [B, n+1] int32 item types


class Batch(NamedTuple):
  """A few-shot batch: inputs `x` and labels `y` for n context pairs and the query."""
  x: "jax.Array | IndexedFeatures"  # [B, n+1, F] exemplar features (or table rows)
  y: jax.Array  # [B, n+1] labels; y[:, -1] is the target and is never fed to the model


class IndexedFeatures(NamedTuple):
  """Features as rows of a small table: x[b, i] = table[ids[b, i]].

  The model embeds each table row once and gathers (cheaper than embedding every
  token when few distinct exemplars occur, e.g. 50 in training).
  """
  table: jax.Array  # [U, F]
  ids: jax.Array    # [B, N] int32 rows of `table`


class SamplerSpec(NamedTuple):
  """Which classes, exemplars and relabel pairs a sampler draws from (device arrays)."""
  classes: jax.Array    # [K] class ids, K >= 2
  exemplars: jax.Array  # [E] exemplar ids, E >= 1
  pairs: jax.Array      # [P, 2] label pairs


def _uniform_int(bits_u32: jax.Array, n: int | jax.Array) -> jax.Array:
  """Uniform integers in [0, n) from 32 random bits (24 used; bias < n / 2^24)."""
  u = (bits_u32 >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
  return jnp.minimum((u * n).astype(jnp.int32), n - 1)


def zipf_cdf(num_classes: int, exponent: float) -> np.ndarray:
  """[K] cumulative Zipf probabilities over ranks 0..K-1, p(r) ~ (r + 1)^-exponent."""
  w = (np.arange(num_classes) + 1.0) ** -float(exponent)
  return np.cumsum(w / w.sum()).astype(np.float32)


def _zipf_pick(u: jax.Array, cdf_K: np.ndarray) -> jax.Array:
  K = cdf_K.shape[0]
  return jnp.minimum(jnp.searchsorted(jnp.asarray(cdf_K), u, side="right"), K - 1
                     ).astype(jnp.int32)


def _zipf_others(q_B: jax.Array, u_others: jax.Array, cdf_K: np.ndarray) -> jax.Array:
  """Zipf draws [B, m] with the query's mass cut out: u' = u (1 - p_q), stepped over the
  query's interval [cdf_{q-1}, cdf_q) of the full CDF."""
  K = cdf_K.shape[0]
  cdf = jnp.asarray(cdf_K)
  lo_B = jnp.where(q_B > 0, cdf[jnp.maximum(q_B - 1, 0)], 0.0)
  p_B = cdf[q_B] - lo_B
  u = u_others * (1.0 - p_B)[:, None]
  u = jnp.where(u >= lo_B[:, None], u + p_B[:, None], u)
  others = _zipf_pick(u, cdf_K)
  # Float rounding at the interval's edge must never give the query back.
  return jnp.where(others == q_B[:, None], (q_B[:, None] + 1) % K, others)


def _other_classes(q_B: jax.Array, bits_BM: jax.Array, K: int,
                   zipf_exponent: float) -> jax.Array:
  """[B, M] class indices other than the query's, uniform or Zipfian."""
  if zipf_exponent > 0:
    return _zipf_others(q_B, _unit(bits_BM), zipf_cdf(K, zipf_exponent))
  # Offset the query index by 1..K-1 (uniform over the others).
  return (q_B[:, None] + 1 + _uniform_int(bits_BM, K - 1)) % K


def _unit(bits_u32: jax.Array) -> jax.Array:
  return (bits_u32 >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def check_layout(num_context: int, bursty: int = 1, zipf_exponent: float = 0.0,
                 relabel_fraction: float = 1.0, num_labels: int = 0) -> None:
  """Raises a ValueError naming the bad value when a sequence layout is impossible."""
  if num_context < 2:
    raise ValueError(f"num_context must be >= 2 (query class + distractor), got {num_context}")
  if not 1 <= bursty <= num_context - 1:
    raise ValueError(f"task.bursty (copies of the query class in the context) must be in "
                     f"[1, num_context - 1 = {num_context - 1}] so one distractor fits; "
                     f"got {bursty}")
  if not zipf_exponent >= 0.0:
    raise ValueError(f"task.zipf_exponent must be >= 0 (0 = uniform classes), got {zipf_exponent}")
  if not 0.0 <= relabel_fraction <= 1.0:
    raise ValueError(f"task.relabel_fraction must be in [0, 1] (1 = every sequence relabelled, "
                     f"the paper), got {relabel_fraction}")
  if relabel_fraction < 1.0 and num_labels < 2:
    raise ValueError("fixed class labels (relabel_fraction < 1) need num_labels >= 2")


def sample_indices(key: jax.Array, spec: SamplerSpec, batch_size: int,
                   num_context: int, bursty: int = 1, zipf_exponent: float = 0.0,
                   relabel_fraction: float = 1.0, num_labels: int = 0) -> SequenceIndices:
  """Draws `batch_size` sequences with `num_context` context pairs.

  `bursty` k: copies of the query class in the context (types BURSTY); the
  distractor and the n - k - 1 "other" items fill the rest. `zipf_exponent`:
  see the module docstring (static: 0 compiles the uniform sampler).
  `relabel_fraction`: the share of sequences labelled by a random relabel pair
  (1 = the paper's ICL-only task). The others carry each class's fixed label,
  class id mod `num_labels`, and no context item of the query's class (its k
  slots get other classes, type OTHER): they can be answered only from a map
  learned in the weights (Chan et al.'s in-weights sequences).

  All randomness of a batch comes from ONE `jax.random.bits` draw of 3n + 3
  words per sequence (threefry is a rolled loop on CPU, so one draw instead of
  ~10 separate ones matters inside the training loop). Word layout per sequence:
  [query class | distractor offset | n-2 other offsets | n shuffle keys |
   n+1 exemplars | relabel pair | pair order]. With k > 1 the last k - 1 offset
  words go unused, so k = 1 and the uniform law give the paper's sampler exactly.
  """
  check_layout(num_context, bursty, zipf_exponent, relabel_fraction, num_labels)
  B, n, k = batch_size, num_context, bursty
  K, E, P = spec.classes.shape[0], spec.exemplars.shape[0], spec.pairs.shape[0]
  bits = jax.random.bits(key, (B, 3 * n + 3), jnp.uint32)
  col = iter(range(3 * n + 3))
  take = lambda width: bits[:, [next(col) for _ in range(width)]]

  q_bits, other_bits = take(1)[:, 0], take(n - 1)[:, :n - k]
  if zipf_exponent > 0:
    q_B = _zipf_pick(_unit(q_bits), zipf_cdf(K, zipf_exponent))
  else:
    q_B = _uniform_int(q_bits, K)
  others_B = _other_classes(q_B, other_bits, K, zipf_exponent)  # distractor, rest
  ctx_BN = jnp.concatenate([jnp.repeat(q_B[:, None], k, axis=1), others_B], axis=1)
  ctx_types_N = jnp.array([BURSTY] * k + [DISTRACTOR] + [OTHER] * (n - k - 1), jnp.int32)

  # Random order of the context items (types permuted with them).
  perm_BN = jnp.argsort(take(n), axis=1)
  ctx_BN = jnp.take_along_axis(ctx_BN, perm_BN, axis=1)
  types_BN = ctx_types_N[perm_BN]
  class_idx = jnp.concatenate([ctx_BN, q_B[:, None]], axis=1)
  types = jnp.concatenate([types_BN, jnp.full((B, 1), QUERY, jnp.int32)], axis=1)

  ex_idx = _uniform_int(take(n + 1), E)

  pair_B2 = spec.pairs[_uniform_int(take(1)[:, 0], P)]
  swap_B = (take(1)[:, 0] >> 31) == 1
  l1_B = jnp.where(swap_B, pair_B2[:, 1], pair_B2[:, 0])
  l2_B = jnp.where(swap_B, pair_B2[:, 0], pair_B2[:, 1])
  gets_l1 = (types == BURSTY) | (types == QUERY)
  labels = jnp.where(gets_l1, l1_B[:, None], l2_B[:, None]).astype(jnp.int32)
  if relabel_fraction < 1.0:  # static: the paper's sampler draws no extra bits
    # Fixed-label sequences hold no item of the query's class: the bursty slots get
    # other classes, so only a class -> label map learned in the weights answers them.
    extra = jax.random.bits(jax.random.fold_in(key, 1), (B, n + 1), jnp.uint32)
    fixed_B = _unit(extra[:, 0]) >= relabel_fraction
    swap_BN = fixed_B[:, None] & (types[:, :n] == BURSTY)
    repl_BN = _other_classes(q_B, extra[:, 1:], K, zipf_exponent)
    class_idx = class_idx.at[:, :n].set(jnp.where(swap_BN, repl_BN, class_idx[:, :n]))
    types = types.at[:, :n].set(jnp.where(swap_BN, OTHER, types[:, :n]))
    fixed_labels = spec.classes[class_idx] % num_labels
    labels = jnp.where(fixed_B[:, None], fixed_labels, labels).astype(jnp.int32)

  return SequenceIndices(spec.classes[class_idx].astype(jnp.int32),
                         spec.exemplars[ex_idx].astype(jnp.int32), labels, types)


def gather_features(features_CEF: jax.Array, idx: SequenceIndices) -> Batch:
  """The Batch of `idx`: features [B, n+1, F] looked up in the [C, E, F] table, with its labels."""
  return Batch(x=features_CEF[idx.classes, idx.exemplars], y=idx.labels)


def sample_batch(key: jax.Array, features_CEF: jax.Array, spec: SamplerSpec,
                 batch_size: int, num_context: int, **layout) -> Batch:
  """`layout`: sample_indices' bursty / zipf_exponent / relabel_fraction / num_labels."""
  return gather_features(features_CEF, sample_indices(key, spec, batch_size, num_context,
                                                      **layout))


def compact_table(features_CEF: jax.Array, spec: SamplerSpec) -> tuple[jax.Array, jax.Array]:
  """(table [K*E, F] of the spec's (class, exemplar) rows, lookup [C, E] -> row id)."""
  C, E, F = features_CEF.shape
  K, Es = spec.classes.shape[0], spec.exemplars.shape[0]
  table = features_CEF[spec.classes][:, spec.exemplars].reshape(K * Es, F)
  lookup = jnp.zeros((C, E), jnp.int32).at[spec.classes[:, None], spec.exemplars[None, :]].set(
      jnp.arange(K * Es, dtype=jnp.int32).reshape(K, Es))
  return table, lookup


def sample_indexed_batch(key: jax.Array, table: jax.Array, lookup: jax.Array,
                         spec: SamplerSpec, batch_size: int, num_context: int,
                         **layout) -> Batch:
  """`sample_batch`'s sequences with features as rows of `compact_table`'s table."""
  idx = sample_indices(key, spec, batch_size, num_context, **layout)
  return Batch(x=IndexedFeatures(table, lookup[idx.classes, idx.exemplars]), y=idx.labels)


def indexed_set(features_VCEF: jax.Array, idx: SequenceIndices) -> Batch:
  """A fixed sequence set with features as table rows, for V feature tables.

  Leaves get a leading [V] axis: table [V, U, F] holds the U distinct (class,
  exemplar) rows the set uses (host-side np.unique), ids [V, S, N] index them.
  """
  pairs = np.stack([np.asarray(idx.classes).ravel(), np.asarray(idx.exemplars).ravel()], 1)
  rows, inverse = np.unique(pairs, axis=0, return_inverse=True)
  table = features_VCEF[:, rows[:, 0], rows[:, 1]]
  V = features_VCEF.shape[0]
  ids = jnp.asarray(inverse.reshape(idx.classes.shape), jnp.int32)
  return Batch(x=IndexedFeatures(table, jnp.broadcast_to(ids, (V,) + ids.shape)),
               y=jnp.broadcast_to(idx.labels, (V,) + idx.labels.shape))
