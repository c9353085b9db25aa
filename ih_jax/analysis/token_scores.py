"""Per-head scores of the token-level induction task (Olsson et al. 2022 style).

Pattern scores (in-graph, defined in ih_jax.metrics, which the training metrics use
too) take attention patterns [B, H, Tq, Tk] and a TokenBatch (its declared repeated
segment):
  prev_token_score     mean attention from t >= 1 to t - 1                      [B, H]
  prefix_matching      mean attention, over the positions t of the second copy of
                       the segment, to the token after x_t's earlier copy
                       (a + (t - b) + 1): what an induction head attends to     [B, H]
  induction_strength   prefix_matching minus the mean attention to the earlier copy
                       itself (a + (t - b)): separates induction heads from
                       duplicate-token heads; in [-1, 1], like the paper's IS   [B, H]
The copying score reads weights only (copying_score): how much a head's OV circuit,
read through the embedding and unembedding, raises the logit of the token it
attends to.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ih_jax import model as model_lib
from ih_jax.data.tokens import TokenBatch
from ih_jax.metrics import induction_strength, prefix_matching, prev_token_score

# pylint: disable=invalid-name


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


def head_scores(params: Any, cfg: Any, batch: TokenBatch) -> dict[str, np.ndarray]:
  """Every head's scores on a token batch, each [L, H] (means over the batch).

  `cfg` is an ExperimentConfig of the token task; `params` one run's (unstacked).
  """
  m, S = cfg.model, cfg.tokens.segment_len
  sites = tuple(f"blocks.{l}.pattern" for l in range(m.num_layers))
  _, aux = jax.jit(lambda p, b: model_lib.apply(p, b, None, m, sites=sites))(params, batch)
  pats = [aux[s] for s in sites]
  return dict(
      prev_token=np.stack([np.asarray(prev_token_score(p).mean(0)) for p in pats]),
      prefix_matching=np.stack([np.asarray(prefix_matching(p, batch, S).mean(0)) for p in pats]),
      induction_strength=np.stack([np.asarray(induction_strength(p, batch, S).mean(0))
                                   for p in pats]),
      copying=np.asarray([[copying_score(params, l, h, m.num_heads) for h in range(m.num_heads)]
                          for l in range(m.num_layers)]))
