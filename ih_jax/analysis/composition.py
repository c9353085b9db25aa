"""Weight-based K/Q/V composition scores between consecutive layers.

CS_X(h1 <- h0) = ||W_O^{h0} W_X^{h1}||_F / (||W_O^{h0}||_F ||W_X^{h1}||_F), LayerNorm
ignored; W_O^{h0} [dh, d] = rows 8 h0 .. 8 h0 + 7 of layer l's output kernel,
W_X^{h1} [d, dh] = columns (0 | d | 2d) + 8 h1 of layer l+1's fused QKV kernel.
"""

from __future__ import annotations

from typing import Any

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
