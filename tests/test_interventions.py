"""Intervention kinds as plug-ins: the guide's example kind (docs/extending.md), written outside ih_jax,
parses, stacks and vmaps with the built-ins, trains, and is analysed under its clamps."""
import csv
import os
import re

import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest

from ih_jax import clamps as cl
from ih_jax import interventions
from ih_jax import model as model_lib
from ih_jax import train
from ih_jax.analysis import context, measures, report
from conftest import small_sweep

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "extending.md")
CONDITIONS = ("none", "half=scale:L2H*@0.5", "both=scale:L2H1@0.2;pt:L1H3",
              "late=scale:L2H1@0.2@[640,)")


def guide_block(heading: str) -> str:
  """The first ```python block after `heading` in docs/extending.md."""
  text = open(GUIDE).read()
  start = text.index(heading)
  m = re.search(r"```python\n(.*?)```", text[start:], re.S)
  assert m, heading
  return m.group(1)


@pytest.fixture(scope="module")
def scale_kind():
  """Runs the guide's example (it registers 'scale'); unregisters it afterwards."""
  code = guide_block("## Writing your own intervention")
  namespace: dict = {"__name__": "my_notebook"}
  exec(compile(code, "docs/extending.md", "exec"), namespace)  # pylint: disable=exec-used
  yield namespace["ScaleHeads"]
  interventions.unregister("scale")


def test_guide_kind_parses_describes_and_plans(scale_kind):
  c = cl.parse("scale:L2H1@0.2;pt:L1H3", 2, 8)
  assert bool(c["scale_on"][1, 1]) and c["scale_strength"][1, 1] == np.float32(0.2)
  assert cl.describe(c) == "pt:L1H3;scale:L2H1@0.2"
  again = cl.parse(cl.describe(c), 2, 8)
  for k in cl.leaf_names():
    np.testing.assert_array_equal(c[k], again[k])
  plan = cl.plan_for(cl.stack([cl.parse(s.split("=")[-1], 2, 8) for s in CONDITIONS]))
  assert plan.kinds == ("pt", "scale") and plan.num_passes == 1
  assert cl.plan_for(cl.stack([cl.identity(2, 8)])) == cl.NO_CLAMPS  # unused: not compiled
  # Its own grammar and the built-ins' rules apply to it.
  with pytest.raises(ValueError, match="strength '2' must be a number in"):
    cl.parse("scale:L2H1@2", 2, 8)
  with pytest.raises(ValueError, match="contradict: L2H1 is clamped and ablated"):
    cl.parse("scale:L2H1;keep_only:L2H0", 2, 8)
  # A condition made before the kind was registered stacks with one made after.
  old = {k: v for k, v in cl.identity(2, 8).items() if not k.startswith("scale_")}
  assert cl.stack([old, c])["scale_on"].shape == (2, 2, 8)


def test_registry_refuses_clashes_and_keeps_builtins(scale_kind):
  with pytest.raises(ValueError, match="already registered"):
    interventions.register(scale_kind())
  class Clash(scale_kind):
    name = "scale2"
  with pytest.raises(ValueError, match="leaves .*scale_on.* are already 'scale'"):
    interventions.register(Clash())
  class BadSite(scale_kind):
    name = "bad_site"
    sites = ("attention",)
  with pytest.raises(ValueError, match="sites .* must be a non-empty subset"):
    interventions.register(BadSite())
  with pytest.raises(ValueError, match="built-in"):
    interventions.unregister("ablate")


def test_scale_zero_equals_value_ablation(scale_kind, params, cfg, batch):
  """scale@0 zeroes the heads' outputs: the same model as value ablation."""
  def logits(spec):
    c = cl.parse(spec, 2, 8)
    plan = cl.plan_for(cl.stack([c]))
    return model_lib.apply(params, batch, jax.tree.map(jnp.asarray, c), cfg, plan)[0]
  numerics.assert_close(logits("scale:L2H0-5@0"), logits("ablate:L2H0-5"))
  assert np.abs(np.asarray(logits("scale:L2H0-5@0.5") - logits("none"))).max() > 1e-3


@pytest.fixture(scope="module")
def trained(scale_kind, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("plugin"))
  cfg = small_sweep(CONDITIONS, 1280, 640, train=dict(learning_rate=1e-3))
  result = train.train_and_evaluate(cfg, wd, verbose=False)
  return wd, result


