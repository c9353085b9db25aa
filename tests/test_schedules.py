"""Interventions over time: a clause with a window `@[START,STOP)` acts only while
START <= sequences seen < STOP, evaluated in-graph, so windows differ between the runs
of one program."""
import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest

import ih_jax
from ih_jax import clamps, model as model_lib, sweep as sweep_lib, train
from ih_jax.train import experiment, placement, state as state_lib, step as step_lib
from ih_jax.analysis import context, measures, report
from ih_jax.config import ExperimentConfig

pytestmark = pytest.mark.xdist_group("test_schedules")  # one worker trains the shared sweep

CONDITIONS = ["always=ih:L2H0;keep_only:L2H0", "first=ih:L2H0@[0,320);keep_only:L2H0@[0,320)",
              "late=ih:L2H0@[320,);keep_only:L2H0@[320,)",
              "fade=ih:L2H0@fade[160,480);keep_only:L2H0@fade[160,480)"]


def _cfg(num_seqs, conditions):
  return ExperimentConfig.from_dict({
      "train": {"num_seqs": num_seqs, "eval_every": 160, "learning_rate": 1e-3,
                "progress_every_s": 0},
      "checkpoint": {"every": 320},
      "sweep": {"conditions": conditions, "init_seeds": [5]},
      "evaluators": [{"name": "fsl_train", "size": 128}]})


@pytest.fixture(scope="session")
def sweep(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("sched") / "wd")
  return ih_jax.run(_cfg(640, CONDITIONS), wd, verbose=False)


def _rows(run, clamped):
  m = run.metrics("fsl_train", clamped=clamped)
  return dict(zip(m["seqs"].tolist(), m["loss"].tolist()))


def test_windows_train_in_one_program_and_act_only_inside(sweep):
  always, first, late = (sweep.run(c) for c in ("always", "first", "late"))
  assert len({r.workdir for r in sweep.runs}) == 1
  # Before 320 "first" is the always-clamped run (same program, same ops per run) ...
  numerics.assert_close(numerics.without_key_bias(first.params(320)),
                        numerics.without_key_bias(always.params(320)), rtol=1e-5, rel_atol=1e-5)
  numerics.assert_close(_rows(first, True)[160], _rows(always, True)[160], rtol=1e-5)
  # ... and after its window its clamped evaluation is the clamp-free one.
  on, off = _rows(first, True), _rows(first, False)
  assert on[160] != off[160]
  numerics.assert_close(on[480], off[480], rtol=1e-5)
  numerics.assert_close(on[640], off[640], rtol=1e-5)
  # "late" starts unclamped and is clamped from 320 on.
  on, off = _rows(late, True), _rows(late, False)
  numerics.assert_close(on[160], off[160], rtol=1e-5)
  assert on[480] != off[480]
  assert not np.array_equal(first.params()["blocks_1"]["qkv"]["kernel"],
                            always.params()["blocks_1"]["qkv"]["kernel"])
  # "fade" (released gradually from 160 to 480): fully clamped up to 160, half-released
  # at 320, released after 480.
  fade = sweep.run("fade")
  numerics.assert_close(_rows(fade, True)[160], _rows(always, True)[160], rtol=1e-5)
  on, off = _rows(fade, True), _rows(fade, False)
  assert on[320] != off[320]
  numerics.assert_close(on[640], off[640], rtol=1e-5)


def test_window_run_equals_the_clamped_run_up_to_its_end(sweep, tmp_path):
  """A separate 320-sequence run clamped throughout ends where the windowed one is at 320."""
  alone = train.train_and_evaluate(_cfg(320, [CONDITIONS[0]]), None, verbose=False)
  numerics.assert_close(numerics.without_key_bias(jax.tree.map(lambda x: x[0], alone.params)),
                        numerics.without_key_bias(sweep.run("first").params(320)),
                        rtol=1e-4, rel_atol=1e-4)


