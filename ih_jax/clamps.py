"""Conditions: spec strings -> the clamp pytree of one run, stacking, static plans.

A *condition* is a dict of numeric arrays with the same keys and shapes for every
condition, so conditions stack along a leading runs axis and share one compiled
program. "No clamp" is the identity condition (all masks off, every head kept).
Its leaves are the union of the registered intervention kinds' leaves
(ih_jax.interventions): the built-in kinds' below, plus any kind a user registers.

Built-in leaves (per run; L layers, H heads):
  v_keep            [L, H] float  1 = head active, 0 = value-ablated
  pt_on, pt_strength [L, H] bool/float  previous-token pattern clamp (all rows), strength s
  ih_on, ih_strength [L, H] bool/float  induction ("perfect match") clamp on the query row
  preserve_pattern  []  bool   all layers' patterns := those of a clean pass
  preserve_value    []  bool   all layers' values   := those of a clean pass
  copy_on           [H] bool   perfect copy from this last-layer head (at most one)
  perfect_l1        []  bool   perfect previous-token input (any L >= 2: every
                               layer >= 1 takes its pattern from the shifted-input pass)
  graft_on          []  bool   graft-in: the residual after block 0 := a
                               frozen donor model's (its embeddings + its layer 0)
  graft_donor       []  int32  which donor (index into the program's donor list)
A program whose runs graft also carries `graft_params` (the donor's params tree per
run, under stop_gradient); see ih_jax.train.experiment.

Head names. Specs accept paper numbering `L2H3` (layers 1-based as in the paper,
heads 0-based) and code numbering `1:3` (both 0-based); they name the same head.
Ranges `L2H0-3` and wildcards `L2H*` / `1:*` are allowed.

Spec grammar (clauses joined by ';'):
  none                          the identity condition
  ablate:HEADS                  value-ablate these heads
  keep_only:HEADS               value-ablate every other head of the layers named
  pt:HEADS[@s]                  previous-token pattern clamp, strength s (default 1)
  ih:HEADS[@s]   (alias match)  induction clamp on the query row, strength s (default 1)
  copy:HEAD                     perfect copy from one last-layer head
  perfect_l1                    perfect previous-token input into layer 1 (L >= 2)
  graft:NAME                    graft-in from the donor named NAME (sweep.donors)
  preserve_pattern | preserve_value
Example: "ih:L2H3;keep_only:L2H3" = perfect match on L2H3, the other L2 heads ablated.

Schedules. Any clause may end in a window of sequences seen, `@[START,STOP)` or
`@[START,)`: the kind acts only while START <= sequences seen < STOP (e.g.
"ih:L2H3@[0,200000);keep_only:L2H3@[0,200000)" clamps perfect match for the first 200k
sequences, then releases it). The window is data (leaf `<kind>@window`, [2] int32;
[0, int32 max) = always), evaluated in-graph from the step, so conditions with different
windows share one program. One window per kind per run.
Ramps: `@ramp[A,B)` phases a clause in (off before A, its edit blended in linearly from
A to B, fully on from B), `@fade[A,B)` releases it gradually (fully on before A, blended
out linearly to nothing at B, off after): the activation is (1 - r) x + r edit(x), r the
ramp's value at the step (leaf `<kind>@ramp`, [2] int32: the lengths of the rise and the
fall in sequences; 0 = a hard edge). One schedule (window or ramp) per kind per run.

Combining clauses. Clauses add up: ablations are the union of every ablate clause and
of every head a keep_only clause drops, where the keep_only clauses naming one layer
keep the union of their heads ("keep_only:L2H0;keep_only:L2H1" keeps both). Repeating a
clause (or a head, e.g. "pt:L1H*;pt:L1H2") is harmless. Refused, naming both clauses:
  - a head both kept (keep_only) and ablated (ablate);
  - a pt / ih / copy clamp on a head the same spec ablates (its output is zero, so the
    clamp would do nothing);
  - pt and ih on one head (one pattern clamp per head);
  - one head given two different strengths by clauses of one kind;
  - 'none' together with any other clause.
Strengths '@s' must be numbers in [0, 1] (nan / inf are refused).

Any depth: ablate and pt take heads of any layer; ih heads of any layer but the
first; copy one head of the last layer; perfect_l1 needs L >= 2 and refuses layer-L1
clamps, as graft does. A block's MLP (ModelConfig.mlp_ratio > 0) belongs to its block:
perfect_l1 and graft replace block L1's attention *and* MLP; copy replaces the query
logits, so the last block's MLP no longer reaches the loss. Clamps never touch MLPs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from ih_jax import schedule
from ih_jax.interventions import builtin as _builtin  # noqa: F401  (registers the built-ins)
from ih_jax.interventions import core
from ih_jax.interventions.core import Clamps, Head, head_name, parse_heads

__all__ = ["Clamps", "Head", "ClampPlan", "NO_CLAMPS", "identity", "complete", "plan_for",
           "stack", "parse", "parse_heads", "head_name", "describe", "combine", "leaf_names"]


WINDOW = "@window"   # suffix of a kind's schedule leaf
RAMP = "@ramp"       # suffix of a kind's ramp leaf: (rise, fall) lengths in sequences
ALWAYS_STOP = schedule.ALWAYS_STOP


def always() -> np.ndarray:
  """The identity window: [0, int32 max) sequences, i.e. the whole run."""
  return np.array([0, ALWAYS_STOP], np.int32)


def no_ramp() -> np.ndarray:
  """The identity ramp: hard edges (no rise, no fall)."""
  return np.zeros(2, np.int32)


def leaf_names() -> tuple[str, ...]:
  """Every leaf of a condition: the union of the registered kinds' leaves, windows and
  ramps."""
  return tuple(k for kind in core.registered()
               for k in (*kind.leaves(1, 1), kind.name + WINDOW, kind.name + RAMP))


def identity(num_layers: int, num_heads: int) -> Clamps:
  """The condition that changes nothing (every registered kind at its identity)."""
  out: Clamps = {}
  for kind in core.registered():
    out.update(kind.leaves(num_layers, num_heads))
    out[kind.name + WINDOW] = always()
    out[kind.name + RAMP] = no_ramp()
  return out


def window_of(c: Clamps, kind: str) -> tuple[int, int]:
  """(start, stop) of one run's window for `kind` (stop = ALWAYS_STOP when open)."""
  w = np.asarray(c.get(kind + WINDOW, always()))
  return int(w[0]), int(w[1])


