"""A program's runs and inputs: the Experiment that training and evaluation read.

A program is a stack of runs trained and evaluated together. The leading axis of params /
optimizer state / clamps is the runs axis R (data variant x condition x init seed,
variant-major). Data variants (ih_jax.sweep.PER_RUN_FIELDS) give each group of runs its
own feature table and training stream; variants with the same training seed and data
settings (differing only in optimizer numbers or freeze schedules) share one batch per
step, and with one such group it is shared by every run. With several devices the runs axis is padded to a multiple
of the device count with copies of the last run (their results are dropped; see
ih_jax.train.placement).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ih_jax import clamps as clamps_lib
from ih_jax import sweep as sweep_lib
from ih_jax import interventions
from ih_jax.interventions import graft as graft_lib
from ih_jax import model as model_lib
from ih_jax import tasks as tasks_lib
from ih_jax.config import ExperimentConfig
from ih_jax.data import sampler, splits as splits_lib
from ih_jax.sweep import Program, RunSpec, Variant
from ih_jax.train.placement import make_mesh

# pylint: disable=invalid-name


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a program: its index on the runs axis, condition, clamp spec, seed, variant."""
  index: int
  condition: str   # condition name
  spec: str        # canonical clamp spec (ih_jax.clamps.describe)
  init_seed: int
  variant: str = ""  # data variant name ("" when the sweep has no data grid)


@dataclasses.dataclass
class Experiment:
  """Everything derived from a program that training and evaluation need."""
  cfg: ExperimentConfig                  # shared settings (the first variant's config)
  variants: tuple[Variant, ...]
  # The task's data per variant (TaskData.data_V): few-shot [V, classes, exemplars, F];
  # [V, 1, 1, 1] for tasks that sample from nothing (the token task).
  features: jax.Array
  splits: splits_lib.Splits | None       # few-shot only (None for other tasks)
  train_spec: sampler.SamplerSpec | None  # few-shot only (None for other tasks)
  # Leaves [V, ...]; few-shot: x is IndexedFeatures; token task: one TokenBatch "tokens".
  eval_batches: dict[str, Any]
  runs: list[Run]                        # the real runs (R)
  run_variant: np.ndarray                # [R_pad] variant index of each (padded) run
  run_init_seeds: np.ndarray             # [R_pad] init seed of each (padded) run
  clamps: clamps_lib.Clamps              # runs-stacked [R_pad, ...], host numpy
  plan: clamps_lib.ClampPlan
  mesh: jax.sharding.Mesh | None = None
  task: tasks_lib.Task | None = None      # the task (ih_jax.tasks), set by setup_experiment

  @property
  def num_padded(self) -> int:
    """R_pad, the length of the runs axis including padding runs."""
    return len(self.run_variant)

def parse_conditions(entries: tuple[str, ...], num_layers: int, num_heads: int,
                     donors: tuple[str, ...] = (), tokens: bool = False,
                     num_seqs: int | None = None, family: str | None = None
                     ) -> list[tuple[str, clamps_lib.Clamps]]:
  """'name=spec', 'name[seeds]=spec' or 'spec' entries -> [(name, clamps)]. Names and
  seed bindings are checked where the runs are planned (ih_jax.sweep.condition_runs).

  `donors` are the graft donor names (`graft_lib.donor_names(cfg)`); `family`: the task
  family (ih_jax.tasks.FAMILIES) the conditions are for; kinds not defined on it are
  refused (`tokens=True` is family "tokens"); `num_seqs`: the run's length, which a
  clamp window must start within.
  """
  family = family or ("tokens" if tokens else "fewshot")
  out = []
  for entry in entries:
    name, _, spec = sweep_lib.split_condition(entry)
    try:
      c = clamps_lib.parse(spec, num_layers, num_heads, donors)
    except ValueError as e:
      raise ValueError(f"condition {entry!r}: {e}") from None
    check_family_clamps(c, entry, family)
    for kind, (start, _) in clamps_lib.scheduled(c).items():
      if num_seqs is not None and start >= num_seqs:
        raise ValueError(f"condition {entry!r}: the {kind} window starts at {start:,d}, at or "
                         f"after the end of the run (train.num_seqs={num_seqs:,d})")
    out.append((name, c))
  if not out:
    raise ValueError("sweep.conditions is empty; use ('none',) for a plain run")
  return out


