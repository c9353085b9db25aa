"""Per-head scores as a registry: one definition each, used everywhere.

A `HeadScore` is either a *pattern* score, which turns one layer's attention pattern
on a batch of its task family into a score per sequence and head ([B, H]), or a
*weights* score, which reads one run's params only (fn(params, layer, model_cfg) ->
[H], host numpy). Few-shot scores: `measures.measure` computes every registered one for
every layer (pattern scores as weighted means over the sequence set, [L, H]), and the
analysis report writes those marked for it into its progress CSVs. Token-task scores:
`token_scores.head_scores` computes every registered one on a token batch. Scores of
task "any" apply to both. A researcher adds one in their own code, e.g. in a notebook:

    from ih_jax.analysis import scores
    scores.register(scores.HeadScore(
        "query_to_first", lambda A, batch: A[:, :, -1, 0],
        "attention from the query to the first token", report_layers="last"))

Built-in scores (T = 2n + 1 tokens: n (exemplar, label) pairs, then the query q;
A = the attention pattern [B, H, T, T], rows = queries):
  induction_strength  mean A(q -> label of a matching exemplar) - mean A(q -> other
                      labels), in [-1, 1] (the paper's IS)
  induction_detect    mean A(q -> matching label) (TransformerLens-style induction
                      detection score: attention mass on the induction target)
  pt_score            mean over tokens i >= 1 of a - (1 - a) / i, a = A(i -> i-1)
                      (previous-token score, corrected for uniform attention)
  pt_score_labels     the same over label tokens only (odd i)
  pt_raw              mean a (TransformerLens-style previous-token detection score)
Token task (pattern scores from ih_jax.metrics, which the training metrics use too; the
segment length is read off the batch):
  prev_token          mean attention from t >= 1 to t - 1
  prefix_matching     attention from the second copy's positions to the token after
                      their earlier copy (what an induction head attends to)
  induction_strength  prefix_matching minus attention to the earlier copy itself
  copying             (weights) Olsson et al.'s OV-circuit copying score
Any task (weights; ih_jax.analysis.circuits): q_composition, k_composition,
v_composition = for a head of layer l >= 1, its largest composition score with a head
of layer l - 1 (0 in the first layer, which reads only the embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import metrics
from ih_jax.analysis import circuits
from ih_jax.data import sampler

# pylint: disable=invalid-name

REPORT_LAYERS = ("none", "first", "last", "all")
TASKS = ("fewshot", "tokens", "any")  # the task family a score applies to
SOURCES = ("pattern", "weights")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a cache key
class HeadScore:
  """A named per-head score: `fn(A_BHTT, batch)` -> [B, H] (source "pattern"), or
  `fn(params, layer, model_cfg)` -> [H] (source "weights": one run's params, host).

  `report_layers` picks the layers written to the progress CSVs (one of REPORT_LAYERS),
  under the column prefix `column` (default: `name`); `task`: the task family whose
  batches (and params) it reads, "fewshot", "tokens" or "any"."""
  name: str
  fn: Callable[..., Any]        # pattern: (A_BHTT, batch) -> [B, H]; weights: see above
  description: str = ""
  report_layers: str = "none"   # layers whose values go into the progress CSVs
  column: str = ""              # CSV column prefix (default: the name)
  task: str = "fewshot"
  source: str = "pattern"

  def __post_init__(self):
    if not self.name.isidentifier():
      raise ValueError(f"score name {self.name!r} must be a Python identifier (it names "
                       "result keys and CSV columns)")
    if self.report_layers not in REPORT_LAYERS:
      raise ValueError(f"score {self.name!r}: report_layers={self.report_layers!r}; allowed: "
                       f"{', '.join(REPORT_LAYERS)}")
    if not callable(self.fn):
      raise ValueError(f"score {self.name!r}: fn must be callable (A_BHTT, batch) -> [B, H]")
    if self.task not in TASKS:
      raise ValueError(f"score {self.name!r}: task={self.task!r}; allowed: {', '.join(TASKS)}")
    if self.source not in SOURCES:
      raise ValueError(f"score {self.name!r}: source={self.source!r}; allowed: "
                       f"{', '.join(SOURCES)}")

  def layers(self, num_layers: int) -> list[int]:
    """The (0-based) layers reported in CSVs."""
    return {"none": [], "first": [0], "last": [num_layers - 1],
            "all": list(range(num_layers))}[self.report_layers]

  @property
  def prefix(self) -> str:
    """The CSV column prefix: `column`, or the name when that is empty."""
    return self.column or self.name


# (task, name) -> score: a few-shot and a token score may share a name (each task's
# "induction_strength"); a score of task "any" takes its name for both.
_REGISTRY: dict[tuple[str, str], HeadScore] = {}


def _clashes(score: HeadScore) -> list[HeadScore]:
  tasks = TASKS if score.task == "any" else (score.task, "any")
  return [s for t in tasks if (s := _REGISTRY.get((t, score.name))) is not None]


def register(score: HeadScore, *, replace: bool = False) -> HeadScore:
  """Adds a score for every later `measures.measure` / `token_scores.head_scores`
  call of its task; returns it."""
  clashes = _clashes(score)
  if clashes and not replace:
    raise ValueError(f"a score named {score.name!r} is already registered (task "
                     f"{clashes[0].task!r}); pass replace=True to redefine it")
  for s in clashes:
    del _REGISTRY[(s.task, s.name)]
  _REGISTRY[(score.task, score.name)] = score
  return score


def unregister(name: str, task: str | None = None) -> None:
  """Removes a registered score (of `task`, or of every task; a no-op if unknown);
  built-in scores cannot be removed."""
  for key in [k for k in _REGISTRY if k[1] == name and task in (None, k[0])]:
    if key in BUILTIN_KEYS:
      raise ValueError(f"{name!r} is a built-in score (the analysis depends on it)")
    del _REGISTRY[key]


def registered(task: str = "fewshot", source: str | None = None) -> tuple[HeadScore, ...]:
  """The registered scores that apply to `task`'s family (its own and task "any"; built-ins
  first, in registration order), of one `source` if given."""
  return tuple(s for s in _REGISTRY.values() if s.task in (task, "any")
               and source in (None, s.source))


def resolve(names: Sequence[str | HeadScore] | None, task: str = "fewshot"
            ) -> tuple[HeadScore, ...]:
  """Names (or scores) -> scores of `task`'s family; None = every registered one."""
  if names is None:
    return registered(task)
  out = []
  for n in names:
    if isinstance(n, HeadScore):
      out.append(n)
    elif (task, n) in _REGISTRY or ("any", n) in _REGISTRY:
      out.append(_REGISTRY.get((task, n)) or _REGISTRY[("any", n)])
    else:
      known = ", ".join(s.name for s in registered(task))
      raise ValueError(f"unknown head score {n!r} for the {task} task; registered: {known}")
  return tuple(out)


