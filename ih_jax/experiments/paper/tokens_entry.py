"""`--figure=tokens`: the token-level induction task (beyond the paper).

  ih-jax reproduce --figure=tokens --scale=quick --workdir=/tmp/repro_tok

Stages (each a sweep in one compiled program):
  tokens_main     the unclamped 2-layer attention-only model, seed 5 plus extra seeds
  tokens_clamps   seed 5 under clamps on the heads measured in its own main run:
                  a perfect previous-token clamp on the best layer-1 PT head, a perfect
                  induction clamp on the best layer-2 prefix-matching head, both, and
                  value ablations of each of those heads
Head choices come from the trained main run (token_heads), never constants. The
stages are yielded one at a time, so the main run is trained (report.run_entry
trains each stage as it is yielded) before the clamp stage is built from its heads.
When the main run is not trained (only planning the grid, e.g. in tests) the heads
come from `heads` (if given) or head 0: such a plan is never trained.

Learning time here = first eval point where `loss_repeated` (loss on the positions
whose next token is predictable by induction) < 0.4 ln V, the token analogue of
the paper's 0.4 ln 2.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import jax
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import plots
from ih_jax.analysis import heads as heads_lib, timing, token_scores
from ih_jax.analysis import verdicts as V
from ih_jax.config import ExperimentConfig
from ih_jax.experiments.configs import tokens as token_configs
from ih_jax.tasks import tokens as tokens_task
from ih_jax.experiments.paper.registry_base import Entry, Outcome, lt_table as _lt_table
from ih_jax.experiments.paper.study import PAPER_SEED, Study

CURVE = "loss_repeated"
PREFIX_MATCH_IH = 0.4   # an induction head: prefix-matching score above this
PREV_TOKEN_PT = 0.5     # a previous-token head: previous-token score above this
COPYING = 0.5           # the induction head copies: copying score above this

# Per scale: (main seqs, clamp seqs, eval every, eval set size, number of extra seeds).
_LENGTHS = {"full": (300_000, 200_000, 2000, 1000, 4),
            "medium": (240_000, 200_000, 4000, 500, 4),
            "quick": (120_000, 100_000, 4000, 500, 2),
            "smoke": (3200, 3200, 1600, 64, 1)}


def _lengths(study: Study) -> tuple[int, int, int, int, int]:
  """(main seqs, clamp seqs, eval every, eval size, extra seeds) of the study's scale."""
  if study.scale.name not in _LENGTHS:
    raise ValueError(f"the tokens entry has no lengths for scale {study.scale.name!r}; "
                     f"known: {sorted(_LENGTHS)}")
  return _LENGTHS[study.scale.name]


def token_config(study: Study, seqs: int, conditions: tuple[str, ...],
                 seeds: tuple[int, ...]) -> ExperimentConfig:
  """ih_jax/experiments/configs/tokens.py's model and layout with this stage's runs and length."""
  _, _, every, eval_size, _ = _lengths(study)
  d = ExperimentConfig().to_dict()
  d["task"]["kind"] = "tokens"
  d["model"]["vocab_size"] = token_configs.VOCAB
  d["tokens"].update(seq_len=token_configs.SEQ_LEN, segment_len=token_configs.SEGMENT,
                     eval_size=eval_size)
  # The token task has its own learning rate (1e-3, BUILD_NOTES.md), not the scale's.
  d["train"].update(num_seqs=seqs, eval_every=every, learning_rate=token_configs.LEARNING_RATE,
                    progress_every_s=30.0)
  d["sweep"].update(conditions=list(conditions), init_seeds=list(seeds))
  d["checkpoint"].update(at=[0])
  return ExperimentConfig.from_dict(d)


def _main(study: Study) -> tuple[str, ExperimentConfig]:
  main_seqs, _, _, _, n_extra = _lengths(study)
  seeds = (PAPER_SEED,) + tuple(study.scale.extra_seeds[:n_extra])
  return "tokens_main", token_config(study, main_seqs, ("none",), seeds)


