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
The copying score reads weights only (ih_jax.analysis.circuits.copying_score): how
much a head's OV circuit, read through the embedding and unembedding, raises the logit
of the token it attends to. Each is an entry of the head-score registry
(ih_jax.analysis.scores, task "tokens"); `head_scores` computes every registered one.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from ih_jax import model as model_lib
from ih_jax.analysis import scores as scores_lib
from ih_jax.data.tokens import TokenBatch

# pylint: disable=invalid-name


def head_scores(params: Any, cfg: Any, batch: TokenBatch,
                names: Sequence[str | scores_lib.HeadScore] | None = None
                ) -> dict[str, np.ndarray]:
  """Every head's registered token-task scores on a token batch (`names`: a subset),
  each [L, H] (pattern scores: means over the batch).

  `cfg` is an ExperimentConfig of the token task; `params` one run's (unstacked).
  """
  m = cfg.model
  chosen = scores_lib.resolve(names, task="tokens")
  sites = tuple(f"blocks.{l}.pattern" for l in range(m.num_layers))
  _, aux = jax.jit(lambda p, b: model_lib.apply(p, b, None, m, sites=sites))(params, batch)
  pats = [aux[s] for s in sites]
  out = {s.name: np.stack([np.asarray(s.fn(p, batch).mean(0)) for p in pats])
         for s in chosen if s.source == "pattern"}
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], params)
  out.update({k: v[0] for k, v in scores_lib.weight_scores(stacked, m, chosen).items()})
  return out
