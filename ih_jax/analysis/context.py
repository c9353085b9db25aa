"""What analysing a workdir needs: its config, features, splits, runs and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import clamps as clamps_lib
from ih_jax import model as model_lib
from ih_jax import workdir as workdir_lib
from ih_jax.config import ExperimentConfig
from ih_jax.data import evalsets, features as features_lib, sampler, splits as splits_lib
from ih_jax.interventions import graft as graft_lib


@dataclasses.dataclass
class RunContext:
  """What the analysis of one program's workdir needs: its config, runs, features and splits."""
  workdir: str
  cfg: ExperimentConfig            # the program's config (shared settings)
  runs: list[dict[str, Any]]       # index, condition, spec, init_seed, variant
  features: jax.Array              # [classes, exemplars, F] (first data variant)
  splits: splits_lib.Splits

  def dense_set(self, size: int | None = None, seed: int = 0) -> sampler.SequenceIndices:
    """The dense analysis set, or a fixed random subset of `size` sequences."""
    idx = evalsets.dense_indices(self.splits)
    total = idx.classes.shape[0]
    if size is None or size >= total:
      return idx
    keep = np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    return jax.tree.map(lambda x: x[keep], idx)

  def checkpoint_steps(self) -> list[int]:
    """Sequences-seen labels of the saved params (see `checkpoint.list_steps`)."""
    return ckpt_lib.list_steps(self.workdir)

  def stacked_params(self, run: int, steps: list[int]) -> Any:
    """[K, ...] params of one run at the given checkpoint steps."""
    return ckpt_lib.load_params_series(self.workdir, run, steps)

  def run_clamps(self, run: int) -> clamps_lib.Clamps | None:
    """The clamps run `run` was trained with (None for an unclamped run); a grafted
    run's also carry its donor's params (`graft_params`). Clamps with windows keep them:
    measures then need each checkpoint's sequences seen (`seqs_K=`), so that a clamp
    acts at the checkpoints where it acted in training."""
    info = self.runs[run]
    m = self.cfg.model
    donors = graft_lib.donor_names(self.cfg)
    c = clamps_lib.parse(info["spec"], m.num_layers, m.num_heads, donors)
    if clamps_lib.describe(c, donors) == "none":
      return None
    if bool(c["graft_on"]):
      template = jax.eval_shape(lambda: model_lib.init_params(
          jax.random.key(0), m, self.features.shape[-1], self.cfg.task.num_context))
      donor = graft_lib.load_donors(self.cfg, template)[int(c["graft_donor"])]
      c = dict(c, graft_params=donor)
    return c


def load_context(workdir: str) -> RunContext:
  """The RunContext of a (few-shot) training workdir, read from its config.json.

  Rebuilds the feature table and splits the runs trained on; raises for a directory
  that is not a program's workdir, for a token-task workdir, and for a features file
  that no longer holds the table the runs trained on."""
  path = os.path.join(workdir, workdir_lib.CONFIG_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} has no {workdir_lib.CONFIG_JSON}: not a training "
                            "workdir (for a multi-program sweep, pass WORKDIR/program_<k>)")
  with open(path) as f:
    meta = json.load(f)
  cfg = ExperimentConfig.from_stored(meta.get("program_config", meta["config"]))
  if cfg.is_tokens:
    raise ValueError(f"{workdir!r} is a token-task workdir: the few-shot analysis (dense set, "
                     "induction strength, ablations) does not apply. Use "
                     "ih_jax.analysis.token_scores, or `ih_jax.experiments.reproduce --figure=tokens`")
  if cfg.task.kind != "fewshot":
    raise ValueError(f"{workdir!r} trained task {cfg.task.kind!r}: the few-shot analysis (dense "
                     "set, induction strength, ablations) does not apply; its metrics.csv "
                     "holds the task's own metrics (ih_jax.load(workdir).metrics)")
  feats = features_lib.load_features(cfg.data)
  if cfg.data.source == "file":  # the file must still hold the table the run trained on
    current = dict(features_lib.feature_metadata(cfg.data),
                   sha256=features_lib.table_fingerprint(np.asarray(feats)))
    workdir_lib.check_feature_records(workdir, meta.get("features"), [current])
  C, E, _ = feats.shape
  splits = splits_lib.make_splits(C, E, cfg.model.num_labels, cfg.task.class_split,
                                  cfg.task.exemplar_split, cfg.task.pair_weights)
  return RunContext(workdir, cfg, meta["runs"], feats, splits)


def subsample_steps(steps: list[int], num: int = 100) -> list[int]:
  """The checkpoints closest to linspace(first, last, num), duplicates removed."""
  if len(steps) <= num:
    return list(steps)
  arr = np.asarray(steps)
  picks = [int(arr[np.argmin(np.abs(arr - t))]) for t in np.linspace(arr[0], arr[-1], num)]
  return sorted(set(picks))
