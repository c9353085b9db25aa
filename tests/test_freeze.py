"""Freeze schedules (ih_jax.freeze): frozen groups get exactly zero updates inside their
window, per run, in one program; bad entries are refused by name."""
import jax
import numpy as np
import pytest

import ih_jax
from ih_jax import freeze
from ih_jax.config import ExperimentConfig

pytestmark = pytest.mark.xdist_group("test_freeze")  # one worker trains the shared sweep

VARIANTS = ["()", "('L1@[0,320)',)", "('L1', 'L2H3.qk')", "('embed', 'unembed')"]  # as the variant names print them


@pytest.fixture(scope="session")
def sweep(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("freeze") / "wd")
  cfg = ExperimentConfig.from_dict({
      "train": {"num_seqs": 640, "eval_every": 320, "learning_rate": 1e-3,
                "progress_every_s": 0},
      "checkpoint": {"every": 320},
      "sweep": {"conditions": ["none"], "init_seeds": [5],
                "grid": ["train.freeze=" + ",".join(VARIANTS)]},
      "evaluators": [{"name": "fsl_train", "size": 64}]})
  ih_jax.run(cfg, wd, verbose=False)
  return cfg, ih_jax.load(wd)


def _same(a, b) -> dict:
  return {k: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k])))
          for k in a}


def test_frozen_groups_keep_their_init_exactly_and_others_train(sweep):
  _, s = sweep
  assert len(s.runs) == 4 and len({r.workdir for r in s.runs}) == 1  # one program
  free, window, l1_qk, ends = (s.run(variant=f"train.freeze={v}") for v in VARIANTS)
  # The saved initial params (an eager init_params can differ from the jitted one by an ulp).
  init = free.params(0)
  assert all(all(_same(r.params(0), init).values()) for r in (window, l1_qk, ends))
  assert not any(_same(free.params(), init).values())
  assert _same(l1_qk.params(), init) == {"blocks_0": True, "blocks_1": False, "embed_x": False,
                                         "embed_y": False, "ln_f": False, "unembed": False}
  # L2H3.qk: head 3's query and key columns of layer 2 stay; its values and other heads move.
  K, D = 8, 64
  got = np.asarray(l1_qk.params()["blocks_1"]["qkv"]["kernel"])
  ref = init["blocks_1"]["qkv"]["kernel"]
  cols = lambda part, h: slice(part * D + h * K, part * D + (h + 1) * K)  # noqa: E731
  assert np.array_equal(got[:, cols(0, 3)], ref[:, cols(0, 3)])
  assert np.array_equal(got[:, cols(1, 3)], ref[:, cols(1, 3)])
  assert not np.array_equal(got[:, cols(2, 3)], ref[:, cols(2, 3)])
  assert not np.array_equal(got[:, cols(0, 2)], ref[:, cols(0, 2)])
  assert _same(ends.params(), init) == {"blocks_0": False, "blocks_1": False, "embed_x": True,
                                        "embed_y": True, "ln_f": True, "unembed": True}
  # A window: layer 1 is its init up to 320 sequences, and trains after.
  assert _same(window.params(320), init)["blocks_0"]
  assert not _same(window.params(640), init)["blocks_0"]
  assert not _same(window.params(320), init)["blocks_1"]


def test_bad_entries_are_refused_by_name():
  def cfg(*entries, num_seqs=1000):
    return ExperimentConfig.from_dict({"train": {"num_seqs": num_seqs, "freeze": list(entries)}})
  with pytest.raises(ValueError, match="unknown group 'layer1'; allowed: embed, unembed, L1..L2"):
    cfg("layer1")
  with pytest.raises(ValueError, match="layer 3 does not exist"):
    cfg("L3")
  with pytest.raises(ValueError, match="head 8 does not exist"):
    cfg("L2H8")
  with pytest.raises(ValueError, match=r"starts at 2,000, at or after the end of the run"):
    cfg("L1@[2000,)")
  with pytest.raises(ValueError, match=r"the window \[500, 100\) is empty"):
    cfg("L1@[500,100)")
  with pytest.raises(ValueError, match="must look like GROUP or GROUP@"):
    cfg("L1@0-100")
  with pytest.raises(ValueError, match="names group 'L1' twice"):
    freeze.plan_for([cfg("L1@[0,10)", "L1@[20,30)").train], 2, 8)
  assert freeze.plan_for([cfg().train], 2, 8) is None  # nothing frozen: the step is unchanged