def token_heads(study: Study) -> dict[str, Any] | None:
  """Seed 5's best PT head (layer 1) and induction head (layer 2) with every head's scores,
  measured on the eval set from the final params of its main run (None: not trained)."""
  return study.cached("tokens_heads.json", str(PAPER_SEED), lambda: _measure_heads(study))


def _measure_heads(study: Study) -> dict[str, Any] | None:
  name, cfg = _main(study)
  wd = study.stage_dir(name)
  if not os.path.exists(os.path.join(wd, "done.json")):
    return None
  params = ckpt_lib.load_params(wd, 0)   # run 0 = seed 5
  batch = jax.tree.map(lambda x: x[0], tokens_task.eval_set(cfg, 1))
  s = token_scores.head_scores(params, cfg, batch)
  L = cfg.model.num_layers
  # The main token run is unclamped (every head usable); the same choice rule as
  # every other head choice (ih_jax.analysis.heads).
  info = dict(pt=heads_lib.strongest(s["prev_token"][0]),
              ih=heads_lib.strongest(s["prefix_matching"][L - 1]),
              **{k: np.round(np.asarray(v, np.float64), 4).tolist() for k, v in s.items()})
  study.log(f"[reproduce] tokens: PT head L1H{info['pt']} (score "
            f"{s['prev_token'][0].max():.2f}), induction head L{L}H{info['ih']} (prefix "
            f"matching {s['prefix_matching'][L - 1].max():.2f})")
  return info


def clamp_conditions(pt: int, ih: int) -> tuple[str, ...]:
  """The token task's clamp conditions for PT head L1H`pt` and induction head L2H`ih`:
  none, pt, ih, both, and each head ablated."""
  P, I = f"L1H{pt}", f"L2H{ih}"
  return ("none", f"pt=pt:{P}", f"ih=ih:{I}", f"pt_ih=pt:{P};ih:{I}",
          f"ablate_pt=ablate:{P}", f"ablate_ih=ablate:{I}")


def _stages(study: Study, heads: dict) -> Iterator[tuple[str, ExperimentConfig]]:
  yield _main(study)
  info = token_heads(study)
  if info is None:  # planning only (see the module docstring)
    h = heads.get(PAPER_SEED, {})
    info = dict(pt=h.get("pt_order", [0])[0], ih=h.get("strongest", 0))
  _, clamp_seqs, _, _, _ = _lengths(study)
  yield "tokens_clamps", token_config(study, clamp_seqs, clamp_conditions(info["pt"], info["ih"]),
                                      (PAPER_SEED,))


def curves(results: list) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
  """(condition, seed) -> (seqs, loss on the repeated positions) under the run's clamps."""
  out = {}
  for res in results:
    for run in res.runs:
      rows = sorted((r for r in res.metrics if r["run"] == run.index and r["clamped"] == 1
                     and r["eval_set"] == tokens_task.EVAL_SET), key=lambda r: r["seqs"])
      out[(run.condition, run.init_seed)] = (np.array([r["seqs"] for r in rows], float),
                                             np.array([r[CURVE] for r in rows]))
  return out


def _final(results: list, condition: str, seed: int) -> dict[str, float]:
  for res in results:
    for run in res.runs:
      if (run.condition, run.init_seed) == (condition, seed):
        rows = [r for r in res.metrics if r["run"] == run.index and r["clamped"] == 1]
        return max(rows, key=lambda r: r["seqs"])
  raise KeyError((condition, seed))


