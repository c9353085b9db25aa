"""Warm starts: a program's runs start from another workdir's saved params.

`train.init_from = "WORKDIR[:RUN][@SEQS]"` takes run RUN (default 0) of a finished or
running workdir at SEQS sequences (default: its last saved params; SEQS must be a saved
point, `ih_jax.load(WORKDIR).run(...).snapshots()` lists them). Every run of the new
program starts from those params, except the groups in `train.reinit` (the
`train.freeze` group names: embed, unembed, L1, L2H3, L2H3.qk, ...), which take each
run's own fresh initialisation from its init seed. The optimizer state starts fresh.
The task, data and clamps of the new config may differ from the donor's; the model's
shapes must not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import freeze as freeze_lib


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a warm start's params come from: a workdir, a run index, sequences (None = last)."""
  workdir: str
  run: int
  seqs: int | None


def parse(entry: str) -> Source:
  """'WORKDIR[:RUN][@SEQS]' -> Source; a malformed entry is refused by name."""
  return Source(*ckpt_lib.parse_source(entry, f"train.init_from={entry!r}"))


def load(entry: str, template: Any) -> Any:
  """The donor's params for `entry`, checked against this model's param shapes."""
  src = parse(entry)
  if not os.path.isdir(src.workdir):
    raise ValueError(f"train.init_from={entry!r}: no workdir {src.workdir!r}")
  params = ckpt_lib.load_params(src.workdir, src.run, src.seqs, nearest=False)
  diff = _differences(_shapes(params), _shapes(template))
  if diff:
    raise ValueError(f"train.init_from={entry!r}: its params do not fit this model ({diff}); "
                     "a warm start needs the same model shapes (layers, width, labels, "
                     "feature dimension)")
  return params


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in flat}


def _differences(saved: dict[str, tuple], want: dict[str, tuple]) -> str:
  """A short account of how two {param path: shape} maps differ ('' if they do not)."""
  out = [f"{k} saved {list(saved[k])}, needed {list(want[k])}"
         for k in want if k in saved and saved[k] != want[k]]
  out += [f"{k} missing from the saved params" for k in want if k not in saved]
  out += [f"{k} saved but not in this model" for k in saved if k not in want]
  more = f" and {len(out) - 3} more" if len(out) > 3 else ""
  return "; ".join(out[:3]) + more


def combine(fresh_R: Any, donor: Any, reinit: tuple[str, ...], num_heads: int) -> Any:
  """Runs-stacked start params: the donor's everywhere but the `reinit` groups, which
  keep each run's fresh values."""
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), fresh_R)
  masks = [freeze_lib.group_mask(template, g, num_heads) for g in reinit]
  keep_fresh = (jax.tree.map(lambda *m: np.any(np.stack(m), axis=0), *masks) if masks
                else jax.tree.map(lambda t: np.zeros(t.shape, bool), template))
  return jax.tree.map(lambda f, d, m: jnp.where(m, f, jnp.asarray(d, f.dtype)[None]),
                      fresh_R, donor, keep_fresh)
