"""FlatParams: one run's params as a single flat vector, the form the training loop carries."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class FlatParams:
  """One run's params as a single flat vector [P] (and back), for the training loop.

  The loop carries each run's params and its optimizer's params-shaped moments flat:
  Adam is elementwise, so it then runs as a few fused ops per step instead of a few
  per parameter leaf (19 leaves in the paper's model). The math is unchanged; XLA fuses
  it differently, so float rounding differs (1e-7 relative on gradients; Adam turns that
  into up to +-lr on parameters whose gradient is at noise level, e.g. key biases when
  the scores are shift-invariant). Checkpoints, results and TrainState keep the usual
  trees: the chunk flattens on entry and unflattens on exit.
  """
  PAD = 64

  def __init__(self, template: Any):
    self.template = template
    leaves, self.treedef = jax.tree.flatten(template)
    dtypes = {l.dtype for l in leaves}
    if len(dtypes) != 1:
      raise ValueError(f"flat params need one dtype, got {sorted(map(str, dtypes))}")
    self.shapes = [l.shape for l in leaves]
    sizes = [int(np.prod(s)) for s in self.shapes]
    self.offsets = np.cumsum(sizes).tolist()  # the last one is where the padding starts
    # Zero padding to a multiple of PAD: XLA:CPU's loop emitter vectorises Adam's fused
    # update (sqrt, divide) only for such lengths (67,141 -> 67,200 floats: ~75 -> ~24 us
    # per update on 2 cores, BUILD_NOTES.md). The padding gets zero gradients, so it stays 0.
    self.size = -(-sum(sizes) // self.PAD) * self.PAD

  def is_params(self, x: Any) -> bool:
    """Whether `x` has the params tree's structure (e.g. an Adam moment)."""
    return jax.tree.structure(x) == self.treedef

  def ravel(self, tree: Any) -> jax.Array:
    """A params tree -> one flat [P] vector (leaves in tree order, zero-padded to `size`)."""
    leaves = [x.reshape(-1) for x in jax.tree.leaves(tree)]
    pad = jnp.zeros((self.size - self.offsets[-1],), leaves[0].dtype)
    return jnp.concatenate(leaves + [pad])

  def unravel(self, flat_P: jax.Array) -> Any:
    """A flat [P] vector -> the params tree (the padding is dropped)."""
    # jnp.split's transpose is one concatenate: the gradient arrives flat, cheaply.
    parts = jnp.split(flat_P, self.offsets)[:-1]
    return jax.tree.unflatten(self.treedef, [p.reshape(s) for p, s in zip(parts, self.shapes)])

  def ravel_state(self, params_R: Any, opt_state_R: Any) -> tuple[jax.Array, Any]:
    """Runs-stacked params and optimizer state -> ([R, P], state with [R, P] moments)."""
    ravel_R = jax.vmap(self.ravel)
    opt = jax.tree.map(lambda x: ravel_R(x) if self.is_params(x) else x, opt_state_R,
                       is_leaf=self.is_params)
    return ravel_R(params_R), opt

  def unravel_state(self, params_RP: jax.Array, flat_opt_R: Any, like_opt_R: Any
                    ) -> tuple[Any, Any]:
    """The inverse of ravel_state; `like_opt_R` is a state of the tree form (its structure)."""
    unravel_R = jax.vmap(self.unravel)
    opt = jax.tree.map(lambda like, x: unravel_R(x) if self.is_params(like) else x,
                       like_opt_R, flat_opt_R, is_leaf=self.is_params)
    return unravel_R(params_RP), opt
