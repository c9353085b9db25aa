"""What a training program writes into its workdir, and resuming into it.

  config.json     resolved config, runs, clamp plan, relabel pairs, versions
  metrics.csv     one row per run x eval point x eval set x (clamped | unclamped)
  train_log.csv   per step: run, seqs, train loss, global gradient-norm
  snapshots/      params on the configured schedule, one array store (ih_jax.snapshots)
  resume/         Orbax resume checkpoints: the full training state (ih_jax.checkpoint)
  done.json       written last: the run finished (wall time, compile time)
  (later, by other tools: loss_curves.{png,pdf}, analysis/; a sweep's folder holds
  sweep.json and program_<k>/ instead)

A workdir is never appended to blindly: a workdir holding a run of
the same config is resumed from its latest checkpoint (rows after it are
dropped, then recomputed), one holding a different config is refused with the
differing fields named, unless the caller asks to overwrite. Resume never drops
a row before the checkpoint silently: a torn last line (a kill mid-write) is cut
and logged; any other damage is refused with the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Callable

import flax
import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import schedule
from ih_jax import snapshots as snap_lib
from ih_jax.config import ExperimentConfig
from ih_jax.data import features as features_lib
from ih_jax.metrics import METRIC_NAMES

if TYPE_CHECKING:  # for type hints only: the format module never runs training code
  from ih_jax.train.experiment import Experiment

METRICS_CSV = "metrics.csv"
TRAIN_LOG_CSV = "train_log.csv"
CONFIG_JSON = "config.json"
DONE_JSON = "done.json"
ROW_COLUMNS = ("run", "condition", "seed", "variant", "seqs", "step", "eval_set", "clamped")
METRIC_COLUMNS = ROW_COLUMNS + METRIC_NAMES   # the few-shot task's metrics.csv columns


def is_sweep(workdir: str) -> bool:
  """Does `workdir` hold a multi-program sweep (sweep.json + program_<k>/)?"""
  return os.path.exists(os.path.join(workdir, SWEEP_JSON))


def write_sweep_index(workdir: str, programs: list[dict[str, Any]]) -> None:
  """sweep.json: one entry per program (its folder name, variants and runs)."""
  with open(os.path.join(workdir, SWEEP_JSON), "w") as f:
    json.dump(programs, f, indent=2)


def read_sweep_index(workdir: str) -> list[dict[str, Any]]:
  """The program entries of a sweep's sweep.json; ValueError if it is damaged or malformed."""
  path = os.path.join(workdir, SWEEP_JSON)
  try:
    with open(path) as f:
      programs = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is damaged ({e}); rerun the sweep command to rewrite it") from None
  if not isinstance(programs, list) or not all(isinstance(p, dict) and "workdir" in p
                                               for p in programs):
    raise ValueError(f"{path} does not list programs (expected [{{'workdir': ...}}, ...])")
  return programs


def read_config(workdir: str) -> dict[str, Any]:
  """config.json of a (program's) workdir: config, runs, features, environment."""
  path = os.path.join(workdir, CONFIG_JSON)
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{workdir!r} has no {CONFIG_JSON}: not a training workdir (was "
                            "training started there?)") from None
  except ValueError as e:
    raise ValueError(f"{path} is damaged ({e})") from None
  if not isinstance(meta, dict) or "runs" not in meta or "config" not in meta:
    raise ValueError(f"{path} lacks its 'config' or 'runs' entry")
  return meta


def metric_columns(metric_names: tuple[str, ...]) -> tuple[str, ...]:
  """metrics.csv columns of a task whose evaluation returns `metric_names`
  (ih_jax.tasks.Task.metric_names)."""
  return ROW_COLUMNS + tuple(metric_names)


