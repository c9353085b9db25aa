"""Freeze schedules: parameter groups that get no updates inside a window of training.

`train.freeze` lists entries `GROUP[@[START,STOP)]` (sequences seen; no window = the
whole run, `[START,)` = from START to the end). Groups, in paper numbering:

  embed            the input embeddings (embed_*) and learned positions
  unembed          the final layer norm and the unembedding
  L2               a whole layer (its layer norm, Q/K/V, output projection, MLP)
  L2H3             one head: its Q, K, V columns and its rows of the output projection
  L2H3.qk          part of a head: any of q, k, v, o

A frozen parameter's update is exactly zero in its window (Adam's moments keep
accumulating its gradients, so it resumes with them when the window ends). The
entries may differ between the runs of one program (`train.freeze` is a sweep.grid
field): each program compiles the union of the groups its runs name, with a per-run
window for each ([start, stop) = [0, 0) where a run does not freeze that group).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import schedule

_HEAD = re.compile(r"^L(?P<layer>\d+)(?:H(?P<head>\d+)(?:\.(?P<parts>[qkvo]+))?)?$")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parsed `train.freeze` entry: the group and its window [start, stop) in sequences."""
  group: str
  start: int
  stop: int


def parse(entry: str, num_seqs: int, num_layers: int, num_heads: int) -> Entry:
  """'L1@[0,100000)' -> Entry('L1', 0, 100000); bad groups and windows are refused by name."""
  group, window = schedule.split_window(entry.strip(), f"train.freeze entry {entry!r}")
  if "@" in group:
    raise ValueError(f"train.freeze entry {entry!r} must look like GROUP or GROUP@[START,STOP) "
                     "(e.g. 'L1', 'embed@[0,100000)', 'L2H3.qk@[200000,)')")
  _check_group(group, entry, num_layers, num_heads)
  start, stop = window or (0, schedule.ALWAYS_STOP)
  if window is not None and start >= num_seqs:
    raise ValueError(f"train.freeze entry {entry!r}: the window starts at {start:,d}, at or "
                     f"after the end of the run (train.num_seqs={num_seqs:,d})")
  return Entry(group, start, stop)


def _check_group(group: str, entry: str, num_layers: int, num_heads: int) -> None:
  if group in ("embed", "unembed"):
    return
  m = _HEAD.match(group)
  allowed = (f"allowed: embed, unembed, L1..L{num_layers}, L<l>H<h> (heads 0..{num_heads - 1}), "
             "L<l>H<h>.<parts of qkvo>")
  if not m:
    raise ValueError(f"train.freeze entry {entry!r}: unknown group {group!r}; {allowed}")
  if not 1 <= int(m["layer"]) <= num_layers:
    raise ValueError(f"train.freeze entry {entry!r}: layer {m['layer']} does not exist; {allowed}")
  if m["head"] is not None and not 0 <= int(m["head"]) < num_heads:
    raise ValueError(f"train.freeze entry {entry!r}: head {m['head']} does not exist; {allowed}")


def group_mask(template: Any, group: str, num_heads: int) -> Any:
  """A params-shaped tree of bools: True where `group`'s parameters are."""
  paths_leaves = jax.tree_util.tree_flatten_with_path(template)[0]
  treedef = jax.tree.structure(template)
  m = _HEAD.match(group)
  out = []
  for path, leaf in paths_leaves:
    keys = [getattr(p, "key", str(p)) for p in path]
    mask = np.zeros(leaf.shape, bool)
    top = keys[0]
    if group == "embed":
      mask[...] = top.startswith(("embed", "pos"))
    elif group == "unembed":
      mask[...] = top in ("unembed", "ln_f")
    elif top == f"blocks_{int(m['layer']) - 1}":
      if m["head"] is None:
        mask[...] = True
      else:
        _head_entries(mask, keys, int(m["head"]), m["parts"] or "qkvo", num_heads)
    out.append(mask)
  return jax.tree.unflatten(treedef, out)


def _head_entries(mask: np.ndarray, keys: list[str], head: int, parts: str, num_heads: int
                  ) -> None:
  """Marks one head's slice of a layer's fused QKV ([.., 3 * H * K], q | k | v) or output
  projection ([H * K, D]) leaf."""
  if keys[1] == "qkv":
    D = mask.shape[-1] // 3
    K = D // num_heads
    for p in parts.replace("o", ""):
      lo = "qkv".index(p) * D + head * K
      mask[..., lo:lo + K] = True
  elif keys[1] == "out" and keys[-1] == "kernel" and "o" in parts:
    K = mask.shape[0] // num_heads
    mask[head * K:(head + 1) * K] = True


@dataclasses.dataclass(frozen=True)
class FreezePlan:
  """A program's freeze schedule: the groups any run names (static) and per variant a
  window for each ([V, G] starts and stops, in sequences; [0, 0) = not frozen)."""
  groups: tuple[str, ...]
  starts: np.ndarray
  stops: np.ndarray

  def per_run(self, run_variant: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """([R, G], [R, G]) int32 window starts and stops."""
    return (jnp.asarray(self.starts[run_variant], jnp.int32),
            jnp.asarray(self.stops[run_variant], jnp.int32))


def plan_for(trains: Sequence[Any], num_layers: int, num_heads: int) -> FreezePlan | None:
  """The plan for a program whose variants have these train configs; None when no run
  freezes anything (the training step is then unchanged)."""
  parsed = [[parse(e, t.num_seqs, num_layers, num_heads) for e in t.freeze] for t in trains]
  groups = tuple(dict.fromkeys(e.group for entries in parsed for e in entries))
  if not groups:
    return None
  starts = np.zeros((len(trains), len(groups)), np.int64)
  stops = np.zeros((len(trains), len(groups)), np.int64)
  for v, entries in enumerate(parsed):
    seen = set()
    for e in entries:
      if e.group in seen:
        raise ValueError(f"train.freeze names group {e.group!r} twice; give one window per group")
      seen.add(e.group)
      g = groups.index(e.group)
      starts[v, g], stops[v, g] = e.start, e.stop
  return FreezePlan(groups, starts, stops)


def frozen_at(masks_GP: jax.Array, starts_G: jax.Array, stops_G: jax.Array,
              seqs: jax.Array) -> jax.Array:
  """[P] bool: the parameters one run must not update at a step starting at `seqs`."""
  on_G = (starts_G <= seqs) & (seqs < stops_G)
  return jnp.any(masks_GP & on_G[:, None], axis=0)
