"""Metric writers besides the CSV files: TensorBoard (tensorboardX) and Weights & Biases.

Chosen by `tracking.writers` (ih_jax.config.TrackingConfig). metrics.csv and
train_log.csv stay the source of truth; these mirror them, one tracker run per
ih_jax run (named CONDITION_seedSEED[_VARIANT]):
  {eval_set}/{metric}            each evaluation under the run's own clamps
  {eval_set}_clampfree/{metric}  the same with its clamps removed (clamped runs)
  train/loss, train/grad_norm    the mean over each chunk of steps, at its last step
at step = sequences seen; at the end the run's hyperparameters (condition, seed,
clamp spec, learning rate, ...) with its final losses, and the loss-curve figure.
TensorBoard event files go to WORKDIR/tensorboard/<run>/ (`tensorboard --logdir
WORKDIR/tensorboard`). tensorboardX writes them without TensorFlow; clu's writers
would need TensorFlow for the same (BUILD_NOTES.md).
"""

from __future__ import annotations

import ast
import io
import os
import re
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image

from ih_jax import plots
from ih_jax.config import ExperimentConfig

_INSTALL = "pip install 'ih_jax[tracking]'"
_KEYS = ("run", "condition", "seed", "variant", "eval_set", "clamped", "seqs", "step")


def run_name(run: Any) -> str:
  """A run's tracker name, CONDITION_seedSEED[_VARIANT], with unsafe characters as "_"."""
  name = f"{run.condition}_seed{run.init_seed}" + (f"_{run.variant}" if run.variant else "")
  return re.sub(r"[^\w.=-]+", "_", name)


def _scalars(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
  """Eval rows -> {run index: {tag: value}}."""
  out: dict[int, dict[str, float]] = {}
  for r in rows:
    prefix = r["eval_set"] + ("" if r["clamped"] else "_clampfree")
    tags = out.setdefault(r["run"], {})
    for k, v in r.items():
      if k not in _KEYS and isinstance(v, (int, float)):
        tags[f"{prefix}/{k}"] = float(v)
  return out


def _hparams(cfg: ExperimentConfig, run: Any) -> dict[str, Any]:
  out = dict(condition=run.condition, seed=run.init_seed, spec=run.spec,
             variant=run.variant or "", learning_rate=cfg.train.learning_rate,
             optimizer=cfg.train.optimizer, weight_decay=cfg.train.weight_decay,
             lr_schedule=cfg.train.lr_schedule,
             batch_size=cfg.train.batch_size, num_seqs=cfg.train.num_seqs,
             num_layers=cfg.model.num_layers, num_heads=cfg.model.num_heads,
             d_model=cfg.model.d_model, features=cfg.data.source)
  out.update(_variant_values(run.variant or ""))  # a grid's per-run values (e.g. its lr)
  return out


def _variant_values(variant: str) -> dict[str, Any]:
  """'train.learning_rate=0.0001;data.family=relu' -> {'learning_rate': 0.0001, 'family': 'relu'}."""
  out: dict[str, Any] = {}
  for item in filter(None, variant.split(";")):
    field, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    out[field.rsplit(".", 1)[-1]] = value if isinstance(value, (int, float, str, bool)) else text
  return out


class _TensorBoard:
  def __init__(self, workdir: str, runs: Sequence[Any]):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f"tracking.writers has 'tensorboard', which needs tensorboardX: "
                       f"{_INSTALL}") from None
    self.root = os.path.join(workdir, "tensorboard")
    self.writers = {r.index: SummaryWriter(os.path.join(self.root, run_name(r)))
                    for r in runs}

  def scalars(self, run: int, step: int, values: dict[str, float]) -> None:
    for tag, v in values.items():
      self.writers[run].add_scalar(tag, v, step)

  def finish(self, run: int, hparams: dict[str, Any], final: dict[str, float], fig) -> None:
    w = self.writers[run]
    w.add_hparams(hparams, {f"final/{k}": v for k, v in final.items()}, name="hparams")
    if fig is not None:
      w.add_figure("loss_curves", fig, close=False)

  def close(self) -> None:
    for w in self.writers.values():
      w.close()


