"""A reproduction workdir: trains (or reuses) the stages the figures need, picks heads per seed.

Layout of WORKDIR:
  repro.json              scale and features (a workdir holds one scale; refused otherwise)
  <stage>/                one training workdir per stage (ih_jax.train; resumable)
  heads.json              per init seed: STRONGEST and the PT heads, from its main run
  figures/                figures made by the report (plus each stage's own loss_curves.png)
  REPORT.md               claims, measurements and verdicts
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import sweep as sweep_lib
from ih_jax import train
from ih_jax import workdir as workdir_lib
from ih_jax.analysis import context, heads as heads_lib, measures, timing
from ih_jax.config import ExperimentConfig
from ih_jax.data import features as features_lib, splits as splits_lib
from ih_jax.experiments.paper.scales import Scale

PAPER_SEED = 5


def feature_overrides(text: str) -> dict[str, Any]:
  """--features value -> data config fields.

  synthetic                the embedded default (data.family's default: relu)
  gaussian | relu | lowrank  that embedded family (gaussian = the earlier default)
  FAMILY:k=v,k2=v2         ... with data.* fields (e.g. relu:latent_dim=128,rho=0.7)
  h5:PATH | file:PATH      a feature file (.h5 in the authors' layout, or .npy)
  SOURCE                   any other data.source (e.g. omniglot_conv; see README)
  SOURCE:k=v,k2=v2         ... with extra data.* fields
  """
  text = (text or "synthetic").strip()
  name, _, arg = text.partition(":")
  if name == "synthetic":
    if arg:
      raise ValueError(f"--features={text!r}: the embedded default takes no argument "
                       "(name a family to set fields, e.g. relu:latent_dim=128)")
    return {}
  out: dict[str, Any]
  if name in features_lib.FAMILIES:
    # Named explicitly so a workdir keeps its family when the default changes.
    out = {"source": "synthetic", "family": name}
    arg_items = arg
  elif name in ("h5", "file"):
    if not arg:
      raise ValueError(f"--features={text!r}: give the file, e.g. h5:/path/features.h5")
    return {"source": "file", "path": arg}
  else:
    out, arg_items = {"source": name}, arg
  for item in filter(None, (s.strip() for s in arg_items.split(","))):
    k, sep, v = item.partition("=")
    if not sep:
      raise ValueError(f"--features={text!r}: {item!r} must look like field=value")
    out[k.strip()] = v.strip()
  return out


class Study:
  """Stages of one reproduction workdir, trained once and reused."""

  def __init__(self, root: str, scale: Scale, features: str = "synthetic",
               log: Callable[[str], None] = print, verbose: bool = True):
    self.root = os.path.abspath(root)
    self.scale = scale
    self.features = features
    self.data = feature_overrides(features)
    self.log = log
    self.verbose = verbose
    self._check_features()  # before anything is written: a bad source must not lock the root
    os.makedirs(self.root, exist_ok=True)
    self._check_identity()
    self.figure_dir = os.path.join(self.root, "figures")
    os.makedirs(self.figure_dir, exist_ok=True)
    self.train_seconds = 0.0

  def _check_features(self) -> None:
    """A feature file must exist, load and fit the task's class split (no training)."""
    cfg = self.config(paper_seqs=1, paper_eval_every=1, conditions=("none",))
    if cfg.data.source != "file":  # other sources are built (and checked) when trained
      return
    try:
      table = features_lib.load_feature_file(cfg.data.path, cfg.data.h5_dataset)
    except (OSError, KeyError, ValueError) as e:
      msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError quotes
      raise ValueError(f"--features={self.features!r}: {msg}") from None
    C, E, _ = table.shape
    try:
      splits_lib.make_splits(C, E, cfg.model.num_labels, cfg.task.class_split,
                             cfg.task.exemplar_split, cfg.task.pair_weights)
    except ValueError as e:
      raise ValueError(f"--features={self.features!r}: the table {table.shape} in "
                       f"{cfg.data.path} does not fit the task: {e}") from None

  def _check_identity(self) -> None:
    path = os.path.join(self.root, "repro.json")
    ident = dict(scale=self.scale.name, features=self.features)
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old == ident:
        return
      if self._holds_results():
        raise ValueError(f"{self.root} holds a reproduction at {old}; this one asks for "
                         f"{ident}. Use another --workdir (runs of different scales or "
                         "features are never mixed)")
      # A failed start (no trained stage, no finished entry) must not lock the folder.
      self.log(f"[reproduce] {self.root} holds only a failed start at {old}; taking it over "
               f"for {ident}")
      results = os.path.join(self.root, "results")
      for name in os.listdir(results) if os.path.isdir(results) else []:
        os.remove(os.path.join(results, name))  # the failed entries' error records
    with open(path, "w") as f:
      json.dump(ident, f)

  def _holds_results(self) -> bool:
    """Whether any stage trained or any entry finished in this folder."""
    if os.path.exists(os.path.join(self.root, "heads.json")):
      return True
    results = os.path.join(self.root, "results")
    for name in os.listdir(results) if os.path.isdir(results) else []:
      try:
        with open(os.path.join(results, name)) as f:
          if json.load(f).get("error") is None:
            return True
      except (OSError, ValueError, AttributeError):
        return True  # unreadable: keep it
    return any(workdir_lib.holds_results(os.path.join(self.root, d))
               for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)))

  # ------------------------------------------------------------------ configs

  def config(self, *, paper_seqs: int, paper_eval_every: int, conditions: tuple[str, ...],
             seeds: tuple[int, ...] = (PAPER_SEED,), ckpt_every: int = 0,
             grid: tuple[str, ...] = (), donors: tuple[str, ...] = (),
             model: dict[str, Any] | None = None,
             task: dict[str, Any] | None = None) -> ExperimentConfig:
    """The paper's settings at this scale, with the given runs (and model / task changes)."""
    sc = self.scale
    d = ExperimentConfig().to_dict()
    d["data"].update(self.data)
    d["model"].update(model or {})
    if str(self.data.get("source", "")).startswith("omniglot"):
      # Omniglot tables hold only the characters that were loaded (242 from the shared
      # archives): keep 50 train and 100 test classes, the rest in the middle split.
      d["task"]["class_split"] = [50, -1, 100]
    d["task"].update(task or {})
    d["train"].update(num_seqs=sc.seqs(paper_seqs), eval_every=sc.every(paper_eval_every),
                      learning_rate=sc.learning_rate, progress_every_s=30.0)
    d["evaluators"] = [dict(e, size=sc.eval_size) for e in d["evaluators"]]
    d["sweep"].update(conditions=list(conditions), init_seeds=list(seeds), grid=list(grid),
                      donors=list(donors))
    # Start + end are always kept (analysis needs the final params); dense ones on request.
    d["checkpoint"].update(every=ckpt_every, at=[0])
    return ExperimentConfig.from_dict(d)

  def stage_dir(self, name: str) -> str:
    """The training workdir of stage `name`."""
    return os.path.join(self.root, name)

  def stage(self, name: str, cfg: ExperimentConfig) -> list[train.TrainResult]:
    """Trains the stage (or reuses / resumes it) and returns one result per program."""
    wd = self.stage_dir(name)
    t = time.time()
    runs = sweep_lib.condition_runs(cfg.sweep.conditions, cfg.sweep.init_seeds)
    names = len(dict.fromkeys(n for n, _, _ in runs))
    seeds = len(cfg.sweep.init_seeds)
    shape = (f"{names} condition(s) x {seeds} seed(s)" if names * seeds == len(runs) else
             f"{len(runs)} runs ({names} condition(s), some bound to seeds, {seeds} seed(s))")
    self.log(f"[reproduce] stage {name}: {shape}, {cfg.train.num_seqs:,d} seqs -> {wd}")
    res = train.train_and_evaluate(cfg, wd, verbose=self.verbose)
    self.train_seconds += time.time() - t
    return res if isinstance(res, list) else [res]

  # ------------------------------------------------------------------ main runs and heads

  def main_config(self, seeds: tuple[int, ...], dense: bool) -> ExperimentConfig:
    """The main-run config for `seeds` (unclamped), with dense checkpoints if `dense`."""
    return self.config(paper_seqs=1_000_000, paper_eval_every=5000, conditions=("none",),
                       seeds=seeds, ckpt_every=self.scale.main_ckpt_every if dense else 0)

  def main_location(self, seed: int) -> tuple[str, ExperimentConfig, int]:
    """(stage name, its config, run index) of `seed`'s main run (nothing is trained).

    Seed 5's main run has dense checkpoints for the progress measures; the extra
    seeds' main runs share one program (stage "seeds").
    """
    if seed == PAPER_SEED:
      return "main", self.main_config((PAPER_SEED,), dense=True), 0
    seeds = self.scale.extra_seeds
    if seed not in seeds:
      raise ValueError(f"seed {seed} is not part of scale {self.scale.name!r} "
                       f"(seeds {PAPER_SEED} and {seeds})")
    return "seeds", self.main_config(seeds, dense=False), seeds.index(seed)

  def main_stage(self, seed: int) -> tuple[str, int]:
    """(workdir, run index) of `seed`'s main run, training it if needed."""
    name, cfg, run = self.main_location(seed)
    self.stage(name, cfg)
    return self.stage_dir(name), run

  def cached(self, filename: str, key: str, compute: Callable[[], Any]) -> Any:
    """compute() once per key, kept as JSON in WORKDIR/filename so reruns reuse it.

    A None result (nothing to compute from yet) is returned and not stored.
    """
    path = os.path.join(self.root, filename)
    cache = {}
    if os.path.exists(path):
      with open(path) as f:
        cache = json.load(f)
    if key not in cache:
      value = compute()
      if value is None:
        return None
      cache[key] = json.loads(json.dumps(value))  # what a rerun will read back
      with open(path, "w") as f:
        json.dump(cache, f, indent=1)
    return cache[key]

  def heads(self, seed: int) -> dict[str, Any]:
    """STRONGEST (highest final IS in the last layer) and PT heads (by PT score) of a seed.

    Computed from the seed's own main run on a dense subset, then cached in heads.json.
    """
    return self.cached("heads.json", str(seed), lambda: self._measure_heads(seed))

  def _measure_heads(self, seed: int) -> dict[str, Any]:
    wd, run = self.main_stage(seed)
    ctx = context.load_context(wd)
    cfg = ctx.cfg
    L, H = cfg.model.num_layers, cfg.model.num_heads
    params = ckpt_lib.load_params(wd, run)
    run_c = ctx.run_clamps(run)
    m = measures.measure_under(jax.tree.map(lambda x: np.asarray(x)[None], params), ctx.features,
                               ctx.dense_set(self.scale.head_size), cfg.model, run_c,
                               seqs_K=[ctx.checkpoint_steps()[-1]])
    is_h = m["induction_strength"][0, L - 1]
    pt_h = m["pt_score"][0, 0]
    # Only heads the run could use (never an ablated or clamped one).
    reasons = heads_lib.unusable_reasons(run_c, L, H)
    usable = heads_lib.mask_from(reasons, L, H)
    strongest = heads_lib.strongest(is_h, usable[L - 1])
    pt_order = heads_lib.ranked(pt_h, usable[0])
    if strongest is None or not pt_order:
      raise ValueError(f"seed {seed}'s main run ({wd}, run {run}): "
                       + heads_lib.none_reason(L - 1 if strongest is None else 0, reasons, H))
    info = dict(strongest=strongest, pt_order=pt_order,
                induction_strength=[round(float(v), 4) for v in is_h],
                pt_score=[round(float(v), 4) for v in pt_h])
    self.log(f"[reproduce] seed {seed}: STRONGEST = L{L}H{info['strongest']} "
             f"(IS {is_h[strongest]:.2f}), PT head = L1H{info['pt_order'][0]} "
             f"(score {pt_h[pt_order[0]]:.2f})")
    return info