def ramp_of(c: Clamps, kind: str) -> tuple[int, int]:
  """(rise, fall) of one run's ramp for `kind` in sequences ((0, 0): hard edges)."""
  r = np.asarray(c.get(kind + RAMP, no_ramp()))
  return int(r[0]), int(r[1])


def scheduled(c: Clamps) -> dict[str, tuple[int, int]]:
  """The kinds of one run's condition that act only part of the run (a window other
  than the whole run, or a ramp), with their windows."""
  return {kind.name: window_of(c, kind.name) for kind in core.registered()
          if window_of(c, kind.name) != (0, ALWAYS_STOP) or ramp_of(c, kind.name) != (0, 0)}


def complete(c: Clamps) -> Clamps:
  """`c` with the leaves of kinds registered after it was made, at their identity."""
  L, H = np.shape(c["v_keep"])[-2:]
  missing = {k: v for k, v in identity(L, H).items() if k not in c}
  if not missing:
    return c
  lead = np.shape(c["v_keep"])[:-2]  # a runs axis, if stacked
  return dict(c, **{k: np.broadcast_to(v, lead + v.shape).copy() for k, v in missing.items()})


@dataclasses.dataclass(frozen=True)
class ClampPlan:
  """Static (compile-time) summary of which intervention kinds a program runs.

  It is the union over all stacked conditions; kinds no run uses cost nothing.
  kinds: the kinds some run uses (registration order); clean_pass_for: those that
  need an extra unedited pass (e.g. perfect copy reads a clean pass's scores; when
  every copying run clamps nothing else, its main pass *is* a clean pass).
  """
  kinds: tuple[str, ...] = ()
  clean_pass_for: tuple[str, ...] = ()
  scheduled: tuple[str, ...] = ()   # kinds some run applies only inside a window / ramp
  ramped: tuple[str, ...] = ()      # of those, kinds some run ramps in or out

  def uses(self, kind: str) -> bool:
    """Whether some run in the program uses intervention kind `kind`."""
    return kind in self.kinds

  @property
  def needs_clean_pass(self) -> bool:
    """Whether some kind needs an extra unedited forward pass."""
    return bool(self.clean_pass_for)

  @property
  def num_passes(self) -> int:
    """Forward passes per step: the main one, a clean one if needed, and the kinds' extra passes."""
    return (1 + int(self.needs_clean_pass)
            + sum(core.get(k).extra_passes for k in self.kinds))


NO_CLAMPS = ClampPlan()


