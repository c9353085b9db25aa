"""A plain, unoptimised forward pass of the few-shot model, exactly as it is defined.

`ih_jax.model` is fast on CPU because it is *not* written this way: heads packed in the
feature axis, attention as sums over position slices with hand-written backward passes,
block 0 projected once per distinct token, the last layer at the query row only. This
module is the textbook form of the same function, on the same params tree:

  * an independent oracle: tests check that `model.apply` gives the same logits and
    gradients (tests/test_reference.py);
  * the "plain implementation" in ih_jax/experiments/bench.py's naive baseline, i.e. what a
    straightforward port of the paper's model computes per step (every token embedded,
    per-head [B, H, T, T] attention, every position through every layer).

No clamps: clamped conditions exist only in ih_jax.model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ih_jax.model import MASK_FILL, ModelConfig

# pylint: disable=invalid-name


def _dense(p: dict, x: jax.Array) -> jax.Array:
  y = x @ p["kernel"]
  return y + p["bias"] if "bias" in p else y


def _layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def rope(x_BHTK: jax.Array, base: float) -> jax.Array:
  """GPT-J rotary embedding: interleaved pairs (x_2j, x_2j+1) rotated by p * theta_j."""
  T, K = x_BHTK.shape[-2:]
  theta_J = base ** (-2.0 * jnp.arange(K // 2) / K)
  angle_TJ = jnp.arange(T)[:, None] * theta_J[None, :]
  cos, sin = jnp.cos(angle_TJ), jnp.sin(angle_TJ)
  x0, x1 = x_BHTK[..., 0::2], x_BHTK[..., 1::2]
  return jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x_BHTK.shape)


def forward(params: Any, x_BNF: jax.Array, y_BN: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Logits [B, N, C] at the exemplar positions 0, 2, ..., 2n (the query's is the last).

  x_BNF: gathered exemplar features [B, n+1, F]; y_BN: labels [B, n+1] (the query's
  label, y[:, -1], is never input).
  """
  if cfg.tokens:
    raise ValueError("ih_jax.reference covers the few-shot model only (vocab_size = 0)")
  B, N, _ = x_BNF.shape
  H, K = cfg.num_heads, cfg.head_dim
  e_x = _dense(params["embed_x"], x_BNF)                                      # [B, N, d]
  e_y = jax.nn.one_hot(y_BN[:, :-1], cfg.num_labels) @ params["embed_y"]["kernel"]
  tokens = jnp.stack([e_x[:, :-1], e_y], axis=2).reshape(B, 2 * (N - 1), cfg.d_model)
  h = jnp.concatenate([tokens, e_x[:, -1:]], axis=1)                         # [B, T, d]
  T = h.shape[1]
  if cfg.learned_pos:
    h = h + params["pos_embed"]["embedding"][:T]
  causal = jnp.tril(jnp.ones((T, T), bool))
  for l in range(cfg.num_layers):
    p = params[f"blocks_{l}"]
    qkv = _dense(p["qkv"], _layer_norm(p["ln"], h, cfg.ln_eps))               # [B, T, 3d]
    heads = lambda a: a.reshape(B, T, H, K).transpose(0, 2, 1, 3)            # [B, H, T, K]
    q, k, v = (heads(a) for a in jnp.split(qkv, 3, axis=-1))
    if cfg.use_rope:
      q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
    scores = jnp.einsum("bhik,bhjk->bhij", q, k) / jnp.sqrt(jnp.float32(K))
    pattern = jax.nn.softmax(jnp.where(causal, scores, MASK_FILL), axis=-1)
    z = jnp.einsum("bhij,bhjk->bhik", pattern, v).transpose(0, 2, 1, 3).reshape(B, T, -1)
    h = h + _dense(p["out"], z)
    if cfg.mlp_ratio:
      u = _layer_norm(p["mlp_ln"], h, cfg.ln_eps)
      h = h + _dense(p["mlp_out"], jax.nn.gelu(_dense(p["mlp_in"], u)))
  logits = _dense(params["unembed"], _layer_norm(params["ln_f"], h, cfg.ln_eps))
  return logits[:, 0::2]


def query_loss(params: Any, x_BNF: jax.Array, y_BN: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Mean softmax cross-entropy of the query (last) row."""
  logp = jax.nn.log_softmax(forward(params, x_BNF, y_BN, cfg)[:, -1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, y_BN[:, -1:], axis=-1))