LOG_COLUMNS = ("run", "condition", "seed", "seqs", "loss", "grad_norm")
SWEEP_JSON = "sweep.json"
# Everything ih_jax writes into a workdir, and nothing else: --overwrite removes these
# (and program_<k>/ folders) but never a file of the user's.
RUN_OUTPUTS = (METRICS_CSV, TRAIN_LOG_CSV, CONFIG_JSON, DONE_JSON, ckpt_lib.CHECKPOINT_DIR,
            ckpt_lib.RESUME_DIR, ckpt_lib.CORRUPT_DIR, snap_lib.SNAPSHOT_DIR)
LATER_OUTPUTS = ("loss_curves.png", "loss_curves.pdf", "analysis", SWEEP_JSON,
                  CONFIG_JSON + ".tmp", METRICS_CSV + ".tmp", TRAIN_LOG_CSV + ".tmp")
_PROGRAM_DIR = re.compile(r"program_\d+$")
# Fields that may change between an interrupted run and its resumption.
# (sweep.max_runs_per_program may change too: the per-program run list is checked.)
RESUMABLE_CHANGES = ("train.progress_every_s", "checkpoint.resume_every_s",
                     "sweep.max_runs_per_program", "tracking.writers",
                     "tracking.wandb_project", "tracking.wandb_mode")


def environment_metadata() -> dict[str, Any]:
  """Library versions, backend, devices, PRNG settings and the time, for config.json."""
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


def runs_as_json(runs: list[Any]) -> list[dict[str, Any]]:
  """A program's run list as config.json and sweep.json store it."""
  return _as_json([dataclasses.asdict(r) for r in runs])


# The data fields that shape the embedded synthetic features; the others (file path,
# Omniglot reader / encoder settings) do not affect a synthetic run.
_SYNTHETIC_FIELDS = ("source", "family", "rho", "eta", "feature_seed", "latent_dim",
                     "num_classes", "num_exemplars", "dim")


def _relevant(cfg_json: Any) -> Any:
  data = cfg_json.get("data") if isinstance(cfg_json, dict) else None
  if isinstance(data, dict) and data.get("source") == "synthetic":
    keep = {k: data[k] for k in _SYNTHETIC_FIELDS if k in data}
    if keep.get("family") == "gaussian":
      keep.pop("latent_dim", None)  # the Gaussian family has no latent space
    cfg_json = dict(cfg_json, data=keep)
  return cfg_json


