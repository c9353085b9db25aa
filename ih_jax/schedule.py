"""Schedule arithmetic in sequences seen (SPEC §5.1, §5.2).

A point p (in sequences) fires at the first step boundary at or past it, i.e.
after ceil(p / B) updates, labelled 32 * ceil(p / 32) for B = 32. The final point
fires after the last update.
"""

from __future__ import annotations

import math


def num_steps(num_seqs: int, batch_size: int) -> int:
  if num_seqs <= 0 or batch_size <= 0:
    raise ValueError(f"num_seqs and batch_size must be positive, got {num_seqs}, {batch_size}")
  return math.ceil(num_seqs / batch_size)


def periodic_points(every: int, num_seqs: int) -> list[int]:
  """0, N, 2N, ... < num_seqs."""
  if every <= 0:
    raise ValueError(f"schedule period must be positive, got {every}")
  return list(range(0, num_seqs, every))


def steps_for_points(points: list[int], num_seqs: int, batch_size: int) -> list[int]:
  """Sorted unique step indices (updates done) at which the points fire, plus the final step."""
  last = num_steps(num_seqs, batch_size)
  steps = {min(math.ceil(p / batch_size), last) for p in points if p < num_seqs}
  steps.add(last)
  return sorted(steps)


def eval_steps(every: int, num_seqs: int, batch_size: int) -> list[int]:
  return steps_for_points(periodic_points(every, num_seqs), num_seqs, batch_size)
