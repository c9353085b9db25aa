"""The paper's few-shot task: n (exemplar, label) pairs, then a query exemplar whose
label is to be predicted from the context.

Inputs are exemplar features (one table row per exemplar, gathered as IndexedFeatures)
and labels; the model sees [e_x0, e_y0, ..., e_x(n-1), e_y(n-1), e_xq] and is scored on
the query row only (so the last layer runs at the query position alone).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ih_jax import metrics
from ih_jax.data import evalsets, features as features_lib, sampler, splits as splits_lib
from ih_jax.data.sampler import Batch, IndexedFeatures
from ih_jax.tasks.core import Forward, Task, TaskData, register

# pylint: disable=invalid-name

# Programs of several runs evaluate each set in blocks of this many sequences (lax.map):
# the runs' activations for a block stay in cache. One evaluation of the main config's
# four 1000-sequence sets, 2 CPU cores: 8 runs 144 -> 57 ms, 32 runs 777 -> 246-284 ms; a
# one-run program (one device using both cores on the whole set) keeps it whole
# (12 ms, 16 ms in blocks). BUILD_NOTES.md, session 6.
EVAL_BLOCK = 50


@register
class FewShotTask(Task):
  """The paper's task (ExperimentConfig.task: layout, splits; .data: the feature table)."""
  name = "fewshot"
  family = "fewshot"
  supports_query_only = True
  uses_features = True

  def __init__(self, cfg: Any = None, num_context: int = 2):
    super().__init__(cfg)
    self._num_context = num_context
    self._spec: sampler.SamplerSpec | None = None

  @property
  def num_context(self) -> int:
    """n, the context pairs before the query."""
    return self.cfg.task.num_context if self.cfg is not None else self._num_context

  # ---------------------------------------------------------------- model side
  def output_size(self, model_cfg: Any) -> int:
    """C, the number of labels."""
    return model_cfg.num_labels

  def create_embeddings(self, model: Any) -> None:
    """The exemplar map `embed_x` (with bias) and the label map `embed_y` (no bias)."""
    model.embed_x = nn.Dense(model.cfg.d_model)                 # exemplar embedding, with bias
    model.embed_y = nn.Dense(model.cfg.d_model, use_bias=False,  # label embedding, no bias
                             kernel_init=nn.initializers.truncated_normal(0.02))

  def embed(self, model: Any, inputs: Any, labels: Any, *, fuse_block0: bool,
            max_fused_batch: int) -> tuple[jax.Array, jax.Array | None]:
    """[e_x0, e_y0, ..., e_x(n-1), e_y(n-1), e_xq]; the query's label is never input.

    `inputs` is the gathered features [B, N, F], or an IndexedFeatures (table [U, F],
    ids [B, N]): then each distinct exemplar is embedded once and gathered, and with
    few distinct tokens block 0's projection is too (see `_embed_distinct`)."""
    if fuse_block0 and distinct_tokens(inputs, model.cfg, max_fused_batch):
      return _embed_distinct(model, inputs, labels)
    return _embed(model, inputs, labels), None

  def readout(self, logits_BTV: jax.Array) -> jax.Array:
    """The exemplar positions 0, 2, ..., 2n: logits [B, n+1, C]."""
    return logits_BTV[:, 0::2]  # the exemplar positions 0, 2, ..., 2n

  def model_inputs(self, batch: Batch) -> tuple[Any, Any]:
    """(features or IndexedFeatures, labels [B, N])."""
    return batch.x, batch.y

  def init_inputs(self, feature_dim: int) -> tuple[Any, Any]:
    """Zero features [1, n+1, F] and labels [1, n+1]."""
    n = self.num_context
    return (jnp.zeros((1, n + 1, feature_dim), jnp.float32),
            jnp.zeros((1, n + 1), jnp.int32))

  # ---------------------------------------------------------------- trainer side
  def setup(self, variant_cfgs: list[Any]) -> TaskData:
    """The variants' feature tables, the splits, the eval sets (as table rows)."""
    cfg = self.cfg
    feats = jnp.stack([jnp.asarray(features_lib.load_features(v.data)) for v in variant_cfgs])
    _, C, E, _ = feats.shape
    splits = splits_lib.make_splits(C, E, cfg.model.num_labels, cfg.task.class_split,
                                    cfg.task.exemplar_split, cfg.task.pair_weights)
    eval_idx = evalsets.make_eval_indices(cfg.train.eval_seed, splits, cfg.evaluators,
                                          cfg.task.num_context, cfg.task.bursty,
                                          cfg.model.num_labels)
    # Eval sets as table rows: each distinct exemplar is embedded once per evaluation.
    eval_batches = {k: sampler.indexed_set(feats, v) for k, v in eval_idx.items()}
    # Sets of one size get one table size (zero rows appended; each set's ids index
    # only its own rows), so they share one compiled evaluation body.
    rows: dict[Any, int] = {}
    for b in eval_batches.values():
      rows[b.x.ids.shape] = max(rows.get(b.x.ids.shape, 0), b.x.table.shape[1])
    eval_batches = {k: b._replace(x=b.x._replace(table=jnp.pad(
        b.x.table, ((0, 0), (0, rows[b.x.ids.shape] - b.x.table.shape[1]), (0, 0)))))
                    for k, b in eval_batches.items()}
    self._spec = evalsets.train_spec(splits)
    return TaskData(feats, eval_batches, splits, self._spec)

  def sampling_inputs(self, data_V: Any) -> tuple[Any, Any]:
    """(each variant's training rows, the shared lookup of those rows)."""
    spec = self._train_spec()
    table_V, lookups = jax.vmap(lambda f: sampler.compact_table(f, spec))(data_V)
    return table_V, lookups[0]  # the lookup is the same for every variant (same splits)

  def sample(self, key: Any, per_variant: Any, shared: Any, batch_size: int) -> Batch:
    """A training batch of the configured layout, as IndexedFeatures rows."""
    cfg = self.cfg
    layout = cfg.task.layout(cfg.model.num_labels)
    return sampler.sample_indexed_batch(key, per_variant, shared, self._train_spec(),
                                        batch_size, cfg.task.num_context, **layout)

  def _train_spec(self) -> sampler.SamplerSpec:
    if self._spec is None:
      raise RuntimeError("FewShotTask.setup must run before sampling (it builds the splits)")
    return self._spec

  def loss(self, forward: Forward, batch: Batch) -> jax.Array:
    """Cross-entropy of the query row (the last layer runs at the query alone)."""
    # Only the query row is scored: the last layer runs at the query position alone.
    return metrics.query_loss(forward(batch, query_only=True)[0], batch.y)

  def evaluate(self, forward: Forward, batch: Batch, many_runs: bool) -> dict[str, Any]:
    """The query metrics (ih_jax.metrics.METRIC_NAMES), in blocks for many runs."""
    query_logits = lambda b: forward(b, query_only=True)[0]
    S = batch.y.shape[0]
    if not (many_runs and S > EVAL_BLOCK and isinstance(batch.x, IndexedFeatures)):
      logits = query_logits(batch)
    else:  # blocks of EVAL_BLOCK sequences; the set padded with copies of its first rows
      n = -(-S // EVAL_BLOCK)
      pad = lambda a: jnp.concatenate([a, a[:n * EVAL_BLOCK - S]]).reshape(
          n, EVAL_BLOCK, *a.shape[1:])
      table = batch.x.table
      logits = jax.lax.map(
          lambda b: query_logits(Batch(IndexedFeatures(table, b[0]), b[1])),
          (pad(batch.x.ids), pad(batch.y))).reshape(n * EVAL_BLOCK, 1, -1)[:S]
    return {k: v.mean() for k, v in metrics.query_metrics(logits, batch.y).items()}

  def eval_set_names(self) -> list[str]:
    """The configured evaluators' names."""
    return [e.name for e in self.cfg.evaluators]

  @property
  def metric_names(self) -> tuple[str, ...]:
    """ih_jax.metrics.METRIC_NAMES."""
    return metrics.METRIC_NAMES


def distinct_tokens(x_BNF: Any, model_cfg: Any, max_batch: int) -> bool:
  """Compute block 0's input projection per distinct token (`_embed_distinct`)?

  Only for table rows (IndexedFeatures), with fewer distinct tokens (table rows +
  labels) than tokens, and for batches of at most `max_batch` sequences: on the
  1000-sequence eval sets XLA:CPU's gather of [B*T, 4d] rows costs more than the
  projection it saves. Never with learned positions: they are added before block 0,
  whose input then depends on more than the token.
  """
  if model_cfg.learned_pos or not isinstance(x_BNF, IndexedFeatures):
    return False
  B, N = x_BNF.ids.shape
  return B <= max_batch and x_BNF.table.shape[0] + model_cfg.num_labels < B * (2 * N - 1)


def _embed(model: Any, x_BNF: Any, y_BN: jax.Array) -> jax.Array:
  if isinstance(x_BNF, IndexedFeatures):
    ex_BND = model.embed_x(x_BNF.table)[x_BNF.ids]
    dtype = x_BNF.table.dtype
  else:
    ex_BND = model.embed_x(x_BNF)
    dtype = x_BNF.dtype
  B, N, _ = ex_BND.shape
  ey_BND = model.embed_y(jax.nn.one_hot(y_BN[:, :-1], model.cfg.num_labels, dtype=dtype))
  pairs = jnp.stack([ex_BND[:, :-1], ey_BND], axis=2).reshape(B, 2 * (N - 1), -1)
  return jnp.concatenate([pairs, ex_BND[:, -1:]], axis=1)


def _embed_distinct(model: Any, x: IndexedFeatures, y_BN: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """(E [B, T, d], block 0's fused qkv before RoPE [B, T, 3d]), computed per distinct token.

  Without learned positions, block 0's LayerNorm and QKV projection see only the
  token embeddings: U table rows + C labels distinct inputs (55 in training, against
  160 tokens per batch). Both are computed once per distinct token and gathered; the
  gather's backward sums each token's cotangents before the weight products.
  """
  C, D = model.cfg.num_labels, model.cfg.d_model
  U = x.table.shape[0]
  eye_CC = jnp.eye(C, dtype=x.table.dtype)
  E_tab = jnp.concatenate([model.embed_x(x.table), model.embed_y(eye_CC)], axis=0)  # [U+C, d]
  B, N = x.ids.shape
  pair_ids = jnp.stack([x.ids[:, :-1], U + y_BN[:, :-1]], axis=2).reshape(B, 2 * (N - 1))
  ids_BT = jnp.concatenate([pair_ids, x.ids[:, -1:]], axis=1)
  rows = jnp.concatenate([E_tab, model.blocks[0].qkv_rows(E_tab)], axis=-1)[ids_BT]
  return rows[..., :D], rows[..., D:]
