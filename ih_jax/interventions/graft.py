"""Graft donors: `sweep.donors` entries, and loading their params into a condition.

A graft condition (`graft:NAME`, ih_jax.interventions.builtin.Graft) replaces the
residual after block L1 with a frozen donor model's; the donor is a run of a finished
workdir, declared as `sweep.donors=("NAME=WORKDIR[:RUN][@SEQS]",)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax.interventions.core import Clamps

if TYPE_CHECKING:
  from ih_jax.config import ExperimentConfig


def parse_donor(entry: str) -> tuple[str, str, int, int | None]:
  """'NAME=WORKDIR[:RUN][@SEQS]' -> (name, workdir, run, seqs or None = final)."""
  name, sep, rest = entry.partition("=")
  if not sep or not name.strip() or not rest.strip():
    raise ValueError(f"sweep.donors entry {entry!r} must look like NAME=WORKDIR[:RUN][@SEQS]")
  return (name.strip(), *ckpt_lib.parse_source(rest, f"sweep.donors entry {entry!r}"))


def donor_names(cfg: ExperimentConfig) -> tuple[str, ...]:
  """The donor names of `sweep.donors`, in order (duplicates are a ValueError)."""
  names = tuple(parse_donor(d)[0] for d in cfg.sweep.donors)
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate donor names in sweep.donors {cfg.sweep.donors}")
  return names


def load_donors(cfg: ExperimentConfig, template: Any) -> list[Any]:
  """Each donor's params, checked against `template` (this model's params or shapes)."""
  out = []
  for entry in cfg.sweep.donors:
    name, workdir, run, seqs = parse_donor(entry)
    try:
      params = ckpt_lib.load_params(workdir, run, seqs)
    except (FileNotFoundError, ckpt_lib.CheckpointError, IndexError) as e:
      raise ValueError(f"graft donor {name!r} ({entry!r}): cannot load its checkpoint: "
                       f"{e}") from None
    want = jax.tree.map(lambda a: a.shape, template)
    got = jax.tree.map(lambda a: np.shape(a), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise ValueError(f"graft donor {name!r} ({entry!r}) has parameter shapes that do not "
                       f"match this model (model config {cfg.model})")
    out.append(jax.tree.map(np.asarray, params))
  return out


def add_graft_params(cfg: ExperimentConfig, stacked: Clamps, template: Any) -> Clamps:
  """Adds the per-run donor params (zeros for runs that do not graft) as `graft_params`."""
  donors = load_donors(cfg, template)
  on, which = np.asarray(stacked["graft_on"]), np.asarray(stacked["graft_donor"])
  zeros = jax.tree.map(np.zeros_like, donors[0])
  per_run = [donors[int(d)] if o else zeros for o, d in zip(on, which)]
  return dict(stacked, graft_params=jax.tree.map(lambda *xs: np.stack(xs), *per_run))
