"""The generalised few-shot task: bursty contexts, Zipfian classes, fixed labels."""
import jax
import numpy as np
import pytest

from ih_jax import train
from ih_jax.config import ExperimentConfig
from ih_jax.data import evalsets
from ih_jax.data.sampler import (BURSTY, DISTRACTOR, OTHER, QUERY, check_layout, sample_indices,
                                 zipf_cdf)
from ih_jax.data.splits import make_splits

SPLITS = make_splits(1623, 5, 5, class_split=(200, 1323, 100))
SPEC = evalsets.train_spec(SPLITS)
K = len(SPLITS.train_classes)
_jit = jax.jit(sample_indices, static_argnums=(2, 3, 4, 5, 6, 7))


def _sample(n, bursty=1, zipf=0.0, relabel=1.0, num_labels=0, batch=4096, key=0):
  idx = _jit(jax.random.key(key), SPEC, batch, n, bursty, zipf, relabel, num_labels)
  return jax.tree.map(np.asarray, idx)


# The paper's sampler before the task was generalised (commit 2d508d8) on key 3, batch 6:
# the default layout must reproduce its stream exactly (resumed runs and published
# numbers depend on it).
_GOLDEN = {
    2: dict(classes=[[3, 49, 3], [6, 43, 6], [49, 38, 38], [36, 2, 36], [18, 38, 18],
                     [34, 30, 30]],
            labels=[[0, 3, 0], [1, 0, 1], [4, 0, 0], [3, 2, 3], [4, 1, 4], [4, 2, 2]]),
    4: dict(classes=[[35, 3, 1, 49, 3], [34, 5, 43, 31, 5], [16, 13, 45, 42, 16],
                     [39, 30, 34, 34, 30], [35, 29, 42, 19, 35], [33, 17, 6, 17, 6]],
            labels=[[0, 4, 0, 0, 4], [4, 0, 4, 4, 0], [4, 1, 1, 1, 4], [2, 4, 2, 2, 4],
                    [2, 4, 4, 4, 2], [4, 4, 0, 4, 0]]),
}


@pytest.mark.parametrize("n", [2, 4])
def test_paper_layout_reproduces_the_old_stream(n):
  spec = evalsets.train_spec(make_splits(1623, 5, 5))
  idx = sample_indices(jax.random.key(3), spec, 6, n)
  np.testing.assert_array_equal(idx.classes, _GOLDEN[n]["classes"])
  np.testing.assert_array_equal(idx.labels, _GOLDEN[n]["labels"])


@pytest.mark.parametrize("n,k", [(4, 2), (6, 3), (8, 7)])
def test_bursty_copies_of_the_query_class(n, k):
  idx = _sample(n, bursty=k)
  ctx_cls, q_cls = idx.classes[:, :-1], idx.classes[:, -1:]
  ctx_types = idx.types[:, :-1]
  np.testing.assert_array_equal((ctx_types == BURSTY).sum(1), k)
  np.testing.assert_array_equal((ctx_types == DISTRACTOR).sum(1), 1)
  np.testing.assert_array_equal((ctx_types == OTHER).sum(1), n - k - 1)
  assert (idx.types[:, -1] == QUERY).all()
  # The bursty items are exactly the context items of the query's class ...
  np.testing.assert_array_equal(ctx_cls == q_cls, ctx_types == BURSTY)
  # ... and carry the query's label; every other item carries the other label.
  q_lab = idx.labels[:, -1:]
  np.testing.assert_array_equal(idx.labels[:, :-1] == q_lab, ctx_types == BURSTY)
  # The bursty items are spread over the context (shuffled), not always in front.
  first_bursty = np.argmax(ctx_types == BURSTY, axis=1)
  assert len(np.unique(first_bursty)) == n - k + 1


def test_zipf_query_classes_follow_the_law():
  a, batch = 1.0, 1 << 16
  idx = _sample(3, zipf=a, batch=batch)
  rank = {int(c): r for r, c in enumerate(SPLITS.train_classes)}
  q_rank = np.array([rank[int(c)] for c in idx.classes[:, -1]])
  p = np.diff(np.concatenate([[0.0], zipf_cdf(K, a)]))
  counts = np.bincount(q_rank, minlength=K)
  expected = batch * p
  # Pearson chi-square over the ranks with >= 20 expected draws: K-1 dof, far below 2x.
  keep = expected >= 20
  chi2 = (((counts - expected) ** 2) / expected)[keep].sum()
  assert chi2 < 2 * keep.sum(), chi2
  assert counts[0] > 30 * counts[K - 1]   # head vs tail (p0 / p_{K-1} = 200)


def test_zipf_other_classes_follow_the_law_without_the_query():
  a, batch = 1.0, 1 << 15
  idx = _sample(4, zipf=a, batch=batch)
  not_bursty = idx.types[:, :-1] != BURSTY
  assert (idx.classes[:, :-1] != idx.classes[:, -1:])[not_bursty].all()
  rank = {int(c): r for r, c in enumerate(SPLITS.train_classes)}
  to_rank = np.vectorize(lambda c: rank[int(c)])
  q = to_rank(idx.classes[:, -1])
  others = to_rank(idx.classes[:, :-1][not_bursty].reshape(batch, 3))
  p = np.diff(np.concatenate([[0.0], zipf_cdf(K, a)]))
  # E[count of rank r among others] = sum_seq 3 * p_r / (1 - p_q) [r != q].
  cond = p[None, :] / (1 - p[q])[:, None]
  cond[np.arange(batch), q] = 0.0
  expected = 3 * cond.sum(0)
  counts = np.bincount(others.ravel(), minlength=K)
  keep = expected >= 20
  chi2 = (((counts - expected) ** 2) / expected)[keep].sum()
  assert chi2 < 2 * keep.sum(), chi2


