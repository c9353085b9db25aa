"""From a config's sweep grid to compiled programs.

The runs axis of one program is (data variant) x (clamp condition) x (init seed),
variant-major. A data variant is a setting of `PER_RUN_FIELDS` (the training
stream seed, the synthetic feature family, the optimizer's numbers such as the
learning rate and weight decay): these change values but not shapes, so variants
share one program (each gets its own feature table and data
stream). Any other grid field (e.g. `model.num_labels`, `task.num_context`)
changes the program, so such variants are grouped into separate programs, run
one after the other, each in `workdir/program_<k>/`. A program with more runs
than `max_runs_per_program` is split into chunks the same way.

A condition entry may be bound to some init seeds, `name[5,7]=spec`: it then trains
only with those seeds. Several entries may share a name when their seed sets are
disjoint, so one condition can mean a different head per seed (e.g. each seed's own
strongest induction head) and still train in one program beside the others.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import re
from typing import Any, Callable

from ih_jax import optim
from ih_jax.config import ExperimentConfig

# Fields that may differ between runs of one program: the data stream and feature table,
# and the optimizer's numbers (ih_jax.optim).
PER_RUN_FIELDS = (("train.train_seed", "data.rho", "data.eta", "data.feature_seed", "data.family",
                   "data.latent_dim", "train.freeze")
                  + tuple(f"train.{f}" for f in optim.NUMERIC_FIELDS))


@dataclasses.dataclass(frozen=True)
class Variant:
  """One setting of the sweep grid's fields, with its full config."""
  name: str                 # "" for the base config, else "field=value;field=value"
  cfg: ExperimentConfig     # the full config of this variant (sweep.grid cleared)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a program before anything is built: condition, init seed and data variant."""
  condition: str            # condition name
  condition_entry: str      # the sweep.conditions entry ("name=spec" or "spec")
  init_seed: int
  variant: int              # index into Program.variants


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program of a sweep: its data variants and its runs, in runs-axis order."""
  name: str                 # "" when the sweep is a single program, else "program_<k>"
  variants: tuple[Variant, ...]
  runs: tuple[RunSpec, ...]

  @property
  def cfg(self) -> ExperimentConfig:
    """The shared settings (per-run fields taken from the first variant)."""
    return self.variants[0].cfg


def parse_grid_axis(entry: str) -> tuple[str, list[Any]]:
  """'data.rho=0.7,0.8' -> ('data.rho', [0.7, 0.8]). Values are Python literals or strings."""
  field, sep, values = entry.partition("=")
  field = field.strip()
  if not sep or not field or not values.strip():
    raise ValueError(f"sweep.grid entry {entry!r} must look like 'section.field=v1,v2,...'")
  if field.startswith("sweep."):
    raise ValueError(f"sweep.grid entry {entry!r}: use sweep.conditions / sweep.init_seeds "
                     "for the runs axis, not the grid")
  out = []
  for text in _split_top_level(values):
    try:
      out.append(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      out.append(text)  # a bare word, e.g. a feature source name
  return field, out


def _split_top_level(text: str) -> list[str]:
  """Splits on commas outside brackets, so tuple values like (1,2) stay whole."""
  parts, depth, cur = [], 0, ""
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append(cur.strip())
      cur = ""
    else:
      cur += ch
  if cur.strip():
    parts.append(cur.strip())
  return parts


def _set_field(d: dict[str, Any], field: str, value: Any) -> None:
  *path, last = field.split(".")
  node = d
  for i, key in enumerate(path):
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"sweep.grid: unknown field {field!r} ({'.'.join(path[:i + 1])!r} "
                       "does not exist)")
    node = node[key]
  if not isinstance(node, dict) or last not in node:
    raise ValueError(f"sweep.grid: unknown field {field!r}; allowed in "
                     f"{'.'.join(path) or 'config'}: {sorted(node) if isinstance(node, dict) else []}")
  node[last] = value


def expand_grid(cfg: ExperimentConfig) -> list[Variant]:
  """Every combination of the grid's values, as full configs (first axis slowest)."""
  if not cfg.sweep.grid:
    return [Variant("", dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, grid=())))]
  axes = [parse_grid_axis(e) for e in cfg.sweep.grid]
  fields = [f for f, _ in axes]
  if len(set(fields)) != len(fields):
    raise ValueError(f"sweep.grid names a field twice: {fields}")
  variants = []
  for combo in itertools.product(*[values for _, values in axes]):
    d = cfg.to_dict()
    d["sweep"]["grid"] = ()
    for field, value in zip(fields, combo):
      _set_field(d, field, value)
    try:
      v_cfg = ExperimentConfig.from_dict(d)
    except ValueError as e:
      raise ValueError(f"sweep.grid value {dict(zip(fields, combo))}: {e}") from None
    name = ";".join(f"{f}={v}" for f, v in zip(fields, combo))
    variants.append(Variant(name, v_cfg))
  return variants