def weight_scores(params_K: Any, model_cfg: Any, head_scores: Sequence[HeadScore]
                  ) -> dict[str, np.ndarray]:
  """{name: [K, L, H]} of the weights scores among `head_scores`, for K stacked runs'
  or checkpoints' params (host numpy)."""
  params_K = jax.tree.map(np.asarray, params_K)
  K = jax.tree.leaves(params_K)[0].shape[0]
  out = {}
  for score in head_scores:
    if score.source != "weights":
      continue
    out[score.name] = np.asarray([
        [np.asarray(score.fn(jax.tree.map(lambda x, k=k: x[k], params_K), l, model_cfg),
                    np.float32) for l in range(model_cfg.num_layers)] for k in range(K)])
  return out


# ------------------------------------------------------------------ built-ins

def _label_masks(batch: sampler.Batch) -> tuple[jax.Array, jax.Array]:
  n = batch.y.shape[1] - 1
  match_BN = (batch.y[:, :n] == batch.y[:, -1:]).astype(jnp.float32)
  return match_BN, 1.0 - match_BN


def _query_to_labels(A_BHTT: jax.Array) -> jax.Array:
  T = A_BHTT.shape[-1]
  return A_BHTT[:, :, T - 1, 1:T - 1:2]          # query row -> the n label tokens


def _masked_mean(x_BHN: jax.Array, mask_BN: jax.Array) -> jax.Array:
  return (x_BHN * mask_BN[:, None]).sum(-1) / jnp.maximum(mask_BN.sum(-1), 1)[:, None]