class _WandB:
  def __init__(self, workdir: str, runs: Sequence[Any], cfg: ExperimentConfig):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f"tracking.writers has 'wandb', which needs wandb: {_INSTALL}") from None
    self.wandb = wandb
    t = cfg.tracking
    group = os.path.basename(os.path.abspath(workdir))
    self.runs = {r.index: wandb.init(project=t.wandb_project, name=run_name(r), group=group,
                                     config=_hparams(cfg, r), mode=t.wandb_mode, dir=workdir,
                                     reinit="create_new")
                 for r in runs}

  def scalars(self, run: int, step: int, values: dict[str, float]) -> None:
    self.runs[run].log(values, step=step)

  def finish(self, run: int, hparams: dict[str, Any], final: dict[str, float], fig) -> None:
    wr = self.runs[run]
    wr.summary.update({f"final/{k}": v for k, v in final.items()})
    if fig is not None:  # as a PNG: wandb's own matplotlib conversion lags matplotlib
      buf = io.BytesIO()
      fig.savefig(buf, format="png", dpi=100)
      buf.seek(0)
      wr.log({"loss_curves": self.wandb.Image(PIL.Image.open(buf))})

  def close(self) -> None:
    for wr in self.runs.values():
      wr.finish()


class Trackers:
  """The writers `cfg.tracking.writers` names, for one program's runs.

  Made before compiling (a missing package is an error then, not after training).
  """

  def __init__(self, cfg: ExperimentConfig, workdir: str, runs: Sequence[Any],
               log: Callable[[str], None] = print):
    self.cfg, self.runs = cfg, list(runs)
    self.writers: list[Any] = []
    for name in cfg.tracking.writers:
      self.writers.append(_TensorBoard(workdir, runs) if name == "tensorboard"
                          else _WandB(workdir, runs, cfg))
    if self.writers:
      log(f"[ih_jax] tracking: {', '.join(cfg.tracking.writers)}"
          + (f" (tensorboard --logdir {os.path.join(workdir, 'tensorboard')})"
             if "tensorboard" in cfg.tracking.writers else ""))
    self._last: dict[int, dict[str, float]] = {}

  def __bool__(self) -> bool:
    return bool(self.writers)

  def log(self, rows: Sequence[dict[str, Any]], seqs_k: np.ndarray, losses_RK: np.ndarray,
          gnorms_RK: np.ndarray) -> None:
    """One chunk: its eval rows (maybe none) and per-step train losses [R, K]."""
    if not self.writers:
      return
    for i, values in _scalars(rows).items():
      step = int(next(r["seqs"] for r in rows if r["run"] == i))
      self._last[i] = values
      for w in self.writers:
        w.scalars(i, step, values)
    if len(seqs_k):
      step = int(seqs_k[-1])
      for r in self.runs:
        values = {"train/loss": float(np.mean(losses_RK[r.index])),
                  "train/grad_norm": float(np.mean(gnorms_RK[r.index]))}
        for w in self.writers:
          w.scalars(r.index, step, values)

  def finish(self, metrics_rows: Sequence[dict[str, Any]]) -> None:
    """Hyperparameters with final losses, the loss-curve figure; closes the writers."""
    if not self.writers:
      return
    fig = None
    if metrics_rows:
      fig = plots.training_curves_figure(metrics_rows)
    for r in self.runs:
      last = self._last.get(r.index, {})
      final = {k.replace("/", "_"): v for k, v in last.items() if k.endswith("/loss")}
      for w in self.writers:
        w.finish(r.index, _hparams(self.cfg, r), final, fig)
    self.close()

  def close(self) -> None:
    """Closes every writer (later calls do nothing)."""
    for w in self.writers:
      w.close()
    self.writers = []