# ------------------------------------------------------------------ curves

def curves(results: list[train.TrainResult], eval_set: str = "fsl_train",
           clamped: int = 1) -> dict[tuple[str, int, str], tuple[np.ndarray, np.ndarray]]:
  """(condition, seed, variant) -> (seqs, loss) of every run in the results."""
  out = {}
  for res in results:
    rows: dict[int, list] = {}
    for r in res.metrics:
      if r["eval_set"] == eval_set and r["clamped"] == clamped:
        rows.setdefault(r["run"], []).append(r)
    for run in res.runs:
      rs = sorted(rows.get(run.index, []), key=lambda r: r["seqs"])
      key = (run.condition, run.init_seed, run.variant)
      out[key] = (np.array([r["seqs"] for r in rs], float), np.array([r["loss"] for r in rs]))
  return out


def learning_times(results: list[train.TrainResult]) -> dict[tuple[str, int, str], float]:
  """(condition, seed, variant) -> learning time (NaN = never learned) of every run."""
  return {k: timing.learning_time(s, l) for k, (s, l) in curves(results).items()}


def horizon(results: list[train.TrainResult]) -> float:
  """The largest evaluated sequences count of any run in the results (the x-axis end)."""
  return float(max(s.max() for s, _ in curves(results).values()))


def nan_to_none(x: float) -> float | None:
  """None for a NaN float, else `x` unchanged (for JSON)."""
  return None if isinstance(x, float) and math.isnan(x) else x
