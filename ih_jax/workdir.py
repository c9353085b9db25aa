"""What a training run writes into its workdir.

  config.json     resolved config, runs, clamp plan, relabel pairs, versions
  metrics.csv     one row per run x eval point x eval set x (clamped | unclamped)
  train_log.csv   per step: run, seqs, train loss, global gradient-norm
  final_params.msgpack   runs-stacked final params (flax.serialization)

A workdir that already holds results is never appended to (SPEC §9.10).
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

from ih_jax.data import features as features_lib
from ih_jax.metrics import METRIC_NAMES

if TYPE_CHECKING:
  from ih_jax.train import Experiment, TrainResult

METRICS_CSV = "metrics.csv"
TRAIN_LOG_CSV = "train_log.csv"
CONFIG_JSON = "config.json"
FINAL_PARAMS = "final_params.msgpack"
METRIC_COLUMNS = ("run", "condition", "seed", "seqs", "step", "eval_set", "clamped") + METRIC_NAMES
_OUTPUTS = (METRICS_CSV, TRAIN_LOG_CSV, CONFIG_JSON, FINAL_PARAMS)


def environment_metadata() -> dict[str, Any]:
  return dict(
      jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
      backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
      jax_threefry_partitionable=bool(jax.config.jax_threefry_partitionable),
      default_prng_impl=str(jax.config.jax_default_prng_impl),
      created=datetime.datetime.now().isoformat(timespec="seconds"))


class RunWriter:
  """Writes a fresh workdir incrementally (rows are flushed after every evaluation)."""

  def __init__(self, workdir: str, exp: "Experiment", *, overwrite: bool = False):
    self.workdir = workdir
    existing = [f for f in _OUTPUTS if os.path.exists(os.path.join(workdir, f))]
    if existing and not overwrite:
      raise FileExistsError(
          f"workdir {workdir!r} already holds results ({', '.join(existing)}); refusing to "
          "append to or overwrite them. Use a new --workdir, or pass overwrite=True "
          "(--overwrite) to replace them")
    os.makedirs(workdir, exist_ok=True)
    for f in existing:
      os.remove(os.path.join(workdir, f))
    meta = dict(
        config=exp.cfg.to_dict(),
        runs=[dataclasses.asdict(r) for r in exp.runs],
        clamp_plan=dataclasses.asdict(exp.plan),
        features=features_lib.feature_metadata(exp.cfg.data),
        relabel_pairs=dict(train=exp.splits.train_pairs.tolist(),
                           val=exp.splits.val_pairs.tolist(),
                           test=exp.splits.test_pairs.tolist()),
        matmul_precision=exp.cfg.train.matmul_precision,
        environment=environment_metadata())
    with open(os.path.join(workdir, CONFIG_JSON), "w") as f:
      json.dump(meta, f, indent=2)
    self._metrics = open(os.path.join(workdir, METRICS_CSV), "w", newline="")
    self._mw = csv.DictWriter(self._metrics, fieldnames=METRIC_COLUMNS)
    self._mw.writeheader()
    self._log = open(os.path.join(workdir, TRAIN_LOG_CSV), "w", newline="")
    self._lw = csv.writer(self._log)
    self._lw.writerow(("run", "condition", "seed", "seqs", "loss", "grad_norm"))
    self._runs = exp.runs

  def append(self, rows: list[dict[str, Any]], seqs_S: np.ndarray, loss_RS: np.ndarray,
             gnorm_RS: np.ndarray) -> None:
    self._mw.writerows(rows)
    self._metrics.flush()
    for r in self._runs:
      self._lw.writerows(
          (r.index, r.condition, r.init_seed, int(s), f"{l:.6g}", f"{g:.6g}")
          for s, l, g in zip(seqs_S, loss_RS[r.index], gnorm_RS[r.index]))
    self._log.flush()

  def finish(self, result: "TrainResult") -> None:
    self._metrics.close()
    self._log.close()
    tmp = os.path.join(self.workdir, FINAL_PARAMS + ".tmp")
    with open(tmp, "wb") as f:
      f.write(flax.serialization.to_bytes(result.params))
    shutil.move(tmp, os.path.join(self.workdir, FINAL_PARAMS))


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
      for k in METRIC_NAMES:
        row[k] = float(row[k])
      out.append(row)
  return out
