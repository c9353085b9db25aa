"""The paper's attention-only transformer, with interventions (clamps) in the graph.

Public API (pure functions; the Flax module is an implementation detail):
  init_params(key, cfg, feature_dim)                    -> params
  apply(params, batch, clamps, cfg, plan, sites=())     -> (logits [B, n+1, C], aux)
  query_loss(logits, y)                                 -> mean CE of the query row
  next_token_loss(logits, tokens)                       -> mean CE over all positions

The task (ih_jax.tasks; `task=` of init_params / apply) owns the input embeddings, what
a batch feeds the model and which positions are read out; the model holds no task
branches. Without `task=`, cfg implies a built-in: with cfg.vocab_size > 0 the *token*
model (token-level induction task: a token embedding table [V, d], `batch` a
TokenBatch, logits over V at every position [B, T, V]), else the paper's few-shot
model. Clamps that are specific to the few-shot task family (perfect copy, perfect L1,
graft) are refused on token tasks; `ih` uses the token definition of
ih_jax.interventions.targets.token_induction_pattern there.

`clamps` is one run's condition (see ih_jax.clamps); `plan` is the static
ClampPlan that decides which intervention kinds (ih_jax.interventions) and extra
passes get compiled; each kind's edit runs at its sites in the public layout. `aux` holds only the
activation sites named in `sites` (e.g. "blocks.1.pattern"); under jit the rest
is dead code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import clamps as clamps_lib
from ih_jax import tasks as tasks_lib
from ih_jax.interventions import core
from ih_jax.data.sampler import Batch
# The losses live with the metrics (the tasks use them); re-exported for callers of the model.
from ih_jax.metrics import next_token_loss, next_token_nll, query_loss  # noqa: F401

MASK_FILL = -1e20   # causal mask fill (pre-softmax), as in the authors' code

# pylint: disable=invalid-name


POS_EMB_KINDS = ("rope", "learned", "rope+learned")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The paper's model by default; the other fields generalise it beyond the paper.

  mlp_ratio: 0 = attention-only (the paper); r > 0 adds a pre-LN MLP block
    d -> r*d -> d (GELU, with biases, its own LayerNorm) after each attention block.
  pos_emb: "rope" (the paper), "learned" (learned absolute positions added to the
    embeddings, no RoPE) or "rope+learned" (both). The learned table has one row per
    token of the init sequence, T = 2*num_context + 1 (see init_params).
  """
  num_layers: int = 2
  num_heads: int = 8
  d_model: int = 64
  num_labels: int = 5
  attn_bias: bool = True   # paper version: zero-initialised QKV and output biases
  rope_base: float = 10000.0
  ln_eps: float = 1e-5     # not Flax's 1e-6 default
  mlp_ratio: int = 0       # 0 = no MLP (the paper)
  pos_emb: str = "rope"    # one of POS_EMB_KINDS
  vocab_size: int = 0      # 0 = the few-shot model; V > 0 = the token model (see above)

  def __post_init__(self):
    if self.num_layers < 1 or self.num_heads < 1 or self.num_labels < 2 or self.d_model < 1:
      raise ValueError(f"need num_layers >= 1, num_heads >= 1, d_model >= 1, num_labels >= 2; "
                       f"got {self}")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    if self.pos_emb not in POS_EMB_KINDS:
      raise ValueError(f"unknown pos_emb {self.pos_emb!r}; allowed: {', '.join(POS_EMB_KINDS)}")
    if self.use_rope and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head width; d_model/num_heads = {self.head_dim} "
                       f"(use pos_emb='learned' for odd head widths)")
    if self.vocab_size < 0 or self.vocab_size == 1:
      raise ValueError(f"vocab_size must be 0 (few-shot model) or >= 2 (token model), got "
                       f"{self.vocab_size}")
    if isinstance(self.mlp_ratio, bool) or int(self.mlp_ratio) != self.mlp_ratio \
        or self.mlp_ratio < 0:
      raise ValueError(f"mlp_ratio must be an integer >= 0 (0 = no MLP), got {self.mlp_ratio!r}")

  @property
  def head_dim(self) -> int:
    """K, the width of one head: d_model // num_heads."""
    return self.d_model // self.num_heads

  @property
  def tokens(self) -> bool:
    """The token model (token-level induction task)?"""
    return self.vocab_size > 0

  @property
  def use_rope(self) -> bool:
    """Whether queries and keys are rotated by RoPE ("rope" in pos_emb)."""
    return "rope" in self.pos_emb

  @property
  def learned_pos(self) -> bool:
    """Whether learned absolute position embeddings are added ("learned" in pos_emb)."""
    return "learned" in self.pos_emb