def plan_for(stacked: Clamps) -> ClampPlan:
  """The static plan for a stack of conditions (leading runs axis, host arrays)."""
  stacked = complete({k: v for k, v in stacked.items() if k != "graft_params"})
  L, H = np.shape(stacked["v_keep"])[-2:]
  ident = identity(L, H)
  active = {kind.name: np.asarray(kind.active_runs(stacked, ident), bool)
            for kind in core.registered()}
  kinds = tuple(name for name, runs in active.items() if runs.any())
  clean = tuple(name for name in kinds if core.get(name).needs_clean_pass(stacked, active))
  ramped = tuple(name for name in kinds if np.asarray(stacked[name + RAMP]).any())
  timed = tuple(name for name in kinds
                if (np.asarray(stacked[name + WINDOW]) != always()[None]).any()
                or name in ramped)
  return ClampPlan(kinds, clean, timed, ramped)


def stack(conditions: Sequence[Clamps]) -> Clamps:
  """Stacks per-run conditions on a leading runs axis, checking they share a structure."""
  if not conditions:
    raise ValueError("need at least one condition to stack")
  conditions = [complete(c) for c in conditions]
  ref = conditions[0]
  for i, c in enumerate(conditions):
    if set(c) != set(ref):
      raise ValueError(f"condition {i} has clamp keys {sorted(c)}, expected {sorted(ref)}")
    for k in ref:
      if np.shape(c[k]) != np.shape(ref[k]):
        raise ValueError(f"condition {i}: clamp leaf {k!r} has shape {np.shape(c[k])}, "
                         f"expected {np.shape(ref[k])} (all conditions must use the same model)")
  return {k: np.stack([np.asarray(c[k]) for c in conditions]) for k in ref}


# ----------------------------------------------------------------------------- parsing

_STRENGTH = re.compile(r"^(.*)@(.*)$")
_RAMP = re.compile(r"^(?P<head>.*?)\s*@\s*(?P<kind>ramp|fade)\s*(?P<window>\[.*\))\s*$")


def _split_schedule(clause: str) -> tuple[str, np.ndarray | None, np.ndarray | None]:
  """'ih:L2H3@[0,200000)' -> ('ih:L2H3', window [0, 200000], ramp [0, 0]);
  '...@ramp[A,B)' -> window [A, open), ramp [B - A, 0]; '...@fade[A,B)' -> window
  [0, B), ramp [0, B - A]; no schedule -> (clause, None, None)."""
  where = f"clamp clause {clause!r}"
  m = _RAMP.match(clause)
  if m:
    _, bounds = schedule.split_window("x@" + m["window"], where)
    a, b = bounds
    if b == ALWAYS_STOP:
      raise ValueError(f"{where}: a {m['kind']} needs an end, e.g. @{m['kind']}[100000,200000)")
    if m["kind"] == "ramp":
      return m["head"].strip(), np.array([a, ALWAYS_STOP], np.int32), np.array([b - a, 0], np.int32)
    return m["head"].strip(), np.array([0, b], np.int32), np.array([0, b - a], np.int32)
  head, window = schedule.split_window(clause, where)
  if window is None:
    return head, None, None
  return head, np.array(window, np.int32), no_ramp()


