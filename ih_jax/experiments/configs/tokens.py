"""The token-level induction task: a 2-layer attention-only model on repeated segments.

  ih-jax train --config=tokens --workdir=/tmp/ih_tokens
  ih-jax train --config=tokens:clamps=1 --workdir=/tmp/ih_tc

Sequences of 32 random tokens (vocabulary 32) in which a 10-token segment appears
twice at random places (ih_jax.data.tokens); next-token loss on every position.
With these settings the loss on the repeated positions sits on a plateau near
ln 32, then drops abruptly when an induction head forms (README, "Token-level
induction task"). `clamps=1` adds example clamp conditions (heads fixed here for
illustration; ih_jax/experiments/paper/tokens_entry.py picks them from measured scores).
"""

from ih_jax.experiments.configs import common

# The configuration of the slow science test and of --figure=tokens (BUILD_NOTES.md).
VOCAB, SEQ_LEN, SEGMENT = 32, 32, 10
LEARNING_RATE, NUM_SEQS, EVAL_EVERY = 1e-3, 96_000, 2000


def get_config(arg: str | None = None):
  """The token task's config; `clamps=1` adds pt, ih and ablate conditions."""
  opts = common.parse_arg(arg)
  cfg = common.base_config()
  cfg.task.kind = "tokens"
  cfg.model.vocab_size = VOCAB
  cfg.tokens.seq_len = SEQ_LEN
  cfg.tokens.segment_len = SEGMENT
  cfg.tokens.eval_size = 500
  cfg.train.learning_rate = LEARNING_RATE
  cfg.train.num_seqs = NUM_SEQS
  cfg.train.eval_every = EVAL_EVERY
  if opts.get("clamps", "0") not in ("0", ""):
    cfg.sweep.conditions = ("none", "pt=pt:L1H0", "ih=ih:L2H0", "ablate=ablate:L1H0")
  return cfg
