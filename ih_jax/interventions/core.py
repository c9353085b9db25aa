"""What an intervention kind is, the registry of kinds, and what an edit can see.

An intervention *kind* (ablate, pt, a user's own ...) is one `Intervention` object:
  - its numeric leaves with their identity values (`leaves`): a condition is the
    union of every registered kind's leaves, so conditions stack on a runs axis and
    vmap in one program;
  - its spec clause(s) and their validation (`parse`, `finish`, `validate`);
  - its description (`describe`, the inverse of parsing);
  - a pure edit function (`edit`) applied at one or more named *sites* of the
    forward pass, in the public layout, for one run.
Registering a kind (`register`) from any module or notebook makes its clauses
parseable (ih_jax.clamps.parse) and its edits part of every program that uses it.
A kind no run of a program uses is not compiled in (ih_jax.clamps.ClampPlan).

Sites and the layout each edit receives and returns (B batch, H heads, T positions,
Tq <= T query rows: the last layer may hold only the query row, K = d_model / H):
  scores    [B, H, Tq, T]  pre-softmax scores (causally masked with -1e20)
  pattern   [B, H, Tq, T]  attention pattern (rows sum to 1)
  values    [B, H, T, K]   values
  head_out  [B, H, Tq, K]  each head's output, before the output projection
  resid     [B, Tq, D]     the residual stream after a block (resid_post)
  logits    [B, N, C]      the model's logits (few-shot: one row per exemplar; token
                           task: [B, T, V])
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Clamps = dict[str, Any]  # leaf name -> array (numpy on the host, jax inside jit)
Head = tuple[int, int]   # (layer, head), 0-based code numbering

SITES = ("scores", "pattern", "values", "head_out", "resid", "logits")
TASKS = ("fewshot", "tokens")


def head_name(head: Head) -> str:
  """Paper-style name of a 0-based (layer, head): (1, 3) -> 'L2H3'."""
  return f"L{head[0] + 1}H{head[1]}"


def range_names(num_layers: int, num_heads: int) -> str:
  """The model's valid layer and head names, in words (for error messages)."""
  return (f"the model has layers L1..L{num_layers} in paper numbering (0..{num_layers - 1} "
          f"in code numbering 'l:h') and heads H0..H{num_heads - 1}")


_PAPER_HEAD = re.compile(r"^L(\d+)H(\*|\d+(?:-\d+)?)$", re.IGNORECASE)
_CODE_HEAD = re.compile(r"^(\d+):(\*|\d+(?:-\d+)?)$")


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
        raise ValueError(f"head {token!r}: paper layers start at L1; "
                         f"{range_names(num_layers, num_heads)}")
    else:
      m = _CODE_HEAD.match(token)
      if not m:
        raise ValueError(f"cannot parse head {token!r}: write heads as L<layer>H<head> "
                         f"(paper numbering, e.g. L2H3, L2H0-7, L2H*) or <layer>:<head> "
                         f"(code numbering, e.g. 1:3)")
      layer = int(m.group(1))
    hs = m.group(2)
    if layer >= num_layers:
      raise ValueError(f"unknown head {token!r}: {range_names(num_layers, num_heads)}")
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
        raise ValueError(f"unknown head {token!r}: {range_names(num_layers, num_heads)}")
      heads.append((layer, h))
  if not heads:
    raise ValueError(f"no heads named in {text!r}")
  return sorted(set(heads))


def parse_strength(clause: str, text: str) -> float:
  """The '@s' of a clause: a number in [0, 1] (nan and inf are refused)."""
  try:
    s = float(text)
  except ValueError:
    s = float("nan")
  if not 0.0 <= s <= 1.0:
    raise ValueError(f"clamp clause {clause!r}: strength {text!r} must be a number in [0, 1]")
  return s