def _with_defaults(stored: dict[str, Any]) -> Any:
  """A stored config with the fields added since it was written set to their defaults.

  A run made before an option existed behaved like the option's default, so the
  new field must not count as a difference (reuse / resume keep working).
  """
  try:
    # from_stored: a stored synthetic config without data.family is the Gaussian family.
    return _as_json(ExperimentConfig.from_stored(stored).to_dict())
  except (ValueError, TypeError):
    return stored  # e.g. written by a newer version: compare as stored


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that cannot hold outputs (a file, read-only), before any setup."""
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):  # folders are created later, under the nearest existing one
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise NotADirectoryError(f"workdir {workdir!r}: {probe!r} is a file, not a folder; pass "
                             "a folder path (new or existing) as --workdir")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise PermissionError(f"workdir {workdir!r}: {probe!r} is not writable; pass a writable "
                          "--workdir")
  if probe == path:  # catches read-only filesystems, which os.access may not report
    try:
      fd, tmp = tempfile.mkstemp(prefix=".ih_jax_write_test", dir=path)
      os.close(fd)
      os.remove(tmp)
    except OSError as e:
      raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a "
                            "writable --workdir") from None


def output_entries(workdir: str) -> list[str]:
  """Names in `workdir` that ih_jax writes (a run's, a sweep's and later tools' outputs)."""
  if not os.path.isdir(workdir):
    return []
  return sorted(n for n in os.listdir(workdir)
                if n in RUN_OUTPUTS or n in LATER_OUTPUTS or _PROGRAM_DIR.match(n))


def remove_outputs(workdir: str) -> list[str]:
  """Removes what ih_jax wrote into `workdir` (for --overwrite); other files stay."""
  removed = output_entries(workdir)
  for name in removed:
    p = os.path.join(workdir, name)
    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
  return removed


def holds_results(workdir: str) -> bool:
  """Whether `workdir` holds anything a run produced (so its config must not change).

  A failed start leaves only config.json, CSV headers and empty checkpoint folders:
  nothing is lost by replacing it.
  """
  for name in output_entries(workdir):
    p = os.path.join(workdir, name)
    if name in (CONFIG_JSON, CONFIG_JSON + ".tmp", METRICS_CSV + ".tmp",
                TRAIN_LOG_CSV + ".tmp"):
      continue
    if name in (ckpt_lib.CHECKPOINT_DIR, ckpt_lib.RESUME_DIR):
      if any(d.isdigit() for d in os.listdir(p)):  # Orbax names a step only once complete
        return True
    elif name == snap_lib.SNAPSHOT_DIR:
      try:
        if snap_lib.read_manifest(workdir)["batches"]:
          return True
      except (snap_lib.SnapshotError, KeyError, TypeError):
        if os.listdir(p):  # something there that is not an empty store: keep it
          return True
    elif name in (METRICS_CSV, TRAIN_LOG_CSV):
      with open(p, newline="") as f:
        next(f, None)  # the header
        if any(line.strip() for line in f):
          return True
    elif _PROGRAM_DIR.match(name) and os.path.isdir(p):
      if holds_results(p):
        return True
    else:  # done.json, corrupt checkpoints, figures, analysis, a sweep index
      return True
  return False


def feature_records(exp: "Experiment") -> list[dict[str, Any]]:
  """config.json's `features`: each variant's source, with a content fingerprint of a
  feature file's table (only its path is in the config)."""
  if not exp.task.uses_features:
    return []
  out = []
  for i, v in enumerate(exp.variants):
    rec = features_lib.feature_metadata(v.cfg.data)
    if v.cfg.data.source == "file":
      rec["sha256"] = features_lib.table_fingerprint(np.asarray(exp.features[i]))
    out.append(rec)
  return out


def check_feature_records(workdir: str, stored: Any, current: list[dict[str, Any]]) -> None:
  """Refuses a workdir whose feature file now holds another table than it trained on.

  Workdirs written before fingerprints were recorded (no "sha256") are not checked.
  """
  if not isinstance(stored, list):
    return
  for old, new in zip(stored, current):
    if not isinstance(old, dict) or "sha256" not in old or "sha256" not in new:
      continue
    if old["sha256"] != new["sha256"]:
      raise FileExistsError(
          f"feature file {new.get('path')!r} changed since workdir {workdir!r} was trained "
          f"on it (table sha256 {old['sha256'][:16]}... then, {new['sha256'][:16]}... now); "
          "restore the original file, or use a new --workdir or overwrite=True (--overwrite)")


def workdir_status(workdir: str, sweep_cfg: "ExperimentConfig", runs: list[Any], *,
                   overwrite: bool, features: list[dict[str, Any]] | None = None,
                   log: Callable[[str], None] = print) -> str:
  """'fresh', 'resume' or 'done'. Refuses a workdir holding a different config or runs.

  `features` (feature_records of the program) is checked against the recorded
  fingerprints. A workdir holding only a failed start (no checkpoint, no rows) never
  locks its config: it is replaced.
  """
  path = os.path.join(workdir, CONFIG_JSON)
  present = output_entries(workdir)
  if overwrite:
    remove_outputs(workdir)
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
  try:
    _check_same_run(workdir, old, old_runs, sweep_cfg, runs)
    if features is not None:
      check_feature_records(workdir, stored.get("features"), features)
  except FileExistsError as e:
    if holds_results(workdir):
      raise
    log(f"[ih_jax] {workdir} holds only a failed start of another run ({CONFIG_JSON}, no "
        "checkpoint, no rows); replacing it")
    remove_outputs(workdir)
    return "fresh"
  return "done" if os.path.exists(os.path.join(workdir, DONE_JSON)) else "resume"


def _check_same_run(workdir: str, old: Any, old_runs: Any, sweep_cfg: "ExperimentConfig",
                    runs: list[Any]) -> None:
  diff = [d for d in config_diff(_relevant(_with_defaults(old)),
                                 _relevant(_as_json(sweep_cfg.to_dict())))
          if d not in RESUMABLE_CHANGES]
  if diff:
    raise FileExistsError(
        f"workdir {workdir!r} holds a run with a different config (differing fields: "
        f"{', '.join(diff)}); refusing to resume or overwrite it. Use a new --workdir, or "
        "pass overwrite=True (--overwrite) to replace it")
  new_runs = runs_as_json(runs)
  if old_runs != new_runs:
    # Same config but another split into programs (e.g. automatic chunking on a
    # machine with a different memory size): resuming would mix runs.
    raise FileExistsError(
        f"workdir {workdir!r} holds runs {_run_names(old_runs)} but this program has "
        f"{_run_names(new_runs)}: the sweep was split into programs differently (set "
        f"sweep.max_runs_per_program={len(old_runs)} to resume it as before); refusing to "
        "resume")


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
      features=feature_records(exp),
      relabel_pairs=None if exp.splits is None else dict(
          train=exp.splits.train_pairs.tolist(), val=exp.splits.val_pairs.tolist(),
          test=exp.splits.test_pairs.tolist()),
      matmul_precision=exp.cfg.train.matmul_precision,
      environment=environment_metadata())
  tmp = os.path.join(workdir, CONFIG_JSON + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(workdir, CONFIG_JSON))


