"""The token-level induction task (ih_jax.data.tokens): random token sequences with one
segment repeated; next-token loss at every position; head scores from the patterns."""

from __future__ import annotations

from typing import Any

import jax

from ih_jax import metrics
from ih_jax.data import tokens as tokens_lib
from ih_jax.tasks.core import Forward, register
from ih_jax.tasks.sequence import SequenceTask

EVAL_SET = "tokens"


@register
class TokenTask(SequenceTask):
  """ExperimentConfig.tokens sets the layout; the eval set is "tokens"."""
  name = "tokens"

  def __init__(self, cfg: Any = None, seq_len: int = 32):
    super().__init__(cfg)
    self._seq_len = seq_len

  @property
  def seq_len(self) -> int:  # type: ignore[override]
    """T, from ExperimentConfig.tokens (or the constructor's, without a config)."""
    return self.cfg.tokens.seq_len if self.cfg is not None else self._seq_len

  @property
  def eval_size(self) -> int:  # type: ignore[override]
    """tokens.eval_size."""
    return self.cfg.tokens.eval_size

  def check(self) -> None:
    """T, from ExperimentConfig.tokens (or the constructor without a config)."""
    self.cfg.tokens.check(self.cfg.model.vocab_size)

  def sample_sequences(self, key: jax.Array, batch_size: int) -> tokens_lib.TokenBatch:
    """Sequences of the configured layout (ih_jax.data.tokens)."""
    return tokens_lib.sample_tokens(key, self.cfg.tokens, self.cfg.model.vocab_size, batch_size)

  def induction_targets(self, batch: tokens_lib.TokenBatch) -> jax.Array:
    """The declared layout's copy targets (ih_jax.data.tokens.copy_targets)."""
    # The declared layout's targets: accidental earlier copies (frequent with small V)
    # are ignored.
    return tokens_lib.copy_targets(batch)

  def evaluate(self, forward: Forward, batch: Any, many_runs: bool) -> dict[str, Any]:
    """ih_jax.metrics.token_metrics, with the head scores from the recorded patterns."""
    # Every position scored; head scores from the recorded patterns.
    sites = [f"blocks.{l}.pattern" for l in range(self.cfg.model.num_layers)]
    logits, aux = forward(batch, sites=tuple(sites))
    return metrics.token_metrics(logits, batch, [aux[s] for s in sites],
                                 self.cfg.tokens.segment_len, self.cfg.tokens.late_frac)

  def eval_set_names(self) -> list[str]:
    """["tokens"]."""
    return [EVAL_SET]

  @property
  def metric_names(self) -> tuple[str, ...]:
    """ih_jax.metrics.TOKEN_METRIC_NAMES."""
    return metrics.TOKEN_METRIC_NAMES


def eval_set(cfg: Any, num_variants: int = 1) -> tokens_lib.TokenBatch:
  """The token task's fixed eval set of `cfg` (from eval_seed), with a leading [V] axis."""
  task = TokenTask(cfg)
  return task.setup([cfg] * num_variants).eval_batches[EVAL_SET]
