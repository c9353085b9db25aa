"""Typed experiment configuration.

The library takes these frozen dataclasses. `ExperimentConfig.from_dict` accepts
any nested mapping (e.g. `ml_collections.ConfigDict.to_dict()`), so only the
launchers in `ih_jax/experiments/` depend on ml_collections. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from typing import Any, Mapping

from ih_jax.data.evalsets import PAPER_EVALUATORS, EvaluatorConfig
from ih_jax.data.features import LEGACY_FAMILY, FeatureConfig, check_class_split
from ih_jax.data.sampler import check_layout
from ih_jax.data.tokens import TokenTaskConfig
from ih_jax import freeze as freeze_lib
from ih_jax import warmstart
from ih_jax.model import ModelConfig
from ih_jax.tasks import core as tasks_core


MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
# Adam moves every parameter by up to ~lr per step: above this a run diverges or
# oscillates, so it is warned about (not refused: a deliberate stress test may want it).
LEARNING_RATE_WARN = 1.0


def _check_int(where: str, value: int, low: int, allowed: str = "") -> None:
  """Refuses an integer below `low`, naming the field (`allowed` overrides the text)."""
  if value < low:
    raise ValueError(f"{where} must be {allowed or f'>= {low}'}, got {value}")


def _check_seconds(where: str, value: float, meaning: str) -> None:
  if not value >= 0:  # also refuses nan
    raise ValueError(f"{where} must be >= 0 seconds ({meaning}), got {value}")


def _check_seeds(where: str, seeds: tuple[int, ...]) -> None:
  for s in seeds:  # seeds become uint32 PRNG seeds
    if not 0 <= s < 2**32:
      raise ValueError(f"{where} entries must be in [0, 2**32), got {s}")


OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")


def _check_optimizer(t: "TrainConfig") -> None:
  if t.optimizer not in OPTIMIZERS:
    raise ValueError(f"train.optimizer={t.optimizer!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
  if t.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"train.lr_schedule={t.lr_schedule!r} is unknown; allowed: "
                     f"{', '.join(LR_SCHEDULES)}")
  _check_int("train.warmup_seqs", t.warmup_seqs, 0, ">= 0 (sequences of linear warmup)")
  if t.warmup_seqs >= t.num_seqs:
    raise ValueError(f"train.warmup_seqs={t.warmup_seqs} must be < train.num_seqs={t.num_seqs}")
  ranges = {"final_lr_fraction": (0.0, 1.0, True), "weight_decay": (0.0, math.inf, False),
            "adam_b1": (0.0, 1.0, False), "adam_b2": (0.0, 1.0, False),
            "momentum": (0.0, 1.0, False)}
  for name, (lo, hi, hi_ok) in ranges.items():
    v = getattr(t, name)
    if not (isinstance(v, (int, float)) and lo <= v and (v <= hi if hi_ok else v < hi)):
      raise ValueError(f"train.{name} must be in [{lo:g}, {hi:g}{']' if hi_ok else ')'}, got {v!r}")
  if not (isinstance(t.adam_eps, (int, float)) and 0 < t.adam_eps < 1):
    raise ValueError(f"train.adam_eps must be in (0, 1), got {t.adam_eps!r}")
  if t.optimizer != "sgd" and t.momentum != 0:
    raise ValueError(f"train.momentum={t.momentum:g} applies to train.optimizer='sgd' only "
                     f"(the optimizer is {t.optimizer!r}; Adam's momentum is train.adam_b1)")
  if t.lr_schedule == "constant" and t.final_lr_fraction != 0:
    raise ValueError(f"train.final_lr_fraction={t.final_lr_fraction:g} needs a decaying "
                     "train.lr_schedule (cosine or linear)")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The task: its kind, and for the few-shot task the sequence layout, splits and sampling."""
  # "fewshot": the paper's few-shot task; "tokens": the token-level induction task
  # (ih_jax.data.tokens; needs model.vocab_size >= 2, layout in ExperimentConfig.tokens).
  kind: str = "fewshot"
  num_context: int = 2                      # n context (exemplar, label) pairs; T = 2n + 1
  class_split: tuple[int, ...] = (50, 1473, 100)   # train / val / test; one may be -1 (the rest)
  exemplar_split: tuple[int, ...] = (1, 4, 0)
  pair_weights: tuple[float, ...] = (0.8, 0.2, 0.0)
  # Data properties beyond the paper (Chan et al. 2022; ih_jax.data.sampler):
  bursty: int = 1                 # copies of the query class in the context (1 = the paper)
  zipf_exponent: float = 0.0      # training classes ~ Zipf(rank)^-a (0 = uniform, the paper)
  relabel_fraction: float = 1.0   # share of relabelled sequences (1 = ICL-only, the paper);
                                  # the rest carry fixed labels (class id mod num_labels)
                                  # and no query-class item: in-weights sequences

  def layout(self, num_labels: int) -> dict:
    """The training sampler's keyword arguments (ih_jax.data.sampler.sample_indices)."""
    return dict(bursty=self.bursty, zipf_exponent=self.zipf_exponent,
                relabel_fraction=self.relabel_fraction, num_labels=num_labels)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training length, batch size, Adam learning rate, training / eval data seeds, evaluation
  cadence, matmul precision and progress-line interval."""
  num_seqs: int = 1_000_000      # training length in sequences seen (the paper's x-axis unit)
  batch_size: int = 32
  learning_rate: float = 1e-5    # peak learning rate (the paper: plain Adam at 1e-5)
  # The optimizer (ih_jax.optim). The numbers below may differ between the runs of one
  # program (a sweep.grid over them trains in one compiled program); optimizer and
  # lr_schedule may not. The defaults are the paper's plain Adam.
  optimizer: str = "adam"        # adam | sgd
  lr_schedule: str = "constant"  # constant | cosine | linear (decay to final_lr_fraction)
  warmup_seqs: int = 0           # linear warmup from 0 over this many sequences
  final_lr_fraction: float = 0.0  # cosine / linear: the last step's lr as a fraction of the peak
  weight_decay: float = 0.0      # decoupled (AdamW-style), applied to every parameter
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  momentum: float = 0.0          # sgd only (0 = plain SGD)
  # Parameter groups that get no updates in a window: 'L1', 'embed@[0,100000)',
  # 'L2H3.qk@[200000,)' (ih_jax.freeze). May differ between the runs of one program.
  freeze: tuple[str, ...] = ()
  # Warm start (ih_jax.warmstart): every run starts from WORKDIR[:RUN][@SEQS]'s params,
  # except the `reinit` groups (freeze's group names), which start fresh.
  init_from: str = ""
  reinit: tuple[str, ...] = ()
  train_seed: int = 0            # batches depend only on this (shared by all runs)
  eval_seed: int = 1
  eval_every: int = 5000         # sequences between evaluations
  eval_unclamped: bool = True    # also log each clamped run's metrics without its clamps
  matmul_precision: str = "highest"
  progress_every_s: float = 5.0  # seconds between progress lines (0 = every evaluation)

  def __post_init__(self):
    # Checked here, not when the program compiles: a bad value would otherwise cost a
    # compile and then fail obscurely (nan lr) or silently train nonsense (lr < 0).
    _check_int("train.num_seqs", self.num_seqs, 1)
    _check_int("train.batch_size", self.batch_size, 1)
    _check_int("train.eval_every", self.eval_every, 1,
               ">= 1 (sequences between evaluations; the final point is always evaluated)")
    lr = self.learning_rate
    if not (math.isfinite(lr) and lr > 0):
      raise ValueError(f"train.learning_rate must be a finite number > 0, got {lr}")
    if self.optimizer == "adam" and lr > LEARNING_RATE_WARN:
      warnings.warn(f"train.learning_rate={lr:g} is > {LEARNING_RATE_WARN:g}: Adam moves every "
                    "parameter by up to lr per step, so training will likely diverge "
                    "(the paper uses 1e-5)", UserWarning, stacklevel=3)
    _check_optimizer(self)
    _check_seeds("train.train_seed", (self.train_seed,))
    _check_seeds("train.eval_seed", (self.eval_seed,))
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"train.matmul_precision={self.matmul_precision!r} is unknown; allowed: "
                       f"{', '.join(MATMUL_PRECISIONS)}")
    _check_seconds("train.progress_every_s", self.progress_every_s,
                   "0 = a line at every evaluation")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to write Orbax checkpoints, in sequences seen.

  The saved points are the union of the schedules below plus the final point
  (always saved: it holds the final params). Points fire at the first step
  boundary at or past them, like evaluation points. Separately, a transient
  `resume/` checkpoint is written every `resume_every_s` seconds of wall time so
  an interrupted run loses little; it is deleted when the run finishes.
  """
  every: int = 0                    # period N: points 0, N, 2N, ... < num_seqs (0 = off)
  at: tuple[int, ...] = ()          # explicit points
  log_num: int = 0                  # log-spaced points between log_start and num_seqs
  log_start: int = 1000
  windows: tuple[tuple[int, ...], ...] = ()   # (start, stop, every): dense, stop inclusive
  resume_every_s: float = 60.0      # 0 = no resume checkpoints (resume from the schedule)

  def __post_init__(self):
    _check_int("checkpoint.every", self.every, 0, ">= 0 (0 = no periodic checkpoints)")
    for p in self.at:
      _check_int("checkpoint.at entries", p, 0, ">= 0 (sequences seen)")
    _check_int("checkpoint.log_num", self.log_num, 0, ">= 0 (0 = no log-spaced checkpoints)")
    if self.log_num:
      _check_int("checkpoint.log_start", self.log_start, 1)
    for i, w in enumerate(self.windows):
      if len(w) != 3 or w[2] < 1 or w[0] < 0 or w[1] < w[0]:
        raise ValueError(f"checkpoint.windows[{i}]={tuple(w)} must be (start, stop, every) "
                         "with 0 <= start <= stop and every >= 1")
    _check_seconds("checkpoint.resume_every_s", self.resume_every_s,
                   "0 = no resume checkpoints")