class OutputFileError(ValueError):
  """A workdir's CSV is damaged or incomplete; the message names the file and line."""


_FIX = "Restore the file, or pass overwrite=True (--overwrite) to start this run over"


class RunWriter:
  """Writes metrics / train log rows incrementally (flushed after every chunk).

  `resume_seqs=None` starts fresh files; otherwise the existing files are cut
  back to the rows at or before `resume_seqs` (the checkpoint resumed from) and
  appended to, so no row is lost or duplicated: every row before the checkpoint
  must be there (the trainer writes them before the checkpoint), else resuming is
  refused. Losses are written with 9 significant digits, enough to read float32
  back exactly.
  """

  def __init__(self, workdir: str, exp: "Experiment", resume_seqs: int | None = None,
               log: Callable[[str], None] = print):
    self.workdir = workdir
    self._runs = exp.runs
    B = exp.cfg.train.batch_size
    self._eval_seqs = [s * B for s in schedule.eval_steps(exp.cfg.train.eval_every,
                                                          exp.cfg.train.num_seqs, B)]
    self._step_seqs = B
    columns = metric_columns(exp.task.metric_names)
    self._metrics = _open_csv(os.path.join(workdir, METRICS_CSV), columns, resume_seqs,
                              self._metrics_gap, log)
    self._mw = csv.DictWriter(self._metrics, fieldnames=columns)
    self._log = _open_csv(os.path.join(workdir, TRAIN_LOG_CSV), LOG_COLUMNS, resume_seqs,
                          self._log_gap, log)
    self._lw = csv.writer(self._log)

  def _metrics_gap(self, rows: list[dict[str, Any]], upto: int) -> str | None:
    """What is missing from the metrics rows of the evaluations at or before `upto`."""
    per_point = len(self._runs) * max(1, len({(r["eval_set"], r["clamped"]) for r in rows}))
    count: dict[int, int] = {}
    for r in rows:
      count[r["seqs"]] = count.get(r["seqs"], 0) + 1
    points = [p for p in self._eval_seqs if p <= upto]
    bad = [p for p in points if count.get(p, 0) != per_point]
    if not bad:
      return None
    return (f"{len(bad)} of {len(points)} evaluation points are incomplete (at {bad[0]:,d} "
            f"seqs: {count.get(bad[0], 0)} of {per_point} rows)")

  def _log_gap(self, rows: list[dict[str, Any]], upto: int) -> str | None:
    """What is missing from the train log: every run logs every step up to `upto`."""
    want = list(range(self._step_seqs, upto + 1, self._step_seqs))
    by_run: dict[int, list[int]] = {r.index: [] for r in self._runs}
    for r in rows:
      by_run.setdefault(r["run"], []).append(r["seqs"])
    for run, got in by_run.items():
      if sorted(got) != want:
        return f"run {run} has {len(got)} of its {len(want)} step rows"
    return None

  def append(self, rows: list[dict[str, Any]], seqs_S: np.ndarray, loss_RS: np.ndarray,
             gnorm_RS: np.ndarray) -> None:
    """Appends one chunk's eval rows to metrics.csv and its per-step losses and gradient
    norms [R, S] to train_log.csv, flushing both."""
    self._mw.writerows(rows)
    self._metrics.flush()
    for r in self._runs:
      self._lw.writerows(
          (r.index, r.condition, r.init_seed, int(s), f"{l:.9g}", f"{g:.9g}")
          for s, l, g in zip(seqs_S, loss_RS[r.index], gnorm_RS[r.index]))
    self._log.flush()

  def close(self) -> None:
    """Closes metrics.csv and train_log.csv."""
    self._metrics.close()
    self._log.close()

  def finish(self, summary: dict[str, Any]) -> None:
    """Closes the CSV files and writes done.json with `summary` (the run finished)."""
    self.close()
    with open(os.path.join(self.workdir, DONE_JSON), "w") as f:
      json.dump(summary, f, indent=2)


