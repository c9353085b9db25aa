"""The scanned, vmapped trainer: outputs, vmap equivalence, determinism, freezing, errors."""
import csv
import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

import chex
import optax

from ih_jax import checkpoint as ckpt_lib
from ih_jax import model as model_lib
from ih_jax.tasks import fewshot as fewshot_task
from ih_jax import train
from ih_jax.analysis.timing import learning_time
from ih_jax.train import evaluation, experiment, flat as flat_lib, placement
from ih_jax.train import state as state_lib, step as step_lib
from ih_jax import workdir as workdir_lib
from ih_jax.config import ExperimentConfig
from ih_jax.data import sampler

import numerics


def tiny(conditions=("none",), seeds=(5,), num_seqs=640, **train_kw):
  return ExperimentConfig.from_dict({
      "train": dict(num_seqs=num_seqs, eval_every=320, progress_every_s=0, **train_kw),
      "sweep": {"conditions": list(conditions), "init_seeds": list(seeds)},
      "evaluators": [{"name": "fsl_train", "size": 64},
                     {"name": "fsl_test_class", "classes": "test", "size": 64}],
  })


SWEEP = ("none", "match=ih:L2H0;keep_only:L2H0", "l1copy=perfect_l1;copy:L2H1", "pt=pt:L1H2")


@pytest.fixture(scope="module")
def sweep_result(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("sweep"))
  return wd, train.train_and_evaluate(tiny(SWEEP, (5, 6)), wd, verbose=False)


def test_workdir_outputs(sweep_result):
  wd, res = sweep_result
  for f in ("config.json", "metrics.csv", "train_log.csv", "done.json", "snapshots", "resume"):
    assert os.path.exists(os.path.join(wd, f)), f
  # Default schedule: only the final snapshot, holding the final params.
  assert ckpt_lib.list_steps(wd) == [640]
  chex.assert_trees_all_equal(ckpt_lib.load_params(wd, 3), jax.tree.map(lambda x: x[3], res.params))
  rows = workdir_lib.read_metrics(wd)
  # 8 runs x 3 eval points (0, 320, 640) x 2 sets x (clamped + unclamped).
  assert len(rows) == 8 * 3 * 2 * 2
  assert {"run", "condition", "seed", "seqs", "eval_set", "loss", "acc"} <= set(rows[0])
  assert sorted({r["seqs"] for r in rows}) == [0, 320, 640]
  assert [(r.condition, r.init_seed) for r in res.runs] == [
      (c.split("=")[0], s) for c in SWEEP for s in (5, 6)]
  with open(os.path.join(wd, "train_log.csv")) as f:
    log = list(csv.DictReader(f))
  assert len(log) == 8 * 20  # 640 / 32 steps per run
  assert [int(r["seqs"]) for r in log if r["run"] == "0"] == list(range(32, 641, 32))
  np.testing.assert_array_equal(res.train_seqs, np.arange(32, 641, 32))


def test_unclamped_eval_differs_only_for_clamped_runs(sweep_result):
  _, res = sweep_result
  def final(cond, clamped):
    return [r["loss"] for r in res.metrics if r["condition"] == cond and r["seqs"] == 640
            and r["clamped"] == clamped]
  # The clamped evaluation of an unclamped run goes through the clamp machinery with
  # identity clamps (another op order), so equal up to float32 rounding only (losses ~1.6;
  # a clamp that really acts changes them by > 1e-3, as the match run's below).
  numerics.assert_close(final("none", 1), final("none", 0), rtol=1e-5, rel_atol=1e-6)
  assert np.abs(np.subtract(final("match", 1), final("match", 0))).min() > 1e-3


def test_flat_params_round_trip():
  cfg = tiny()
  exp = experiment.setup_experiment(cfg)
  state = state_lib.init_state(exp)
  # Moments with distinct random values (fresh ones are all zeros, so a swap or a
  # misordering of leaves would go unseen).
  leaves, treedef = jax.tree.flatten(state.opt_state)
  rng = np.random.default_rng(0)
  opt_state = jax.tree.unflatten(treedef, [
      rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else x for x in leaves])
  flat = flat_lib.FlatParams(jax.tree.map(lambda x: x[0], state.params))
  params_RP, opt_RP = flat.ravel_state(state.params, opt_state)
  P = model_lib.param_count(state.params)
  assert params_RP.shape == (1, flat.size) and flat.size % flat.PAD == 0
  assert P <= flat.size < P + flat.PAD
  mu_RP = opt_RP[0].mu
  assert mu_RP.shape == (1, flat.size)
  np.testing.assert_array_equal(mu_RP[0, :P], flat.ravel(jax.tree.map(lambda x: x[0],
                                                                       opt_state[0].mu))[:P])
  np.testing.assert_array_equal(mu_RP[0, P:], 0.0)  # the padding
  back_params, back_opt = flat.unravel_state(params_RP, opt_RP, opt_state)
  chex.assert_trees_all_equal(back_params, state.params)
  chex.assert_trees_all_equal(back_opt, opt_state)
  with pytest.raises(ValueError, match="one dtype"):
    flat_lib.FlatParams({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.int32)})