def parse(spec: str, num_layers: int, num_heads: int,
          donors: Sequence[str] = ()) -> Clamps:
  """Parses a condition spec (see the module docstring) into a validated clamp dict.

  Each clause `KIND[:ARG]` goes to the registered kind with that keyword
  (ih_jax.interventions). `donors` names the graft donors a `graft:NAME` clause may
  use (in order). Contradictory clauses are refused naming both ("Combining clauses").
  """
  clauses = [c.strip() for c in spec.split(";") if c.strip()]
  if not clauses:
    raise ValueError("empty clamp spec; use 'none' for the unclamped condition")
  draft = core.Draft(spec, num_layers, num_heads, donors, identity(num_layers, num_heads))
  windows: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
  for clause in clauses:
    clause, window, ramp = _split_schedule(clause)
    keyword, _, arg = clause.partition(":")
    keyword, arg = keyword.strip().lower(), arg.strip()
    if keyword == "none":
      if arg:
        raise ValueError(f"clamp clause {clause!r}: 'none' takes no heads")
      if len(clauses) > 1:  # 'none;ablate:...' is a typo or a mix-up
        raise ValueError(f"'none' means no clamp and cannot be combined with other clauses; "
                         f"got {spec!r}")
      if window is not None:
        raise ValueError(f"clamp clause {clause!r}: 'none' takes no window")
      continue
    kind = core.by_keyword(keyword)
    if kind is None:
      raise ValueError(f"unknown clamp kind {keyword!r} in {spec!r}; allowed: "
                       f"{', '.join(core.keywords() + core.RESERVED)} (a kind of your own "
                       "must be registered first: ih_jax.interventions.register)")
    strength = None
    if kind.argument == "none":
      if arg:
        raise ValueError(f"clamp clause {clause!r}: {keyword!r} takes no heads")
    elif not arg:
      raise ValueError(f"clamp clause {clause!r} needs "
                       + (f"heads, e.g. '{keyword}:L2H3'" if kind.argument == "heads"
                          else f"a name, e.g. '{keyword}:NAME'"))
    elif kind.argument == "heads":
      m = _STRENGTH.match(arg)
      if m:
        if not kind.takes_strength:
          with_s = [k.name for k in core.registered() if k.takes_strength]
          raise ValueError(f"clamp clause {clause!r}: only {' and '.join(with_s)} take a "
                           "strength '@s'")
        arg, strength = m.group(1).strip(), core.parse_strength(clause, m.group(2))
    kind.parse(keyword, arg, strength, clause, draft)
    w = always() if window is None else window
    r = no_ramp() if ramp is None else ramp
    if kind.name in windows and not (np.array_equal(windows[kind.name][0], w)
                                     and np.array_equal(windows[kind.name][1], r)):
      raise ValueError(f"clauses {windows[kind.name][2]!r} and {clause!r} give {kind.name} "
                       "two different windows; one window per kind per run")
    windows[kind.name] = (w, r, clause)
  for kind in core.registered():
    kind.finish(draft)
  # A value-ablated head outputs nothing, so a clamp on it would have no effect.
  for hd, roles in sorted(draft.claims.items()):
    if "ablated" in roles:
      for role in ("pattern", "clamped"):
        if role in roles:
          raise ValueError(f"clauses {roles[role][1]!r} and {roles['ablated'][1]!r} "
                           f"contradict: {head_name(hd)} is clamped and ablated (a clamp on "
                           "an ablated head does nothing)")
  for kind in core.registered():
    kind.check(draft)
  out = dict(draft.leaves)
  for name, (w, r, _) in windows.items():
    out[name + WINDOW] = w
    out[name + RAMP] = r
  return out


def describe(c: Clamps, donors: Sequence[str] = ()) -> str:
  """A canonical spec string for a (single-run) condition; parse(describe(c)) == c."""
  c = complete(c)
  parts = []
  for kind in core.registered():
    start, stop = window_of(c, kind.name)
    rise, fall = ramp_of(c, kind.name)
    if rise:
      suffix = f"@ramp[{start},{start + rise})"
    elif fall:
      suffix = f"@fade[{stop - fall},{stop})"
    else:
      suffix = "" if (start, stop) == (0, ALWAYS_STOP) else \
          f"@[{start},{'' if stop == ALWAYS_STOP else stop})"
    parts += [part + suffix for part in kind.describe(c, donors)]
  return ";".join(parts) or "none"


# ------------------------------------------------------------------ combining conditions

def combine(base: Clamps, extra: Clamps) -> Clamps:
  """`extra` applied on top of `base` (one run each): what analysing a clamped run needs.

  A post-hoc condition (e.g. "ablate:L2H3") is measured under the clamps the run was
  trained with, so both must hold at once: ablations multiply, pattern clamps and
  flags add up (extra's strength wins on a head both clamp; a kind of your own:
  extra's non-identity values win). Combinations the model cannot express (two copy
  heads; perfect_l1 or graft with layer-L1 ablations, pattern clamps or preserve_*)
  raise ValueError, so a study can report "not applicable".
  A donor tree under `graft_params` (a grafted run's) travels along.
  """
  base, extra = complete(base), complete(extra)
  if scheduled(extra):
    raise ValueError(f"a post-hoc condition takes no window (it has {scheduled(extra)})")
  out: Clamps = {}
  for kind in core.registered():
    kind.combine(base, extra, out)
    out[kind.name + WINDOW] = base[kind.name + WINDOW]  # the run's own schedule stays
    out[kind.name + RAMP] = base[kind.name + RAMP]
  for kind in core.registered():
    kind.validate(out)
  if "graft_params" in base:
    out["graft_params"] = base["graft_params"]
  return out


def heads_touched(c: Clamps) -> dict[Head, str]:
  """Every head some kind of `c` ablates or clamps, with the first kind's reason."""
  out: dict[Head, str] = {}
  for kind in core.registered():
    for hd, why in kind.heads_touched(complete(c)).items():
      out.setdefault(hd, why)
  return out


def replaced_layers(c: Clamps) -> dict[int, str]:
  """Layers some kind of `c` replaces wholesale (perfect_l1, graft), with the reason."""
  out: dict[int, str] = {}
  for kind in core.registered():
    out.update(kind.replaced_layers(complete(c)))
  return out