def test_grammar_round_trips_and_bad_windows_are_refused():
  c = clamps.parse("pt:L1H3@0.5@[100,);ih:L2H3@[0,2e5)", 2, 8)
  assert clamps.describe(c) == "pt:L1H3@0.5@[100,);ih:L2H3@[0,200000)"
  assert clamps.scheduled(clamps.parse(clamps.describe(c), 2, 8)) == {
      "pt": (100, clamps.ALWAYS_STOP), "ih": (0, 200000)}
  for spec, msg in [("ih:L2H3@[5,5)", r"window \[5, 5\) is empty"),
                    ("ih:L2H3@[0,5", "must look like @\\[START,STOP\\)"),
                    ("ih:L2H3@[0,100);ih:L2H2@[0,200)", "two different windows"),
                    ("none@[0,10)", "takes no window")]:
    with pytest.raises(ValueError, match=msg):
      clamps.parse(spec, 2, 8)
  with pytest.raises(ValueError, match="the ih window starts at 1,000, at or after the end"):
    ih_jax.run(_cfg(640, ["ih:L2H0@[1000,)"]), "/tmp/never_written", verbose=False)
  with pytest.raises(ValueError, match="post-hoc condition takes no window"):
    clamps.combine(clamps.parse("none", 2, 8), clamps.parse("ablate:L2H1@[0,10)", 2, 8))
  # Ramps: the same grammar after @ramp / @fade; they round-trip and are planned.
  c = clamps.parse("ih:L2H3@0.8@ramp[100,300);ablate:L1H0@fade[0,50)", 2, 8)
  assert clamps.describe(c) == "ih:L2H3@0.8@ramp[100,300);ablate:L1H0@fade[0,50)"
  assert clamps.ramp_of(c, "ih") == (200, 0) and clamps.ramp_of(c, "ablate") == (0, 50)
  plan = clamps.plan_for(clamps.stack([c]))
  assert set(plan.ramped) == {"ablate", "ih"} and set(plan.scheduled) == {"ablate", "ih"}
  for spec, msg in [("ih:L2H3@ramp[100,)", "a ramp needs an end"),
                    ("ih:L2H3@fade[9,3)", r"window \[9, 3\) is empty"),
                    ("ih:L2H3@ramp[0,9);ih:L2H2@[0,9)", "two different windows")]:
    with pytest.raises(ValueError, match=msg):
      clamps.parse(spec, 2, 8)


@pytest.mark.parametrize("spec,seqs,r", [("ih:L2H0@ramp[100,300)", 50, 0.0),
                                          ("ih:L2H0@ramp[100,300)", 200, 0.5),
                                          ("ih:L2H0@ramp[100,300)", 400, 1.0),
                                          ("ih:L2H0@fade[100,300)", 150, 0.75),
                                          ("ih:L2H0@fade[100,300)", 300, 0.0)])
def test_a_ramp_blends_the_edit_in_and_out(params, cfg, batch, spec, seqs, r):
  """At ramp value r the edited site holds (1 - r) x + r edit(x)."""
  site = ("blocks.1.pattern",)
  def pattern(spec_, s=None):
    c = clamps.parse(spec_, 2, 8)
    plan = clamps.plan_for(clamps.stack([c]))
    c = None if spec_ == "none" else jax.tree.map(jnp.asarray, c)
    return model_lib.apply(params, batch, c, cfg, plan, sites=site, seqs=s)[1][site[0]]
  want = (1 - r) * pattern("none") + r * pattern("ih:L2H0")
  numerics.assert_close(pattern(spec, seqs), want, rtol=1e-5, rel_atol=1e-6)


def test_after_its_window_the_run_continues_as_an_unclamped_one(sweep):
  """Clamped for 320 sequences, then the same state (params, Adam moments, data stream)
  trained on by an unclamped program: where the windowed run ends."""
  state = None
  for cond, n in ((CONDITIONS[0], 320), ("none", 320)):
    exp = experiment.setup_experiment(sweep_lib.plan_programs(_cfg(640, [cond]))[0])
    state = state_lib.init_state(exp) if state is None else state
    steps = n // exp.cfg.train.batch_size
    chunk = step_lib.make_train_chunk(exp, steps)
    state, _, _ = chunk(state, steps, False, *placement.place_inputs(exp))
  got = jax.tree.map(lambda x: np.asarray(x[0]), state.params)
  numerics.assert_close(numerics.without_key_bias(got),
                        numerics.without_key_bias(sweep.run("first").params()),
                        rtol=1e-4, rel_atol=1e-4)


def test_windowed_runs_are_analysed_as_they_trained(sweep):
  """At each checkpoint a windowed run is measured under the clamps that acted there:
  inside its window as the always-clamped condition, after it as clamp-free."""
  first = sweep.run("first")
  ctx = context.load_context(first.workdir)
  c = ctx.run_clamps(first.index)
  steps = ctx.checkpoint_steps()
  assert steps[0] < 320 <= steps[-1], steps
  params_K = ctx.stacked_params(first.index, steps)
  dense, m = ctx.dense_set(96), ctx.cfg.model
  with pytest.raises(ValueError, match="pass seqs_K"):
    measures.measure_under(params_K, ctx.features, dense, m, c)
  got = measures.measure_under(params_K, ctx.features, dense, m, c, seqs_K=steps)
  plain = clamps.parse("ih:L2H0;keep_only:L2H0", 2, 8)
  inside = measures.measure_under(params_K, ctx.features, dense, m, plain)
  free = measures.measure_under(params_K, ctx.features, dense, m, None)
  for k, s in enumerate(steps):
    want = inside if s < 320 else free
    for key in ("loss", "induction_strength"):
      numerics.assert_close(got[key][k], want[key][k], rtol=1e-5, rel_atol=1e-6,
                            err_msg=f"{key} at {s}")
  # The full report runs on it (the clamped view at the last checkpoint = clamp-free).
  summary = report.analyze_workdir(first.workdir, runs=[first.index], num_checkpoints=3,
                                   dense_size=96, do_wiring=False, posthoc_size=64,
                                   log=lambda _: None)
  assert summary
  numerics.assert_close(first.scores(seqs=steps[-1], size=96)["loss"],
                        free["loss"][-1], rtol=1e-5)