def _curve_figure(study: Study, name: str, groups: dict, title: str, ln_v: float) -> list[str]:
  fig, ax = plots.subplots(figsize=(7, 4.2))
  for label, (s, l) in groups.items():
    ax.plot(s, l, label=label, lw=1.3)
  ax.axhline(ln_v, color="grey", ls="--", lw=0.8, label="ln V (uniform guess)")
  ax.axhline(0.4 * ln_v, color="grey", ls=":", lw=0.8, label="0.4 ln V (learning time)")
  ax.set_xlabel("sequences seen")
  ax.set_ylabel(f"{CURVE} (nats, under the run's clamps)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  paths = plots._save(fig, study.figure_dir, name)  # pylint: disable=protected-access
  return [p for p in paths if p.endswith(".png")]


def _analyze(study: Study, results: dict, heads: dict) -> Outcome:
  del heads
  main, clamped = results["tokens_main"], results["tokens_clamps"]
  info = token_heads(study)
  ln_v = math.log(token_configs.VOCAB)
  thr = 0.4 * ln_v
  out = Outcome([])
  for (cond, seed), (s, l) in curves(main).items():
    out.verdicts.append(V.plateau_then_drop(
        f"Tokens (seed {seed}): the loss on the repeated positions sits on a plateau near "
        f"ln V, then drops abruptly (a phase change)", s, l, level=ln_v,
        level_name=f"ln V (V = {token_configs.VOCAB})", min_drop=0.3 * ln_v))
  L = len(info["prefix_matching"])
  P, I = info["pt"], info["ih"]
  out.verdicts += [
      V.at_least(f"Tokens: an induction head forms in the last layer (here L{L}H{I})",
                 info["prefix_matching"][L - 1][I], PREFIX_MATCH_IH,
                 f"final prefix-matching score of L{L}H{I} (uniform causal attention gives ~0.05)"),
      V.at_least(f"Tokens: Layer 1 has a previous-token head (here L1H{P})",
                 info["prev_token"][0][P], PREV_TOKEN_PT,
                 f"final previous-token score of L1H{P} (uniform causal attention gives ~0.10)"),
      V.at_least("Tokens (our question): the induction head's OV circuit copies",
                 info["copying"][L - 1][I], COPYING, f"copying score of L{L}H{I}"),
  ]
  lts = {c: timing.learning_time(s, l, threshold=thr)
         for (c, _), (s, l) in curves(clamped).items()}
  hz = float(max(s.max() for s, _ in curves(clamped).values()))
  for cond, what in (("pt", f"a perfect previous-token clamp on L1H{P}"),
                     ("ih", f"a perfect induction clamp on L2H{I}"),
                     ("pt_ih", "clamping both heads (PT and induction)")):
    out.verdicts.append(V.earlier_than(f"Tokens (our question): {what} shortens the plateau",
                                       {cond: lts[cond]}, "none", lts["none"], hz))
  for cond, what in (("ablate_pt", f"ablating the PT head L1H{P}"),
                     ("ablate_ih", f"ablating the induction head L2H{I}")):
    out.verdicts.append(V.earlier_than(
        f"Tokens (our question): {what} delays the phase change (the unclamped run learns "
        "strictly earlier)", {"none": lts["none"]}, cond, lts[cond], hz, strict=True))
  table = {(c, PAPER_SEED, ""): v for c, v in lts.items()}
  finals = ", ".join(f"{c} {_final(clamped, c, PAPER_SEED)[CURVE]:.3f}" for c in lts)
  out.notes.append(
      f"Learning time = first eval with {CURVE} < 0.4 ln V = {thr:.3f}. Heads from the main "
      f"run (seed {PAPER_SEED}): PT L1H{P}, induction L2H{I}. Scores per head "
      f"(rows = layers): previous-token {info['prev_token']}; prefix-matching "
      f"{info['prefix_matching']}; induction strength {info['induction_strength']}; copying "
      f"{info['copying']}.\n\nFinal {CURVE} under clamps: {finals}.\n\n"
      + _lt_table(table, hz))
  main_lts = {(c, s, ""): timing.learning_time(x, y, threshold=thr)
              for (c, s), (x, y) in curves(main).items()}
  out.notes.append("Main runs:\n\n" + _lt_table(main_lts, float(max(
      x.max() for x, _ in curves(main).values()))))
  out.figures += _curve_figure(study, "tokens_clamps", {c: v for (c, _), v in
                                                        curves(clamped).items()},
                               f"Token task: {CURVE} under clamps", ln_v)
  out.figures += _curve_figure(study, "tokens_main", {f"seed {s}": v for (_, s), v in
                                                      curves(main).items()},
                               f"Token task: {CURVE}, unclamped", ln_v)
  return out


ENTRY = Entry("tokens", ("tokens",), "Token-level induction task (beyond the paper)",
              lambda study: (), _stages, _analyze)