@dataclasses.dataclass
class Draft:
  """A condition being parsed from a spec: the leaves so far and who claimed which head.

  Kinds write their leaves in `finish`; while parsing clauses they keep private
  state in `notes[kind.name]` and claim heads with `claim` so that contradictions
  between kinds are refused naming both clauses.
  """
  spec: str
  num_layers: int
  num_heads: int
  donors: Sequence[str]
  leaves: Clamps
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)
  # head -> role -> (kind, clause); roles: "ablated", "pattern", "clamped"
  claims: dict[Head, dict[str, tuple[str, str]]] = dataclasses.field(default_factory=dict)

  def heads(self, arg: str) -> list[Head]:
    """Parses a head list (e.g. "L2H3,L1H0-2") into sorted [(layer, head)] for this model."""
    return parse_heads(arg, self.num_layers, self.num_heads)

  def claim(self, head: Head, role: str, kind: str, clause: str) -> None:
    """Records that `clause` (of `kind`) ablates / clamps the pattern of / clamps `head`.

    A head's pattern takes one clamp: a second pattern claim by another kind is refused.
    """
    mine = self.claims.setdefault(head, {})
    old = mine.get(role)
    if role == "pattern" and old is not None and old[0] != kind:
      raise ValueError(f"clauses {old[1]!r} and {clause!r} both clamp {head_name(head)}'s "
                       f"pattern ({old[0]} and {kind}); a head takes one pattern clamp")
    mine.setdefault(role, (kind, clause))

  def claimed(self, role: str, layer: int | None = None) -> list[tuple[Head, str]]:
    """[(head, clause)] of the heads claimed with `role` (in `layer`, if given)."""
    return [(hd, roles[role][1]) for hd, roles in sorted(self.claims.items())
            if role in roles and (layer is None or hd[0] == layer)]


@dataclasses.dataclass
class EditContext:
  """What an edit function may read besides the activation it edits (one run, in-graph).

  condition: the run's whole condition (every kind's leaves; jax arrays).
  labels:    few-shot: the labels y [B, N] (the query's last); token task: the oracle
             induction targets [B, T] (ih_jax.data.tokens.copy_targets; -1 = none).
  inputs:    few-shot: the exemplar features [B, N, F] (or IndexedFeatures); token
             task: the tokens [B, T].
  """
  site: str
  layer: int | None         # None at the logits site
  seq_len: int              # T, the full sequence length
  condition: Clamps
  labels: Any
  inputs: Any
  cfg: Any                  # ih_jax.model.ModelConfig
  plan: Any                 # ih_jax.clamps.ClampPlan (static)
  _read: Callable[[str, str], Any]
  task: str = "fewshot"     # the task's family (ih_jax.tasks.FAMILIES): "fewshot" | "tokens"

  def main(self, name: str):
    """An activation of this (edited) pass computed so far, e.g. 'blocks.1.scores'."""
    return self._read("main", name)

  def clean(self, name: str):
    """The activation of an unedited pass (a kind must set `uses_clean_pass`)."""
    return self._read("clean", name)

  def from_pass(self, kind: str, name: str):
    """An activation recorded by `kind`'s own extra pass (its `pre_pass`)."""
    return self._read(kind, name)


@dataclasses.dataclass
class PassTools:
  """What a kind's `pre_pass` may use inside the model (one run, in-graph)."""
  embed: Any                # E [B, T, D]: what the residual stream starts from
  token_embed: Any          # E without learned positions
  positions: Any            # learned positions [T, D] or None
  run_layers: Callable[[Any, int], dict[str, Any]]  # (h, first layer) -> recorded sites
  condition: Clamps = dataclasses.field(default_factory=dict)