def test_user_kind_trains_vmapped_with_builtins_and_is_analysed_under_it(trained):
  wd, result = trained
  assert [r.spec for r in result.runs] == ["none", "scale:L2H0@0.5;scale:L2H1@0.5;"
                                           "scale:L2H2@0.5;scale:L2H3@0.5;scale:L2H4@0.5;"
                                           "scale:L2H5@0.5;scale:L2H6@0.5;scale:L2H7@0.5",
                                           "pt:L1H3;scale:L2H1@0.2",
                                           "scale:L2H1@0.2@[640,)"]
  # The runs share one program (one batch per step): at step 0 they share params, so
  # only the kind makes their clamped losses differ.
  first = {r["run"]: r["loss"] for r in result.metrics
           if r["seqs"] == 0 and r["eval_set"] == "fsl_train" and r["clamped"] == 1}
  assert abs(first[1] - first[0]) > 1e-4 and abs(first[2] - first[0]) > 1e-4
  # A user kind takes a window like any built-in, in the same program: "late" scales
  # L2H1 only from 640 sequences on - before, it is the unclamped run (same batches, same
  # init); from 640 its clamped and clamp-free evaluations part.
  rows = {(r["run"], r["seqs"], r["clamped"]): r["loss"] for r in result.metrics
          if r["eval_set"] == "fsl_train"}
  numerics.assert_close(rows[(3, 0, 1)], rows[(3, 0, 0)])
  numerics.assert_close(rows[(3, 0, 1)], rows[(0, 0, 1)])
  # At 640 the trained params are still the unclamped run's (the window opens there).
  numerics.assert_close(rows[(3, 640, 0)], rows[(0, 640, 1)])
  for seqs in (640, 1280):
    assert abs(rows[(3, seqs, 1)] - rows[(3, seqs, 0)]) > 1e-4, seqs
  # Analysis under the run's own clamps equals measures.measure with the condition.
  report.analyze_workdir(wd, dense_size=128, do_wiring=False, posthoc_size=64,
                         log=lambda _: None, runs=[1])
  ctx = context.load_context(wd)
  steps = ctx.checkpoint_steps()
  idx = ctx.dense_set(128)
  m = ctx.cfg.model
  want = measures.measure(ctx.stacked_params(1, steps), ctx.features, idx, m,
                          measures.conditions([CONDITIONS[1].split("=")[1]], m))
  with open(os.path.join(wd, "analysis", "progress_run1.csv")) as f:
    rows = list(csv.DictReader(f))
  got = np.array([float(r["loss"]) for r in rows if r["clamped"] == "1"])
  numerics.assert_close(got, want["loss"][:, 0])


def test_unregistered_kind_is_a_clear_error_on_reload(trained):
  wd, _ = trained
  kind = interventions.get("scale")
  interventions.unregister("scale")
  try:
    with pytest.raises(ValueError, match="unknown clamp kind 'scale'.*registered first"):
      context.load_context(wd).run_clamps(1)
  finally:
    interventions.register(kind)


def test_plugins_flag_loads_a_file(tmp_path):
  from ih_jax.experiments import cli  # pylint: disable=g-import-not-at-top
  path = tmp_path / "my_kinds.py"
  path.write_text("from ih_jax import interventions\n"
                  "class Nop(interventions.Intervention):\n"
                  "  name = 'nop_kind'\n  sites = ('resid',)\n"
                  "  def leaves(self, L, H):\n"
                  "    import numpy as np\n    return dict(nop_kind=np.zeros((), bool))\n"
                  "  argument = 'none'\n"
                  "  def edit(self, x, c, ctx):\n    return x\n"
                  "interventions.register(Nop(), replace=True)\n")
  try:
    cli.load_plugins([str(path)])
    assert cl.describe(cl.parse("nop_kind;ablate:L2H0", 2, 8)) == "ablate:L2H0;nop_kind"
  finally:
    interventions.unregister("nop_kind")
  with pytest.raises(ValueError, match="no file"):
    cli.load_plugins([str(tmp_path / "missing.py")])
  with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
    cli.load_plugins(["no_such_module_xyz"])
