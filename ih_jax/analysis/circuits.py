"""Weight-based circuit scores: K/Q/V composition between consecutive layers, and the
token model's OV circuit and copying score. (Per-head summaries of both are head-score
registry entries, ih_jax.analysis.scores.)

CS_X(h1 <- h0) = ||W_O^{h0} W_X^{h1}||_F / (||W_O^{h0}||_F ||W_X^{h1}||_F), LayerNorm
ignored; W_O^{h0} [dh, d] = rows 8 h0 .. 8 h0 + 7 of layer l's output kernel,
W_X^{h1} [d, dh] = columns (0 | d | 2d) + 8 h1 of layer l+1's fused QKV kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def composition_scores(params: Any, num_heads: int, layer: int = 0) -> dict[str, np.ndarray]:
  """{'q'|'k'|'v': [H_next, H]} scores from layer `layer`'s heads into layer `layer`+1's."""
  w_out = np.asarray(params[f"blocks_{layer}"]["out"]["kernel"])      # [D, D], rows = heads
  w_qkv = np.asarray(params[f"blocks_{layer + 1}"]["qkv"]["kernel"])  # [D, 3D]
  d = w_out.shape[0]
  dh = d // num_heads
  out = {}
  for x, offset in (("q", 0), ("k", d), ("v", 2 * d)):
    scores = np.zeros((num_heads, num_heads))
    for h1 in range(num_heads):
      wx = w_qkv[:, offset + dh * h1: offset + dh * (h1 + 1)]
      for h0 in range(num_heads):
        wo = w_out[dh * h0: dh * (h0 + 1)]
        denom = np.linalg.norm(wo) * np.linalg.norm(wx)
        scores[h1, h0] = np.linalg.norm(wo @ wx) / denom if denom > 0 else 0.0
    out[x] = scores
  return out


def ov_circuit(params: Any, layer: int, head: int, num_heads: int) -> np.ndarray:
  """[V, V]: logits added to token j by head (layer, head) attending to a token i.

  Row i: the token embedding E_i through block `layer`'s LayerNorm (exact, per
  token), the head's value and output projections (biases dropped: they do not
  depend on i), then the unembedding scaled by the final LayerNorm's weight (the
  final LayerNorm's normalisation, which depends on the whole residual, is left out,
  as usual for this score).
  """
  p = jax.tree.map(np.asarray, params)
  E_VD = p["embed_tok"]["embedding"]
  ln = p[f"blocks_{layer}"]["ln"]
  mu = E_VD.mean(-1, keepdims=True)
  var = E_VD.var(-1, keepdims=True)
  u_VD = (E_VD - mu) / np.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
  D = E_VD.shape[1]
  K = D // num_heads
  W_qkv = p[f"blocks_{layer}"]["qkv"]["kernel"]          # [D, 3D]: Q | K | V
  W_V = W_qkv[:, 2 * D + head * K: 2 * D + (head + 1) * K]
  W_O = p[f"blocks_{layer}"]["out"]["kernel"][head * K:(head + 1) * K]
  W_U = p["unembed"]["kernel"] * p["ln_f"]["scale"][:, None]
  return u_VD @ W_V @ W_O @ W_U


def copying_score(params: Any, layer: int, head: int, num_heads: int) -> float:
  """Olsson et al.'s positive-eigenvalue score of the OV circuit: sum(l) / sum(|l|).

  +1 for a head whose OV circuit only copies (every eigenvalue positive), -1 for
  one that only suppresses the attended token.
  """
  lam = np.linalg.eigvals(ov_circuit(params, layer, head, num_heads).astype(np.float64))
  return float(np.sum(lam).real / max(np.sum(np.abs(lam)), 1e-12))