def split_condition(entry: str) -> tuple[str, tuple[int, ...] | None, str]:
  """'name[5,6]=spec' -> ('name', (5, 6), 'spec'); 'name=spec' -> ('name', None, 'spec');
  a bare 'spec' is its own name. Raises for a malformed seed binding."""
  head, sep, spec = entry.partition("=")
  if not sep:
    return entry.strip(), None, entry
  head = head.strip()
  if "[" not in head and "]" not in head:
    return head, None, spec
  m = re.fullmatch(r"([^\[\]]+)\[([^\[\]]*)\]", head)
  seeds: list[int] = []
  if m:
    try:
      seeds = [int(t) for t in m.group(2).split(",") if t.strip()]
    except ValueError:
      seeds = []
  if not m or not seeds:
    raise ValueError(f"condition {entry!r}: a seed binding looks like 'name[5]=spec' or "
                     "'name[5,7]=spec' (init seeds, comma-separated)")
  return m.group(1).strip(), tuple(seeds), spec


def condition_runs(conditions: tuple[str, ...], init_seeds: tuple[int, ...]
                   ) -> list[tuple[str, str, int]]:
  """(name, entry, seed) of every run of one data variant, condition-major; validates
  seed bindings (seeds among init_seeds, a shared name only over disjoint seed sets)."""
  owners: dict[tuple[str, int], str] = {}
  unbound: set[str] = set()
  out = []
  for entry in conditions:
    name, bound, _ = split_condition(entry)
    if bound is None:
      if name in unbound:
        raise ValueError(f"duplicate condition name {name!r} in sweep.conditions")
      if any(n == name for n, _ in owners):
        raise ValueError(f"condition {entry!r}: {name!r} is also bound to seeds; a "
                         "seed-bound name may only repeat with disjoint seeds")
      unbound.add(name)
      seeds = init_seeds
    else:
      if name in unbound:
        raise ValueError(f"condition {entry!r}: {name!r} is also given for every seed; a "
                         "seed-bound name may only repeat with disjoint seeds")
      missing = [s for s in bound if s not in init_seeds]
      if missing:
        raise ValueError(f"condition {entry!r}: seed(s) {missing} are not in "
                         f"sweep.init_seeds {tuple(init_seeds)}")
      seeds = tuple(s for s in init_seeds if s in bound)
    for seed in seeds:
      if (name, seed) in owners:
        raise ValueError(f"conditions {owners[(name, seed)]!r} and {entry!r} both give "
                         f"{name!r} for seed {seed}")
      owners[(name, seed)] = entry
      out.append((name, entry, int(seed)))
  return out


def _program_key(cfg: ExperimentConfig) -> str:
  """Everything that must be equal for two variants to share a program."""
  d = cfg.to_dict()
  for field in PER_RUN_FIELDS:
    section, name = field.split(".")
    d[section].pop(name)
  return json.dumps(d, sort_keys=True, default=str)


def plan_programs(cfg: ExperimentConfig,
                  max_runs: int | None | Callable[[ExperimentConfig, int], int | None] = None
                  ) -> list[Program]:
  """Groups the sweep's runs into programs of at most `max_runs` runs (None = no limit).

  `max_runs` may be a function (group config, number of runs) -> limit, so that
  each group of shape-compatible variants gets its own limit.
  """
  per_variant = condition_runs(cfg.sweep.conditions, cfg.sweep.init_seeds)
  variants = expand_grid(cfg)
  groups: dict[str, list[Variant]] = {}
  for v in variants:
    groups.setdefault(_program_key(v.cfg), []).append(v)
  programs: list[tuple[tuple[Variant, ...], tuple[RunSpec, ...]]] = []
  for group in groups.values():
    runs = [RunSpec(name, entry, seed, vi)
            for vi, _ in enumerate(group) for name, entry, seed in per_variant]
    limit = max_runs(group[0].cfg, len(runs)) if callable(max_runs) else max_runs
    if limit is not None and limit < 1:
      raise ValueError(f"max runs per program must be >= 1, got {limit}")
    size = limit or len(runs)
    for start in range(0, len(runs), size):
      chunk = runs[start:start + size]
      used = sorted({r.variant for r in chunk})
      remap = {old: new for new, old in enumerate(used)}
      programs.append((tuple(group[i] for i in used),
                       tuple(dataclasses.replace(r, variant=remap[r.variant]) for r in chunk)))
  if len(programs) == 1:
    return [Program("", *programs[0])]
  return [Program(f"program_{k}", v, r) for k, (v, r) in enumerate(programs)]

