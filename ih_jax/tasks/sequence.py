"""Next-token tasks: the model side and trainer side shared by every task whose inputs
are token sequences and whose loss is next-token prediction at every position.

A researcher's sequence task subclasses SequenceTask, names itself, and writes
`sample_sequences(key, batch_size)` (a pytree with `tokens` [B, T] int32); everything else
(token embedding, readout at every position, loss, eval set, metrics) is inherited and
can be overridden. `induction_targets(batch)` tells interventions such as `ih` where an
ideal induction head attends (by default: after the last earlier copy of each token).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ih_jax import metrics
from ih_jax.data import tokens as tokens_lib
from ih_jax.tasks.core import Forward, Task, TaskData

# pylint: disable=invalid-name


class SequenceTask(Task):
  """Base class of next-token tasks (the vocabulary is ModelConfig.vocab_size)."""
  family = "tokens"
  seq_len: ClassVar[int] = 32      # T, for shaping the params at init
  eval_size: ClassVar[int] = 1000  # sequences in the fixed eval set

  def sample_sequences(self, key: jax.Array, batch_size: int) -> Any:
    """In-graph: `batch_size` sequences, a pytree with `tokens` [B, T] int32."""
    raise NotImplementedError

  def induction_targets(self, batch: Any) -> jax.Array:
    """[B, T] int32: the key an ideal induction head attends to at each row (-1 = none)."""
    return tokens_lib.induction_targets(batch.tokens)

  # ---------------------------------------------------------------- model side
  def output_size(self, model_cfg: Any) -> int:
    """V, the vocabulary (ModelConfig.vocab_size)."""
    return model_cfg.vocab_size

  def create_embeddings(self, model: Any) -> None:
    """A token table `embed_tok` [V, d]."""
    # Unit-variance rows, like the few-shot exemplar embedding of ~unit-variance features.
    model.embed_tok = nn.Embed(model.cfg.vocab_size, model.cfg.d_model,
                               embedding_init=nn.initializers.normal(1.0))

  def embed(self, model: Any, inputs: Any, labels: Any, *, fuse_block0: bool,
            max_fused_batch: int) -> tuple[jax.Array, None]:
    """The token embeddings (no fused block-0 projection)."""
    return model.embed_tok(inputs), None

  def model_inputs(self, batch: Any) -> tuple[Any, Any]:
    """(tokens [B, T], induction targets [B, T])."""
    return batch.tokens, self.induction_targets(batch)

  def init_inputs(self, feature_dim: int) -> tuple[Any, Any]:
    """Zero tokens [1, seq_len] (no labels)."""
    return jnp.zeros((1, self.seq_len), jnp.int32), None

  # ---------------------------------------------------------------- trainer side
  def check(self) -> None:
    """Refuses a model without a vocabulary."""
    if self.cfg.model.vocab_size < 2:
      raise ValueError(f"task {self.name!r} predicts tokens: set model.vocab_size >= 2, got "
                       f"{self.cfg.model.vocab_size}")

  def setup(self, variant_cfgs: list[Any]) -> TaskData:
    """A fixed eval set from eval_seed, shared by every variant."""
    V = len(variant_cfgs)
    # A fixed eval set from eval_seed, the same for every variant.
    key = jax.random.fold_in(jax.random.key(self.cfg.train.eval_seed), 0)
    batch = self.sample_sequences(key, self.eval_size)
    batch_V = jax.tree.map(lambda x: jnp.broadcast_to(x, (V,) + x.shape), batch)
    placeholder_V = jnp.zeros((V, 1, 1, 1), jnp.float32)  # nothing to sample from
    return TaskData(placeholder_V, {name: batch_V for name in self.eval_set_names()})

  def sample(self, key: Any, per_variant: Any, shared: Any, batch_size: int) -> Any:
    """`sample_sequences(key, batch_size)` (sequence tasks sample from nothing)."""
    return self.sample_sequences(key, batch_size)

  def loss(self, forward: Forward, batch: Any) -> jax.Array:
    """Mean next-token cross-entropy over every position."""
    return metrics.next_token_loss(forward(batch)[0], batch.tokens)

  def evaluate(self, forward: Forward, batch: Any, many_runs: bool) -> dict[str, Any]:
    """Next-token loss and accuracy over every position."""
    logits = forward(batch)[0]
    hit = jnp.argmax(logits[:, :-1], -1) == batch.tokens[:, 1:]
    return dict(loss=metrics.next_token_nll(logits, batch.tokens).mean(),
                acc=hit.astype(jnp.float32).mean())

  def eval_set_names(self) -> list[str]:
    """One eval set, named after the task."""
    return [self.name]

  @property
  def metric_names(self) -> tuple[str, ...]:
    """("loss", "acc")."""
    return ("loss", "acc")
