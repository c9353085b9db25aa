"""The paper's attention-only transformer (SPEC §3) with in-graph clamps (SPEC §4).

Public API (pure functions; the Flax module is an implementation detail):
  init_params(key, cfg, feature_dim)                    -> params
  apply(params, batch, clamps, cfg, plan, sites=())     -> (logits [B, n+1, C], aux)
  query_loss(logits, y)                                 -> mean CE of the query row

`clamps` is one run's condition (see ih_jax.clamps); `plan` is the static
ClampPlan that decides which extra passes get compiled. `aux` holds only the
activation sites named in `sites` (e.g. "blocks.1.pattern"); under jit the rest
is dead code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ih_jax import clamps as clamps_lib
from ih_jax.data.sampler import Batch

MASK_FILL = -1e20   # causal mask fill (pre-softmax), as in the authors' code
COPY_FILL = -1e9    # perfect-copy logits for labels absent from the context

# pylint: disable=invalid-name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  num_layers: int = 2
  num_heads: int = 8
  d_model: int = 64
  num_labels: int = 5
  attn_bias: bool = True   # paper version: zero-initialised QKV and output biases
  rope_base: float = 10000.0
  ln_eps: float = 1e-5     # not Flax's 1e-6 default

  def __post_init__(self):
    if self.num_layers < 1 or self.num_heads < 1 or self.num_labels < 2:
      raise ValueError(f"need num_layers >= 1, num_heads >= 1, num_labels >= 2; got {self}")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head width; d_model/num_heads = {self.head_dim}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def rope(x_BHTK: jax.Array, base: float) -> jax.Array:
  """GPT-J (interleaved-pair) rotary embedding over the full head width."""
  T, K = x_BHTK.shape[-2:]
  theta_J = base ** (-2.0 * jnp.arange(K // 2) / K)
  angle_TJ = jnp.arange(T)[:, None] * theta_J[None, :]
  cos, sin = jnp.cos(angle_TJ), jnp.sin(angle_TJ)
  x_even, x_odd = x_BHTK[..., 0::2], x_BHTK[..., 1::2]
  rot_even = x_even * cos - x_odd * sin
  rot_odd = x_even * sin + x_odd * cos
  return jnp.stack([rot_even, rot_odd], axis=-1).reshape(x_BHTK.shape)


class Block(nn.Module):
  """One pre-LN attention block; its steps are exposed so clamps can sit between them."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.ln = nn.LayerNorm(epsilon=cfg.ln_eps)
    self.qkv = nn.Dense(3 * cfg.d_model, use_bias=cfg.attn_bias)
    self.out = nn.Dense(cfg.d_model, use_bias=cfg.attn_bias)

  def project(self, h_BTD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k (post-RoPE), v, each [B, H, T, K]; fused layout Q | K | V, head h at 8h:8h+8."""
    B, T, _ = h_BTD.shape
    qkv = self.qkv(self.ln(h_BTD)).reshape(B, T, 3, self.cfg.num_heads, self.cfg.head_dim)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    return rope(q, self.cfg.rope_base), rope(k, self.cfg.rope_base), v

  def output(self, head_out_BTZ: jax.Array) -> jax.Array:
    return self.out(head_out_BTZ)

  def __call__(self, h_BTD):  # used only by init
    q, k, v = self.project(h_BTD)
    return self.output(attend(causal_scores(q, k), v)[1])


def causal_scores(q_BHTK: jax.Array, k_BHTK: jax.Array) -> jax.Array:
  T, K = q_BHTK.shape[-2:]
  s = jnp.einsum("bhik,bhjk->bhij", q_BHTK, k_BHTK) / jnp.sqrt(jnp.float32(K))
  return jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, MASK_FILL)


def attend(pattern_BHTT: jax.Array, v_BHTK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (per-head outputs [B,H,T,K], heads concatenated in head order [B,T,H*K])."""
  o_BHTK = jnp.einsum("bhij,bhjk->bhik", pattern_BHTT, v_BHTK)
  B, H, T, K = o_BHTK.shape
  return o_BHTK, o_BHTK.transpose(0, 2, 1, 3).reshape(B, T, H * K)


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed_x = nn.Dense(cfg.d_model)                      # exemplar embedding, with bias
    self.embed_y = nn.Dense(cfg.d_model, use_bias=False,      # label embedding, no bias
                            kernel_init=nn.initializers.truncated_normal(0.02))
    self.blocks = [Block(cfg) for _ in range(cfg.num_layers)]
    self.ln_f = nn.LayerNorm(epsilon=cfg.ln_eps)
    self.unembed = nn.Dense(cfg.num_labels)

  def embed(self, x_BNF: jax.Array, y_BN: jax.Array) -> jax.Array:
    """[e_x0, e_y0, ..., e_x(n-1), e_y(n-1), e_xq]; the query's label is never input."""
    B, N, _ = x_BNF.shape
    ex_BND = self.embed_x(x_BNF)
    ey_BND = self.embed_y(jax.nn.one_hot(y_BN[:, :-1], self.cfg.num_labels, dtype=x_BNF.dtype))
    pairs = jnp.stack([ex_BND[:, :-1], ey_BND], axis=2).reshape(B, 2 * (N - 1), -1)
    return jnp.concatenate([pairs, ex_BND[:, -1:]], axis=1)

  def project(self, layer: int, h_BTD):
    return self.blocks[layer].project(h_BTD)

  def output(self, layer: int, head_out_BTZ):
    return self.blocks[layer].output(head_out_BTZ)

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    return self.unembed(self.ln_f(h_BTD))[:, 0::2]  # exemplar positions 0, 2, ..., 2n

  def __call__(self, x_BNF, y_BN):  # used only by init
    h = self.embed(x_BNF, y_BN)
    for block in self.blocks:
      h = h + block(h)
    return self.logits(h)


def init_params(key: jax.Array, cfg: ModelConfig, feature_dim: int, num_context: int = 2) -> Any:
  x = jnp.zeros((1, num_context + 1, feature_dim), jnp.float32)
  y = jnp.zeros((1, num_context + 1), jnp.int32)
  return Transformer(cfg).init(key, x, y)["params"]


def param_count(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- clamp targets

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


def shifted_embedding(E_BTD: jax.Array) -> jax.Array:
  """Perfect previous-token input: [E0, E0, E1, ..., E(T-3), E(T-1)] (query unshifted)."""
  return jnp.concatenate([E_BTD[:, :1], E_BTD[:, :-2], E_BTD[:, -1:]], axis=1)


def copy_logits(scores_BHTT: jax.Array, y_BN: jax.Array, copy_on_H: jax.Array,
                num_labels: int) -> jax.Array:
  """Perfect copy: the query's logit for label y_c is the copying head's score on label token c.

  Labels absent from the context get COPY_FILL; if a label appears twice the
  larger score wins.
  """
  T = scores_BHTT.shape[-1]
  ell_BHn = scores_BHTT[:, :, T - 1, 1::2]
  ell_Bn = jnp.einsum("bhn,h->bn", ell_BHn, copy_on_H.astype(ell_BHn.dtype))
  onehot_BnC = jax.nn.one_hot(y_BN[:, :-1], num_labels, dtype=bool)
  return jnp.max(jnp.where(onehot_BnC, ell_Bn[:, :, None], COPY_FILL), axis=1)


# ----------------------------------------------------------------------------- forward

SITES = ("embed", "logits") + tuple(
    f"blocks.{{l}}.{s}" for s in ("resid_pre", "resid_post", "q", "k", "v", "scores", "pattern",
                                  "head_out", "attn_out"))


def site_names(num_layers: int) -> tuple[str, ...]:
  names = ["embed", "logits"]
  for l in range(num_layers):
    names += [s.format(l=l) for s in SITES[2:]]
  return tuple(names)


def _run(model: Transformer, x_BNF, y_BN, c: clamps_lib.Clamps | None,
         plan: clamps_lib.ClampPlan, sites: Sequence[str]):
  cfg = model.cfg
  L = cfg.num_layers
  rec: dict[str, jax.Array] = {}

  def layer(l, h_BTD, *, pattern_edit=None, value_edit=None, record=None):
    q, k, v = model.project(l, h_BTD)
    scores = causal_scores(q, k)
    pattern = jax.nn.softmax(scores, axis=-1)
    if pattern_edit is not None:
      pattern = pattern_edit(pattern)
    if value_edit is not None:
      v = value_edit(v)
    _, head_out = attend(pattern, v)
    attn_out = model.output(l, head_out)
    out = h_BTD + attn_out
    if record is not None:
      record.update({f"blocks.{l}.{n}": a for n, a in dict(
          resid_pre=h_BTD, q=q, k=k, v=v, scores=scores, pattern=pattern,
          head_out=head_out, attn_out=attn_out, resid_post=out).items()})
    return out

  E = model.embed(x_BNF, y_BN)
  T = E.shape[1]
  rec["embed"] = E

  clean: dict[str, jax.Array] = {}
  if plan.needs_clean_pass:  # no manipulations at all
    h = E
    for l in range(L):
      h = layer(l, h, record=clean)

  ppass: dict[str, jax.Array] = {}
  if plan.perfect_l1:  # layer 1+ patterns from the shifted residual
    h = shifted_embedding(E)
    for l in range(1, L):
      h = layer(l, h, record=ppass)

  def pattern_edit(l):
    def edit(A):  # precedence: computed < preserved < perfect L1 < PT < IH (query row)
      if plan.preserve_pattern:
        A = jnp.where(c["preserve_pattern"], clean[f"blocks.{l}.pattern"], A)
      if plan.perfect_l1 and l >= 1:
        A = jnp.where(c["perfect_l1"], ppass[f"blocks.{l}.pattern"], A)
      if plan.pt:
        P_HTT = prev_token_pattern(T, c["pt_strength"][l])
        A = jnp.where(c["pt_on"][l][None, :, None, None], P_HTT[None], A)
      if plan.ih:
        row = induction_row(y_BN, c["ih_strength"][l])
        A = A.at[:, :, T - 1].set(jnp.where(c["ih_on"][l][None, :, None], row, A[:, :, T - 1]))
      return A
    return edit

  def value_edit(l):
    def edit(v):  # precedence: computed < preserved < ablation
      if plan.preserve_value:
        v = jnp.where(c["preserve_value"], clean[f"blocks.{l}.v"], v)
      if plan.ablate:
        v = v * c["v_keep"][l][None, :, None, None]
      return v
    return edit

  h = E
  for l in range(L):
    h = layer(l, h, pattern_edit=pattern_edit(l), value_edit=value_edit(l), record=rec)
    if l == 0 and plan.perfect_l1:  # layer 0 contributes nothing; layer 1 reads raw E
      h = jnp.where(c["perfect_l1"], E, h)
  logits = model.logits(h)

  if plan.copy:
    last = f"blocks.{L - 1}.scores"
    src = clean[last] if plan.copy_needs_clean_pass else rec[last]
    if plan.perfect_l1:
      src = jnp.where(c["perfect_l1"], ppass[last], src)
    copied = copy_logits(src, y_BN, c["copy_on"], cfg.num_labels)
    logits = logits.at[:, -1].set(jnp.where(c["copy_on"].any(), copied, logits[:, -1]))
  rec["logits"] = logits
  return logits, {s: rec[s] for s in sites}


def apply(params: Any, batch: Batch, clamps: clamps_lib.Clamps | None, cfg: ModelConfig,
          plan: clamps_lib.ClampPlan = clamps_lib.NO_CLAMPS,
          sites: Sequence[str] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Forward pass of one run on a batch. Returns (query-and-context logits [B, n+1, C], aux)."""
  if plan != clamps_lib.NO_CLAMPS and clamps is None:
    raise ValueError(f"plan {plan} needs clamps")
  unknown = set(sites) - set(site_names(cfg.num_layers))
  if unknown:
    raise ValueError(f"unknown activation sites {sorted(unknown)}; allowed: "
                     f"{site_names(cfg.num_layers)}")
  return Transformer(cfg).apply({"params": params}, batch.x, batch.y, clamps, plan,
                                tuple(sites), method=_run)


def query_loss(logits_BNC: jax.Array, y_BN: jax.Array) -> jax.Array:
  """Softmax cross-entropy of the last (query) logit row, averaged over the batch."""
  logp = jax.nn.log_softmax(logits_BNC[:, -1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, y_BN[:, -1:], axis=-1))
