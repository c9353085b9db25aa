"""What a training program writes into its workdir, and resuming into it.

  config.json     resolved config, runs, clamp plan, relabel pairs, versions
  metrics.csv     one row per run x eval point x eval set x (clamped | unclamped)
  train_log.csv   per step: run, seqs, train loss, global gradient-norm
  checkpoints/    Orbax checkpoints on the configured schedule (ih_jax.checkpoint)
  done.json       written last: the run finished (wall time, compile time)

A workdir is never appended to blindly (SPEC §9.10): a workdir holding a run of
the same config is resumed from its latest checkpoint (rows after it are
dropped, then recomputed), one holding a different config is refused with the
differing fields named, unless the caller asks to overwrite.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import shutil
from typing import TYPE_CHECKING, Any

import flax
import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax.data import features as features_lib
from ih_jax.metrics import METRIC_NAMES, metric_names

if TYPE_CHECKING:
  from ih_jax.config import ExperimentConfig
  from ih_jax.program import Experiment

METRICS_CSV = "metrics.csv"
TRAIN_LOG_CSV = "train_log.csv"
CONFIG_JSON = "config.json"
DONE_JSON = "done.json"
ROW_COLUMNS = ("run", "condition", "seed", "variant", "seqs", "step", "eval_set", "clamped")
METRIC_COLUMNS = ROW_COLUMNS + METRIC_NAMES   # the few-shot task's metrics.csv columns


def metric_columns(task_kind: str) -> tuple[str, ...]:
  """metrics.csv columns of a task (ih_jax.metrics.metric_names)."""
  return ROW_COLUMNS + metric_names(task_kind)


LOG_COLUMNS = ("run", "condition", "seed", "seqs", "loss", "grad_norm")
_OUTPUTS = (METRICS_CSV, TRAIN_LOG_CSV, CONFIG_JSON, DONE_JSON, ckpt_lib.CHECKPOINT_DIR,
            ckpt_lib.RESUME_DIR, ckpt_lib.CORRUPT_DIR)
# Fields that may change between an interrupted run and its resumption.
# (sweep.max_runs_per_program may change too: the per-program run list is checked.)
RESUMABLE_CHANGES = ("train.progress_every_s", "checkpoint.resume_every_s",
                     "sweep.max_runs_per_program")


def environment_metadata() -> dict[str, Any]:
  return dict(
      jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
      backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
      jax_threefry_partitionable=bool(jax.config.jax_threefry_partitionable),
      default_prng_impl=str(jax.config.jax_default_prng_impl),
      created=datetime.datetime.now().isoformat(timespec="seconds"))


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ between two JSON-like configs."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      name = f"{prefix}.{k}" if prefix else str(k)
      if k not in old or k not in new:
        out.append(name)
      else:
        out += config_diff(old[k], new[k], name)
    return out
  return [] if old == new else [prefix]


def _as_json(tree: Any) -> Any:
  return json.loads(json.dumps(tree))


# The data fields that shape the embedded synthetic features; the others (file path,
# Omniglot reader / encoder settings) do not affect a synthetic run.
_SYNTHETIC_FIELDS = ("source", "rho", "eta", "feature_seed", "num_classes", "num_exemplars",
                     "dim")


def _relevant(cfg_json: Any) -> Any:
  data = cfg_json.get("data") if isinstance(cfg_json, dict) else None
  if isinstance(data, dict) and data.get("source") == "synthetic":
    cfg_json = dict(cfg_json, data={k: data[k] for k in _SYNTHETIC_FIELDS if k in data})
  return cfg_json


def _with_defaults(stored: dict[str, Any]) -> Any:
  """A stored config with the fields added since it was written set to their defaults.

  A run made before an option existed behaved like the option's default, so the
  new field must not count as a difference (reuse / resume keep working).
  """
  from ih_jax.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  try:
    return _as_json(ExperimentConfig.from_dict(stored).to_dict())
  except (ValueError, TypeError):
    return stored  # e.g. written by a newer version: compare as stored


def workdir_status(workdir: str, sweep_cfg: "ExperimentConfig", runs: list[Any], *,
                   overwrite: bool) -> str:
  """'fresh', 'resume' or 'done'. Refuses a workdir holding a different config or runs."""
  path = os.path.join(workdir, CONFIG_JSON)
  present = [f for f in _OUTPUTS if os.path.exists(os.path.join(workdir, f))]
  if overwrite:
    for f in present:
      p = os.path.join(workdir, f)
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return "fresh"
  if not present:
    return "fresh"
  if not os.path.exists(path):
    raise FileExistsError(
        f"workdir {workdir!r} holds {', '.join(present)} but no {CONFIG_JSON}, so it cannot "
        "be resumed; use a new --workdir or pass overwrite=True (--overwrite)")
  try:
    with open(path) as f:
      stored = json.load(f)
    old, old_runs = stored["config"], stored["runs"]
  except (OSError, ValueError, KeyError) as e:
    raise FileExistsError(f"{path} is unreadable ({e}); use a new --workdir or pass "
                          "overwrite=True (--overwrite)") from None
  diff = [d for d in config_diff(_relevant(_with_defaults(old)),
                                 _relevant(_as_json(sweep_cfg.to_dict())))
          if d not in RESUMABLE_CHANGES]
  if diff:
    raise FileExistsError(
        f"workdir {workdir!r} holds a run with a different config (differing fields: "
        f"{', '.join(diff)}); refusing to resume or overwrite it. Use a new --workdir, or "
        "pass overwrite=True (--overwrite) to replace it")
  new_runs = _as_json([dataclasses.asdict(r) for r in runs])
  if old_runs != new_runs:
    # Same config but another split into programs (e.g. automatic chunking on a
    # machine with a different memory size): resuming would mix runs.
    raise FileExistsError(
        f"workdir {workdir!r} holds runs {_run_names(old_runs)} but this program has "
        f"{_run_names(new_runs)}: the sweep was split into programs differently (set "
        f"sweep.max_runs_per_program={len(old_runs)} to resume it as before); refusing to "
        "resume")
  return "done" if os.path.exists(os.path.join(workdir, DONE_JSON)) else "resume"


def _run_names(runs: list[dict[str, Any]]) -> str:
  names = [f"{r['condition']}/s{r['init_seed']}" + (f"[{r['variant']}]" if r.get("variant") else "")
           for r in runs]
  return "[" + ", ".join(names[:6]) + (f", ... ({len(names)} in all)]" if len(names) > 6 else "]")


def write_config(workdir: str, exp: "Experiment", sweep_cfg: "ExperimentConfig") -> None:
  """config.json: written first, so a workdir with anything in it can be checked."""
  os.makedirs(workdir, exist_ok=True)
  meta = dict(
      config=sweep_cfg.to_dict(),
      program_config=exp.cfg.to_dict(),
      variants=[v.name for v in exp.variants],
      runs=[dataclasses.asdict(r) for r in exp.runs],
      clamp_plan=dataclasses.asdict(exp.plan),
      features=([] if exp.cfg.is_tokens else
                [features_lib.feature_metadata(v.cfg.data) for v in exp.variants]),
      relabel_pairs=None if exp.splits is None else dict(
          train=exp.splits.train_pairs.tolist(), val=exp.splits.val_pairs.tolist(),
          test=exp.splits.test_pairs.tolist()),
      matmul_precision=exp.cfg.train.matmul_precision,
      environment=environment_metadata())
  tmp = os.path.join(workdir, CONFIG_JSON + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(workdir, CONFIG_JSON))


class RunWriter:
  """Writes metrics / train log rows incrementally (flushed after every chunk).

  `resume_seqs=None` starts fresh files; otherwise the existing files are cut
  back to the rows at or before `resume_seqs` (the checkpoint resumed from) and
  appended to, so no row is lost or duplicated. Losses are written with 9
  significant digits, enough to read float32 back exactly.
  """

  def __init__(self, workdir: str, exp: "Experiment", resume_seqs: int | None = None):
    self.workdir = workdir
    columns = metric_columns(exp.cfg.task.kind)
    self._metrics = _open_csv(os.path.join(workdir, METRICS_CSV), columns, resume_seqs)
    self._mw = csv.DictWriter(self._metrics, fieldnames=columns)
    self._log = _open_csv(os.path.join(workdir, TRAIN_LOG_CSV), LOG_COLUMNS, resume_seqs)
    self._lw = csv.writer(self._log)
    self._runs = exp.runs

  def append(self, rows: list[dict[str, Any]], seqs_S: np.ndarray, loss_RS: np.ndarray,
             gnorm_RS: np.ndarray) -> None:
    self._mw.writerows(rows)
    self._metrics.flush()
    for r in self._runs:
      self._lw.writerows(
          (r.index, r.condition, r.init_seed, int(s), f"{l:.9g}", f"{g:.9g}")
          for s, l, g in zip(seqs_S, loss_RS[r.index], gnorm_RS[r.index]))
    self._log.flush()

  def close(self) -> None:
    self._metrics.close()
    self._log.close()

  def finish(self, summary: dict[str, Any]) -> None:
    self.close()
    with open(os.path.join(self.workdir, DONE_JSON), "w") as f:
      json.dump(summary, f, indent=2)


def _open_csv(path: str, columns: tuple[str, ...], resume_seqs: int | None):
  """A CSV opened for appending; on resume, rows after `resume_seqs` (or torn) are cut."""
  kept: list[list[str]] = []
  if resume_seqs is not None and os.path.exists(path):
    with open(path, newline="") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      seqs_col = columns.index("seqs")
      for row in reader:
        if header == list(columns) and len(row) == len(columns):
          try:
            if int(row[seqs_col]) <= resume_seqs:
              kept.append(row)
          except ValueError:
            pass  # a torn last line
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    w.writerows(kept)
  os.replace(tmp, path)
  return open(path, "a", newline="")


def read_metrics(workdir_or_csv: str) -> list[dict[str, Any]]:
  """Reads metrics.csv rows with numeric columns converted."""
  path = workdir_or_csv
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_CSV)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file at {path!r}; did training run in that workdir?")
  out = []
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      for k in ("run", "seed", "seqs", "step", "clamped"):
        row[k] = int(row[k])
      for k in row:  # every metric column of the task (ih_jax.metrics.metric_names)
        if k not in ROW_COLUMNS:
          row[k] = float(row[k])
      out.append(row)
  return out


def read_train_log(workdir: str, num_runs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(seqs [S], loss [R, S], grad_norm [R, S]) from train_log.csv."""
  per_run: dict[int, list[tuple[int, float, float]]] = {r: [] for r in range(num_runs)}
  with open(os.path.join(workdir, TRAIN_LOG_CSV), newline="") as f:
    for row in csv.DictReader(f):
      per_run[int(row["run"])].append((int(row["seqs"]), float(row["loss"]),
                                       float(row["grad_norm"])))
  seqs = np.asarray([s for s, _, _ in per_run[0]], np.int64)
  loss = np.asarray([[l for _, l, _ in per_run[r]] for r in range(num_runs)], np.float32)
  gnorm = np.asarray([[g for _, _, g in per_run[r]] for r in range(num_runs)], np.float32)
  return seqs, loss, gnorm