def test_training_loop_matches_plain_tree_adam():
  """Two chunks of the flat-params loop (2 + 2 steps, the state leaving and re-entering the
  chunk in between) take the same steps as textbook per-leaf Adam on the same batches
  (same key chain: data key -> (next data key, batch key) per step)."""
  cfg = tiny()
  exp = experiment.setup_experiment(cfg)
  state = state_lib.init_state(exp)
  clamps, feats, batches = placement.place_inputs(exp)
  params = jax.tree.map(lambda x: np.asarray(x[0]), state.params)
  key = state.data_key[0]
  chunk = step_lib.make_train_chunk(exp, 2)
  state, (losses_a, gnorms_a), _ = chunk(state, 2, False, clamps, feats, batches)
  state, (losses_b, gnorms_b), _ = chunk(state, 2, False, clamps, feats, batches)
  losses = np.concatenate([losses_a, losses_b], axis=1)
  gnorms = np.concatenate([gnorms_a, gnorms_b], axis=1)
  table, lookup = sampler.compact_table(feats[0], exp.train_spec)
  tx = optax.adam(cfg.train.learning_rate)
  opt = tx.init(params)
  for i in range(4):
    key, batch_key = jax.random.split(key)
    batch = sampler.sample_indexed_batch(batch_key, table, lookup, exp.train_spec,
                                         cfg.train.batch_size, cfg.task.num_context,
                                         **cfg.task.layout(cfg.model.num_labels))
    loss, grads = jax.value_and_grad(lambda p: model_lib.query_loss(
        model_lib.apply(p, batch, None, cfg.model, query_only=True)[0], batch.y))(params)
    np.testing.assert_allclose(losses[0, i], loss, rtol=1e-5)
    np.testing.assert_allclose(gnorms[0, i], optax.tree.norm(grads), rtol=1e-5)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  # One Adam step moves a parameter by about lr = 1e-5 whatever its gradient's size, so a
  # wrong or missing update shows at ~lr: the absolute tolerance is a fraction of lr, not of
  # the parameter. Float rounding differs between the two forms (fusion, CPU model) and Adam
  # scales it up where a gradient is tiny against its leaf (m / sqrt(v) of a noisy ~1e-6
  # gradient, e.g. the qkv biases): measured max difference 1.2e-7 = 0.012 lr (AMD EPYC).
  lr = cfg.train.learning_rate
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x[0]), tree)
  numerics.assert_close(first(state.params), params, rtol=1e-6, rel_atol=0, atol=0.2 * lr)
  got_adam, want_adam = first(state.opt_state)[0], opt[0]
  np.testing.assert_array_equal(got_adam.count, want_adam.count)
  # The moments are sums of gradients, each rounded relative to its leaf's scale (an
  # element near zero after cancellation carries its neighbours' absolute error: 2.5e-8 on
  # a -2.7e-5 entry of embed_y's mu on an Intel Xeon, whose leaf max is 0.5). Measured
  # max difference 3e-7 of each leaf's max; a wrong beta, gradient or step changes the
  # moments by a sizeable fraction of the leaf's max.
  numerics.assert_close(got_adam.mu, want_adam.mu, rtol=1e-5, rel_atol=1e-5)
  numerics.assert_close(got_adam.nu, want_adam.nu, rtol=1e-5, rel_atol=1e-5)


def test_evaluation_in_blocks_equals_whole_sets(monkeypatch):
  """Several-run programs evaluate in blocks of EVAL_BLOCK sequences (the last one padded):
  the metrics equal evaluating each set whole, under clamps too."""
  cfg = ExperimentConfig.from_dict({
      "sweep": {"conditions": ["none", "match=ih:L2H0;keep_only:L2H0",
                               "l1copy=perfect_l1;copy:L2H1"], "init_seeds": [5]},
      "evaluators": [{"name": "fsl_train", "size": 130},
                     {"name": "fsl_test_class", "classes": "test", "size": 40}]})
  exp = experiment.setup_experiment(cfg)
  state = state_lib.init_state(exp)
  clamps, _, batches = placement.place_inputs(exp)
  assert exp.num_padded > 1
  evaluate = lambda: jax.jit(evaluation.make_evaluate(exp))(state.params, clamps, batches)
  monkeypatch.setattr(fewshot_task, "EVAL_BLOCK", 50)   # 130 = 50 + 50 + 30 (+ 20 padding)
  in_blocks = evaluate()
  monkeypatch.setattr(fewshot_task, "EVAL_BLOCK", 10_000)
  whole = evaluate()
  # Blocks and whole sets are different programs (other reduction orders): per-leaf scale.
  numerics.assert_close(in_blocks, whole, rtol=2e-5, rel_atol=1e-6, atol=1e-6)