def _open_csv(path: str, columns: tuple[str, ...], resume_seqs: int | None,
              gap: Callable[[list[dict[str, Any]], int], str | None] | None = None,
              log: Callable[[str], None] = print):
  """A CSV opened for appending; on resume, cut back to the rows at or before `resume_seqs`.

  Besides those rows only a torn last line (a kill mid-write) is cut, and said. A
  damaged header or row, or rows missing before `resume_seqs` (`gap` says what), are
  refused: resuming would lose them silently.
  """
  kept: list[list[str]] = []
  if resume_seqs is not None:
    if not os.path.exists(path):
      raise OutputFileError(f"{path} is missing, but the run resumes from its checkpoint at "
                            f"{resume_seqs:,d} seqs: the rows before it would be lost. {_FIX}")
    try:
      _, rows, torn = _read_csv(path, columns)
    except OutputFileError as e:
      raise OutputFileError(f"{e}. {_FIX}") from None
    rows = [(fields, row) for _, fields, row in rows if row["seqs"] <= resume_seqs]
    problem = gap([row for _, row in rows], resume_seqs) if gap else None
    if problem:
      cut = f"; line {torn[0]} is incomplete (cut off mid-write)" if torn else ""
      raise OutputFileError(f"{path}: rows are missing before the checkpoint at "
                            f"{resume_seqs:,d} seqs ({problem}{cut}). {_FIX}")
    if torn:
      log(f"[ih_jax] {path}: line {torn[0]}, an incomplete last line (cut off mid-write: "
          f"{torn[1][:40]!r}), is dropped; it lies after the checkpoint at {resume_seqs:,d} "
          "seqs and is recomputed")
    kept = [fields for fields, _ in rows]
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    w.writerows(kept)
  os.replace(tmp, path)
  return open(path, "a", newline="")


_INT_COLUMNS = ("run", "seed", "seqs", "step", "clamped")
_TEXT_COLUMNS = ("condition", "variant", "eval_set")


def _parse_row(path: str, line: int, header: list[str], fields: list[str]) -> dict[str, Any]:
  if len(fields) != len(header):
    raise OutputFileError(f"{path}, line {line}: {len(fields)} fields, expected {len(header)} "
                          f"({','.join(header)})")
  row: dict[str, Any] = dict(zip(header, fields))
  for k in header:
    if k in _TEXT_COLUMNS:
      continue
    try:
      row[k] = int(row[k]) if k in _INT_COLUMNS else float(row[k])
    except ValueError:
      kind = "an integer" if k in _INT_COLUMNS else "a number"
      raise OutputFileError(f"{path}, line {line}: field {k!r} is {row[k]!r}, not {kind}"
                            ) from None
  return row


