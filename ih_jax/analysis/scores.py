"""Per-head attention scores as a registry: one definition each, used everywhere.

A `HeadScore` turns one layer's attention pattern on a few-shot batch into a score
per sequence and head ([B, H]). `measures.measure` computes every registered score
for every layer (weighted means over the sequence set, [L, H]), and the analysis
report writes those marked for it into its progress CSVs. A researcher adds one in
their own code, e.g. in a notebook:

    from ih_jax.analysis import scores
    scores.register(scores.HeadScore(
        "query_to_first", lambda A, batch: A[:, :, -1, 0],
        "attention from the query to the first token", report_layers="last"))

Built-in scores (T = 2n + 1 tokens: n (exemplar, label) pairs, then the query q;
A = the attention pattern [B, H, T, T], rows = queries):
  induction_strength  mean A(q -> label of a matching exemplar) - mean A(q -> other
                      labels), in [-1, 1] (the paper's IS)
  induction_detect    mean A(q -> matching label) (TransformerLens-style induction
                      detection score: attention mass on the induction target)
  pt_score            mean over tokens i >= 1 of a - (1 - a) / i, a = A(i -> i-1)
                      (previous-token score, corrected for uniform attention)
  pt_score_labels     the same over label tokens only (odd i)
  pt_raw              mean a (TransformerLens-style previous-token detection score)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ih_jax.data import sampler

# pylint: disable=invalid-name

REPORT_LAYERS = ("none", "first", "last", "all")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a cache key
class HeadScore:
  """A named per-head attention score: `fn(A_BHTT, batch)` -> [B, H].

  `report_layers` picks the layers written to the progress CSVs (one of REPORT_LAYERS),
  under the column prefix `column` (default: `name`)."""
  name: str
  fn: Callable[[jax.Array, sampler.Batch], jax.Array]  # (A_BHTT, batch) -> [B, H]
  description: str = ""
  report_layers: str = "none"   # layers whose values go into the progress CSVs
  column: str = ""              # CSV column prefix (default: the name)

  def __post_init__(self):
    if not self.name.isidentifier():
      raise ValueError(f"score name {self.name!r} must be a Python identifier (it names "
                       "result keys and CSV columns)")
    if self.report_layers not in REPORT_LAYERS:
      raise ValueError(f"score {self.name!r}: report_layers={self.report_layers!r}; allowed: "
                       f"{', '.join(REPORT_LAYERS)}")
    if not callable(self.fn):
      raise ValueError(f"score {self.name!r}: fn must be callable (A_BHTT, batch) -> [B, H]")

  def layers(self, num_layers: int) -> list[int]:
    """The (0-based) layers reported in CSVs."""
    return {"none": [], "first": [0], "last": [num_layers - 1],
            "all": list(range(num_layers))}[self.report_layers]

  @property
  def prefix(self) -> str:
    """The CSV column prefix: `column`, or the name when that is empty."""
    return self.column or self.name


_REGISTRY: dict[str, HeadScore] = {}


def register(score: HeadScore, *, replace: bool = False) -> HeadScore:
  """Adds a score for every later `measures.measure` call; returns it."""
  if score.name in _REGISTRY and not replace:
    raise ValueError(f"a score named {score.name!r} is already registered; pass "
                     "replace=True to redefine it")
  _REGISTRY[score.name] = score
  return score


def unregister(name: str) -> None:
  """Removes a registered score (a no-op if unknown); built-in scores cannot be removed."""
  if name in BUILTIN_NAMES:
    raise ValueError(f"{name!r} is a built-in score (the analysis depends on it)")
  _REGISTRY.pop(name, None)


def registered() -> tuple[HeadScore, ...]:
  """Every registered score (built-ins first), in registration order."""
  return tuple(_REGISTRY.values())


def resolve(names: Sequence[str | HeadScore] | None) -> tuple[HeadScore, ...]:
  """Names (or scores) -> scores; None = every registered score."""
  if names is None:
    return registered()
  out = []
  for n in names:
    if isinstance(n, HeadScore):
      out.append(n)
    elif n in _REGISTRY:
      out.append(_REGISTRY[n])
    else:
      raise ValueError(f"unknown head score {n!r}; registered: {', '.join(_REGISTRY)}")
  return tuple(out)


# ------------------------------------------------------------------ built-ins

def _label_masks(batch: sampler.Batch) -> tuple[jax.Array, jax.Array]:
  n = batch.y.shape[1] - 1
  match_BN = (batch.y[:, :n] == batch.y[:, -1:]).astype(jnp.float32)
  return match_BN, 1.0 - match_BN


def _query_to_labels(A_BHTT: jax.Array) -> jax.Array:
  T = A_BHTT.shape[-1]
  return A_BHTT[:, :, T - 1, 1:T - 1:2]          # query row -> the n label tokens


def _masked_mean(x_BHN: jax.Array, mask_BN: jax.Array) -> jax.Array:
  return (x_BHN * mask_BN[:, None]).sum(-1) / jnp.maximum(mask_BN.sum(-1), 1)[:, None]


def induction_strength(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean attention query -> matching labels minus query -> other labels, [B, H] in [-1, 1]."""
  match_BN, other_BN = _label_masks(batch)
  to_labels = _query_to_labels(A_BHTT)
  return _masked_mean(to_labels, match_BN) - _masked_mean(to_labels, other_BN)


def induction_detect(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean attention from the query to the labels of matching exemplars, [B, H]."""
  match_BN, _ = _label_masks(batch)
  return _masked_mean(_query_to_labels(A_BHTT), match_BN)


def _prev_token(A_BHTT: jax.Array) -> jax.Array:
  return jnp.diagonal(A_BHTT[:, :, 1:, :-1], axis1=2, axis2=3)   # A(i -> i-1), i = 1..T-1


def _pt_corrected(A_BHTT: jax.Array) -> jax.Array:
  T = A_BHTT.shape[-1]
  a_BHT = _prev_token(A_BHTT)
  return a_BHT - (1.0 - a_BHT) / jnp.arange(1, T, dtype=jnp.float32)


def pt_score(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean over tokens i >= 1 of a - (1 - a) / i, a = A(i -> i-1): [B, H], uniform-corrected."""
  del batch
  return _pt_corrected(A_BHTT).mean(-1)


def pt_score_labels(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """The uniform-corrected previous-token score averaged over label tokens only, [B, H]."""
  del batch
  T = A_BHTT.shape[-1]
  label_T = (jnp.arange(1, T) % 2 == 1).astype(jnp.float32)
  return (_pt_corrected(A_BHTT) * label_T).sum(-1) / label_T.sum()


def pt_raw(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean attention from each token i >= 1 to token i-1, [B, H] (uncorrected)."""
  del batch
  return _prev_token(A_BHTT).mean(-1)


BUILTINS = (
    HeadScore("induction_strength", induction_strength,
              "query -> matching label minus query -> other labels", "last", "is"),
    HeadScore("pt_score", pt_score, "previous-token score (uniform-corrected)", "first", "pt"),
    HeadScore("pt_score_labels", pt_score_labels, "previous-token score on label tokens",
              "first", "pt_labels"),
    HeadScore("pt_raw", pt_raw, "attention to the previous token"),
    HeadScore("induction_detect", induction_detect, "attention from the query to matching labels"),
)
BUILTIN_NAMES = tuple(s.name for s in BUILTINS)
for _s in BUILTINS:
  register(_s)