class Intervention:
  """One kind of intervention. Subclass it, set the class attributes, override what
  the kind needs, and `register(YourKind())`.

  name:     the clause keyword ("pt" in "pt:L1H3"); also how a plan names the kind.
  aliases:  other keywords parsed as this kind.
  sites:    the sites `edit` is called at (see the module docstring).
  order:    among kinds at one site, lower edits first (built-ins: 10-40; yours: 100).
  tasks:    the task families the kind is defined on ("fewshot", "tokens"; a task's
            `family`, ih_jax.tasks).
  argument: the clause grammar: "heads" (`KIND:HEADS`, with takes_strength
            `KIND:HEADS[@s]`), "name" (`KIND:NAME`) or "none" (`KIND` alone).
  claim_role: what a head clause does to its heads, for refusing contradictions:
            "pattern" (one pattern clamp per head), "clamped" or "ablated".
  uses_clean_pass: `edit` reads ctx.clean(...), so a program using the kind computes
            one extra unedited forward pass.
  extra_passes: forward passes its `pre_pass` / `prepare` add (for the logs).
  """
  name: str = ""
  aliases: tuple[str, ...] = ()
  sites: tuple[str, ...] = ()
  order: int = 100
  tasks: tuple[str, ...] = TASKS
  argument: str = "heads"
  takes_strength: bool = False
  claim_role: str = "clamped"
  uses_clean_pass: bool = False
  extra_passes: int = 0

  # ---- leaves
  def leaves(self, num_layers: int, num_heads: int) -> Clamps:
    """This kind's leaves with their identity values (numpy)."""
    raise NotImplementedError

  def active_runs(self, stacked: Clamps, identity: Clamps) -> np.ndarray:
    """[R] bool: which runs of a stack use the kind. Default: a leaf differs from identity."""
    R = None
    out = None
    for k in self.leaves(*_shape_LH(identity)):
      a = np.asarray(stacked[k])
      R = a.shape[0]
      diff = (a != np.asarray(identity[k])[None]).reshape(R, -1).any(axis=1)
      out = diff if out is None else out | diff
    return np.zeros((R or 0,), bool) if out is None else out

  # ---- spec grammar
  def parse(self, keyword: str, arg: str, strength: float | None, clause: str,
            draft: Draft) -> None:
    """Records one clause. Default for head kinds: an `{name}_on` [L, H] leaf set True
    on the named heads and, with takes_strength, `{name}_strength` (default 1)."""
    if self.argument != "heads":
      draft.leaves.update(self._flag_on())
      return
    notes = draft.notes.setdefault(self.name, {})
    for hd in draft.heads(arg):
      old = notes.get(hd)
      s = 1.0 if strength is None else strength
      if old is not None and old[0] != s:
        raise ValueError(f"clauses {old[1]!r} and {clause!r} give {head_name(hd)} two "
                         f"strengths ({old[0]:g}, {s:g}); give one")
      notes.setdefault(hd, (s, clause))
      draft.claim(hd, self.claim_role, self.name, clause)

  def _flag_on(self) -> Clamps:
    return {self.name: np.ones((), bool)}

  def finish(self, draft: Draft) -> None:
    """Writes the leaves from what `parse` recorded (called once per spec)."""
    if self.argument != "heads":
      return
    for hd, (s, _) in draft.notes.get(self.name, {}).items():
      draft.leaves[f"{self.name}_on"][hd] = True
      if self.takes_strength:
        draft.leaves[f"{self.name}_strength"][hd] = s

  def check(self, draft: Draft) -> None:
    """Validation of the finished condition with the clauses at hand (after every
    kind's finish); default: `validate` on the leaves."""
    self.validate(draft.leaves)

  def validate(self, c: Clamps) -> None:
    """Validation of one run's condition from its leaves alone (also after `combine`)."""

  def describe(self, c: Clamps, donors: Sequence[str] = ()) -> list[str]:
    """Clauses that parse back to this kind's leaves of `c` (one run)."""
    if self.argument != "heads":
      return [self.name] if bool(np.asarray(c[self.name])) else []
    out = []
    for l, h in np.argwhere(np.asarray(c[f"{self.name}_on"])):
      s = float(np.asarray(c[f"{self.name}_strength"])[l, h]) if self.takes_strength else 1.0
      out.append(f"{self.name}:{head_name((l, h))}" + ("" if s == 1.0 else f"@{s:g}"))
    return out

  def heads_touched(self, c: Clamps) -> dict[Head, str]:
    """Heads this kind's leaves of `c` change, with a reason (for head choice in
    analysis: a touched head is not a free head of the model)."""
    if self.argument != "heads" or f"{self.name}_on" not in c:
      return {}
    why = (f"pattern clamped ({self.name})" if self.claim_role == "pattern" else
           "ablated" if self.claim_role == "ablated" else f"clamped ({self.name})")
    return {(int(l), int(h)): why for l, h in np.argwhere(np.asarray(c[f"{self.name}_on"]))}

  def replaced_layers(self, c: Clamps) -> dict[int, str]:
    """Layers this kind's leaves of `c` replace wholesale, with a reason."""
    return {}

  def combine(self, base: Clamps, extra: Clamps, out: Clamps) -> None:
    """Writes into `out` this kind's leaves of `extra` applied on top of `base` (one run
    each). Default: wherever extra's leaf differs from identity it wins."""
    ident = self.leaves(*_shape_LH(base))
    for k, idv in ident.items():
      b, e = np.asarray(base[k]), np.asarray(extra[k])
      out[k] = np.where(e != idv, e, b)

  # ---- in the model
  def needs_clean_pass(self, stacked: Clamps, active: Mapping[str, np.ndarray]) -> bool:
    """Given the [R] use masks of every kind, does a program need the clean pass for it?"""
    return self.uses_clean_pass

  def prepare(self, c: Clamps, batch: Any, cfg: Any, tools: Any) -> Clamps:
    """Extra leaves computed before the forward pass, outside the model (graft)."""
    return {}

  def pre_pass(self, c: Clamps, tools: PassTools) -> dict[str, Any] | None:
    """An extra forward pass inside the model before the main one; its recorded
    activations are readable with ctx.from_pass(kind, name)."""
    return None

  def edit(self, x: Any, c: Clamps, ctx: EditContext) -> Any:
    """The edited activation at ctx.site (ctx.layer), same shape and dtype as x."""
    raise NotImplementedError