def _read_csv(path: str, columns: tuple[str, ...] | None = None
              ) -> tuple[list[str], list[tuple[int, list[str], dict[str, Any]]],
                         tuple[int, str] | None]:
  """(header, [(line, fields, parsed row)], torn) of a CSV ih_jax wrote.

  Every complete line is checked (field count, numbers); `columns`, when given, is
  the required header. `torn` is (line, text) of a last line without its newline
  (its values cannot be trusted), else None.
  """
  with open(path, newline="") as f:
    lines = f.read().split("\n")
  tail = lines.pop()  # "" when the file ends with a newline
  torn = (len(lines) + 1, tail) if tail else None
  header = next(csv.reader([lines[0] + "\n"]), []) if lines else None
  if header is None:
    header = list(columns or ())
  elif columns is not None and header != list(columns):
    i = next(i for i in range(len(header) + len(columns))
             if i >= min(len(header), len(columns)) or header[i] != columns[i])
    got = repr(header[i]) if i < len(header) else "missing"
    want = repr(columns[i]) if i < len(columns) else "nothing"
    raise OutputFileError(f"{path}, line 1: header differs from the expected one at column "
                          f"{i + 1} ({got}, expected {want})")
  rows = []
  for i, line in enumerate(lines[1:], start=2):
    fields = next(csv.reader([line + "\n"]), [])
    if fields:  # a blank line holds no row
      rows.append((i, fields, _parse_row(path, i, header, fields)))
  return header, rows, torn


def _read_finished_csv(path: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
  """Parsed rows of a workdir's CSV for reading back, with errors naming file and line."""
  header, rows, torn = _read_csv(path)
  missing = [c for c in required if c not in header]
  if missing:
    raise OutputFileError(f"{path}, line 1: header lacks column(s) {', '.join(missing)} "
                          f"(found: {','.join(header) or 'nothing'})")
  if torn and os.path.exists(os.path.join(os.path.dirname(path), DONE_JSON)):
    # A run still writing may show a partial last line; a finished one may not.
    raise OutputFileError(f"{path}, line {torn[0]}: incomplete last line {torn[1][:40]!r} "
                          "(the file was cut off); restore it from a copy or rerun")
  return [row for _, _, row in rows]


def read_metrics(workdir_or_csv: str) -> list[dict[str, Any]]:
  """Reads metrics.csv rows with numeric columns converted."""
  path = workdir_or_csv
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_CSV)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file at {path!r}; did training run in that workdir?")
  return _read_finished_csv(path, ROW_COLUMNS)


def read_train_log(workdir: str, num_runs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(seqs [S], loss [R, S], grad_norm [R, S]) from train_log.csv."""
  path = os.path.join(workdir, TRAIN_LOG_CSV)
  per_run: dict[int, list[tuple[int, float, float]]] = {r: [] for r in range(num_runs)}
  for row in _read_finished_csv(path, LOG_COLUMNS):
    if row["run"] not in per_run:
      raise OutputFileError(f"{path}: a row names run {row['run']}, but the workdir has runs "
                            f"0..{num_runs - 1}")
    per_run[row["run"]].append((row["seqs"], row["loss"], row["grad_norm"]))
  seqs = np.asarray([s for s, _, _ in per_run[0]], np.int64)
  lengths = {len(v) for v in per_run.values()}
  if len(lengths) > 1:
    raise OutputFileError(f"{path}: runs have different numbers of rows "
                          f"({sorted(lengths)}); the file is incomplete")
  loss = np.asarray([[l for _, l, _ in per_run[r]] for r in range(num_runs)], np.float32)
  gnorm = np.asarray([[g for _, _, g in per_run[r]] for r in range(num_runs)], np.float32)
  return seqs, loss, gnorm
