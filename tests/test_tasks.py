"""Tasks as plug-ins: the guide's example task (docs/extending.md), written outside
ih_jax, trains with clamps (built-in and the guide's own intervention kind) in one
program, logs its own metrics, and is refused what does not apply to it."""
import csv
import math
import os
import re

import jax
import numpy as np
import pytest

import ih_jax
from ih_jax import interventions, tasks
from ih_jax import model as model_lib
from ih_jax.train import experiment
from ih_jax.config import ExperimentConfig

pytestmark = pytest.mark.xdist_group("tasks")

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "extending.md")


def guide_blocks(heading: str) -> list[str]:
  """The ```python blocks of a section of docs/extending.md."""
  text = open(GUIDE).read()
  start = text.index(heading)
  end = text.find("\n## ", start + 1)
  return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def run_guide(heading: str, index: int = 0, edit=lambda code: code) -> dict:
  """Executes a ```python block of docs/extending.md as a notebook cell; its namespace."""
  namespace: dict = {"__name__": "my_notebook"}
  code = edit(guide_blocks(heading)[index])
  exec(compile(code, "docs/extending.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


@pytest.fixture(scope="module")
def repeat_task():
  """Runs the guide's task block (it registers 'repeat'); unregisters it afterwards."""
  yield run_guide("## Your own task")["RepeatTask"]
  tasks.unregister("repeat")


@pytest.fixture(scope="module")
def scale_kind():
  """The guide's own intervention kind, to train beside the built-ins on the new task."""
  yield run_guide("## Writing your own intervention")["ScaleHeads"]
  interventions.unregister("scale")


@pytest.fixture(scope="module")
def trained(repeat_task, scale_kind, tmp_path_factory):
  """The guide's training block, with a user kind added to its conditions."""
  del repeat_task, scale_kind
  workdir = str(tmp_path_factory.mktemp("repeat"))

  def edit(code):
    code = code.replace('"/tmp/repeat_task"', repr(workdir))
    code = code.replace('"ablate:L1H*")', '"ablate:L1H*", "half=scale:L2H*@0.5")')
    assert workdir in code and "half=scale" in code
    return code
  namespace = run_guide("## Your own task", 1, edit)
  return namespace["sweep"], workdir


def test_guide_task_trains_with_clamps_in_one_program(trained):
  sweep, workdir = trained
  assert sweep.conditions == ["none", "ih:L2H0", "ablate:L1H*", "half"]
  assert not os.path.exists(os.path.join(workdir, "sweep.json"))  # one program
  with open(os.path.join(workdir, "metrics.csv")) as f:
    header = next(csv.reader(f))
  assert header[-2:] == ["loss", "loss_repeat"]
  ln_v = math.log(16)
  none = sweep.run("none").metrics("repeat")
  assert none["seqs"].tolist() == [0, 4000, 8000, 12000, 16000]
  # Untrained: every next token is a guess among 16; trained: the repeats are copied.
  assert none["loss_repeat"][0] > 0.9 * ln_v
  assert none["loss_repeat"][-1] < 0.5 * ln_v, none["loss_repeat"]
  assert none["loss"][-1] > 0.4 * ln_v  # the first half stays unpredictable
  # The clamps acted: each clamped run's evaluation differs from its clamp-free one,
  # while the unclamped run's two views are the same forward pass.
  for cond in ("ih:L2H0", "ablate:L1H*", "half"):
    run = sweep.run(cond)
    on, off = run.metrics("repeat")["loss"][-1], run.metrics("repeat", clamped=False)["loss"][-1]
    assert abs(on - off) > 1e-3 * on, (cond, on, off)
  np.testing.assert_allclose(none["loss"], sweep.run("none").metrics("repeat", False)["loss"],
                             rtol=1e-5)


def test_user_task_model_side(repeat_task):
  cfg = ExperimentConfig.from_dict(dict(model=dict(vocab_size=16, num_heads=4, d_model=32),
                                        task=dict(kind="repeat")))
  task = tasks.for_config(cfg)
  assert isinstance(task, repeat_task) and task.family == "tokens"
  params = model_lib.init_params(jax.random.key(0), cfg.model, 0, task=task)
  assert params["embed_tok"]["embedding"].shape == (16, 32)
  assert params["unembed"]["kernel"].shape == (32, 16)
  assert "embed_x" not in params
  batch = task.sample_sequences(jax.random.key(1), 3)
  logits, aux = model_lib.apply(params, batch, None, cfg.model, sites=("blocks.1.pattern",),
                                task=task)
  assert logits.shape == (3, 16, 16) and aux["blocks.1.pattern"].shape == (3, 4, 16, 16)
  # The ih clamp's targets: one after the earlier copy, in the second half only.
  tokens = np.concatenate([np.arange(8), np.arange(8)])[None].astype(np.int32)
  targets = np.asarray(task.induction_targets(batch._replace(tokens=tokens)))
  np.testing.assert_array_equal(targets[0], [-1] * 8 + list(range(1, 9)))
  with pytest.raises(ValueError, match="query_only is a few-shot option"):
    model_lib.apply(params, batch, None, cfg.model, query_only=True, task=task)


def test_task_errors(repeat_task):
  good = dict(model=dict(vocab_size=16, num_heads=4, d_model=32), task=dict(kind="repeat"),
              train=dict(num_seqs=320))
  with pytest.raises(ValueError, match=r"unknown task.kind 'nope'; allowed: fewshot, tokens, "
                                       r"repeat.*register"):
    ExperimentConfig.from_dict(dict(good, task=dict(kind="nope")))
  # Few-shot-only kinds are refused before anything compiles, naming what applies.
  cfg = ExperimentConfig.from_dict(dict(good, sweep=dict(conditions=("copy:L2H0",))))
  with pytest.raises(ValueError, match=r"copy.*few-shot task.*allowed there: none, .*ablate"):
    experiment.setup_experiment(cfg)
  cfg = ExperimentConfig.from_dict(dict(good, model=dict(num_heads=4, d_model=32)))
  with pytest.raises(ValueError, match="task 'repeat' predicts tokens: set model.vocab_size"):
    experiment.setup_experiment(cfg)
  # The registry: a Task subclass, an identifier, a known family, no stolen names.
  with pytest.raises(TypeError, match="Task subclass"):
    tasks.register(object)

  class Other(tasks.SequenceTask):
    name = "repeat"
  with pytest.raises(ValueError, match="'repeat' is taken by my_notebook.RepeatTask"):
    tasks.register(Other)

  class Images(tasks.Task):
    name = "images"
    family = "pixels"
  with pytest.raises(ValueError, match="family must be one of"):
    tasks.register(Images)
  with pytest.raises(ValueError, match="built-in"):
    tasks.unregister("fewshot")
  # Re-running the notebook cell (same module and class name) replaces the class.
  tasks.register(repeat_task)
  assert tasks.get("repeat") is repeat_task
  assert ih_jax.tasks.names()[:2] == ("fewshot", "tokens")