def _shape_LH(c: Clamps) -> tuple[int, int]:
  """(L, H) of a condition, from the ablation mask every condition carries."""
  return tuple(int(v) for v in np.shape(c["v_keep"])[-2:])  # type: ignore[return-value]


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Intervention] = {}
_KEYWORDS: dict[str, str] = {}   # clause keyword (name or alias) -> kind name
RESERVED = ("none",)


def register(kind: Intervention, *, replace: bool = False) -> Intervention:
  """Adds an intervention kind; its clauses parse and its edits compile from now on.

  replace=True swaps a kind of the same name (re-running a notebook cell).
  """
  if not kind.name or not re.fullmatch(r"[a-z][a-z0-9_]*", kind.name):
    raise ValueError(f"intervention name {kind.name!r} must be lower-case letters, digits "
                     "and '_' (it is the spec clause's keyword)")
  bad = [s for s in kind.sites if s not in SITES]
  if bad or not kind.sites:
    raise ValueError(f"intervention {kind.name!r}: sites {list(kind.sites)} must be a non-empty "
                     f"subset of {list(SITES)}")
  bad_tasks = [t for t in kind.tasks if t not in TASKS]
  if bad_tasks:
    raise ValueError(f"intervention {kind.name!r}: unknown tasks {bad_tasks}; allowed {TASKS}")
  if kind.argument not in ("heads", "name", "none"):
    raise ValueError(f"intervention {kind.name!r}: argument must be 'heads', 'name' or 'none', "
                     f"got {kind.argument!r}")
  if kind.claim_role not in ("pattern", "clamped", "ablated"):
    raise ValueError(f"intervention {kind.name!r}: claim_role must be 'pattern', 'clamped' or "
                     f"'ablated', got {kind.claim_role!r}")
  if kind.name in _REGISTRY and not replace:
    raise ValueError(f"intervention {kind.name!r} is already registered (pass replace=True "
                     "to swap it)")
  if kind.name in _REGISTRY:
    if kind.name in BUILTIN:
      raise ValueError(f"{kind.name!r} is a built-in intervention; register yours under "
                       "another name")
    unregister(kind.name)
  keywords = (kind.name,) + tuple(kind.aliases)
  for kw in keywords:
    if kw in _KEYWORDS or kw in RESERVED:
      raise ValueError(f"clause keyword {kw!r} of {kind.name!r} is already taken"
                       + (f" by {_KEYWORDS[kw]!r}" if kw in _KEYWORDS else ""))
  mine = set(kind.leaves(2, 2))
  for other in _REGISTRY.values():
    clash = mine & set(other.leaves(2, 2))
    if clash:
      raise ValueError(f"intervention {kind.name!r}: leaves {sorted(clash)} are already "
                       f"{other.name!r}'s; name your leaves after your kind")
  _REGISTRY[kind.name] = kind
  for kw in keywords:
    _KEYWORDS[kw] = kind.name
  return kind


BUILTIN: set[str] = set()  # filled by ih_jax.interventions.builtin; never unregistered


def unregister(name: str) -> None:
  """Removes a registered kind and its keywords; built-in or unknown kinds raise ValueError."""
  if name in BUILTIN:
    raise ValueError(f"{name!r} is a built-in intervention and cannot be unregistered")
  kind = _REGISTRY.pop(name, None)
  if kind is None:
    raise ValueError(f"no intervention {name!r} is registered")
  for kw in [k for k, v in _KEYWORDS.items() if v == name]:
    del _KEYWORDS[kw]


def registered() -> tuple[Intervention, ...]:
  """Every kind, built-ins first, in registration order."""
  return tuple(_REGISTRY.values())


def get(name: str) -> Intervention:
  """The registered kind named `name`; a ValueError lists the registered ones otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f"no intervention {name!r} is registered; registered: "
                     f"{', '.join(_REGISTRY)} (a kind of your own must be registered, e.g. "
                     "by importing the module that defines it, before it is used)")
  return _REGISTRY[name]


def by_keyword(keyword: str) -> Intervention | None:
  """The kind a clause keyword (its name or an alias) selects, or None."""
  name = _KEYWORDS.get(keyword)
  return None if name is None else _REGISTRY[name]


def keywords() -> tuple[str, ...]:
  """Every registered clause keyword (kind names and aliases)."""
  return tuple(_KEYWORDS)