TRACKERS = ("tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
  """Metric writers besides metrics.csv / train_log.csv (always written: the source of
  truth). tensorboard needs tensorboardX, wandb needs wandb (`pip install
  'ih_jax[tracking]'`); each run is one TensorBoard / W&B run named
  CONDITION_seedSEED."""
  writers: tuple[str, ...] = ()     # any of TRACKERS
  wandb_project: str = "ih_jax"
  wandb_mode: str = "offline"       # offline: synced later with `wandb sync`

  def __post_init__(self):
    bad = [w for w in self.writers if w not in TRACKERS]
    if bad:
      raise ValueError(f"tracking.writers: unknown writer(s) {bad}; allowed: "
                       f"{', '.join(TRACKERS)} (CSV files are always written)")
    if self.wandb_mode not in WANDB_MODES:
      raise ValueError(f"tracking.wandb_mode={self.wandb_mode!r}; allowed: "
                       f"{', '.join(WANDB_MODES)}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """The runs axis: every data variant x condition x init seed.

  `grid` adds axes over other config fields, each "dotted.field=v1,v2,...", e.g.
  ("data.rho=0.7,0.8", "model.num_labels=5,15"). Variants that differ only in
  per-run data settings (`ih_jax.sweep.PER_RUN_FIELDS`: train_seed and the
  synthetic feature settings) share one compiled program; others get their own.
  """
  conditions: tuple[str, ...] = ("none",)   # "spec" or "name=spec" (see ih_jax.clamps)
  init_seeds: tuple[int, ...] = (5,)
  grid: tuple[str, ...] = ()
  max_runs_per_program: int = 0     # 0 = automatic (CPU: <= 12 runs per core; memory)
  # Graft-in donors for "graft:NAME" conditions: "NAME=WORKDIR[:RUN][@SEQS]",
  # a run of a finished workdir (run index 0 and its final checkpoint by default).
  donors: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.conditions:
      raise ValueError("sweep.conditions is empty; give at least one, e.g. ('none',) for a "
                       "plain run")
    if not self.init_seeds:
      raise ValueError("sweep.init_seeds is empty; give at least one seed, e.g. (5,)")
    _check_seeds("sweep.init_seeds", self.init_seeds)
    _check_int("sweep.max_runs_per_program", self.max_runs_per_program, 0,
               ">= 0 (0 = automatic)")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole experiment: model, data, task, training, sweep, checkpoint, evaluator and
  tracking settings. Cross-field checks (task kind against the model, the few-shot
  layout, the class split against the data) run on construction."""
  model: ModelConfig = ModelConfig()
  data: FeatureConfig = FeatureConfig()
  task: TaskConfig = TaskConfig()
  tokens: TokenTaskConfig = TokenTaskConfig()   # used when task.kind == "tokens"
  train: TrainConfig = TrainConfig()
  sweep: SweepConfig = SweepConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  evaluators: tuple[EvaluatorConfig, ...] = PAPER_EVALUATORS
  tracking: TrackingConfig = TrackingConfig()

  def __post_init__(self):
    check_class_split(self.data, self.task.class_split)
    for entry in self.train.freeze:  # the groups depend on the model's shape
      freeze_lib.parse(entry, self.train.num_seqs, self.model.num_layers, self.model.num_heads)
    if self.train.reinit and not self.train.init_from:
      raise ValueError(f"train.reinit={self.train.reinit} needs train.init_from (a warm start)")
    for group in self.train.reinit:
      if "@" in group:
        raise ValueError(f"train.reinit entry {group!r}: a group name without a window")
      freeze_lib.parse(group, self.train.num_seqs, self.model.num_layers, self.model.num_heads)
    if self.train.init_from:
      warmstart.parse(self.train.init_from)
    kind = self.task.kind
    if kind not in tasks_core.names():
      raise ValueError(f"unknown task.kind {kind!r}; allowed: {', '.join(tasks_core.names())} "
                       "(a task of your own must be registered with ih_jax.tasks.register "
                       "first)")
    if kind == "fewshot":
      check_layout(self.task.num_context, self.task.bursty, self.task.zipf_exponent,
                   self.task.relabel_fraction, self.model.num_labels)
    if kind == "tokens":
      if not self.model.tokens:
        raise ValueError("task.kind='tokens' needs the token model: set model.vocab_size "
                         ">= 2 (the vocabulary size)")
      self.tokens.check(self.model.vocab_size)
    elif kind == "fewshot" and self.model.tokens:
      raise ValueError(f"model.vocab_size={self.model.vocab_size} builds the token model, "
                       "which only the token task uses (set task.kind='tokens', or "
                       "model.vocab_size=0 for the few-shot task)")

  @property
  def is_tokens(self) -> bool:
    """Whether this is the token-level induction task (task.kind == "tokens")."""
    return self.task.kind == "tokens"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ExperimentConfig":
    """A config from a nested mapping, values coerced to the field types (sequences to
    tuples); unknown keys are errors."""
    return _build(cls, d, "config")

  @classmethod
  def from_stored(cls, d: Mapping[str, Any]) -> "ExperimentConfig":
    """A config read back from a workdir's config.json (see `stored_defaults`)."""
    return cls.from_dict(stored_defaults(d))

  def to_dict(self) -> dict[str, Any]:
    """The config as nested plain dicts (`dataclasses.asdict`)."""
    return dataclasses.asdict(self)


def stored_defaults(d: Mapping[str, Any]) -> dict[str, Any]:
  """Fills fields whose default changed since a stored config was written.

  A missing field otherwise takes today's default; for `data.family` that would be the
  wrong table: a synthetic run written before the field existed trained on the Gaussian
  family (features.LEGACY_FAMILY), whatever the default is now.
  """
  out = dict(d)
  data = out.get("data")
  if isinstance(data, Mapping) and data.get("source", "synthetic") == "synthetic" \
      and "family" not in data:
    out["data"] = dict(data, family=LEGACY_FAMILY)
  return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    return _build(tp, value, where)
  if origin is tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
      value = (value,)
    (elem, *_), = [typing.get_args(tp)]
    return tuple(_coerce(elem, v, f"{where}[{i}]") for i, v in enumerate(value))
  if tp is bool:
    if not isinstance(value, bool):
      raise ValueError(f"{where} must be true/false, got {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ValueError(f"{where} must be a string, got {value!r}")
    return value
  if tp in (int, float):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
      raise ValueError(f"{where} must be {tp.__name__}, got {value!r}")
    try:
      out = tp(value)
    except (TypeError, ValueError, OverflowError):
      raise ValueError(f"{where} must be {tp.__name__}, got {value!r}") from None
    if tp is int and isinstance(value, float) and value != out:
      raise ValueError(f"{where} must be an integer, got {value!r}")
    return out
  return value


def _build(cls: Any, d: Mapping[str, Any], where: str) -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
  kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()}
  return cls(**kwargs)