def check_family_clamps(c: clamps_lib.Clamps, entry: str, family: str) -> None:
  """Refuses clamp kinds that are not defined on the task family (e.g. the few-shot-only
  kinds, which read the label tokens / query row, on a token task)."""
  plan = clamps_lib.plan_for(clamps_lib.stack([c]))
  bad = [kind for kind in plan.kinds if family not in interventions.get(kind).tasks]
  if bad:
    allowed = ("none",) + tuple(kw for kind in interventions.registered()
                                if family in kind.tasks
                                for kw in (kind.name,) + tuple(kind.aliases))
    what = "the token task" if family == "tokens" else f"{family} tasks"
    raise ValueError(
        f"condition {entry!r}: clamp kind(s) {bad} are specific to the few-shot task (they "
        f"read its label tokens / query row) and are not defined on {what}; allowed "
        f"there: {', '.join(allowed)}")


def check_seeds(cfg: ExperimentConfig) -> None:
  """Refuses an empty or duplicated list of init seeds, or an init seed equal to
  train_seed or eval_seed (the three must be pairwise distinct)."""
  t = cfg.train
  if not cfg.sweep.init_seeds:
    raise ValueError("sweep.init_seeds is empty")
  if t.train_seed == t.eval_seed:
    raise ValueError(f"train_seed and eval_seed must differ (both {t.train_seed})")
  for s in cfg.sweep.init_seeds:
    if s in (t.train_seed, t.eval_seed):
      raise ValueError(f"init seed {s} equals train_seed ({t.train_seed}) or eval_seed "
                       f"({t.eval_seed}); the three seeds must be pairwise distinct")
  if len(set(cfg.sweep.init_seeds)) != len(cfg.sweep.init_seeds):
    raise ValueError(f"duplicate init seeds in {cfg.sweep.init_seeds}")


def setup_experiment(cfg_or_program: ExperimentConfig | Program, *,
                     shard: bool = True) -> Experiment:
  """Validates a single-program config (or a planned Program) and builds its inputs."""
  if isinstance(cfg_or_program, ExperimentConfig):
    programs = sweep_lib.plan_programs(cfg_or_program)
    if len(programs) != 1:
      raise ValueError(f"this sweep needs {len(programs)} programs; plan them with "
                       "ih_jax.sweep.plan_programs and set up each one")
    program = programs[0]
  else:
    program = cfg_or_program
  cfg = program.cfg
  for v in program.variants:
    check_seeds(v.cfg)
  if cfg.train.batch_size < 1:
    raise ValueError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
  task = tasks_lib.for_config(cfg)
  task.check()
  data = task.setup([v.cfg for v in program.variants])
  conds = program_conditions(program)
  runs = program_runs(program)
  specs: list[RunSpec] = list(program.runs)
  if sorted(s.variant for s in specs) != [s.variant for s in specs]:
    raise ValueError("runs must be ordered variant-major")
  mesh = make_mesh(len(specs)) if shard else None
  if mesh is not None:  # pad with copies of the last run
    specs += [specs[-1]] * (-len(specs) % mesh.size)
  stacked = clamps_lib.stack([conds[s.condition_entry] for s in specs])
  if clamps_lib.plan_for(stacked).uses("graft"):
    template = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg,
                                                  data.data_V.shape[-1]))
    stacked = graft_lib.add_graft_params(cfg, stacked, template)
  exp = Experiment(cfg, program.variants, data.data_V, data.splits, data.train_spec,
                   data.eval_batches, runs,
                   np.asarray([s.variant for s in specs], np.int32),
                   np.asarray([s.init_seed for s in specs], np.uint32),
                   stacked, clamps_lib.plan_for(stacked), mesh, task)
  return exp


def eval_set_names(cfg: ExperimentConfig) -> list[str]:
  """The eval set names a config logs (its task's; the few-shot task: its evaluators')."""
  return tasks_lib.for_config(cfg).eval_set_names()


def program_conditions(program: Program) -> dict[str, clamps_lib.Clamps]:
  """sweep.conditions entry -> its parsed clamps, for each entry the program's runs use
  (keyed by entry: seed-bound entries may share a condition name)."""
  cfg = program.cfg
  entries = tuple(dict.fromkeys(r.condition_entry for r in program.runs))
  parsed = parse_conditions(entries, cfg.model.num_layers, cfg.model.num_heads,
                            graft_lib.donor_names(cfg), num_seqs=cfg.train.num_seqs,
                            family=tasks_lib.get(cfg.task.kind).family)
  return {entry: c for entry, (_, c) in zip(entries, parsed)}


def program_runs(program: Program) -> list[Run]:
  """The runs of a program, in runs-axis order (cheap: builds no arrays)."""
  conds = program_conditions(program)
  names = graft_lib.donor_names(program.cfg)
  return [Run(i, r.condition, clamps_lib.describe(conds[r.condition_entry], names), r.init_seed,
              program.variants[r.variant].name) for i, r in enumerate(program.runs)]


def init_params(key: jax.Array, cfg: ExperimentConfig, feature_dim: int) -> Any:
  """One run's params for this config's task."""
  return model_lib.init_params(key, cfg.model, feature_dim, task=tasks_lib.for_config(cfg))