# Layout note. With T = 5 tokens and 8-wide heads, XLA:CPU runs per-head batched
# matmuls ([B, H, T, K] x [B, H, K, T]) very slowly. Internally the model keeps the
# heads packed in the feature axis ([B, T, D], D = H*K) and the attention pattern
# as [B, Tq, Tk, H]; the per-head contraction over K is a plain matmul with a
# constant 0/1 matrix. Recorded sites are converted to the [B, H, T, ...] layout
# only when requested (jit drops the transposes otherwise).


def head_sum_matrix(num_heads: int, head_dim: int) -> np.ndarray:
  """[H*K, H] with 1 where feature d belongs to head h (d // K == h)."""
  return np.repeat(np.eye(num_heads, dtype=np.float32), head_dim, axis=0)


@functools.lru_cache(maxsize=None)
def rope_tables(T: int, num_heads: int, head_dim: int, base: float):
  """cos, sin [T, H*K] for GPT-J interleaved pairs, repeated for every head.

  Host constants on purpose: computed in-graph, XLA fuses cos/sin into every
  consumer and recomputes them per element.
  """
  theta_J = base ** (-2.0 * np.arange(head_dim // 2) / head_dim)
  angle_TJ = np.arange(T)[:, None] * theta_J[None, :]
  angle_TD = np.tile(np.repeat(angle_TJ, 2, axis=1), (1, num_heads))  # pair j: dims 2j, 2j+1
  return np.cos(angle_TD).astype(np.float32), np.sin(angle_TD).astype(np.float32)


def rope_packed(x_BTD: jax.Array, num_heads: int, head_dim: int, base: float,
                seq_len: int | None = None) -> jax.Array:
  """GPT-J rotary embedding of heads packed in D: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c).

  seq_len: the sequence's length when x holds only its last rows (default: all).
  """
  T = x_BTD.shape[-2]
  cos, sin = rope_tables(seq_len or T, num_heads, head_dim, base)
  cos, sin = cos[cos.shape[0] - T:], sin[sin.shape[0] - T:]
  return x_BTD * cos + swap_pairs(x_BTD) * sin


def _causal_TT(Tq: int, Tk: int) -> np.ndarray:
  return np.tril(np.ones((Tk, Tk), bool))[Tk - Tq:]


# The two attention contractions below have hand-written backward passes. With T = 5
# they are written as sums over slices of the (few) positions: XLA:CPU is slow at
# reducing a middle axis. Autodiff of those slice-sums pads every slice's cotangent to
# full size and adds them (two ~100 us pad+add fusions per step); the backward passes
# here are the same slice-sums transposed, ~13% faster per training step
# (BUILD_NOTES.md). tests/test_model.py checks them against autodiff of an einsum form.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def causal_scores(q_BTD: jax.Array, k_BTD: jax.Array, num_heads: int) -> jax.Array:
  """Scaled, causally masked scores [B, Tq, Tk, H] from packed q, k.

  q may hold only the last Tq <= Tk positions (e.g. the query row alone).
  """
  Tq, D = q_BTD.shape[-2:]
  Tk = k_BTD.shape[1]
  K = D // num_heads
  prod_BTTD = jnp.stack([q_BTD * k_BTD[:, j:j + 1] for j in range(Tk)], axis=2)
  s = prod_BTTD @ (head_sum_matrix(num_heads, K) / np.sqrt(K))
  return jnp.where(_causal_TT(Tq, Tk)[None, :, :, None], s, MASK_FILL)


def _causal_scores_fwd(q_BTD, k_BTD, num_heads):
  return causal_scores(q_BTD, k_BTD, num_heads), (q_BTD, k_BTD)


def _causal_scores_bwd(num_heads, res, g_BTTH):
  q_BTD, k_BTD = res
  Tq, D = q_BTD.shape[-2:]
  Tk = k_BTD.shape[1]
  K = D // num_heads
  g_BTTH = jnp.where(_causal_TT(Tq, Tk)[None, :, :, None], g_BTTH, 0.0)  # masked: constant
  g_BTTD = g_BTTH @ (head_sum_matrix(num_heads, K).T / np.sqrt(K))
  g_q = sum(g_BTTD[:, :, j] * k_BTD[:, j:j + 1] for j in range(Tk))
  g_k = jnp.stack([sum(g_BTTD[:, i, j] * q_BTD[:, i] for i in range(Tq)) for j in range(Tk)],
                  axis=1)
  return g_q, g_k


causal_scores.defvjp(_causal_scores_fwd, _causal_scores_bwd)


@jax.custom_vjp
def attend(pattern_BTTH: jax.Array, v_BTD: jax.Array) -> jax.Array:
  """Heads' outputs concatenated in head order, [B, Tq, H*K]."""
  Tk, H, D = pattern_BTTH.shape[2], pattern_BTTH.shape[-1], v_BTD.shape[-1]
  weights_BTTD = pattern_BTTH @ head_sum_matrix(H, D // H).T
  return sum(weights_BTTD[:, :, j] * v_BTD[:, j:j + 1] for j in range(Tk))


def _attend_fwd(pattern_BTTH, v_BTD):
  return attend(pattern_BTTH, v_BTD), (pattern_BTTH, v_BTD)


def _attend_bwd(res, g_BTD):
  pattern_BTTH, v_BTD = res
  Tq, Tk, H = pattern_BTTH.shape[1:]
  hs_DH = head_sum_matrix(H, v_BTD.shape[-1] // H)
  weights_BTTD = pattern_BTTH @ hs_DH.T
  g_weights_BTTD = jnp.stack([g_BTD * v_BTD[:, j:j + 1] for j in range(Tk)], axis=2)
  g_v = jnp.stack([sum(weights_BTTD[:, i, j] * g_BTD[:, i] for i in range(Tq))
                   for j in range(Tk)], axis=1)
  return g_weights_BTTD @ hs_DH, g_v


attend.defvjp(_attend_fwd, _attend_bwd)


# Longer sequences (T > SLICE_MAX_T: the token task, few-shot tasks with n >= 4 pairs) use
# plain einsums with autodiff: the slice-sums above unroll O(T^2) ops into the graph. The
# paper's T = 5 (and any n <= 3) keeps the slice-sums. So do batches of at most
# SLICE_MAX_B sequences (training); larger ones (the 1000-sequence eval sets) take the
# einsum route, which is faster there: one evaluation of the main config's four sets
# 41 -> 29 ms on 2 CPU cores (BUILD_NOTES.md). The two routes agree to float rounding
# (tests/test_tokens.py, tests/test_model.py), not bit for bit.
SLICE_MAX_T = 8
SLICE_MAX_B = 256


def causal_scores_dense(q_BTD: jax.Array, k_BTD: jax.Array, num_heads: int) -> jax.Array:
  """causal_scores as one einsum (for long sequences); same layout [B, Tq, Tk, H]."""
  B, Tq, D = q_BTD.shape
  Tk, K = k_BTD.shape[1], D // num_heads
  s = jnp.einsum("bqhk,bthk->bqth", q_BTD.reshape(B, Tq, num_heads, K),
                 k_BTD.reshape(B, Tk, num_heads, K)) / np.sqrt(K).astype(np.float32)
  return jnp.where(_causal_TT(Tq, Tk)[None, :, :, None], s, MASK_FILL)


def attend_dense(pattern_BTTH: jax.Array, v_BTD: jax.Array) -> jax.Array:
  """attend as one einsum (for long sequences): [B, Tq, H*K]."""
  B, Tk, D = v_BTD.shape
  Tq, H = pattern_BTTH.shape[1], pattern_BTTH.shape[-1]
  out = jnp.einsum("bqth,bthk->bqhk", pattern_BTTH, v_BTD.reshape(B, Tk, H, D // H))
  return out.reshape(B, Tq, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_even(x: jax.Array, n: int) -> tuple[jax.Array, ...]:
  """Splits the last axis into n equal parts (e.g. fused Q | K | V).

  Its backward concatenates the cotangents; autodiff of slicing would pad each to
  full width and add them (a ~50-90 us fusion per layer on CPU).
  """
  D = x.shape[-1] // n
  return tuple(x[..., i * D:(i + 1) * D] for i in range(n))


split_even.defvjp(lambda x, n: (split_even(x, n), None),
                  lambda n, _, g: (jnp.concatenate(g, axis=-1),))


def to_heads(x_BTD: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, H*K] -> [B, H, T, K]: splits the packed feature axis into heads."""
  B, T, D = x_BTD.shape
  return x_BTD.reshape(B, T, num_heads, D // num_heads).transpose(0, 2, 1, 3)


def swap_pairs(x: jax.Array) -> jax.Array:
  """(x_2j, x_2j+1) -> (-x_2j+1, x_2j) along the last axis: RoPE's rotation partner."""
  pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


class FusedQKV(nn.Module):
  """The fused Q | K | V projection, with nn.Dense's params, init and math (kernel
  [d, 3d], bias [3d]); `parts` picks output column blocks ("q", "k", "v", in order),
  so a caller can skip outputs it does not need (the last layer's non-query q rows)."""
  features: int
  use_bias: bool

  @nn.compact
  def __call__(self, x: jax.Array, parts: str = "qkv") -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,)) \
        if self.use_bias else None
    if parts != "qkv":
      D = self.features // 3
      cols = lambda a: jnp.concatenate([a[..., "qkv".index(p) * D:("qkv".index(p) + 1) * D]
                                        for p in parts], axis=-1)
      kernel, bias = cols(kernel), (None if bias is None else cols(bias))
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


class Block(nn.Module):
  """One pre-LN attention block; its steps are exposed so clamps can sit between them."""
  cfg: ModelConfig

  def setup(self):
    """Creates the LayerNorm, fused QKV and output projections (and the MLP when mlp_ratio > 0)."""
    cfg = self.cfg
    self.ln = nn.LayerNorm(epsilon=cfg.ln_eps)
    self.qkv = FusedQKV(3 * cfg.d_model, use_bias=cfg.attn_bias)
    self.out = nn.Dense(cfg.d_model, use_bias=cfg.attn_bias)
    if cfg.mlp_ratio:
      self.mlp_ln = nn.LayerNorm(epsilon=cfg.ln_eps)
      self.mlp_in = nn.Dense(cfg.mlp_ratio * cfg.d_model)
      self.mlp_out = nn.Dense(cfg.d_model)

  def qkv_rows(self, h_ND: jax.Array) -> jax.Array:
    """Fused q | k | v before RoPE, [..., 3D]: a function of each row of h alone."""
    return self.qkv(self.ln(h_ND))

  def project(self, h_BTD: jax.Array, qkv_BTZ: jax.Array | None = None,
              query_only: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Packed q, k (post-RoPE), v [B, T, D]; fused layout Q | K | V, head h at hK:(h+1)K.

    qkv_BTZ: qkv_rows(h_BTD) when the caller already has it (the few-shot task's
      distinct-token embedding).
    query_only: q at the last position only ([B, 1, D]); k, v still at every position.
    """
    cfg = self.cfg
    T = h_BTD.shape[1]
    if qkv_BTZ is not None or not query_only:
      q, k, v = split_even(self.qkv_rows(h_BTD) if qkv_BTZ is None else qkv_BTZ, 3)
      if query_only:
        q = q[:, -1:]
    else:  # q of the last row alone: 1/T of q's projection work
      x_BTD = self.ln(h_BTD)
      q = self.qkv(x_BTD[:, -1:], "q")
      k, v = split_even(self.qkv(x_BTD, "kv"), 2)
    if not cfg.use_rope:
      return q, k, v
    r = lambda x: rope_packed(x, cfg.num_heads, cfg.head_dim, cfg.rope_base, seq_len=T)
    return r(q), r(k), v

  def output(self, head_out_BTD: jax.Array) -> jax.Array:
    """The output projection of the packed head outputs [B, T, D] -> [B, T, d]."""
    return self.out(head_out_BTD)

  def mlp(self, h_BTD: jax.Array) -> jax.Array:
    """The MLP branch (per position): W_out gelu(W_in LN(h) + b_in) + b_out."""
    return self.mlp_out(nn.gelu(self.mlp_in(self.mlp_ln(h_BTD))))


class LearnedPositions(nn.Module):
  """Learned absolute position embeddings [T_max, d]; T_max = the init sequence length."""
  d_model: int

  @nn.compact
  def __call__(self, T: int) -> jax.Array:
    if self.has_variable("params", "embedding"):
      table = self.get_variable("params", "embedding")
      if T > table.shape[0]:
        raise ValueError(f"sequence of {T} tokens, but the learned position table has "
                         f"{table.shape[0]} rows (init_params sets it: T = 2 * num_context + 1 "
                         f"on the few-shot task, tokens.seq_len on the token task)")
      return table[:T]
    return self.param("embedding", nn.initializers.truncated_normal(0.02), (T, self.d_model))


class Transformer(nn.Module):
  """The Flax module behind `init_params` and `apply`: embeddings, blocks and unembedding,
  with each step a method so that interventions can run between them. The task
  (ih_jax.tasks) owns the input embeddings and says which positions are read out."""
  cfg: ModelConfig
  task: Any = None  # an ih_jax.tasks.Task; None = the one cfg implies (tasks.for_model)

  def io(self) -> tasks_lib.Task:
    """The task whose inputs this model embeds and whose predictions it reads out."""
    return self.task if self.task is not None else tasks_lib.for_model(self.cfg)

  def setup(self):
    """Creates the task's input embeddings, the blocks, the learned positions if used,
    the final LayerNorm and the unembedding."""
    cfg = self.cfg
    self.io().create_embeddings(self)
    self.blocks = [Block(cfg) for _ in range(cfg.num_layers)]
    if cfg.learned_pos:
      self.pos_embed = LearnedPositions(cfg.d_model)
    self.ln_f = nn.LayerNorm(epsilon=cfg.ln_eps)
    self.unembed = nn.Dense(self.io().output_size(cfg))

  def embed(self, x_BNF, y_BN: jax.Array) -> jax.Array:
    """[e_x0, e_y0, ..., e_x(n-1), e_y(n-1), e_xq]; the query's label is never input.

    `x_BNF` is the gathered features [B, N, F], or an IndexedFeatures (table [U, F],
    ids [B, N]): then each distinct exemplar is embedded once and gathered.
    The token model embeds `x_BNF` = tokens [B, T] (y is unused). (The task's `embed`.)
    """
    return self.io().embed(self, x_BNF, y_BN, fuse_block0=False, max_fused_batch=0)[0]

  def positions(self, T: int):
    """Learned absolute positions [T, d], or None (RoPE only: the paper)."""
    return self.pos_embed(T) if self.cfg.learned_pos else None

  def embed_with_positions(self, x_BNF, y_BN) -> tuple[jax.Array, jax.Array | None]:
    """(E, P): the residual stream's input E (token embeddings + P) and P (or None)."""
    E = self.embed(x_BNF, y_BN)
    P = self.positions(E.shape[1])
    return (E if P is None else E + P), P

  def project(self, layer: int, h_BTD, qkv_BTZ=None, query_only: bool = False):
    """Block `layer`'s packed q, k (post-RoPE), v (see `Block.project`)."""
    return self.blocks[layer].project(h_BTD, qkv_BTZ, query_only)

  def output(self, layer: int, head_out_BTZ):
    """Block `layer`'s output projection of the packed head outputs."""
    return self.blocks[layer].output(head_out_BTZ)

  def mlp(self, layer: int, h_BTD):
    """Block `layer`'s MLP branch (see `Block.mlp`)."""
    return self.blocks[layer].mlp(h_BTD)

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Final LayerNorm and unembedding at the task's prediction positions: [B, T, V] for
    the token model; few-shot: the exemplar positions 0, 2, ..., 2n, [B, n+1, C]."""
    return self.io().readout(self.unembed(self.ln_f(h_BTD)))


def init_params(key: jax.Array, cfg: ModelConfig, feature_dim: int, num_context: int = 2,
                seq_len: int = 32, task: tasks_lib.Task | None = None) -> Any:
  """Params of the model for `task` (default: the few-shot model, or the token model when
  cfg.vocab_size > 0; then feature_dim / num_context are unused and seq_len sizes a
  learned position table)."""
  task = task if task is not None else tasks_lib.for_model(cfg, num_context, seq_len)
  x, y = task.init_inputs(feature_dim)
  # Flax derives each parameter's key from its module path, not from call order.
  return Transformer(cfg, task).init(key, x, y, None, clamps_lib.NO_CLAMPS, (),
                                     method=_run)["params"]


def param_count(params: Any) -> int:
  """The number of scalars in a params tree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- forward

_LAYER_SITES = ("resid_pre", "q", "k", "v", "scores", "pattern", "head_out", "attn_out",
                "resid_post")
_MLP_SITES = ("resid_mid", "mlp_out")  # only in models with MLPs (mlp_ratio > 0)


def site_names(num_layers: int, mlp: bool = False) -> tuple[str, ...]:
  """Every recordable activation site; `mlp` adds the MLP sites.

  With MLPs, blocks.l.resid_mid = resid_pre + attn_out (the MLP's input) and
  resid_post = resid_mid + mlp_out; without, resid_post = resid_pre + attn_out.
  """
  per_layer = _LAYER_SITES + (_MLP_SITES if mlp else ())
  return ("embed", "logits") + tuple(
      f"blocks.{l}.{s}" for l in range(num_layers) for s in per_layer)


Edit = Callable[[str, jax.Array], jax.Array]  # (intervention site, internal activation)


def _layer(model: Transformer, l: int, h_BTD: jax.Array, *, edit: Edit | None = None,
           record: dict[str, jax.Array] | None = None,
           query_only: bool = False, qkv_BTZ: jax.Array | None = None) -> jax.Array:
  """One block (attention, then the MLP if any), with interventions at its sites.

  edit(site, x) edits the activation at an intervention site (scores, pattern,
  values, head_out, resid) in the internal layout.
  query_only: compute the block's output at the last (query) position only; its
  pattern, scores, q and outputs then have one row ([B, 1, ...]). Exact for the last
  layer when only the query logits are needed (the loss and every eval metric): keys
  and values still see every position, and the MLP is per position.
  qkv_BTZ: the block's qkv_rows of h_BTD, when already computed (the task's embed).
  """
  q, k, v = model.project(l, h_BTD, qkv_BTZ, query_only)
  if query_only:
    h_BTD = h_BTD[:, -1:]
  sliced = k.shape[1] <= SLICE_MAX_T and k.shape[0] <= SLICE_MAX_B
  scores = (causal_scores if sliced else causal_scores_dense)(q, k, model.cfg.num_heads)
  if edit is not None:
    scores = edit("scores", scores)
  pattern = jax.nn.softmax(scores, axis=2)
  if edit is not None:
    pattern = edit("pattern", pattern)
    v = edit("values", v)
  head_out = (attend if sliced else attend_dense)(pattern, v)
  if edit is not None:
    head_out = edit("head_out", head_out)
  attn_out = model.output(l, head_out)
  out = h_BTD + attn_out
  sites = dict(resid_pre=h_BTD, q=q, k=k, v=v, scores=scores, pattern=pattern,
               head_out=head_out, attn_out=attn_out)
  if model.cfg.mlp_ratio:
    mlp_out = model.mlp(l, out)
    sites.update(resid_mid=out, mlp_out=mlp_out)
    out = out + mlp_out
  if edit is not None:
    out = edit("resid", out)
  if record is not None:  # internal layouts; see _public_site for the public ones
    record.update({f"blocks.{l}.{n}": a for n, a in dict(sites, resid_post=out).items()})
  return out


def _block0_residual(model: Transformer, x_BNF, y_BN) -> jax.Array:
  """The residual stream after block 0 (embeddings + block 0's output), unclamped."""
  return _layer(model, 0, model.embed_with_positions(x_BNF, y_BN)[0])


# Intervention sites' internal layout <-> the public one the kinds' edits see.
def _to_public(site: str, x: jax.Array, num_heads: int) -> jax.Array:
  if site in ("scores", "pattern"):
    return x.transpose(0, 3, 1, 2)           # [B, Tq, Tk, H] -> [B, H, Tq, Tk]
  if site in ("values", "head_out"):
    return to_heads(x, num_heads)            # [B, T, H*K] -> [B, H, T, K]
  return x


def _from_public(site: str, y: jax.Array) -> jax.Array:
  if site in ("scores", "pattern"):
    return y.transpose(0, 2, 3, 1)
  if site in ("values", "head_out"):
    B, H, T, K = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * K)
  return y


def _run(model: Transformer, x_BNF, y_BN, c: clamps_lib.Clamps | None,
         plan: clamps_lib.ClampPlan, sites: Sequence[str], query_only: bool = False,
         seqs: jax.Array | None = None):
  cfg = model.cfg
  L = cfg.num_layers
  rec: dict[str, jax.Array] = {}
  # The last layer only at the query position, unless a recorded site needs its rows.
  last_qo = query_only and not any(s == "logits" or s.startswith(f"blocks.{L - 1}.")
                                   for s in sites)

  def layer(l, h, **kw):
    return _layer(model, l, h, query_only=last_qo and l == L - 1, **kw)

  # qkv0: block 0's qkv_rows of E, when the task computed it per distinct token.
  E_tok, qkv0 = model.io().embed(model, x_BNF, y_BN, fuse_block0=not cfg.learned_pos,
                                 max_fused_batch=SLICE_MAX_B)
  T = E_tok.shape[1]
  P = model.positions(T)
  E = E_tok if P is None else E_tok + P
  rec["embed"] = E

  recorded: dict[str, dict[str, jax.Array]] = {"main": rec}
  if plan.needs_clean_pass:  # no interventions at all
    recorded["clean"] = {}
    h = E
    for l in range(L):
      h = layer(l, h, record=recorded["clean"], qkv_BTZ=qkv0 if l == 0 else None)

  def run_layers(h, first):
    out: dict[str, jax.Array] = {}
    for l in range(first, L):
      h = layer(l, h, record=out)
    return out

  kinds = [core.get(name) for name in plan.kinds]
  tools = core.PassTools(embed=E, token_embed=E_tok, positions=P, run_layers=run_layers,
                         condition=c)
  for kind in kinds:  # the kinds' own extra passes (perfect_l1's shifted pass)
    extra = kind.pre_pass(c, tools)
    if extra is not None:
      recorded[kind.name] = extra

  def read(source: str, name: str) -> jax.Array:
    if name not in recorded.get(source, {}):
      raise ValueError(f"an intervention read {name!r} from the {source!r} pass, which does "
                       f"not have it (a kind reading ctx.clean must set uses_clean_pass)")
    return _public_site(name, recorded[source][name], cfg.num_heads)

  by_site = {site: sorted((k for k in kinds if site in k.sites), key=lambda k: k.order)
             for site in core.SITES}

  def edit_at(l: int | None) -> Edit:
    def edit(site: str, x: jax.Array) -> jax.Array:
      if not by_site[site]:
        return x
      ctx = core.EditContext(site=site, layer=l, seq_len=T, condition=c, labels=y_BN,
                             inputs=x_BNF, cfg=cfg, plan=plan, _read=read,
                             task=model.io().family)
      y = _to_public(site, x, cfg.num_heads)
      for kind in by_site[site]:
        edited = kind.edit(y, c, ctx)
        if kind.name in plan.scheduled:  # on only inside the run's window (exact select)
          window = c[kind.name + clamps_lib.WINDOW]
          on = (window[0] <= seqs) & (seqs < window[1])
          if kind.name in plan.ramped:  # blended in / out on a ramp; exact where fully on
            r = _ramp_value(c[kind.name + clamps_lib.RAMP], window, seqs)
            edited = jnp.where(r >= 1.0, edited, y + r.astype(y.dtype) * (edited - y))
          edited = jnp.where(on, edited, y)
        y = edited
      return _from_public(site, y)
    return edit

  h = E
  for l in range(L):
    h = layer(l, h, edit=edit_at(l) if kinds else None, record=rec,
              qkv_BTZ=qkv0 if l == 0 else None)
  logits = edit_at(None)("logits", model.logits(h))
  rec["logits"] = logits
  return logits, {s: _public_site(s, rec[s], cfg.num_heads) for s in sites}


def _ramp_value(ramp: jax.Array, window: jax.Array, seqs: jax.Array) -> jax.Array:
  """r in [0, 1] at `seqs`: rising over the window's first ramp[0] sequences, falling
  over its last ramp[1] (0 = a hard edge), 1 in between."""
  s = seqs.astype(jnp.float32)
  rise = jnp.where(ramp[0] > 0, (s - window[0]) / jnp.maximum(ramp[0], 1), 1.0)
  fall = jnp.where(ramp[1] > 0, (window[1] - s) / jnp.maximum(ramp[1], 1), 1.0)
  return jnp.clip(jnp.minimum(rise, fall), 0.0, 1.0)


def _public_site(name: str, a: jax.Array, num_heads: int) -> jax.Array:
  """Internal layout -> the public layout ([B, H, T, K] or [B, H, T, T])."""
  kind = name.rsplit(".", 1)[-1]
  if kind in ("q", "k", "v"):
    return to_heads(a, num_heads)
  if kind in ("scores", "pattern"):
    return a.transpose(0, 3, 1, 2)
  return a


@dataclasses.dataclass(frozen=True)
class _PrepareTools:
  """What an intervention's `prepare` may run outside the model (graft's donor pass)."""
  cfg: ModelConfig
  task: Any

  def block0_residual(self, params: Any, batch: Batch) -> jax.Array:
    return Transformer(self.cfg, self.task).apply({"params": params},
                                                  *self.task.model_inputs(batch),
                                                  method=_block0_residual)


def apply(params: Any, batch: Batch, clamps: clamps_lib.Clamps | None, cfg: ModelConfig,
          plan: clamps_lib.ClampPlan = clamps_lib.NO_CLAMPS,
          sites: Sequence[str] = (), query_only: bool = False,
          seqs: jax.Array | int | None = None, task: tasks_lib.Task | None = None
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Forward pass of one run on a batch. Returns (query-and-context logits [B, n+1, C], aux).

  task: the ih_jax.tasks.Task whose batch this is (default: the one cfg implies,
  few-shot or, with cfg.vocab_size > 0, tokens).

  query_only=True returns the query row only ([B, 1, C]) and computes the last layer
  at the query position alone: the same query logits for less work (training, eval).
  seqs: sequences seen so far, which a condition with windows (`ih:L2H3@[0,200000)`)
  needs to know which of its kinds act now.
  """
  if plan != clamps_lib.NO_CLAMPS and clamps is None:
    raise ValueError(f"plan {plan} needs clamps")
  if plan.scheduled and seqs is None:
    raise ValueError(f"this condition applies {', '.join(plan.scheduled)} inside a window of "
                     "training; pass seqs= (sequences seen) to say which part of the run to "
                     "evaluate")
  if seqs is not None:
    seqs = jnp.asarray(seqs, jnp.int32)
  allowed = site_names(cfg.num_layers, mlp=cfg.mlp_ratio > 0)
  unknown = set(sites) - set(allowed)
  if unknown:
    raise ValueError(f"unknown activation sites {sorted(unknown)}; allowed: {allowed}")
  task = task if task is not None else tasks_lib.for_model(cfg)
  bad = [k for k in plan.kinds if task.family not in core.get(k).tasks]
  if bad:
    allowed = ("none",) + tuple(kw for kind in core.registered() if task.family in kind.tasks
                                for kw in (kind.name,) + tuple(kind.aliases))
    label = {"fewshot": "few-shot", "tokens": "token"}
    only = "/".join(label[t] for t in core.get(bad[0]).tasks)
    raise ValueError(f"clamp kind(s) {bad} are specific to the {only} task and not defined "
                     f"on task {task.name!r}; allowed there: {', '.join(allowed)}")
  if query_only and not task.supports_query_only:
    raise ValueError(f"query_only is a few-shot option (task {task.name!r} scores every "
                     "position)")
  for name in plan.kinds:
    extra = core.get(name).prepare(clamps, batch, cfg, _PrepareTools(cfg, task))
    if extra:
      clamps = dict(clamps, **extra)
  x, y = task.model_inputs(batch)
  return Transformer(cfg, task).apply({"params": params}, x, y, clamps, plan,
                                      tuple(sites), query_only, seqs, method=_run)


def token_clamp_kinds() -> tuple[str, ...]:
  """Clause keywords defined on the token model (the registered kinds' `tasks`)."""
  return ("none",) + tuple(kw for kind in core.registered() if "tokens" in kind.tasks
                           for kw in (kind.name,) + tuple(kind.aliases))
