"""The fixed-structure clamp pytree (SPEC §4) and its human-friendly constructors.

A *condition* is a dict of numeric arrays with the same keys and shapes for every
condition, so conditions stack along a leading runs axis and share one compiled
program. "No clamp" is the identity condition (all masks off, every head kept).

Leaves (per run; L layers, H heads):
  v_keep            [L, H] float  1 = head active, 0 = value-ablated
  pt_on, pt_strength [L, H] bool/float  previous-token pattern clamp (all rows), strength s
  ih_on, ih_strength [L, H] bool/float  induction ("perfect match") clamp on the query row
  preserve_pattern  []  bool   all layers' patterns := those of a clean pass
  preserve_value    []  bool   all layers' values   := those of a clean pass
  copy_on           [H] bool   perfect copy from this last-layer head (at most one)
  perfect_l1        []  bool   synthetic block-0 residual of SPEC §4.2f (any L >= 2: every
                               layer >= 1 takes its pattern from the shifted-input pass)
  graft_on          []  bool   graft-in (SPEC §4.2g): the residual after block 0 := a
                               frozen donor model's (its embeddings + its layer 0)
  graft_donor       []  int32  which donor (index into the program's donor list)
A program whose runs graft also carries `graft_params` (the donor's params tree per
run, under stop_gradient); see ih_jax.program.

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

Any depth (#8): ablate and pt take heads of any layer; ih heads of any layer but the
first; copy one head of the last layer; perfect_l1 needs L >= 2 and refuses layer-L1
clamps, as graft does. A block's MLP (ModelConfig.mlp_ratio > 0) belongs to its block:
perfect_l1 and graft replace block L1's attention *and* MLP; copy replaces the query
logits, so the last block's MLP no longer reaches the loss. Clamps never touch MLPs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

Clamps = dict[str, Any]  # leaf name -> array (numpy on the host, jax inside jit)
Head = tuple[int, int]   # (layer, head), 0-based code numbering

CLAMP_KEYS = ("v_keep", "pt_on", "pt_strength", "ih_on", "ih_strength",
              "preserve_pattern", "preserve_value", "copy_on", "perfect_l1",
              "graft_on", "graft_donor")


def identity(num_layers: int, num_heads: int) -> Clamps:
  L, H = num_layers, num_heads
  return dict(
      v_keep=np.ones((L, H), np.float32),
      pt_on=np.zeros((L, H), bool), pt_strength=np.ones((L, H), np.float32),
      ih_on=np.zeros((L, H), bool), ih_strength=np.ones((L, H), np.float32),
      preserve_pattern=np.zeros((), bool), preserve_value=np.zeros((), bool),
      copy_on=np.zeros((H,), bool), perfect_l1=np.zeros((), bool),
      graft_on=np.zeros((), bool), graft_donor=np.zeros((), np.int32))


@dataclasses.dataclass(frozen=True)
class ClampPlan:
  """Static (compile-time) summary of which clamp machinery a program needs.

  It is the union over all stacked conditions; sites no run uses cost nothing.
  """
  ablate: bool = False
  pt: bool = False
  ih: bool = False
  preserve_pattern: bool = False
  preserve_value: bool = False
  copy: bool = False
  perfect_l1: bool = False
  graft: bool = False
  # Perfect copy reads a clean pass's scores. When every copying run clamps nothing
  # else, its main pass *is* a clean pass and the extra pass is skipped.
  copy_needs_clean_pass: bool = False

  @property
  def needs_clean_pass(self) -> bool:
    return self.preserve_pattern or self.preserve_value or self.copy_needs_clean_pass

  @property
  def num_passes(self) -> int:
    return 1 + int(self.needs_clean_pass) + int(self.perfect_l1) + int(self.graft)


NO_CLAMPS = ClampPlan()


def _other_manipulations(c: Clamps) -> np.ndarray:
  """Per run: does the condition clamp anything besides perfect copy? ([R] bool)."""
  red = lambda a: a.reshape(a.shape[0], -1).any(axis=1)
  return (red(np.asarray(c["v_keep"]) != 1) | red(np.asarray(c["pt_on"]))
          | red(np.asarray(c["ih_on"])) | red(np.asarray(c["preserve_pattern"]))
          | red(np.asarray(c["preserve_value"])) | red(np.asarray(c["perfect_l1"]))
          | red(np.asarray(c["graft_on"])))


def plan_for(stacked: Clamps) -> ClampPlan:
  """The static plan for a stack of conditions (leading runs axis, host arrays)."""
  c = {k: np.asarray(stacked[k]) for k in CLAMP_KEYS}  # (graft_params is a tree)
  copy_runs = c["copy_on"].reshape(c["copy_on"].shape[0], -1).any(axis=1)
  pl1 = c["perfect_l1"].reshape(-1)
  others = _other_manipulations(c)
  return ClampPlan(
      ablate=bool((c["v_keep"] != 1).any()),
      pt=bool(c["pt_on"].any()),
      ih=bool(c["ih_on"].any()),
      preserve_pattern=bool(c["preserve_pattern"].any()),
      preserve_value=bool(c["preserve_value"].any()),
      copy=bool(copy_runs.any()),
      perfect_l1=bool(pl1.any()),
      graft=bool(c["graft_on"].any()),
      copy_needs_clean_pass=bool((copy_runs & ~pl1 & others).any()),
  )


def stack(conditions: Sequence[Clamps]) -> Clamps:
  """Stacks per-run conditions on a leading runs axis, checking they share a structure."""
  if not conditions:
    raise ValueError("need at least one condition to stack")
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

_PAPER_HEAD = re.compile(r"^L(\d+)H(\*|\d+(?:-\d+)?)$", re.IGNORECASE)
_CODE_HEAD = re.compile(r"^(\d+):(\*|\d+(?:-\d+)?)$")


def _range_names(num_layers: int, num_heads: int) -> str:
  return (f"the model has layers L1..L{num_layers} in paper numbering (0..{num_layers - 1} "
          f"in code numbering 'l:h') and heads H0..H{num_heads - 1}")


def parse_heads(text: str, num_layers: int, num_heads: int) -> list[Head]:
  """'L2H3,L1H0-2,1:*' -> sorted unique [(layer, head)] in 0-based code numbering."""
  heads: list[Head] = []
  for token in (t.strip() for t in text.split(",")):
    if not token:
      continue
    m = _PAPER_HEAD.match(token)
    if m:
      layer = int(m.group(1)) - 1
      if layer < 0:
        raise ValueError(f"head {token!r}: paper layers start at L1; {_range_names(num_layers, num_heads)}")
    else:
      m = _CODE_HEAD.match(token)
      if not m:
        raise ValueError(f"cannot parse head {token!r}: write heads as L<layer>H<head> "
                         f"(paper numbering, e.g. L2H3, L2H0-7, L2H*) or <layer>:<head> "
                         f"(code numbering, e.g. 1:3)")
      layer = int(m.group(1))
    hs = m.group(2)
    if layer >= num_layers:
      raise ValueError(f"unknown head {token!r}: {_range_names(num_layers, num_heads)}")
    if hs == "*":
      hrange = range(num_heads)
    elif "-" in hs:
      lo, hi = (int(v) for v in hs.split("-"))
      if lo > hi:
        raise ValueError(f"head range {token!r} is empty (start {lo} > end {hi})")
      hrange = range(lo, hi + 1)
    else:
      hrange = range(int(hs), int(hs) + 1)
    for h in hrange:
      if h >= num_heads:
        raise ValueError(f"unknown head {token!r}: {_range_names(num_layers, num_heads)}")
      heads.append((layer, h))
  if not heads:
    raise ValueError(f"no heads named in {text!r}")
  return sorted(set(heads))


def head_name(head: Head) -> str:
  """Paper-style name of a 0-based (layer, head): (1, 3) -> 'L2H3'."""
  return f"L{head[0] + 1}H{head[1]}"


def build(num_layers: int, num_heads: int, *,
          ablate: Iterable[Head] = (), pt: Mapping[Head, float] | Iterable[Head] = (),
          ih: Mapping[Head, float] | Iterable[Head] = (), copy: Head | None = None,
          perfect_l1: bool = False, preserve_pattern: bool = False,
          preserve_value: bool = False, graft: int | None = None) -> Clamps:
  """Builds and validates one condition from 0-based (layer, head) pairs."""
  L, H = num_layers, num_heads
  c = identity(L, H)

  def check(head: Head, what: str) -> Head:
    l, h = int(head[0]), int(head[1])
    if not (0 <= l < L and 0 <= h < H):
      raise ValueError(f"{what}: unknown head {l}:{h} ({head_name((l, h))}); "
                       f"{_range_names(L, H)}")
    return l, h

  def strengths(spec: Any, what: str) -> dict[Head, float]:
    items = spec.items() if isinstance(spec, Mapping) else ((hd, 1.0) for hd in spec)
    out = {}
    for hd, s in items:
      if not 0.0 <= float(s) <= 1.0:
        raise ValueError(f"{what} strength for {head_name(hd)} must be in [0, 1], got {s}")
      out[check(hd, what)] = float(s)
    return out

  for hd in ablate:
    c["v_keep"][check(hd, "ablate")] = 0.0
  pt, ih = strengths(pt, "pt clamp"), strengths(ih, "ih clamp")
  both = sorted(set(pt) & set(ih))
  if both:
    raise ValueError(f"pt and ih both clamp {head_name(both[0])}; a head takes one pattern clamp")
  clamped = set(pt) | set(ih) | ({check(copy, "copy")} if copy is not None else set())
  dead = sorted(hd for hd in clamped if c["v_keep"][hd] != 1)
  if dead:  # an ablated head outputs nothing, so its clamp would do nothing
    raise ValueError(f"{head_name(dead[0])} is both clamped and ablated")
  for hd, s in pt.items():
    c["pt_on"][hd], c["pt_strength"][hd] = True, s
  for hd, s in ih.items():
    if hd[0] == 0:
      raise ValueError(f"ih clamp on {head_name(hd)}: an induction (match) clamp needs a "
                       "previous layer to compose with; use a head in layer L2 or later"
                       + (" (this model has a single layer)" if L == 1 else ""))
    c["ih_on"][hd], c["ih_strength"][hd] = True, s
  if copy is not None:
    l, h = check(copy, "copy")
    if l != L - 1:
      raise ValueError(f"copy from {head_name((l, h))}: perfect copy reads a last-layer head; "
                       f"use a head of L{L}")
    c["copy_on"][h] = True
  if perfect_l1:
    if L < 2:
      raise ValueError("perfect_l1 replaces layer L1's output and needs at least 2 layers")
    if (c["v_keep"][0] != 1).any() or c["pt_on"][0].any():
      raise ValueError("perfect_l1 removes layer L1, so clamps or ablations on L1 heads make "
                       "no sense with it; name L2+ heads only")
    if preserve_pattern or preserve_value:
      raise ValueError("perfect_l1 cannot be combined with preserve_pattern/preserve_value")
    c["perfect_l1"] = np.ones((), bool)
  if graft is not None:
    if perfect_l1:
      raise ValueError("graft and perfect_l1 both replace the residual after layer L1; "
                       "use one of them")
    if (c["v_keep"][0] != 1).any() or c["pt_on"][0].any():
      raise ValueError("graft replaces the residual after layer L1 (the donor's embeddings and "
                       "block L1), so clamps or ablations on L1 heads make no sense with it; "
                       "name L2+ heads only")
    if int(graft) < 0:
      raise ValueError(f"graft donor index must be >= 0, got {graft}")
    c["graft_on"], c["graft_donor"] = np.ones((), bool), np.asarray(int(graft), np.int32)
  c["preserve_pattern"] = np.asarray(bool(preserve_pattern))
  c["preserve_value"] = np.asarray(bool(preserve_value))
  return c


_STRENGTH = re.compile(r"^(.*)@(.*)$")
_FLAG_KINDS = ("perfect_l1", "preserve_pattern", "preserve_value", "none")
_HEAD_KINDS = ("ablate", "keep_only", "pt", "ih", "match", "copy")


def _strength(clause: str, text: str) -> float:
  """The '@s' of a pt / ih clause: a number in [0, 1] (nan and inf are refused)."""
  try:
    s = float(text)
  except ValueError:
    s = float("nan")
  if not 0.0 <= s <= 1.0:
    raise ValueError(f"clamp clause {clause!r}: strength {text!r} must be a number in [0, 1]")
  return s


def parse(spec: str, num_layers: int, num_heads: int,
          donors: Sequence[str] = ()) -> Clamps:
  """Parses a condition spec (see the module docstring) into a validated clamp dict.

  `donors` names the graft donors a `graft:NAME` clause may use (in order).
  Contradictory clauses are refused naming both ("Combining clauses", module docstring).
  """
  L, H = num_layers, num_heads
  graft: int | None = None
  ablated: dict[Head, str] = {}          # head -> the ablate clause naming it
  kept: dict[int, dict[Head, str]] = {}  # layer -> kept head -> its keep_only clause
  keep_clauses: dict[int, list[str]] = {}
  pattern: dict[Head, tuple[str, float, str]] = {}  # head -> (pt | ih, strength, clause)
  copy: tuple[Head, str] | None = None
  flags = dict(perfect_l1=False, preserve_pattern=False, preserve_value=False)
  clauses = [c.strip() for c in spec.split(";") if c.strip()]
  if not clauses:
    raise ValueError("empty clamp spec; use 'none' for the unclamped condition")
  for clause in clauses:
    kind, _, arg = clause.partition(":")
    kind = kind.strip().lower()
    if kind == "graft":
      name = arg.strip()
      if name not in donors:
        raise ValueError(f"graft donor {name!r} in {spec!r} is not declared; declared donors: "
                         f"{list(donors) or 'none'} (set sweep.donors to 'NAME=WORKDIR[:RUN]')")
      if graft is not None:
        raise ValueError(f"{spec!r} grafts twice; a run has one donor")
      graft = list(donors).index(name)
      continue
    if kind in _FLAG_KINDS:
      if arg:
        raise ValueError(f"clamp clause {clause!r}: {kind!r} takes no heads")
      if kind == "none" and len(clauses) > 1:  # 'none;ablate:...' is a typo or a mix-up
        raise ValueError(f"'none' means no clamp and cannot be combined with other clauses; "
                         f"got {spec!r}")
      if kind != "none":
        flags[kind] = True
      continue
    if kind not in _HEAD_KINDS:
      raise ValueError(f"unknown clamp kind {kind!r} in {spec!r}; allowed: "
                       f"{', '.join(_HEAD_KINDS + _FLAG_KINDS + ('graft',))}")
    if not arg:
      raise ValueError(f"clamp clause {clause!r} needs heads, e.g. '{kind}:L2H3'")
    strength = 1.0
    m = _STRENGTH.match(arg)
    if m:
      if kind not in ("pt", "ih", "match"):
        raise ValueError(f"clamp clause {clause!r}: only pt and ih take a strength '@s'")
      arg, strength = m.group(1), _strength(clause, m.group(2))
    heads = parse_heads(arg, L, H)
    if kind == "ablate":
      for hd in heads:
        ablated.setdefault(hd, clause)
    elif kind == "keep_only":  # several keep_only clauses on one layer keep the union
      for l in sorted({l for l, _ in heads}):
        keep_clauses.setdefault(l, []).append(clause)
      for hd in heads:
        kept.setdefault(hd[0], {}).setdefault(hd, clause)
    elif kind in ("pt", "ih", "match"):
      kind = "ih" if kind == "match" else kind
      for hd in heads:
        old = pattern.get(hd)
        if old and old[0] != kind:
          raise ValueError(f"clauses {old[2]!r} and {clause!r} both clamp {head_name(hd)}'s "
                           "pattern (pt and ih); a head takes one pattern clamp")
        if old and old[1] != strength:
          raise ValueError(f"clauses {old[2]!r} and {clause!r} give {head_name(hd)} two "
                           f"strengths ({old[1]:g}, {strength:g}); give one")
        pattern.setdefault(hd, (kind, strength, clause))
    elif kind == "copy":
      if len(heads) != 1 or copy is not None:
        raise ValueError(f"perfect copy takes exactly one head, got {spec!r}")
      copy = heads[0], clause
  for hd, clause in ablated.items():
    if hd in kept.get(hd[0], {}):
      raise ValueError(f"clauses {kept[hd[0]][hd]!r} and {clause!r} contradict: the first "
                       f"keeps {head_name(hd)}, the second ablates it")
  for l, heads_kept in kept.items():
    for h in range(H):
      if (l, h) not in heads_kept:
        ablated.setdefault((l, h), ";".join(keep_clauses[l]))
  # A value-ablated head outputs nothing, so a clamp on it would have no effect.
  clamped = [(hd, c) for hd, (_, _, c) in pattern.items()] + ([copy] if copy else [])
  for hd, clause in clamped:
    if hd in ablated:
      raise ValueError(f"clauses {clause!r} and {ablated[hd]!r} contradict: {head_name(hd)} "
                       "is clamped and ablated (a clamp on an ablated head does nothing)")
  pick = lambda kind: {hd: s for hd, (k, s, _) in pattern.items() if k == kind}
  return build(L, H, ablate=sorted(ablated), pt=pick("pt"), ih=pick("ih"),
               copy=copy[0] if copy else None, graft=graft, **flags)


def describe(c: Clamps, donors: Sequence[str] = ()) -> str:
  """A canonical spec string for a (single-run) condition; parse(describe(c)) == c."""
  parts = []
  for key, kind in (("pt_on", "pt"), ("ih_on", "ih")):
    for l, h in np.argwhere(np.asarray(c[key])):
      s = float(np.asarray(c[key.replace("_on", "_strength")])[l, h])
      parts.append(f"{kind}:{head_name((l, h))}" + ("" if s == 1.0 else f"@{s:g}"))
  for l, h in np.argwhere(np.asarray(c["v_keep"]) != 1):
    parts.append(f"ablate:{head_name((l, h))}")
  for (h,) in np.argwhere(np.asarray(c["copy_on"])):
    parts.append(f"copy:{head_name((np.asarray(c['v_keep']).shape[0] - 1, h))}")
  for flag in ("perfect_l1", "preserve_pattern", "preserve_value"):
    if bool(np.asarray(c[flag])):
      parts.append(flag)
  if bool(np.asarray(c["graft_on"])):
    d = int(np.asarray(c["graft_donor"]))
    parts.append(f"graft:{donors[d] if d < len(donors) else d}")
  return ";".join(parts) or "none"


# ------------------------------------------------------------------ combining conditions

def combine(base: Clamps, extra: Clamps) -> Clamps:
  """`extra` applied on top of `base` (one run each): what analysing a clamped run needs.

  A post-hoc condition (e.g. "ablate:L2H3") is measured under the clamps the run was
  trained with, so both must hold at once: ablations multiply, pattern clamps and
  flags add up (extra's strength wins on a head both clamp). Combinations the model
  cannot express (two copy heads; perfect_l1 or graft with layer-L1 ablations, pattern
  clamps or preserve_*) raise ValueError, so a study can report "not applicable".
  A donor tree under `graft_params` (a grafted run's) travels along.
  """
  out = {k: np.asarray(base[k]).copy() for k in CLAMP_KEYS}
  e = {k: np.asarray(extra[k]) for k in CLAMP_KEYS}
  out["v_keep"] = out["v_keep"] * e["v_keep"]
  for kind in ("pt", "ih"):
    on = e[f"{kind}_on"]
    out[f"{kind}_strength"] = np.where(on, e[f"{kind}_strength"], out[f"{kind}_strength"])
    out[f"{kind}_on"] = out[f"{kind}_on"] | on
  for flag in ("preserve_pattern", "preserve_value", "perfect_l1"):
    out[flag] = np.asarray(bool(out[flag]) or bool(e[flag]))
  if out["copy_on"].any() and e["copy_on"].any() and (out["copy_on"] != e["copy_on"]).any():
    raise ValueError("two different perfect-copy heads in one condition")
  out["copy_on"] = out["copy_on"] | e["copy_on"]
  if bool(e["graft_on"]):
    if bool(out["graft_on"]) and int(out["graft_donor"]) != int(e["graft_donor"]):
      raise ValueError("two different graft donors in one condition")
    out["graft_on"], out["graft_donor"] = e["graft_on"].copy(), e["graft_donor"].copy()
  if bool(out["perfect_l1"]) and bool(out["graft_on"]):
    raise ValueError("graft and perfect_l1 both replace the residual after layer L1")
  replaced = ("perfect_l1" if bool(out["perfect_l1"]) else
              "graft" if bool(out["graft_on"]) else None)
  if replaced:
    if (out["v_keep"][0] != 1).any() or out["pt_on"][0].any():
      raise ValueError(f"{replaced} replaces layer L1, so its heads cannot be ablated or "
                       "clamped")
    if bool(out["preserve_pattern"]) or bool(out["preserve_value"]):
      raise ValueError(f"{replaced} cannot be combined with preserve_pattern/preserve_value")
  if "graft_params" in base:
    out["graft_params"] = base["graft_params"]
  return out
