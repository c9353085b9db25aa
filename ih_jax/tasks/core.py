"""The Task interface and the task registry.

A task says what the model reads and predicts and how the trainer draws, scores and
evaluates batches. The model and the trainer call these methods and hold no branches
on the task; the paper's few-shot task (`fewshot.py`) and the token-level induction
task (`tokens.py`) are implementations, and a researcher's own task is one class in
their own file, registered with `@register` and selected with `task.kind=<name>`.

Model side (called inside the Flax Transformer; `model` is the module, `model.cfg` its
ModelConfig): `create_embeddings`, `output_size`, `embed`, `readout`, `model_inputs`,
`init_inputs`. Trainer side (called by ih_jax.train): `check`, `setup`,
`sampling_inputs`, `sample`, `loss`, `evaluate`, `eval_set_names`, `metric_names`.
`family` says which intervention kinds apply ("fewshot": labels are the few-shot
labels and only the query row is scored; "tokens": labels are per-position induction
targets and every position is scored; see ih_jax.interventions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

# pylint: disable=invalid-name

FAMILIES = ("fewshot", "tokens")

# forward(batch, *, sites=(), query_only=False) -> (logits, {site: activation}): one run's
# forward pass under its interventions, as the trainer hands it to `loss` / `evaluate`.
Forward = Callable[..., tuple[Any, dict[str, Any]]]


@dataclasses.dataclass
class TaskData:
  """What a task's `setup` builds once per program, for the program's V data variants.

  data_V: a pytree of arrays with a leading [V] axis that the trainer passes back to
    `sampling_inputs` in-graph (the few-shot feature tables; a placeholder for tasks
    that sample from nothing).
  eval_batches: {eval set name: batch pytree with a leading [V] axis}.
  splits, train_spec: the few-shot task's class / exemplar splits and its training
    sampler spec (None for other tasks); recorded in the workdir.
  """
  data_V: Any
  eval_batches: dict[str, Any]
  splits: Any = None
  train_spec: Any = None


class Task:
  """Base class of a task. Subclass it (or `ih_jax.tasks.SequenceTask`, which supplies
  the model side of any next-token task), set `name`, and register it with `@register`.

  An instance is built per experiment from its ExperimentConfig (`self.cfg`; None when
  the model is used on its own, outside a training program).
  """
  name: ClassVar[str] = ""
  family: ClassVar[str] = "fewshot"
  # Whether the model may compute only the query row's logits (`query_only`).
  supports_query_only: ClassVar[bool] = False
  # Whether the task trains on a feature table (recorded and fingerprinted in config.json).
  uses_features: ClassVar[bool] = False

  def __init__(self, cfg: Any = None):
    self.cfg = cfg

  # ---------------------------------------------------------------- model side
  def output_size(self, model_cfg: Any) -> int:
    """The unembedding's width (labels, or the vocabulary)."""
    raise NotImplementedError

  def create_embeddings(self, model: Any) -> None:
    """Creates the input embedding submodules as attributes of `model` (inside its
    Flax `setup`); their attribute names are the params' names in checkpoints."""
    raise NotImplementedError

  def embed(self, model: Any, inputs: Any, labels: Any, *, fuse_block0: bool,
            max_fused_batch: int) -> tuple[Any, Any]:
    """(token embeddings E [B, T, d], block 0's fused qkv [B, T, 3d] or None).

    A task may compute block 0's LayerNorm + QKV projection per distinct token and
    gather it (`model.blocks[0].qkv_rows`) when `fuse_block0` (no learned positions)
    and the batch has at most `max_fused_batch` sequences; None = not done."""
    raise NotImplementedError

  def readout(self, logits_BTV: Any) -> Any:
    """The positions of the unembedded stream that are predictions (all by default)."""
    return logits_BTV

  def model_inputs(self, batch: Any) -> tuple[Any, Any]:
    """(inputs, labels) of a batch: what the embedding reads and what interventions see
    as `ctx.labels` (few-shot: labels [B, N]; tokens: induction targets [B, T])."""
    raise NotImplementedError

  def init_inputs(self, feature_dim: int) -> tuple[Any, Any]:
    """(inputs, labels) of one example sequence, for shaping the params at init."""
    raise NotImplementedError

  # ---------------------------------------------------------------- trainer side
  def check(self) -> None:
    """Clear errors for settings of `self.cfg` the task cannot train on (before compiling)."""

  def setup(self, variant_cfgs: list[Any]) -> TaskData:
    """Host-side inputs of a program, one entry per data variant's config."""
    raise NotImplementedError

  def sampling_inputs(self, data_V: Any) -> tuple[Any, Any]:
    """In-graph, once per chunk: (per-variant sampling inputs [V, ...], shared ones)."""
    return data_V, None

  def sample(self, key: Any, per_variant: Any, shared: Any, batch_size: int) -> Any:
    """In-graph: one training batch of `batch_size` sequences (deterministic in `key`)."""
    raise NotImplementedError

  def loss(self, forward: Forward, batch: Any) -> Any:
    """The scalar training loss of one run on `batch`."""
    raise NotImplementedError

  def evaluate(self, forward: Forward, batch: Any, many_runs: bool) -> dict[str, Any]:
    """{metric: scalar} of one run on an eval set; `many_runs`: the program evaluates
    several runs (a task may then evaluate in blocks to stay in cache)."""
    raise NotImplementedError

  def eval_set_names(self) -> list[str]:
    """The eval sets' names, as `setup` keys them."""
    raise NotImplementedError

  @property
  def metric_names(self) -> tuple[str, ...]:
    """The metrics `evaluate` returns (metrics.csv's columns after the row keys)."""
    raise NotImplementedError


_REGISTRY: dict[str, type[Task]] = {}
BUILTIN = ("fewshot", "tokens")


def register(cls: type[Task]) -> type[Task]:
  """Class decorator: makes `cls` selectable as `task.kind=cls.name`.

  Re-registering a class of the same module and name replaces it (a notebook cell run
  twice); another class under a taken name is refused."""
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise TypeError(f"register takes a Task subclass, got {cls!r}")
  if not cls.name or not cls.name.isidentifier():
    raise ValueError(f"task class {cls.__qualname__}: set `name` to an identifier, got "
                     f"{cls.name!r}")
  if cls.family not in FAMILIES:
    raise ValueError(f"task {cls.name!r}: family must be one of {FAMILIES}, got {cls.family!r}")
  old = _REGISTRY.get(cls.name)
  if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
    raise ValueError(f"task name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
  _REGISTRY[cls.name] = cls
  return cls


def unregister(name: str) -> None:
  """Removes a task registered with `register` (the built-ins stay)."""
  if name in BUILTIN:
    raise ValueError(f"{name!r} is a built-in task and cannot be unregistered")
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  """Every selectable task kind (the built-ins, then registered ones)."""
  return tuple(dict.fromkeys(BUILTIN + tuple(_REGISTRY)))


def get(name: str) -> type[Task]:
  """The task class registered as `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown task kind {name!r}; allowed: {', '.join(names())} (a task of "
                     "your own must be registered with ih_jax.tasks.register first)")
  return _REGISTRY[name]
