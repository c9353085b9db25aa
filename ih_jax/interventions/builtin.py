"""The paper's clamps, each one intervention kind (registered when ih_jax.clamps loads).

  ablate:HEADS / keep_only:HEADS   value ablation (values site)
  pt:HEADS[@s]                     previous-token pattern clamp (pattern site)
  ih:HEADS[@s] (alias match)       induction ("perfect match") pattern clamp
  copy:HEAD                        perfect copy from a last-layer head (logits site)
  perfect_l1                       perfect previous-token input into layer L2+ (pattern,
                                   resid sites; one extra pass)
  graft:NAME                       the residual after block L1 := a frozen donor's
  preserve_pattern / preserve_value  patterns / values := a clean pass's

Precedence at a site follows `order`: pattern: computed < preserved (10) < perfect
L1 (20) < PT (30) < IH (40, the query row); values: computed < preserved (10) <
ablation (20); resid after block L1: graft (10), perfect L1 (20).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax.interventions import core, targets
from ih_jax.interventions.core import Clamps, Draft, EditContext, Head, head_name

# pylint: disable=invalid-name


def _head_mask(L: int, H: int) -> np.ndarray:
  return np.zeros((L, H), bool)


def _layer0_touched(c: Clamps) -> bool:
  """Does any kind clamp or ablate a head of layer L1 in condition c?"""
  return any(l == 0 for kind in core.registered() for (l, _) in kind.heads_touched(c))


def _replacing_block0(c: Clamps, what: str) -> None:
  """perfect_l1 and graft replace layer L1: nothing may clamp its heads or preserve."""
  if _layer0_touched(c):
    raise ValueError(f"{what}, so clamps or ablations on L1 heads make no sense with it; "
                     "name L2+ heads only")
  name = what.split()[0]
  if bool(np.asarray(c["preserve_pattern"])) or bool(np.asarray(c["preserve_value"])):
    raise ValueError(f"{name} cannot be combined with preserve_pattern/preserve_value")


class PrevToken(core.Intervention):
  """Clamps a head's whole pattern to attend to the previous token (mass s; 1 - s on
  itself; row 0 on key 0)."""
  name = "pt"
  sites = ("pattern",)
  order = 30
  takes_strength = True
  claim_role = "pattern"

  def leaves(self, num_layers: int, num_heads: int) -> Clamps:
    return {f"{self.name}_on": _head_mask(num_layers, num_heads),
            f"{self.name}_strength": np.ones((num_layers, num_heads), np.float32)}

  def active_runs(self, stacked: Clamps, identity: Clamps) -> np.ndarray:
    on = np.asarray(stacked[f"{self.name}_on"])  # (a strength alone changes nothing)
    return on.reshape(on.shape[0], -1).any(axis=1)

  def combine(self, base: Clamps, extra: Clamps, out: Clamps) -> None:
    on = np.asarray(extra[f"{self.name}_on"])
    out[f"{self.name}_strength"] = np.where(on, extra[f"{self.name}_strength"],
                                            base[f"{self.name}_strength"])
    out[f"{self.name}_on"] = np.asarray(base[f"{self.name}_on"]) | on

  def edit(self, A_BHQT: jax.Array, c: Clamps, ctx: EditContext) -> jax.Array:
    l, T = ctx.layer, ctx.seq_len
    P_HTT = targets.prev_token_pattern(T, c["pt_strength"][l])
    # A may hold only the last rows (the last layer at the query alone).
    return jnp.where(c["pt_on"][l][None, :, None, None], P_HTT[None, :, T - A_BHQT.shape[2]:],
                     A_BHQT)


class Induction(PrevToken):
  """Clamps a head's pattern to the perfect induction pattern built from the labels:
  few-shot: the query row (mass s on the label tokens matching the query's label);
  token task: every row of the sequence's second copy (ih_jax.interventions.targets)."""
  name = "ih"
  aliases = ("match",)
  order = 40

  def parse(self, keyword: str, arg: str, strength: float | None, clause: str,
            draft: Draft) -> None:
    for hd in draft.heads(arg):
      if hd[0] == 0:
        raise ValueError(
            f"ih clamp on {head_name(hd)}: an induction (match) clamp needs a previous layer "
            "to compose with; use a head in layer L2 or later"
            + (" (this model has a single layer)" if draft.num_layers == 1 else ""))
    super().parse(keyword, arg, strength, clause, draft)

  def edit(self, A_BHQT: jax.Array, c: Clamps, ctx: EditContext) -> jax.Array:
    l, T = ctx.layer, ctx.seq_len
    on_H = c["ih_on"][l]
    if ctx.task == "tokens":  # every row; labels = the oracle copy targets
      P_BHTT = targets.token_induction_pattern(ctx.labels, c["ih_strength"][l])
      return jnp.where(on_H[None, :, None, None], P_BHTT[:, :, T - A_BHQT.shape[2]:], A_BHQT)
    row_BHT = targets.induction_row(ctx.labels, c["ih_strength"][l])
    return A_BHQT.at[:, :, -1].set(jnp.where(on_H[None, :, None], row_BHT, A_BHQT[:, :, -1]))


class Ablate(core.Intervention):
  """Value ablation: the head's values (so its output, not the output bias) are zero.
  `keep_only:HEADS` ablates every other head of the layers named; several keep_only
  clauses on one layer keep the union of their heads."""
  name = "ablate"
  aliases = ("keep_only",)
  sites = ("values",)
  order = 20
  claim_role = "ablated"

  def leaves(self, num_layers: int, num_heads: int) -> Clamps:
    return dict(v_keep=np.ones((num_layers, num_heads), np.float32))

  def parse(self, keyword: str, arg: str, strength: float | None, clause: str,
            draft: Draft) -> None:
    notes = draft.notes.setdefault(self.name, dict(ablated={}, kept={}, keep_clauses={}))
    heads = draft.heads(arg)
    if keyword == "ablate":
      for hd in heads:
        notes["ablated"].setdefault(hd, clause)
      return
    for l in sorted({l for l, _ in heads}):
      notes["keep_clauses"].setdefault(l, []).append(clause)
    for hd in heads:
      notes["kept"].setdefault(hd[0], {}).setdefault(hd, clause)

  def finish(self, draft: Draft) -> None:
    notes = draft.notes.get(self.name)
    if not notes:
      return
    ablated, kept = dict(notes["ablated"]), notes["kept"]
    for hd, clause in ablated.items():
      if hd in kept.get(hd[0], {}):
        raise ValueError(f"clauses {kept[hd[0]][hd]!r} and {clause!r} contradict: the first "
                         f"keeps {head_name(hd)}, the second ablates it")
    for l, heads_kept in kept.items():
      for h in range(draft.num_heads):
        if (l, h) not in heads_kept:
          ablated.setdefault((l, h), ";".join(notes["keep_clauses"][l]))
    for hd, clause in ablated.items():
      draft.leaves["v_keep"][hd] = 0.0
      draft.claim(hd, "ablated", self.name, clause)

  def describe(self, c: Clamps, donors: Sequence[str] = ()) -> list[str]:
    return [f"ablate:{head_name((l, h))}" for l, h in np.argwhere(np.asarray(c["v_keep"]) != 1)]

  def heads_touched(self, c: Clamps) -> dict[Head, str]:
    return {(int(l), int(h)): "ablated" for l, h in np.argwhere(np.asarray(c["v_keep"]) != 1)}

  def combine(self, base: Clamps, extra: Clamps, out: Clamps) -> None:
    out["v_keep"] = np.asarray(base["v_keep"]) * np.asarray(extra["v_keep"])

  def edit(self, v_BHTK: jax.Array, c: Clamps, ctx: EditContext) -> jax.Array:
    return v_BHTK * c["v_keep"][ctx.layer][None, :, None, None]


class Copy(core.Intervention):
  """Perfect copy: the query's logit for label y_c := the copying last-layer head's
  (pre-softmax) score on label token c, from an unclamped pass."""
  name = "copy"
  sites = ("logits",)
  order = 10
  tasks = ("fewshot",)

  def leaves(self, num_layers: int, num_heads: int) -> Clamps:
    return dict(copy_on=np.zeros((num_heads,), bool))

  def parse(self, keyword: str, arg: str, strength: float | None, clause: str,
            draft: Draft) -> None:
    heads = draft.heads(arg)
    if len(heads) != 1 or self.name in draft.notes:
      raise ValueError(f"perfect copy takes exactly one head, got {draft.spec!r}")
    draft.notes[self.name] = heads[0]
    draft.claim(heads[0], "clamped", self.name, clause)

  def finish(self, draft: Draft) -> None:
    head = draft.notes.get(self.name)
    if head is None:
      return
    L = draft.num_layers
    if head[0] != L - 1:
      raise ValueError(f"copy from {head_name(head)}: perfect copy reads a last-layer head; "
                       f"use a head of L{L}")
    draft.leaves["copy_on"][head[1]] = True

  def _last(self, c: Clamps) -> int:
    return int(np.shape(c["v_keep"])[0]) - 1

  def describe(self, c: Clamps, donors: Sequence[str] = ()) -> list[str]:
    return [f"copy:{head_name((self._last(c), int(h)))}"
            for (h,) in np.argwhere(np.asarray(c["copy_on"]))]

  def heads_touched(self, c: Clamps) -> dict[Head, str]:
    return {(self._last(c), int(h)): "output replaced (perfect copy)"
            for (h,) in np.argwhere(np.asarray(c["copy_on"]))}

  def combine(self, base: Clamps, extra: Clamps, out: Clamps) -> None:
    b, e = np.asarray(base["copy_on"]), np.asarray(extra["copy_on"])
    if b.any() and e.any() and (b != e).any():
      raise ValueError("two different perfect-copy heads in one condition")
    out["copy_on"] = b | e

  def needs_clean_pass(self, stacked: Clamps, active: dict[str, np.ndarray]) -> bool:
    # The scores must be an unclamped pass's. A copying run that clamps nothing else
    # (perfect_l1 aside: its own pass serves) reads them from its main pass.
    others = np.zeros_like(active[self.name])
    for name, runs in active.items():
      if name not in (self.name, "perfect_l1"):
        others = others | runs
    return bool((active[self.name] & ~active["perfect_l1"] & others).any())

  def edit(self, logits_BNC: jax.Array, c: Clamps, ctx: EditContext) -> jax.Array:
    last = f"blocks.{ctx.cfg.num_layers - 1}.scores"
    src = ctx.clean(last) if self.name in ctx.plan.clean_pass_for else ctx.main(last)
    if ctx.plan.uses("perfect_l1"):
      src = jnp.where(c["perfect_l1"], ctx.from_pass("perfect_l1", last), src)
    copied = targets.copy_logits(src, ctx.labels, c["copy_on"], ctx.cfg.num_labels)
    return logits_BNC.at[:, -1].set(jnp.where(c["copy_on"].any(), copied, logits_BNC[:, -1]))


class PerfectL1(core.Intervention):
  """Perfect previous-token input into layer L2+: block L1 contributes nothing, and
  every later layer takes its pattern from a pass over the shifted embeddings
  [E0, E0, E1, ..., E(T-3), E(T-1)] (needs at least 2 layers)."""
  name = "perfect_l1"
  sites = ("pattern", "resid")
  order = 20
  tasks = ("fewshot",)
  argument = "none"
  extra_passes = 1

  def leaves(self, num_layers: int, num_heads: int) -> Clamps:
    return dict(perfect_l1=np.zeros((), bool))

  def finish(self, draft: Draft) -> None:
    if bool(draft.leaves["perfect_l1"]) and draft.num_layers < 2:
      raise ValueError("perfect_l1 replaces layer L1's output and needs at least 2 layers")

  def validate(self, c: Clamps) -> None:
    if bool(np.asarray(c["perfect_l1"])):
      _replacing_block0(c, "perfect_l1 replaces layer L1")

  def replaced_layers(self, c: Clamps) -> dict[int, str]:
    return {0: "layer L1 replaced by perfect_l1"} if bool(np.asarray(c["perfect_l1"])) else {}

  def combine(self, base: Clamps, extra: Clamps, out: Clamps) -> None:
    out["perfect_l1"] = np.asarray(bool(base["perfect_l1"]) or bool(extra["perfect_l1"]))

  def pre_pass(self, c: Clamps, tools: core.PassTools) -> dict[str, Any]:
    # Token content shifts; learned absolute positions (if any) stay at their slots.
    h = (targets.shifted_embedding(tools.embed) if tools.positions is None
         else targets.shifted_embedding(tools.token_embed) + tools.positions)
    return tools.run_layers(h, 1)

  def edit(self, x: jax.Array, c: Clamps, ctx: EditContext) -> jax.Array:
    if ctx.site == "pattern" and ctx.layer >= 1:
      return jnp.where(c["perfect_l1"], ctx.from_pass(self.name, f"blocks.{ctx.layer}.pattern"),
                       x)
    if ctx.site == "resid" and ctx.layer == 0:  # block L1 (attention and MLP) adds nothing
      return jnp.where(c["perfect_l1"], ctx.main("embed"), x)
    return x


class _Preserve(core.Intervention):
  argument = "none"
  order = 10
  uses_clean_pass = True
  clean_site = ""

  def leaves(self, num_layers: int, num_heads: int) -> Clamps:
    return {self.name: np.zeros((), bool)}

  def combine(self, base: Clamps, extra: Clamps, out: Clamps) -> None:
    out[self.name] = np.asarray(bool(base[self.name]) or bool(extra[self.name]))

  def edit(self, x: jax.Array, c: Clamps, ctx: EditContext) -> jax.Array:
    return jnp.where(c[self.name], ctx.clean(f"blocks.{ctx.layer}.{self.clean_site}"), x)


class PreservePattern(_Preserve):
  """Every layer's pattern := that of a clean (unedited) pass."""
  name = "preserve_pattern"
  sites = ("pattern",)
  clean_site = "pattern"


class PreserveValue(_Preserve):
  """Every layer's values := those of a clean (unedited) pass."""
  name = "preserve_value"
  sites = ("values",)
  clean_site = "v"


class Graft(core.Intervention):
  """Graft-in: the residual after block L1 := a frozen donor model's (its embeddings
  and its block L1); the donor is named in the sweep (sweep.donors) and its params
  travel in the condition as `graft_params` (per run, under stop_gradient)."""
  name = "graft"
  sites = ("resid",)
  order = 10
  tasks = ("fewshot",)
  argument = "name"
  extra_passes = 1

  def leaves(self, num_layers: int, num_heads: int) -> Clamps:
    return dict(graft_on=np.zeros((), bool), graft_donor=np.zeros((), np.int32))

  def parse(self, keyword: str, arg: str, strength: float | None, clause: str,
            draft: Draft) -> None:
    if arg not in draft.donors:
      raise ValueError(f"graft donor {arg!r} in {draft.spec!r} is not declared; declared "
                       f"donors: {list(draft.donors) or 'none'} (set sweep.donors to "
                       "'NAME=WORKDIR[:RUN]')")
    if bool(draft.leaves["graft_on"]):
      raise ValueError(f"{draft.spec!r} grafts twice; a run has one donor")
    draft.leaves["graft_on"] = np.ones((), bool)
    draft.leaves["graft_donor"] = np.asarray(list(draft.donors).index(arg), np.int32)

  def validate(self, c: Clamps) -> None:
    if not bool(np.asarray(c["graft_on"])):
      return
    if int(np.asarray(c["graft_donor"])) < 0:
      raise ValueError(f"graft donor index must be >= 0, got {int(c['graft_donor'])}")
    if bool(np.asarray(c["perfect_l1"])):
      raise ValueError("graft and perfect_l1 both replace the residual after layer L1; "
                       "use one of them")
    _replacing_block0(c, "graft replaces layer L1 (the donor's embeddings and block L1)")

  def describe(self, c: Clamps, donors: Sequence[str] = ()) -> list[str]:
    if not bool(np.asarray(c["graft_on"])):
      return []
    d = int(np.asarray(c["graft_donor"]))
    return [f"graft:{donors[d] if d < len(donors) else d}"]

  def replaced_layers(self, c: Clamps) -> dict[int, str]:
    return {0: "layer L1 replaced by a graft donor"} if bool(np.asarray(c["graft_on"])) else {}

  def combine(self, base: Clamps, extra: Clamps, out: Clamps) -> None:
    out["graft_on"], out["graft_donor"] = np.asarray(base["graft_on"]), np.asarray(
        base["graft_donor"])
    if bool(extra["graft_on"]):
      if bool(base["graft_on"]) and int(base["graft_donor"]) != int(extra["graft_donor"]):
        raise ValueError("two different graft donors in one condition")
      out["graft_on"], out["graft_donor"] = (np.asarray(extra["graft_on"]).copy(),
                                             np.asarray(extra["graft_donor"]).copy())

  def prepare(self, c: Clamps, batch: Any, cfg: Any, tools: Any) -> Clamps:
    if "graft_params" not in c:
      raise ValueError("a graft condition needs the donor's params in clamps['graft_params'] "
                       "(ih_jax.train.experiment adds them from sweep.donors)")
    # The donor is a constant: stop_gradient keeps its params out of this model's grads.
    donor = jax.lax.stop_gradient(c["graft_params"])
    return dict(graft_resid=tools.block0_residual(donor, batch))

  def edit(self, h_BTD: jax.Array, c: Clamps, ctx: EditContext) -> jax.Array:
    if ctx.layer != 0:
      return h_BTD
    return jnp.where(c["graft_on"], c["graft_resid"], h_BTD)


# Registration order is describe()'s clause order.
BUILTINS = (PrevToken(), Induction(), Ablate(), Copy(), PerfectL1(), PreservePattern(),
            PreserveValue(), Graft())
for _kind in BUILTINS:
  if _kind.name not in {k.name for k in core.registered()}:
    core.register(_kind)
  core.BUILTIN.add(_kind.name)
