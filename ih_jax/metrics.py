"""Per-sequence evaluation metrics of the query prediction (SPEC §3.6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

METRIC_NAMES = ("loss", "acc", "prob", "in_context_acc", "in_context_prob",
                "out_context_acc", "out_context_prob", "use_context_prob")
_NEG = -1e20


def _acc_prob(z_BC: jax.Array, target_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  acc = (jnp.argmax(z_BC, axis=-1) == target_B).astype(jnp.float32)
  prob = jnp.take_along_axis(jax.nn.softmax(z_BC, axis=-1), target_B[:, None], axis=-1)[:, 0]
  return acc, prob


def query_metrics(logits_BNC: jax.Array, y_BN: jax.Array) -> dict[str, jax.Array]:
  """Each metric as a [B] array. K = the set of labels present in the context."""
  z = logits_BNC[:, -1]
  C = z.shape[-1]
  target = y_BN[:, -1]
  in_ctx_BC = jax.nn.one_hot(y_BN[:, :-1], C, dtype=bool).any(axis=1)
  logp = jax.nn.log_softmax(z, axis=-1)
  out = dict(loss=-jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0])
  out["acc"], out["prob"] = _acc_prob(z, target)
  out["in_context_acc"], out["in_context_prob"] = _acc_prob(jnp.where(in_ctx_BC, z, _NEG), target)
  out["out_context_acc"], out["out_context_prob"] = _acc_prob(jnp.where(in_ctx_BC, _NEG, z), target)
  out["use_context_prob"] = jnp.sum(jnp.where(in_ctx_BC, jnp.exp(logp), 0.0), axis=-1)
  return out