def test_uniform_classes_by_default():
  idx = _sample(2, batch=1 << 15)
  counts = np.unique(idx.classes[:, -1], return_counts=True)[1]
  assert len(counts) == K and counts.max() < 2 * counts.min()


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_fixed_label_sequences_need_the_weights(fraction):
  L, n, k = 5, 4, 2
  idx = _sample(n, bursty=k, relabel=fraction, num_labels=L, batch=1 << 14)
  ctx, q = idx.classes[:, :-1], idx.classes[:, -1:]
  q_in_ctx = (ctx == q).any(1)
  fixed = ~q_in_ctx   # relabelled sequences always hold k items of the query's class
  assert abs(fixed.mean() - (1 - fraction)) < 0.02
  np.testing.assert_array_equal((ctx == q).sum(1)[~fixed], k)
  np.testing.assert_array_equal((idx.types[:, :-1] == BURSTY).sum(1), np.where(fixed, 0, k))
  # Fixed sequences: every item carries its class's label; the query's label is
  # not readable from a context item of its class (there is none).
  np.testing.assert_array_equal(idx.labels[fixed], idx.classes[fixed] % L)
  # Relabelled sequences: two labels, the query's shared with its class's items.
  rel = ~fixed
  np.testing.assert_array_equal((idx.labels[rel][:, :-1] == idx.labels[rel][:, -1:]),
                                (ctx[rel] == q[rel]))


def test_layout_errors_name_the_value():
  with pytest.raises(ValueError, match=r"bursty.*\[1, num_context - 1 = 3\].*got 4"):
    check_layout(4, bursty=4)
  with pytest.raises(ValueError, match="zipf_exponent.*-1"):
    check_layout(4, zipf_exponent=-1.0)
  with pytest.raises(ValueError, match="relabel_fraction.*1.5"):
    check_layout(4, relabel_fraction=1.5)
  with pytest.raises(ValueError, match="task.bursty"):
    ExperimentConfig.from_dict({"task": {"num_context": 3, "bursty": 3}})
  with pytest.raises(ValueError, match="labels='weights'"):
    evalsets.make_eval_indices(1, SPLITS, (evalsets.EvaluatorConfig("x", labels="weights"),), 2)


def test_eval_sets_are_bursty_uniform_and_fixed_on_request():
  evs = (evalsets.EvaluatorConfig("icl", size=2048),
         evalsets.EvaluatorConfig("iwl", labels="fixed", size=2048))
  out = evalsets.make_eval_indices(1, SPLITS, evs, 5, bursty=2, num_labels=5)
  np.testing.assert_array_equal((np.asarray(out["icl"].types) == BURSTY).sum(1), 2)
  iwl = out["iwl"]
  np.testing.assert_array_equal(np.asarray(iwl.labels), np.asarray(iwl.classes) % 5)
  # A model that copies from context items of the query's class finds none.
  assert not (np.asarray(iwl.classes)[:, :-1] == np.asarray(iwl.classes)[:, -1:]).any()
  with pytest.raises(ValueError, match="'iwl'.*num_labels >= 2"):
    evalsets.make_eval_indices(1, SPLITS, evs, 5)
  icl = out["icl"]
  assert not (np.asarray(icl.labels) == np.asarray(icl.classes) % 5).all(1).all()


def test_training_runs_with_the_chan_properties(tmp_path):
  cfg = ExperimentConfig.from_dict({
      "task": dict(num_context=4, bursty=2, zipf_exponent=1.0, relabel_fraction=0.5,
                   class_split=[200, -1, 100]),
      "train": dict(num_seqs=640, eval_every=320, progress_every_s=0),
      "sweep": {"conditions": ["none"], "init_seeds": [5]},
      "evaluators": [{"name": "icl", "classes": "test", "size": 64},
                     {"name": "iwl", "labels": "fixed", "size": 64}],
  })
  res = train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  assert np.isfinite(res.train_loss).all()
  assert {r["eval_set"] for r in res.metrics} == {"icl", "iwl"}
  assert all(np.isfinite(r["loss"]) for r in res.metrics)
  assert len({r["seqs"] for r in res.metrics}) == 3


@pytest.mark.parametrize("name", ["main", "clamps", "tiny", "chan"])
def test_shipped_configs_build(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from ih_jax.experiments.configs import common  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(f"ih_jax.experiments.configs.{name}")
  cfg = common.to_experiment(mod.get_config(None))
  assert cfg.train.num_seqs > 0
  if name == "chan":
    assert (cfg.task.num_context, cfg.task.bursty, cfg.task.zipf_exponent) == (8, 3, 1.0)
    assert {e.labels for e in cfg.evaluators} == {"relabel", "fixed"}
    flat = common.to_experiment(mod.get_config("zipf=0,bursty=1"))
    assert (flat.task.zipf_exponent, flat.task.bursty) == (0.0, 1)
