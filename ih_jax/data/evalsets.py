"""Fixed evaluation sets and the dense analysis set."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax.data import sampler
from ih_jax.data.splits import Splits

_PART_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
  """One evaluator: which split of classes, exemplars and relabel pairs it draws from."""
  name: str
  classes: str = "train"     # train | val | test
  exemplars: str = "train"
  pairs: str = "train"
  size: int = 1000
  # "relabel": labels from a random relabel pair (in-context learning, the paper);
  # "fixed": each class's fixed label, class id mod num_labels, and no context item of
  # the query's class, so only in-weights learning helps (meaningful when
  # task.relabel_fraction < 1 trains on such sequences).
  labels: str = "relabel"


# The paper's four evaluators, in the order their keys are split off.
PAPER_EVALUATORS = (
    EvaluatorConfig("fsl_train", "train", "train", "train"),
    EvaluatorConfig("fsl_val_rl", "train", "train", "val"),
    EvaluatorConfig("fsl_train_valex", "train", "val", "train"),
    EvaluatorConfig("fsl_test_class", "test", "train", "train"),
)


def spec_for(splits: Splits, classes: str, exemplars: str, pairs: str,
             where: str = "evaluator") -> sampler.SamplerSpec:
  """Builds a SamplerSpec from split names, with errors naming the bad choice."""
  for kind, part in (("classes", classes), ("exemplars", exemplars), ("pairs", pairs)):
    if part not in _PART_NAMES:
      raise ValueError(f"{where}: {kind}={part!r} is not a split; allowed: {_PART_NAMES}")
  cls = getattr(splits, f"{classes}_classes")
  exs = getattr(splits, f"{exemplars}_exemplars")
  prs = getattr(splits, f"{pairs}_pairs")
  if len(cls) < 2:
    raise ValueError(f"{where}: the {classes!r} class split has {len(cls)} classes; need >= 2")
  if len(exs) < 1:
    raise ValueError(f"{where}: the {exemplars!r} exemplar split is empty")
  if len(prs) < 1:
    raise ValueError(f"{where}: the {pairs!r} relabel-pair split is empty")
  return sampler.SamplerSpec(jnp.asarray(cls, jnp.int32), jnp.asarray(exs, jnp.int32),
                             jnp.asarray(prs, jnp.int32))


def train_spec(splits: Splits) -> sampler.SamplerSpec:
  """The training sampler's spec: train classes, train exemplars and train relabel pairs."""
  return spec_for(splits, "train", "train", "train", where="training sampler")


# All eval sets are drawn by ONE compiled program instead of dozens of eagerly dispatched
# ops, or one program per set (each set has its own spec shapes, so its own compile):
# the main config's four sets 2.17 -> 0.91 s on 2 CPU cores. Integer sampling: the sets
# are bit-identical. (sample_indices checks each layout while tracing: plain ValueErrors.)
@functools.partial(jax.jit, static_argnames=("layouts",))
def _sample_sets(keys: jax.Array, specs: tuple[sampler.SamplerSpec, ...],
                 layouts: tuple[tuple[tuple[str, Any], ...], ...]
                 ) -> list[sampler.SequenceIndices]:
  return [sampler.sample_indices(k, spec, **dict(layout))
          for k, spec, layout in zip(keys, specs, layouts)]


def make_eval_indices(eval_seed: int, splits: Splits, evaluators: tuple[EvaluatorConfig, ...],
                      num_context: int, bursty: int = 1,
                      num_labels: int = 0) -> dict[str, sampler.SequenceIndices]:
  """Draws each evaluator's sequences once: eval_seed -> (data, model); data -> one key each.

  Evaluation sequences share the task's layout (`bursty`) with uniform classes.
  """
  names = [e.name for e in evaluators]
  if len(set(names)) != len(names):
    raise ValueError(f"evaluator names must be unique, got {names}")
  data_key, _model_key = jax.random.split(jax.random.key(eval_seed))
  keys = jax.random.split(data_key, len(evaluators))
  specs, layouts = [], []
  for ev in evaluators:
    spec = spec_for(splits, ev.classes, ev.exemplars, ev.pairs, where=f"evaluator {ev.name!r}")
    if ev.labels not in ("relabel", "fixed"):
      raise ValueError(f"evaluator {ev.name!r}: labels={ev.labels!r}; allowed: 'relabel', 'fixed'")
    if ev.labels == "fixed" and num_labels < 2:
      raise ValueError(f"evaluator {ev.name!r}: labels='fixed' needs num_labels >= 2, "
                       f"got {num_labels}")
    specs.append(spec)
    layouts.append(tuple(dict(batch_size=ev.size, num_context=num_context, bursty=bursty,
                              num_labels=num_labels,
                              relabel_fraction=1.0 if ev.labels == "relabel" else 0.0).items()))
  return dict(zip(names, _sample_sets(keys, tuple(specs), tuple(layouts))))



def dense_indices(splits: Splits) -> sampler.SequenceIndices:
  """All (a, b, label order, query) combinations over train classes and pairs (n = 2).

  Returns index arrays only (78,400 sequences for the paper's splits); gather
  features per analysis batch to keep memory small.
  """
  cls = np.asarray(splits.train_classes)
  pairs = np.asarray(splits.train_pairs)
  a, b = np.meshgrid(cls, cls, indexing="ij")
  keep = a != b
  a, b = a[keep], b[keep]                                   # [AB] ordered class pairs
  ordered = np.concatenate([pairs, pairs[:, ::-1]], axis=0)  # [2P] label orders
  ab = np.repeat(np.arange(len(a)), len(ordered) * 2)
  lo = np.tile(np.repeat(np.arange(len(ordered)), 2), len(a))
  correct = np.tile(np.array([0, 1]), len(a) * len(ordered))
  ca, cb = a[ab], b[ab]
  la, lb = ordered[lo, 0], ordered[lo, 1]
  classes = np.stack([ca, cb, np.where(correct == 0, ca, cb)], axis=1)
  labels = np.stack([la, lb, np.where(correct == 0, la, lb)], axis=1)
  types = np.stack([np.where(correct == 0, sampler.BURSTY, sampler.DISTRACTOR),
                    np.where(correct == 0, sampler.DISTRACTOR, sampler.BURSTY),
                    np.full(len(ca), sampler.QUERY)], axis=1)
  ex0 = int(splits.train_exemplars[0])
  return sampler.SequenceIndices(
      jnp.asarray(classes, jnp.int32), jnp.full(classes.shape, ex0, jnp.int32),
      jnp.asarray(labels, jnp.int32), jnp.asarray(types, jnp.int32))
