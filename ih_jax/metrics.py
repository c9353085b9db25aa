"""In-graph losses and evaluation metrics: the few-shot query prediction and the token task
(losses, accuracies and the attention-pattern scores its metrics report)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ih_jax.data.tokens import TokenBatch

# pylint: disable=invalid-name

METRIC_NAMES = ("loss", "acc", "prob", "in_context_acc", "in_context_prob",
                "out_context_acc", "out_context_prob", "use_context_prob")
_NEG = -1e20


def query_loss(logits_BNC: jax.Array, y_BN: jax.Array) -> jax.Array:
  """Softmax cross-entropy of the last (query) logit row, averaged over the batch."""
  logp = jax.nn.log_softmax(logits_BNC[:, -1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, y_BN[:, -1:], axis=-1))


def next_token_nll(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """[B, T-1] cross-entropy of predicting token t+1 at every position t."""
  logp = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]


def next_token_loss(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over every position (the token task's training loss)."""
  return next_token_nll(logits_BTV, tokens_BT).mean()


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


# ----------------------------------------------------------------------------- token task

# Columns of a token-task run's metrics.csv (eval set "tokens"). Losses are next-token
# cross-entropies in nats, averaged over the positions named:
#   loss              every position (the training objective)
#   loss_repeated     positions whose next token is predictable by induction (second copy)
#   loss_first        the other positions (not predictable from the context)
#   acc_repeated      argmax accuracy on the repeated positions
#   icl_score         Olsson et al.'s in-context-learning score: mean loss over the last
#                     `late_frac` of positions minus that over the first (negative = the
#                     model uses its context)
#   prev_token_max    best layer-1 (code layer 0) previous-token score
#   prefix_match_max  best prefix-matching score among the heads of layers >= 2
TOKEN_METRIC_NAMES = ("loss", "loss_repeated", "loss_first", "acc_repeated", "icl_score",
                      "prev_token_max", "prefix_match_max")


def token_metrics(logits_BTV: jax.Array, batch, patterns_LBHTT: list[jax.Array],
                  segment_len: int, late_frac: float) -> dict[str, jax.Array]:
  """Each TOKEN_METRIC_NAMES entry as a scalar (mean over the eval set's sequences)."""
  tokens, rep_BT = batch.tokens, batch.repeated
  T = tokens.shape[1]
  nll_BP = next_token_nll(logits_BTV, tokens)  # P = T-1 predictions
  hit_BP = (jnp.argmax(logits_BTV[:, :-1], -1) == tokens[:, 1:]).astype(jnp.float32)
  rep_BP = rep_BT[:, :-1].astype(jnp.float32)
  mean_over = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  n = max(1, int(round(late_frac * (T - 1))))
  out = dict(loss=nll_BP.mean(), loss_repeated=mean_over(nll_BP, rep_BP),
             loss_first=mean_over(nll_BP, 1.0 - rep_BP),
             acc_repeated=mean_over(hit_BP, rep_BP),
             icl_score=nll_BP[:, -n:].mean() - nll_BP[:, :n].mean())
  out["prev_token_max"] = prev_token_score(patterns_LBHTT[0]).mean(0).max()
  later = patterns_LBHTT[1:] or patterns_LBHTT
  out["prefix_match_max"] = jnp.max(jnp.stack([
      prefix_matching(p, batch, segment_len).mean(0) for p in later]))
  return out


# ----------------------------------------------------------------- token-task pattern scores

def prev_token_score(pattern_BHTT: jax.Array) -> jax.Array:
  """Mean attention from each token t >= 1 to token t-1: [B, H] from a [B, H, T, T] pattern."""
  return jnp.diagonal(pattern_BHTT, offset=-1, axis1=2, axis2=3).mean(-1)  # (t, t-1) pairs


def _copy_positions(batch: TokenBatch, T: int, segment_len):
  """(mask [B, T] of the second copy's positions, offset [B, T] = t - b + a);
  `segment_len`: S, an int or one per sequence [B]."""
  t_T = jnp.arange(T)
  a_B, b_B = batch.starts[:, 0], batch.starts[:, 1]
  if not isinstance(segment_len, int):
    segment_len = jnp.asarray(segment_len).reshape(-1, 1)
  in_copy_BT = (t_T >= b_B[:, None]) & (t_T < b_B[:, None] + segment_len)
  src_BT = jnp.clip(t_T[None] - b_B[:, None] + a_B[:, None], 0, T - 1)
  return in_copy_BT, src_BT


def _mass_at(pattern_BHTT: jax.Array, key_BT: jax.Array) -> jax.Array:
  """[B, H, T]: attention of each query row t to key key_BT[b, t]."""
  idx = jnp.broadcast_to(key_BT[:, None, :, None], pattern_BHTT.shape[:3] + (1,))
  return jnp.take_along_axis(pattern_BHTT, idx, axis=3)[..., 0]


def _masked_mean(x_BHT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  m = mask_BT[:, None, :].astype(x_BHT.dtype)
  return (x_BHT * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


def prefix_matching(pattern_BHTT: jax.Array, batch: TokenBatch, segment_len) -> jax.Array:
  """Attention from each position of the second copy to the token after its match in the
  first copy, averaged over those positions: [B, H]."""
  T = pattern_BHTT.shape[-1]
  mask, src = _copy_positions(batch, T, segment_len)
  return _masked_mean(_mass_at(pattern_BHTT, jnp.minimum(src + 1, T - 1)), mask)


def induction_strength(pattern_BHTT: jax.Array, batch: TokenBatch,
                       segment_len) -> jax.Array:
  """Prefix-matching attention minus attention to the matched token itself, [B, H],
  averaged over the second copy's positions."""
  T = pattern_BHTT.shape[-1]
  mask, src = _copy_positions(batch, T, segment_len)
  return _masked_mean(_mass_at(pattern_BHTT, jnp.minimum(src + 1, T - 1))
                      - _mass_at(pattern_BHTT, src), mask)
