"""End-of-training head studies as vmapped stacks of clamp conditions.

Each study builds its conditions as clamp spec strings, stacks them, and
evaluates all of them in one `measures.measure` call (one compiled program). Heads
are named in paper numbering (layer 1 = the first layer); the last layer's heads
are the induction-head candidates, the first layer's the previous-token ones.
Every table is a dict of equal-length lists (write it with `write_csv`).
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np

from ih_jax.analysis import measures
from ih_jax.clamps import Clamps
from ih_jax.data import sampler
from ih_jax.model import ModelConfig


def _stack_one(params: Any) -> Any:
  return {k: _stack_one(v) if isinstance(v, dict) else np.asarray(v)[None]
          for k, v in params.items()}


def evaluate_conditions(params: Any, specs: list[str], features, idx: sampler.SequenceIndices,
                        cfg: ModelConfig, base: Clamps | None = None,
                        **kw) -> dict[str, np.ndarray]:
  """Loss / accuracy / pattern measures of one set of params under each spec ([Q] arrays).

  `base`: the run's own clamps, applied under every spec (None: clamp-free).
  The studies below read loss / accuracy only and pass head_scores=(), which also lets
  the last layer run at the query position alone.
  """
  out = measures.measure(_stack_one(params), features, idx, cfg,
                         measures.conditions(specs, cfg, base), **kw)
  return {k: v[0] for k, v in out.items()}


def head_ablations(params: Any, features, idx, cfg: ModelConfig,
                   strength: np.ndarray, base: Clamps | None = None, **kw) -> dict[str, list]:
  """remove_h (ablate head h) and only_h (ablate the others) for each last-layer head."""
  L, H = cfg.num_layers, cfg.num_heads
  specs = ["none"] + [f"ablate:L{L}H{h}" for h in range(H)] + [f"keep_only:L{L}H{h}"
                                                               for h in range(H)]
  res = evaluate_conditions(params, specs, features, idx, cfg, base, head_scores=(), **kw)
  return dict(head=[f"L{L}H{h}" for h in range(H)],
              induction_strength=[float(s) for s in strength],
              remove_acc=res["acc"][1:H + 1].tolist(), remove_loss=res["loss"][1:H + 1].tolist(),
              only_acc=res["acc"][H + 1:].tolist(), only_loss=res["loss"][H + 1:].tolist(),
              full_acc=[float(res["acc"][0])] * H, full_loss=[float(res["loss"][0])] * H)


def mistake_fixing(params: Any, features, idx, cfg: ModelConfig, strength: np.ndarray, *,
                   perfected: bool = False, strongest: int | None = None,
                   base: Clamps | None = None, **kw) -> dict[str, list]:
  """Mistake fixing: which heads fix the strongest head's mistakes.

  only_h keeps one last-layer head (with `perfected`, also IH-clamps it: pm_only_h).
  R = the sequences only_STRONGEST gets wrong; per head: accuracy of only_h, the
  fraction of R it gets right, and (perfected) its mistakes per output label.
  STRONGEST is `strongest` if given (a head the run could use), else argmax(strength).
  """
  L, H = cfg.num_layers, cfg.num_heads
  clamp = (lambda h: f"keep_only:L{L}H{h};ih:L{L}H{h}") if perfected else \
      (lambda h: f"keep_only:L{L}H{h}")
  res = evaluate_conditions(params, [clamp(h) for h in range(H)], features, idx, cfg, base,
                            per_sequence=True, head_scores=(), **kw)
  correct_QS = res["seq_correct"] > 0.5
  strongest = int(np.argmax(strength)) if strongest is None else strongest
  wrong = ~correct_QS[strongest]
  fixed = [float(correct_QS[h][wrong].mean()) if wrong.any() else float("nan")
           for h in range(H)]
  labels = np.asarray(idx.labels)[:, -1]
  table = dict(head=[f"L{L}H{h}" for h in range(H)],
               induction_strength=[float(x) for x in strength],
               acc=res["acc"].tolist(), fixes_strongest_mistakes=fixed,
               strongest_mistakes=[int(wrong.sum())] * H)
  if perfected:
    for c in range(cfg.num_labels):
      table[f"acc_label{c}"] = [float(correct_QS[h][labels == c].mean())
                                if (labels == c).any() else float("nan") for h in range(H)]
  return table


def additivity(params: Any, features, idx, cfg: ModelConfig, strength: np.ndarray,
               order: list[int] | None = None, base: Clamps | None = None,
               **kw) -> dict[str, list]:
  """Loss as last-layer heads are switched on cumulatively in decreasing strength.

  Two orders: (i) from the strongest head, (ii) from the second strongest with the
  strongest left out. `order` (e.g. only the heads the run could use)
  replaces the default order of all heads by decreasing strength.
  """
  L = cfg.num_layers
  if order is None:
    order = [int(h) for h in np.argsort(-np.asarray(strength))]
  rows: dict[str, list] = dict(start=[], num_heads=[], heads=[], loss=[], acc=[])
  specs = []
  for start, seq in (("strongest", order), ("second_without_strongest", order[1:])):
    for k in range(1, len(seq) + 1):
      heads = ",".join(f"L{L}H{h}" for h in seq[:k])
      rows["start"].append(start)
      rows["num_heads"].append(k)
      rows["heads"].append(heads)
      specs.append(f"keep_only:{heads}")
  res = evaluate_conditions(params, specs, features, idx, cfg, base, head_scores=(), **kw)
  rows["loss"], rows["acc"] = res["loss"].tolist(), res["acc"].tolist()
  return rows


def wiring(params: Any, features, idx, cfg: ModelConfig, base: Clamps | None = None,
           **kw) -> dict[str, np.ndarray]:
  """Layer-2 x layer-1 heatmaps [i = last-layer head, j = first-layer head].

  For mode in (pp = pattern-preserving, pv = value-preserving):
    all_but_one_<mode>[i, j] = acc(only i in the last layer, j ablated) - acc(only i)
    only_one_<mode>[i, j]    = acc(only i in the last layer and only j in the first)
  All 64 x 2 x 2 + 8 conditions run as one stack (for a 2-layer, 8-head model).
  """
  L, H = cfg.num_layers, cfg.num_heads
  if L != 2:
    raise ValueError(f"wiring heatmaps are defined for 2-layer models, got {L} layers")
  specs = [f"keep_only:L2H{i}" for i in range(H)]
  for mode in ("preserve_pattern", "preserve_value"):
    specs += [f"{mode};keep_only:L2H{i};ablate:L1H{j}" for i in range(H) for j in range(H)]
    specs += [f"{mode};keep_only:L2H{i};keep_only:L1H{j}" for i in range(H) for j in range(H)]
  acc = evaluate_conditions(params, specs, features, idx, cfg, base, head_scores=(), **kw)["acc"]
  only_i = acc[:H]
  out = dict(only_last_acc=only_i)
  pos = H
  for tag in ("pp", "pv"):
    abl = acc[pos:pos + H * H].reshape(H, H)
    pos += H * H
    out[f"all_but_one_{tag}"] = abl - only_i[:, None]
    out[f"only_one_{tag}"] = acc[pos:pos + H * H].reshape(H, H)
    pos += H * H
  return out


def layer_set_ablation(params: Any, features, idx, cfg: ModelConfig, heads: str,
                       base: Clamps | None = None, **kw) -> dict[str, float]:
  """Accuracy with a set of first-layer heads ablated under pp and under pv."""
  specs = ["none", f"preserve_pattern;ablate:{heads}", f"preserve_value;ablate:{heads}",
           f"ablate:{heads}"]
  acc = evaluate_conditions(params, specs, features, idx, cfg, base, head_scores=(), **kw)["acc"]
  return dict(heads=heads, full=float(acc[0]), pp=float(acc[1]), pv=float(acc[2]),
              plain=float(acc[3]))


def write_csv(path: str, table: dict[str, Any]) -> None:
  """A dict of equal-length columns (lists / 1-D arrays) -> CSV."""
  cols = list(table)
  n = len(table[cols[0]])
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for i in range(n):
      w.writerow([table[c][i] for c in cols])


def write_matrix_csv(path: str, matrix: np.ndarray, row_name: str, col_name: str) -> None:
  """A 2-D matrix -> CSV: rows ROW0, ROW1, ..., columns COL0, COL1, ... (values to 6 digits)."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([f"{row_name}\\{col_name}"] + [f"{col_name}{j}" for j in range(matrix.shape[1])])
    for i, row in enumerate(matrix):
      w.writerow([f"{row_name}{i}"] + [f"{v:.6g}" for v in row])
