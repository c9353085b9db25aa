"""The notebook API: train or load a sweep, address its runs by condition and seed.

    import ih_jax
    sweep = ih_jax.run({"sweep": {"conditions": ["none", "pt=pt:L1H3"],
                                  "init_seeds": [5, 6]}}, "/tmp/ih_pt")
    run = sweep.run("pt", seed=6)
    run.metrics()["loss"]                 # [evaluations] array, eval set fsl_train
    run.plot_loss()                       # a matplotlib Figure (save it yourself)
    run.scores()["induction_strength"]    # [L, H] at the final snapshot

A `Sweep` is the same type however many compiled programs the sweep needed; runs are
never addressed by program-local indices.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import clamps as clamps_lib
from ih_jax import model as model_lib
from ih_jax import train as train_lib
from ih_jax import workdir as workdir_lib
from ih_jax.analysis import context as context_lib, measures, timing
from ih_jax.config import ExperimentConfig
from ih_jax.data import sampler


@dataclasses.dataclass(frozen=True)
class Run:
  """One trained run: its condition, seed, data variant and where its outputs are."""
  condition: str      # the condition's name in the sweep
  seed: int           # init seed
  variant: str        # data-variant name ("" without a data grid)
  spec: str           # the canonical clamp spec it trained under
  workdir: str        # its program's workdir
  index: int          # its index in that program (what the files use)

  def __repr__(self) -> str:
    variant = f", variant={self.variant!r}" if self.variant else ""
    return f"Run({self.condition!r}, seed={self.seed}{variant}, spec={self.spec!r})"

  # ---- training curves
  def records(self) -> list[dict[str, Any]]:
    """This run's rows of metrics.csv (every eval set, both views)."""
    return [r for r in workdir_lib.read_metrics(self.workdir) if r["run"] == self.index]

  def metrics(self, eval_set: str = "fsl_train", clamped: bool = True) -> dict[str, np.ndarray]:
    """Columns of one eval set over training: {'seqs': [P], 'loss': [P], ...}.

    clamped=False is the same evaluation with the run's clamps removed (written only
    for clamped runs, when train.eval_unclamped is on).
    """
    rows = [r for r in self.records()
            if r["eval_set"] == eval_set and r["clamped"] == int(clamped)]
    if not rows:
      sets = sorted({r["eval_set"] for r in self.records()})
      raise ValueError(f"{self}: no {'clamped' if clamped else 'clamp-free'} rows for eval "
                       f"set {eval_set!r}; its eval sets: {sets}")
    skip = ("run", "condition", "seed", "eval_set", "clamped", "variant", "spec")
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0] if k not in skip}

  def learning_time(self, eval_set: str = "fsl_train") -> float:
    """First evaluation with loss < 0.4 ln 2 (NaN if never: censored)."""
    m = self.metrics(eval_set)
    return timing.learning_time(m["seqs"].tolist(), m["loss"].tolist())

  # ---- params and activations
  def snapshots(self) -> list[int]:
    """The sequence counts with saved params."""
    return ckpt_lib.list_steps(self.workdir)

  def params(self, seqs: int | None = None) -> Any:
    """Params at `seqs` sequences (the nearest saved, with a warning), final if None."""
    return ckpt_lib.load_params(self.workdir, self.index, seqs)

  def context(self) -> context_lib.RunContext:
    """What analysis needs (config, features, splits; its clamps via run_clamps)."""
    config_json = os.path.join(self.workdir, workdir_lib.CONFIG_JSON)
    return _cached_context(self.workdir, os.path.getmtime(config_json))

  def clamps(self) -> clamps_lib.Clamps | None:
    """The condition it trained under (None for an unclamped run)."""
    return self.context().run_clamps(self.index)

  def activations(self, batch: sampler.Batch, sites: Sequence[str], *,
                  clamps: str | None = "own", seqs: int | None = None) -> dict[str, np.ndarray]:
    """Recorded activations (e.g. 'blocks.1.pattern' [B, H, T, T]) on `batch`.

    clamps: "own" (the run's condition), None (clamp-free) or a spec applied on top
    of the run's own (e.g. "ablate:L2H3").
    """
    ctx = self.context()
    m = ctx.cfg.model
    own = ctx.run_clamps(self.index)
    if clamps == "own":
      c = own
    elif clamps is None:
      c = None
    else:
      extra = clamps_lib.parse(clamps, m.num_layers, m.num_heads)
      c = extra if own is None else clamps_lib.combine(own, extra)
    plan = clamps_lib.NO_CLAMPS if c is None else clamps_lib.plan_for(clamps_lib.stack([c]))
    c_j = None if c is None else jax.tree.map(jax.numpy.asarray, c)
    steps = self.snapshots()
    step = steps[-1] if seqs is None else ckpt_lib.resolve_step(steps, seqs, nearest=True)
    # Windowed clamps act as they did in training at that point.
    _, aux = model_lib.apply(self.params(seqs), batch, c_j, m, plan, sites=tuple(sites),
                             seqs=step if plan.scheduled else None)
    return {k: np.asarray(v) for k, v in aux.items()}

  def batch(self, size: int = 256, seed: int = 0) -> sampler.Batch:
    """A fixed batch of the dense analysis set (few-shot task), gathered."""
    ctx = self.context()
    return sampler.gather_features(ctx.features, ctx.dense_set(size, seed))

  def scores(self, seqs: int | None = None, size: int = 1024,
             names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Head scores under the run's own clamps: {name: [L, H]} plus loss and acc, on
    `size` sequences of the dense set (ih_jax.analysis.scores: induction_strength,
    pt_score, ... and any you registered)."""
    ctx = self.context()
    steps = self.snapshots()
    step = steps[-1] if seqs is None else ckpt_lib.resolve_step(steps, seqs, nearest=True)
    out = measures.measure_under(ctx.stacked_params(self.index, [step]), ctx.features,
                                 ctx.dense_set(size), ctx.cfg.model,
                                 ctx.run_clamps(self.index), head_scores=names,
                                 seqs_K=[step])
    return {k: np.asarray(v)[0] for k, v in out.items()}

  # ---- figures (returned, not saved)
  def plot_loss(self, eval_sets: Sequence[str] | None = None, ax=None):
    """Loss over training of each eval set; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = (plt.subplots(figsize=(6, 3.5)) if ax is None else (ax.figure, ax))
    sets = eval_sets or sorted({r["eval_set"] for r in self.records()})
    for name in sets:
      m = self.metrics(name)
      ax.plot(m["seqs"], m["loss"], label=name)
    ax.axhline(np.log(2), color="gray", ls=":", lw=1)
    ax.set(xlabel="sequences", ylabel="loss", title=repr(self))
    ax.legend(fontsize=8)
    return fig

  def plot_pattern(self, layer: int, head: int, seqs: int | None = None, size: int = 256,
                   clamps: str | None = "own", ax=None):
    """Mean attention pattern of one head (0-based layer, head) on the dense set."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    site = f"blocks.{layer}.pattern"
    A = self.activations(self.batch(size), [site], clamps=clamps, seqs=seqs)[site]
    fig, ax = (plt.subplots(figsize=(3.5, 3)) if ax is None else (ax.figure, ax))
    im = ax.imshow(A[:, head].mean(0), vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set(xlabel="key", ylabel="query",
           title=f"{clamps_lib.head_name((layer, head))} ({self.condition}, seed {self.seed})")
    return fig


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Every run of a workdir (one program or several), addressed by condition and seed."""
  workdir: str
  runs: tuple[Run, ...]

  def select(self, condition: str | None = None, seed: int | None = None,
             variant: str | None = None) -> list[Run]:
    """The runs matching every given field."""
    return [r for r in self.runs if (condition is None or r.condition == condition)
            and (seed is None or r.seed == seed) and (variant is None or r.variant == variant)]

  def run(self, condition: str | None = None, seed: int | None = None,
          variant: str | None = None) -> Run:
    """The one run matching the fields given; an error names the choices otherwise."""
    found = self.select(condition, seed, variant)
    if len(found) == 1:
      return found[0]
    choices = ", ".join(f"({r.condition!r}, seed={r.seed}"
                        + (f", variant={r.variant!r})" if r.variant else ")") for r in self.runs)
    what = "no run" if not found else f"{len(found)} runs"
    raise ValueError(f"{what} with condition={condition!r}, seed={seed!r}, variant={variant!r} "
                     f"in {self.workdir!r}; runs: {choices}")

  @property
  def conditions(self) -> list[str]:
    """The distinct condition names of the runs, in first-seen order."""
    return list(dict.fromkeys(r.condition for r in self.runs))

  @property
  def seeds(self) -> list[int]:
    """The distinct init seeds of the runs, in first-seen order."""
    return list(dict.fromkeys(r.seed for r in self.runs))

  def learning_times(self, eval_set: str = "fsl_train") -> dict[tuple[str, int], float]:
    """{(condition, seed): learning time} (NaN = never learned)."""
    return {(r.condition, r.seed): r.learning_time(eval_set) for r in self.runs}

  def plot_losses(self, eval_set: str = "fsl_train", ax=None):
    """One loss curve per run, coloured by condition; returns the Figure."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = (plt.subplots(figsize=(6, 3.5)) if ax is None else (ax.figure, ax))
    colours = {c: f"C{i % 10}" for i, c in enumerate(self.conditions)}
    for r in self.runs:
      m = r.metrics(eval_set)
      ax.plot(m["seqs"], m["loss"], color=colours[r.condition], lw=1,
              label=r.condition if r is self.select(r.condition)[0] else None)
    ax.axhline(np.log(2), color="gray", ls=":", lw=1)
    ax.set(xlabel="sequences", ylabel=f"{eval_set} loss", title=os.path.basename(self.workdir))
    ax.legend(fontsize=8)
    return fig


@functools.lru_cache(maxsize=4)
def _cached_context(workdir: str, config_mtime: float) -> context_lib.RunContext:
  """A workdir's context, loaded once (features are rebuilt otherwise) until its
  config.json changes."""
  del config_mtime  # part of the cache key only
  return context_lib.load_context(workdir)


def _program_dirs(workdir: str) -> list[str]:
  if workdir_lib.is_sweep(workdir):
    return [os.path.join(workdir, p["workdir"]) for p in workdir_lib.read_sweep_index(workdir)]
  return [workdir]


def load(workdir: str) -> Sweep:
  """The runs of a trained (or partly trained) workdir."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no workdir {workdir!r}")
  runs = []
  for sub in _program_dirs(workdir):
    for r in workdir_lib.read_config(sub)["runs"]:
      runs.append(Run(r["condition"], int(r["init_seed"]), r.get("variant", ""), r["spec"],
                      sub, int(r["index"])))
  return Sweep(workdir, tuple(runs))


def run(config: ExperimentConfig | Mapping[str, Any], workdir: str, *,
        overwrite: bool = False, verbose: bool = True) -> Sweep:
  """Trains every run of `config` (an ExperimentConfig or its dict form) into `workdir`
  (resuming what is there) and returns the Sweep."""
  cfg = config if isinstance(config, ExperimentConfig) else ExperimentConfig.from_dict(
      dict(config))
  train_lib.train_and_evaluate(cfg, workdir, overwrite=overwrite, verbose=verbose)
  return load(workdir)
