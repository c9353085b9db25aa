"""Schedule arithmetic in sequences seen.

A point p (in sequences) fires at the first step boundary at or past it, i.e.
after ceil(p / B) updates, labelled 32 * ceil(p / 32) for B = 32. The final point
fires after the last update.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from ih_jax.config import CheckpointConfig


ALWAYS_STOP = int(np.iinfo(np.int32).max)  # an open window's stop: the whole run
_WINDOW = re.compile(r"^(?P<head>.*?)\s*@\s*\[\s*(?P<start>[^,\]]*)\s*,"
                     r"\s*(?P<stop>[^)\]]*)\s*\)\s*$")


def split_window(text: str, where: str) -> tuple[str, tuple[int, int] | None]:
  """'X@[START,STOP)' -> ('X', (start, stop)); '@[START,)' is open-ended (stop =
  ALWAYS_STOP); no window -> (text, None). Bounds are whole numbers of sequences;
  `where` names the setting in the error of a malformed or empty window."""
  m = _WINDOW.match(text)
  if not m:
    if "@[" in text:
      raise ValueError(f"{where}: a window must look like @[START,STOP) or @[START,) in "
                       "sequences seen, e.g. 'ih:L2H3@[0,200000)'")
    return text, None
  bounds = []
  for bound, open_value in ((m["start"].strip(), None), (m["stop"].strip(), ALWAYS_STOP)):
    if not bound and open_value is not None:
      bounds.append(open_value)
      continue
    try:
      value = float(bound)
    except ValueError:
      raise ValueError(f"{where}: window bound {bound!r} is not a number of sequences") from None
    if not (0 <= value < ALWAYS_STOP and value == int(value)):
      raise ValueError(f"{where}: window bound {bound!r} must be a whole number of sequences "
                       f"in [0, {ALWAYS_STOP})")
    bounds.append(int(value))
  if bounds[1] <= bounds[0]:
    raise ValueError(f"{where}: the window [{bounds[0]}, {bounds[1]}) is empty")
  return m["head"].strip(), (bounds[0], bounds[1])


def num_steps(num_seqs: int, batch_size: int) -> int:
  """Optimizer updates to see `num_seqs` sequences: ceil(num_seqs / batch_size)."""
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
  """The step indices at which evaluations fire: every `every` sequences, plus the final step."""
  return steps_for_points(periodic_points(every, num_seqs), num_seqs, batch_size)


def log_points(num: int, start: int, num_seqs: int) -> list[int]:
  """`num` log-spaced integer points from `start` to `num_seqs` (duplicates merged)."""
  if num <= 0:
    return []
  if not 0 < start <= num_seqs:
    raise ValueError(f"log-spaced checkpoints need 0 < log_start <= num_seqs, got "
                     f"log_start={start}, num_seqs={num_seqs}")
  return sorted({int(round(p)) for p in np.geomspace(start, num_seqs, num)})


def window_points(window: tuple[int, ...]) -> list[int]:
  """(start, stop, every) -> start, start + every, ... <= stop."""
  if len(window) != 3:
    raise ValueError(f"checkpoint window must be (start, stop, every), got {window!r}")
  start, stop, every = window
  if every <= 0 or start < 0 or stop < start:
    raise ValueError(f"checkpoint window {window!r} needs 0 <= start <= stop and every > 0")
  return list(range(start, stop + 1, every))


def checkpoint_steps(ckpt: "CheckpointConfig", num_seqs: int, batch_size: int) -> list[int]:
  """Steps (updates done) of the checkpoint schedule: the union of every schedule + final."""
  points: list[int] = []
  if ckpt.every:
    points += periodic_points(ckpt.every, num_seqs)
  for p in ckpt.at:
    if p < 0:
      raise ValueError(f"checkpoint point {p} is negative")
  points += list(ckpt.at)
  points += log_points(ckpt.log_num, ckpt.log_start, num_seqs)
  for w in ckpt.windows:
    points += window_points(tuple(w))
  return steps_for_points(points, num_seqs, batch_size)