def induction_strength(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean attention query -> matching labels minus query -> other labels, [B, H] in [-1, 1]."""
  match_BN, other_BN = _label_masks(batch)
  to_labels = _query_to_labels(A_BHTT)
  return _masked_mean(to_labels, match_BN) - _masked_mean(to_labels, other_BN)


def induction_detect(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean attention from the query to the labels of matching exemplars, [B, H]."""
  match_BN, _ = _label_masks(batch)
  return _masked_mean(_query_to_labels(A_BHTT), match_BN)


def _prev_token(A_BHTT: jax.Array) -> jax.Array:
  return jnp.diagonal(A_BHTT[:, :, 1:, :-1], axis1=2, axis2=3)   # A(i -> i-1), i = 1..T-1


def _pt_corrected(A_BHTT: jax.Array) -> jax.Array:
  T = A_BHTT.shape[-1]
  a_BHT = _prev_token(A_BHTT)
  return a_BHT - (1.0 - a_BHT) / jnp.arange(1, T, dtype=jnp.float32)


def pt_score(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean over tokens i >= 1 of a - (1 - a) / i, a = A(i -> i-1): [B, H], uniform-corrected."""
  del batch
  return _pt_corrected(A_BHTT).mean(-1)


def pt_score_labels(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """The uniform-corrected previous-token score averaged over label tokens only, [B, H]."""
  del batch
  T = A_BHTT.shape[-1]
  label_T = (jnp.arange(1, T) % 2 == 1).astype(jnp.float32)
  return (_pt_corrected(A_BHTT) * label_T).sum(-1) / label_T.sum()


def pt_raw(A_BHTT: jax.Array, batch: sampler.Batch) -> jax.Array:
  """Mean attention from each token i >= 1 to token i-1, [B, H] (uncorrected)."""
  del batch
  return _prev_token(A_BHTT).mean(-1)


# ------------------------------------------------------------------ token task

def _segment_len_B(batch: Any) -> jax.Array:
  """[B] the repeated segment's length S: `repeated` marks S - 1 positions per row."""
  return batch.repeated.sum(-1).astype(jnp.int32) + 1


def token_prev_token(A_BHTT: jax.Array, batch: Any) -> jax.Array:
  """Mean attention from each token t >= 1 to t - 1, [B, H]."""
  del batch
  return metrics.prev_token_score(A_BHTT)


def token_prefix_matching(A_BHTT: jax.Array, batch: Any) -> jax.Array:
  """Attention from the second copy to the token after the earlier copy, [B, H]."""
  return metrics.prefix_matching(A_BHTT, batch, _segment_len_B(batch))


def token_induction_strength(A_BHTT: jax.Array, batch: Any) -> jax.Array:
  """Prefix matching minus attention to the earlier copy itself, [B, H] in [-1, 1]."""
  return metrics.induction_strength(A_BHTT, batch, _segment_len_B(batch))


def _copying(params: Any, layer: int, model_cfg: Any) -> np.ndarray:
  H = model_cfg.num_heads
  return np.asarray([circuits.copying_score(params, layer, h, H) for h in range(H)])


def _composition(kind: str) -> Callable[[Any, int, Any], np.ndarray]:
  def fn(params: Any, layer: int, model_cfg: Any) -> np.ndarray:
    if layer == 0:  # nothing before the first layer but the embeddings
      return np.zeros(model_cfg.num_heads)
    return circuits.composition_scores(params, model_cfg.num_heads, layer - 1)[kind].max(-1)
  return fn


BUILTINS = (
    HeadScore("induction_strength", induction_strength,
              "query -> matching label minus query -> other labels", "last", "is"),
    HeadScore("pt_score", pt_score, "previous-token score (uniform-corrected)", "first", "pt"),
    HeadScore("pt_score_labels", pt_score_labels, "previous-token score on label tokens",
              "first", "pt_labels"),
    HeadScore("pt_raw", pt_raw, "attention to the previous token"),
    HeadScore("induction_detect", induction_detect, "attention from the query to matching labels"),
    HeadScore("prev_token", token_prev_token, "attention to the previous token", task="tokens"),
    HeadScore("prefix_matching", token_prefix_matching,
              "attention to the token after the earlier copy", task="tokens"),
    HeadScore("induction_strength", token_induction_strength,
              "prefix matching minus attention to the earlier copy", task="tokens"),
    HeadScore("copying", _copying, "OV-circuit copying score (positive eigenvalues)",
              task="tokens", source="weights"),
    *(HeadScore(f"{x}_composition", _composition(x),
                f"largest {x.upper()}-composition with a head of the layer before",
                task="any", source="weights") for x in ("q", "k", "v")),
)
BUILTIN_KEYS = tuple((s.task, s.name) for s in BUILTINS)
BUILTIN_NAMES = tuple(dict.fromkeys(s.name for s in BUILTINS))
for _s in BUILTINS:
  register(_s)