def test_eval_sets_of_one_shape_share_one_body():
  """Sets of equal shapes are evaluated by one compiled body looped over the stacked sets
  (tables padded to one row count): the metrics equal each set evaluated on its own,
  clamped and clamp-free, and the program is smaller."""
  cfg = ExperimentConfig.from_dict({
      "sweep": {"conditions": ["none", "match=ih:L2H0;keep_only:L2H0",
                               "l1copy=perfect_l1;copy:L2H1"], "init_seeds": [5]},
      "evaluators": [{"name": "fsl_train", "size": 60},
                     {"name": "fsl_valex", "exemplars": "val", "size": 60},
                     {"name": "fsl_test_class", "classes": "test", "size": 60}]})
  exp = experiment.setup_experiment(cfg)
  state = state_lib.init_state(exp)
  clamps, _, batches = placement.place_inputs(exp)
  assert len({b.x.table.shape for b in batches.values()}) == 1
  fns = {k: jax.jit(evaluation.make_evaluate(exp, stack_sets=k)) for k in (True, False)}
  stacked, per_set = (fns[k](state.params, clamps, batches) for k in (True, False))
  assert set(stacked) == set(batches) and "unclamped" in stacked["fsl_train"]
  numerics.assert_close(stacked, per_set, rtol=1e-5, rel_atol=1e-6, atol=1e-6)
  # The padding rows change nothing: each set with its table cut to the rows it uses.
  trimmed = {k: b._replace(x=b.x._replace(table=b.x.table[:, :int(b.x.ids.max()) + 1]))
             for k, b in batches.items()}
  assert len({b.x.table.shape for b in trimmed.values()}) > 1
  numerics.assert_close(stacked, fns[False](state.params, clamps, trimmed), rtol=1e-5,
                        rel_atol=1e-6, atol=1e-6)
  sizes = {k: len(fns[k].lower(state.params, clamps, batches).as_text()) for k in fns}
  assert sizes[True] < 0.7 * sizes[False], sizes


def test_vmap_equals_separate_runs(sweep_result):
  _, res = sweep_result
  for run in (res.runs[1], res.runs[2], res.runs[5], res.runs[6]):
    spec = f"{run.condition}={SWEEP[[c.split('=')[0] for c in SWEEP].index(run.condition)].split('=', 1)[-1]}"
    alone = train.train_and_evaluate(tiny((spec,), (run.init_seed,)), None, verbose=False)
    # Vmapped and single-run programs round differently. Each of the 20 Adam steps moves a
    # parameter by ~lr = 1e-5 whatever its size (a wrong step shows at ~lr), so the absolute
    # tolerance is a fraction of lr, not of the parameter's magnitude.
    numerics.assert_close(jax.tree.map(lambda x: x[run.index], res.params),
                          jax.tree.map(lambda x: x[0], alone.params),
                          rtol=1e-5, rel_atol=0, atol=0.2 * tiny().train.learning_rate,
                          err_msg=run.condition)
    a = [r["loss"] for r in alone.metrics if r["clamped"]]
    s = [r["loss"] for r in res.metrics if r["run"] == run.index and r["clamped"]]
    numerics.assert_close(s, a, rtol=1e-5, rel_atol=1e-6)


def test_deterministic():
  a = train.train_and_evaluate(tiny(), None, verbose=False)
  b = train.train_and_evaluate(tiny(), None, verbose=False)
  assert a.metrics == b.metrics
  np.testing.assert_array_equal(a.train_loss, b.train_loss)


def test_init_seed_changes_params_not_data():
  a = train.train_and_evaluate(tiny(seeds=(5, 6)), None, verbose=False)
  p5, p6 = (jax.tree.map(lambda x: x[i], a.params) for i in (0, 1))
  assert not np.allclose(p5["embed_x"]["kernel"], p6["embed_x"]["kernel"])


