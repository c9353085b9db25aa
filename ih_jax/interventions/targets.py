"""The target activations the built-in clamps write (public layouts, pure jnp)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

COPY_FILL = -1e9    # perfect-copy logits for labels absent from the context

# pylint: disable=invalid-name


def prev_token_pattern(T: int, strength_H: jax.Array) -> jax.Array:
  """[H, T, T]: row 0 one-hot on key 0; row i>=1 has s on i-1 and 1-s on i."""
  s = strength_H[:, None, None]
  P = s * jnp.eye(T, k=-1) + (1.0 - s) * jnp.eye(T)
  return P.at[:, 0, :].set(jax.nn.one_hot(0, T))


def induction_row(y_BN: jax.Array, strength_H: jax.Array) -> jax.Array:
  """[B, H, T]: the query row of a perfect-match pattern, built from ground-truth labels.

  Mass s is spread evenly over the label tokens whose label equals the query's
  label, 1 - s over the other label tokens; exemplars and the query get 0.
  (With n = 2 and distinct context labels this is [0, s, 0, 1-s, 0] or its mirror.)
  """
  B, N = y_BN.shape
  T = 2 * N - 1
  match_Bn = (y_BN[:, :-1] == y_BN[:, -1:]).astype(jnp.float32)
  n_match = match_Bn.sum(1, keepdims=True)
  n_other = (N - 1) - n_match
  s = strength_H[None, :, None]                                      # [1, H, 1]
  w_match = jnp.where(n_match > 0, 1.0 / jnp.maximum(n_match, 1.0), 0.0)[:, None]
  w_other = jnp.where(n_other > 0, 1.0 / jnp.maximum(n_other, 1.0), 0.0)[:, None]
  on_label_BHn = (s * w_match * match_Bn[:, None] + (1.0 - s) * w_other * (1.0 - match_Bn[:, None]))
  row = jnp.zeros((B, strength_H.shape[0], T), jnp.float32)
  return row.at[:, :, 1::2].set(on_label_BHn)


def token_induction_pattern(targets_BT: jax.Array, strength_H: jax.Array) -> jax.Array:
  """[B, H, T, T]: the perfect induction pattern of the token task.

  `targets_BT` (ih_jax.data.tokens.copy_targets) holds, for each row of the second
  copy, the token after x_t's earlier copy: the row puts mass s there and 1 - s on t
  itself (as the PT clamp puts 1 - s on the diagonal). Every other row (no declared
  earlier copy) attends to key 0 (a fixed "sink", like the PT clamp's row 0), so the
  clamped head's queries and keys get no gradient from any row.
  """
  T = targets_BT.shape[1]
  has_BT = targets_BT >= 0
  s = strength_H[None, :, None, None]
  hit_BTT = jax.nn.one_hot(jnp.maximum(targets_BT, 0), T)
  P = s * hit_BTT[:, None] + (1.0 - s) * jnp.eye(T)[None, None]
  sink = jax.nn.one_hot(0, T)[None, None, None, :]
  return jnp.where(has_BT[:, None, :, None], P, sink)


def shifted_embedding(E_BTD: jax.Array) -> jax.Array:
  """Perfect previous-token input: [E0, E0, E1, ..., E(T-3), E(T-1)] (query unshifted)."""
  return jnp.concatenate([E_BTD[:, :1], E_BTD[:, :-2], E_BTD[:, -1:]], axis=1)


def copy_logits(scores_BHTT: jax.Array, y_BN: jax.Array, copy_on_H: jax.Array,
                num_labels: int) -> jax.Array:
  """Perfect copy: the query's logit for label y_c is the copying head's score on label token c.

  scores: [B, H, Tq, T] (the query is the last row). Labels absent from the context
  get COPY_FILL; if a label appears twice the larger score wins.
  """
  ell_BHn = scores_BHTT[:, :, -1, 1::2]
  ell_Bn = jnp.einsum("bhn,h->bn", ell_BHn, copy_on_H.astype(ell_BHn.dtype))
  onehot_BnC = jax.nn.one_hot(y_BN[:, :-1], num_labels, dtype=bool)
  return jnp.max(jnp.where(onehot_BnC, ell_Bn[:, :, None], COPY_FILL), axis=1)
