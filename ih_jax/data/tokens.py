"""On-device sampler of the token-level induction task (Olsson et al. 2022 style).

A sequence holds `seq_len` tokens drawn i.i.d. uniformly from a vocabulary of
`vocab_size`, except that one segment of `segment_len` tokens appears twice: a
first copy starting at `a` and a second copy starting at `b >= a + segment_len`
(the second copy overwrites the random tokens there). The gap g = b - a - S is
uniform over [0, T - 2S], then `a` uniform over [0, T - 2S - g]. With a random
gap, no single relative offset finds the earlier copy (a head copying from
t - S + 1 is right for 1 / (T - 2S + 1) of sequences); predicting the second
copy needs an induction head (find the previous occurrence of the current token,
copy the token after it).

`repeated[t]` marks the positions whose *next* token is predictable by induction:
t in [b, b + S - 2] (the model sees x_t = x_{a+t-b} and must predict
x_{t+1} = x_{a+t-b+1}). Everything here is pure JAX and jit-able.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

# pylint: disable=invalid-name


@dataclasses.dataclass(frozen=True)
class TokenTaskConfig:
  """The token task's sequence layout (used when TaskConfig.kind == "tokens").

  The vocabulary size is the model's (ModelConfig.vocab_size), so it is stated once.
  """
  seq_len: int = 32        # T tokens per sequence
  segment_len: int = 10    # S: length of the repeated segment (appears twice)
  eval_size: int = 1000    # sequences in the fixed eval set "tokens"
  late_frac: float = 0.25  # icl_score: mean loss over the last / first quarter of positions

  def check(self, vocab_size: int) -> None:
    """Clear errors for a layout that cannot be sampled."""
    if vocab_size < 2:
      raise ValueError(f"the token task needs model.vocab_size >= 2, got {vocab_size}")
    if self.segment_len < 2:
      raise ValueError(f"tokens.segment_len must be >= 2 (one predictable next token), "
                       f"got {self.segment_len}")
    if self.seq_len < 2 * self.segment_len:
      raise ValueError(f"tokens.seq_len={self.seq_len} is too short for two copies of a "
                       f"segment of tokens.segment_len={self.segment_len} (need seq_len >= "
                       f"{2 * self.segment_len})")
    if self.eval_size < 1:
      raise ValueError(f"tokens.eval_size must be >= 1, got {self.eval_size}")
    if not 0.0 < self.late_frac <= 0.5:
      raise ValueError(f"tokens.late_frac must be in (0, 0.5], got {self.late_frac}")


class TokenBatch(NamedTuple):
  """A token-task batch: sequences with a repeated segment, and where induction can predict."""
  tokens: jax.Array    # [B, T] int32 in [0, V)
  repeated: jax.Array  # [B, T] bool: the next token is predictable by induction
  starts: jax.Array    # [B, 2] int32: (a, b), the starts of the first and second copy


def sample_tokens(key: jax.Array, cfg: TokenTaskConfig, vocab_size: int,
                  batch_size: int) -> TokenBatch:
  """Draws `batch_size` sequences of the layout above (deterministic in `key`)."""
  cfg.check(vocab_size)
  B, T, S = batch_size, cfg.seq_len, cfg.segment_len
  k_tok, k_a, k_b = jax.random.split(key, 3)
  tokens_BT = jax.random.randint(k_tok, (B, T), 0, vocab_size, jnp.int32)
  gap_B = jax.random.randint(k_b, (B,), 0, T - 2 * S + 1, jnp.int32)
  # a uniform over [0, T - 2S - gap], so the second copy ends by T.
  u_B = jax.random.uniform(k_a, (B,))
  a_B = jnp.minimum((u_B * (T - 2 * S - gap_B + 1)).astype(jnp.int32), T - 2 * S - gap_B)
  b_B = a_B + S + gap_B
  t_T = jnp.arange(T, dtype=jnp.int32)
  in_copy_BT = (t_T >= b_B[:, None]) & (t_T < b_B[:, None] + S)
  src_BT = jnp.clip(t_T[None] - b_B[:, None] + a_B[:, None], 0, T - 1)
  tokens_BT = jnp.where(in_copy_BT, jnp.take_along_axis(tokens_BT, src_BT, axis=1), tokens_BT)
  repeated_BT = (t_T >= b_B[:, None]) & (t_T <= b_B[:, None] + S - 2)
  return TokenBatch(tokens_BT, repeated_BT, jnp.stack([a_B, b_B], axis=1))


def copy_targets(batch: TokenBatch) -> jax.Array:
  """[B, T] int32: the oracle induction target of each row, from the declared layout.

  Rows t of the second copy (t in [b, b + S - 1]) target a + (t - b) + 1, the token
  after x_t's earlier copy; every other row gets -1. Unlike `induction_targets`,
  accidental earlier occurrences of x_t (frequent with small V) are ignored.
  """
  rep_BT = batch.repeated
  T = rep_BT.shape[1]
  # repeated = [b, b + S - 2]; one more row (b + S - 1) completes the second copy.
  in_copy_BT = rep_BT | jnp.pad(rep_BT[:, :-1], ((0, 0), (1, 0)))
  t_T = jnp.arange(T, dtype=jnp.int32)
  a_B, b_B = batch.starts[:, 0], batch.starts[:, 1]
  return jnp.where(in_copy_BT, a_B[:, None] + (t_T[None] - b_B[:, None]) + 1, -1)


def induction_targets(tokens_BT: jax.Array) -> jax.Array:
  """[B, T] int32: j + 1 for the most recent earlier j with x_j == x_t, else -1.

  The key an ideal induction head at query t attends to (the token after the
  previous occurrence of x_t); always <= t, so causal.
  """
  T = tokens_BT.shape[1]
  same_BTT = tokens_BT[:, :, None] == tokens_BT[:, None, :]          # [B, t, j]
  earlier_TT = jnp.tril(jnp.ones((T, T), bool), k=-1)
  j_T = jnp.arange(T, dtype=jnp.int32)
  last_BT = jnp.max(jnp.where(same_BTT & earlier_TT, j_T[None, None], -1), axis=2)
  return jnp.where(last_BT >= 0, last_BT + 1, -1)