def test_clamped_parameters_stay_frozen_under_adam():
  res = train.train_and_evaluate(tiny(("pt=pt:L1H2;ablate:L2H7",), num_seqs=320), None,
                                 verbose=False)
  init = model_lib.init_params(jax.random.key(5), model_lib.ModelConfig(), 512)
  final = jax.tree.map(lambda x: x[0], res.params)
  q2 = slice(16, 24)
  k2 = slice(64 + 16, 64 + 24)
  for sl in (q2, k2):  # the PT-clamped head's Q/K never move
    np.testing.assert_array_equal(final["blocks_0"]["qkv"]["kernel"][:, sl],
                                  init["blocks_0"]["qkv"]["kernel"][:, sl])
  np.testing.assert_array_equal(final["blocks_1"]["out"]["kernel"][56:64],
                                init["blocks_1"]["out"]["kernel"][56:64])  # ablated W_O rows
  assert not np.array_equal(final["blocks_0"]["qkv"]["kernel"][:, 128 + 16:128 + 24],
                            init["blocks_0"]["qkv"]["kernel"][:, 128 + 16:128 + 24])


def test_workdir_with_other_config_is_refused_naming_fields(tmp_path, capsys):
  wd = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny(num_seqs=32), wd, verbose=False)
  with pytest.raises(FileExistsError,
                     match=r"different config \(differing fields: train.learning_rate, "
                           r"train.num_seqs\)"):
    train.train_and_evaluate(tiny(num_seqs=64, learning_rate=1e-4), wd, verbose=False)
  # The same config again: nothing to redo, the finished results are loaded.
  again = train.train_and_evaluate(tiny(num_seqs=32), wd, verbose=True)
  assert "already holds this finished run" in capsys.readouterr().out
  assert again.metrics == workdir_lib.read_metrics(wd)
  chex.assert_trees_all_equal(again.params, first.params)
  train.train_and_evaluate(tiny(num_seqs=64), wd, overwrite=True, verbose=False)
  assert max(r["seqs"] for r in workdir_lib.read_metrics(wd)) == 64


def test_workdir_from_before_an_option_existed_is_reused(tmp_path, capsys):
  """A config field added later (absent from an old config.json) counts as its default."""
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny(num_seqs=32), wd, verbose=False)
  path = os.path.join(wd, workdir_lib.CONFIG_JSON)
  with open(path) as f:
    stored = json.load(f)
  del stored["config"]["model"]["mlp_ratio"], stored["config"]["sweep"]["donors"]
  with open(path, "w") as f:
    json.dump(stored, f)
  train.train_and_evaluate(tiny(num_seqs=32), wd, verbose=True)
  assert "already holds this finished run" in capsys.readouterr().out
  with pytest.raises(FileExistsError, match="differing fields: model.mlp_ratio"):
    bad = tiny(num_seqs=32)
    train.train_and_evaluate(dataclasses.replace(
        bad, model=dataclasses.replace(bad.model, mlp_ratio=2)), wd, verbose=False)


@pytest.mark.parametrize("change,match", [
    (dict(train_seed=1), "train_seed and eval_seed must differ"),
    (dict(train_seed=5), "init seed 5 equals"),
])
def test_seed_errors(change, match):
  with pytest.raises(ValueError, match=match):
    experiment.setup_experiment(tiny(**change))


def test_condition_errors_name_the_condition():
  with pytest.raises(ValueError, match="condition 'bad=ablate:L3H9'.*unknown head"):
    experiment.setup_experiment(tiny(("bad=ablate:L3H9",)))
  with pytest.raises(ValueError, match="duplicate condition name"):
    experiment.setup_experiment(tiny(("a=none", "a=ablate:L2H1")))


def test_learning_time_is_censored_not_zero():
  assert math.isnan(learning_time([0, 100, 200], [0.7, 0.6, 0.5]))
  assert learning_time([0, 100, 200], [0.7, 0.2, 0.1]) == 100


def test_progress_output(capsys):
  train.train_and_evaluate(tiny(num_seqs=320), None, verbose=True)
  out = capsys.readouterr().out
  assert "320/320 seqs (100.0%)" in out and "seq/s per run" in out


def test_launcher_end_to_end(tmp_path):
  # A successful CLI training (plots, learning times) is checked by
  # test_analysis.test_analyze_cli_end_to_end, which trains the tiny config through this
  # launcher anyway; here only the refusal of a misspelt override.
  import subprocess
  import sys
  wd = str(tmp_path / "cli")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bad = subprocess.run(
      [sys.executable, "-m", "ih_jax.experiments.train", "--config=tiny",
       f"--workdir={wd}2", "--config.train.num_seqz=1"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "num_seqz" in bad.stderr
