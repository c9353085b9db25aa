"""Which heads a run could use, and choosing its strongest heads among them.

A run trained with clamps has heads it never used as ordinary heads: value-ablated
ones, heads whose pattern was clamped (pt / ih) or whose output was replaced
(perfect copy), and the whole first layer when perfect_l1 or a graft replaced it.
Such a head can score high on a pattern measure without doing anything (an ablated
head keeps its initial Q/K; an IH-clamped head scores 2s - 1 by construction), so it
is never reported as a run's induction or previous-token head. Every head choice in
the library and the reproduction registry goes through `strongest` / `ranked`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ih_jax import clamps as clamps_lib

Head = tuple[int, int]   # (layer, head), 0-based code numbering


def unusable_reasons(c: clamps_lib.Clamps | None, num_layers: int,
                     num_heads: int) -> dict[Head, str]:
  """Head -> why the run could not use it as an ordinary head (empty for no clamps)."""
  if c is None:
    return {}
  out: dict[Head, str] = {}
  for l, why in clamps_lib.replaced_layers(c).items():
    out.update({(l, h): why for h in range(num_heads)})
  for hd, why in clamps_lib.heads_touched(c).items():  # every kind's, built-in or not
    out.setdefault(hd, why)
  return out


def mask_from(reasons: dict[Head, str], num_layers: int, num_heads: int) -> np.ndarray:
  """[L, H] bool: True where the head is not in `reasons` (the run could use it)."""
  mask = np.ones((num_layers, num_heads), bool)
  for (l, h) in reasons:
    mask[l, h] = False
  return mask


def usable_mask(c: clamps_lib.Clamps | None, num_layers: int, num_heads: int) -> np.ndarray:
  """[L, H] bool: True where the run could use the head."""
  return mask_from(unusable_reasons(c, num_layers, num_heads), num_layers, num_heads)


def ranked(scores: Sequence[float], usable: Sequence[bool]) -> list[int]:
  """Usable heads of one layer by decreasing score (ties: lower index first)."""
  scores = np.asarray(scores, float)
  order = np.argsort(-scores, kind="stable")
  return [int(h) for h in order if bool(np.asarray(usable)[h]) and np.isfinite(scores[h])]


def strongest(scores: Sequence[float], usable: Sequence[bool] | None = None) -> int | None:
  """The usable head with the highest score, or None if no head qualifies."""
  usable = np.ones(len(scores), bool) if usable is None else usable
  order = ranked(scores, usable)
  return order[0] if order else None


def strongest_in(scores_LH: np.ndarray, usable_LH: np.ndarray,
                 layers: Sequence[int]) -> Head | None:
  """The best usable (layer, head) over the given layers, or None."""
  best: Head | None = None
  for l in layers:
    h = strongest(scores_LH[l], usable_LH[l])
    if h is not None and (best is None or scores_LH[l, h] > scores_LH[best]):
      best = (int(l), h)
  return best


def none_reason(layer: int, reasons: dict[Head, str], num_heads: int) -> str:
  """Why no head of `layer` qualifies (for reports that must say so)."""
  whys = sorted({reasons[(layer, h)] for h in range(num_heads) if (layer, h) in reasons})
  return (f"no usable head in layer L{layer + 1} (" + "; ".join(whys) + ")") if whys else \
      f"no head in layer L{layer + 1} has a finite score"
