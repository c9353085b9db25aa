"""The token-level induction task: sampler, model path, head scores and clamps."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ih_jax import clamps as clamps_lib
from ih_jax import model as model_lib
from ih_jax.interventions import targets
from ih_jax import workdir as workdir_lib
from ih_jax import metrics
from ih_jax.analysis import circuits, scores, token_scores
from ih_jax.config import ExperimentConfig
from ih_jax.data import tokens as tokens_lib
from ih_jax import tasks
from ih_jax.metrics import TOKEN_METRIC_NAMES
from ih_jax.train import experiment

import numerics

LAYOUT = tokens_lib.TokenTaskConfig(seq_len=24, segment_len=6)
V = 16
CFG = model_lib.ModelConfig(vocab_size=V, d_model=32, num_heads=4)


def test_sampler_shapes_repeats_and_determinism():
  b = tokens_lib.sample_tokens(jax.random.key(0), LAYOUT, V, 256)
  T, S = LAYOUT.seq_len, LAYOUT.segment_len
  assert b.tokens.shape == b.repeated.shape == (256, T) and b.starts.shape == (256, 2)
  assert b.tokens.dtype == jnp.int32 and b.repeated.dtype == jnp.bool_
  tok, rep, (a, bb) = np.asarray(b.tokens), np.asarray(b.repeated), np.asarray(b.starts).T
  assert tok.min() >= 0 and tok.max() < V
  assert (a >= 0).all() and (bb >= a + S).all() and (bb + S <= T).all()
  for i in range(256):  # the declared segment is repeated, and only its continuation is marked
    np.testing.assert_array_equal(tok[i, bb[i]:bb[i] + S], tok[i, a[i]:a[i] + S])
    want = np.zeros(T, bool)
    want[bb[i]:bb[i] + S - 1] = True
    np.testing.assert_array_equal(rep[i], want)
  # Gaps vary uniformly (so copying by one relative offset rarely works).
  gaps = bb - a - S
  assert set(gaps.tolist()) == set(range(T - 2 * S + 1))
  assert np.bincount(gaps).max() < 2.5 * 256 / (T - 2 * S + 1)
  again = tokens_lib.sample_tokens(jax.random.key(0), LAYOUT, V, 256)
  chex.assert_trees_all_equal(b, again)
  other = tokens_lib.sample_tokens(jax.random.key(1), LAYOUT, V, 256)
  assert not np.array_equal(b.tokens, other.tokens)
  jitted = jax.jit(lambda k: tokens_lib.sample_tokens(k, LAYOUT, V, 256))(jax.random.key(0))
  chex.assert_trees_all_equal(b, jitted)


@pytest.mark.parametrize("kw,vocab,match", [
    (dict(seq_len=10, segment_len=6), 16, "too short"),
    (dict(segment_len=1), 16, "segment_len must be >= 2"),
    (dict(), 1, "vocab_size >= 2"),
])
def test_sampler_errors(kw, vocab, match):
  with pytest.raises(ValueError, match=match):
    tokens_lib.sample_tokens(jax.random.key(0), tokens_lib.TokenTaskConfig(**kw), vocab, 4)


# A hand-built sequence with distinct tokens: segment [1, 2, 3, 4] at a=1, again at b=6.
HAND = tokens_lib.TokenBatch(
    tokens=jnp.asarray([[0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 10, 11]], jnp.int32),
    repeated=jnp.asarray([[0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]], bool),
    starts=jnp.asarray([[1, 6]], jnp.int32))


def test_induction_targets_by_hand():
  np.testing.assert_array_equal(tokens_lib.induction_targets(HAND.tokens)[0],
                                [-1, -1, -1, -1, -1, -1, 2, 3, 4, 5, -1, -1])
  # The most recent earlier occurrence wins; x_{t-1} == x_t targets t itself.
  np.testing.assert_array_equal(
      tokens_lib.induction_targets(jnp.asarray([[7, 8, 7, 7, 8]]))[0], [-1, -1, 1, 3, 2])


def test_scores_on_hand_built_patterns():
  T = 12
  prev = targets.prev_token_pattern(T, jnp.ones(1))[None]
  ind = targets.token_induction_pattern(tokens_lib.copy_targets(HAND), jnp.ones(1))
  # Attend to the earlier copy itself (a "duplicate-token head"): row t -> src(t).
  dup = np.zeros((1, 1, T, T), np.float32)
  dup[0, 0, np.arange(T), np.arange(T)] = 1
  for t in range(6, 10):
    dup[0, 0, t] = 0
    dup[0, 0, t, t - 5] = 1
  S = 4
  assert float(metrics.prev_token_score(prev)[0, 0]) == pytest.approx(1.0)
  assert float(metrics.prefix_matching(prev, HAND, S)[0, 0]) == pytest.approx(0.0)
  assert float(metrics.prefix_matching(ind, HAND, S)[0, 0]) == pytest.approx(1.0)
  assert float(metrics.induction_strength(ind, HAND, S)[0, 0]) == pytest.approx(1.0)
  assert float(metrics.prefix_matching(dup, HAND, S)[0, 0]) == pytest.approx(0.0)
  assert float(metrics.induction_strength(dup, HAND, S)[0, 0]) == pytest.approx(-1.0)
  # Uniform causal attention: prefix matching = mean over the copy rows of 1 / (t + 1).
  uni = np.tril(np.ones((T, T), np.float32))
  uni = (uni / uni.sum(1, keepdims=True))[None, None]
  want = np.mean([1 / (t + 1) for t in range(6, 10)])
  assert float(metrics.prefix_matching(uni, HAND, S)[0, 0]) == pytest.approx(want)
  # The head-score registry's token entries read S off the batch: the same numbers.
  for name, pats in (("prefix_matching", (prev, ind, dup, uni)),
                     ("induction_strength", (ind, dup)), ("prev_token", (prev, uni))):
    score = scores.resolve([name], task="tokens")[0]
    for A in pats:
      want_ = (metrics.prev_token_score(A) if name == "prev_token"
               else getattr(metrics, name)(A, HAND, S))
      np.testing.assert_allclose(score.fn(A, HAND), want_, rtol=1e-6)
  # Rows without an earlier occurrence attend to key 0 (the documented "sink").
  np.testing.assert_array_equal(np.asarray(ind)[0, 0, 1], np.eye(T)[0])


def _copy_params(sign: float):
  """Hand-built token model: E = I, head 0's OV = +-(projection on its 8 dims), W_U = I."""
  cfg = model_lib.ModelConfig(vocab_size=16, d_model=16, num_heads=2)
  p = jax.tree.map(np.asarray, model_lib.init_params(jax.random.key(0), cfg, 0))
  p = jax.tree.map(np.array, p)
  p["embed_tok"]["embedding"] = np.eye(16, dtype=np.float32)
  qkv = np.zeros((16, 48), np.float32)
  qkv[np.arange(8), 32 + np.arange(8)] = 1.0            # W_V of head 0 reads dims 0..7
  out = np.zeros((16, 16), np.float32)
  out[np.arange(8), np.arange(8)] = sign                 # W_O of head 0 writes them back
  p["blocks_1"]["qkv"]["kernel"], p["blocks_1"]["out"]["kernel"] = qkv, out
  p["unembed"]["kernel"] = np.eye(16, dtype=np.float32)
  return p


def test_copying_score_on_hand_built_weights():
  assert circuits.copying_score(_copy_params(+1.0), 1, 0, 2) > 0.99
  assert circuits.copying_score(_copy_params(-1.0), 1, 0, 2) < -0.99
  assert circuits.copying_score(_copy_params(+1.0), 1, 1, 2) == pytest.approx(0.0, abs=1e-6)


def test_dense_attention_matches_slice_sums():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (3, 6, 32)) for kk in (k1, k2, k3))
  f = lambda sc, at: lambda q, k, v: at(jax.nn.softmax(sc(q, k, 4), axis=2), v)
  slice_fn = f(model_lib.causal_scores, model_lib.attend)
  dense_fn = f(model_lib.causal_scores_dense, model_lib.attend_dense)
  numerics.assert_close(dense_fn(q, k, v), slice_fn(q, k, v), rtol=1e-5, rel_atol=1e-5)
  g = lambda fn: jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
  numerics.assert_close(g(dense_fn), g(slice_fn), rtol=1e-4, rel_atol=1e-5)


# ----------------------------------------------------------------------------- model + clamps

@pytest.fixture(scope="module")
def setup():
  params = model_lib.init_params(jax.random.key(5), CFG, 0, seq_len=LAYOUT.seq_len)
  batch = tokens_lib.sample_tokens(jax.random.key(3), LAYOUT, V, 8)
  return params, batch


def _one(spec):
  stacked = clamps_lib.stack([clamps_lib.parse(spec, 2, 4)])
  return jax.tree.map(lambda x: jnp.asarray(x[0]), stacked), clamps_lib.plan_for(stacked)


def _loss_grads(params, batch, spec):
  c, plan = _one(spec)
  loss = lambda p: model_lib.next_token_loss(model_lib.apply(p, batch, c, CFG, plan)[0],
                                             batch.tokens)
  return jax.grad(loss)(params)


def test_token_model_shapes_and_param_count(setup):
  params, batch = setup
  logits, aux = model_lib.apply(params, batch, None, CFG, sites=("blocks.1.pattern",))
  assert logits.shape == (8, LAYOUT.seq_len, V)
  assert aux["blocks.1.pattern"].shape == (8, 4, LAYOUT.seq_len, LAYOUT.seq_len)
  # embedding V*d + 2 layers (LN 2d + QKV d*3d + 3d + out d*d + d) + final LN 2d + unembed d*V + V
  d = 32
  assert model_lib.param_count(params) == V * d + 2 * (2 * d + 3 * d * d + 3 * d + d * d + d) \
      + 2 * d + d * V + V
  # Causality: the logits at t do not depend on later tokens.
  other = batch.tokens.at[:, 10:].set((batch.tokens[:, 10:] + 1) % V)
  l2, _ = model_lib.apply(params, batch._replace(tokens=other), None, CFG)
  numerics.assert_close(l2[:, :10], logits[:, :10], rtol=1e-5, rel_atol=1e-5)


def test_pt_clamp_on_tokens(setup):
  params, batch = setup
  c, plan = _one("pt:L1H2")
  _, aux = model_lib.apply(params, batch, c, CFG, plan, sites=("blocks.0.pattern",))
  T = LAYOUT.seq_len
  want = targets.prev_token_pattern(T, jnp.ones(1))[0]
  np.testing.assert_array_equal(aux["blocks.0.pattern"][:, 2], jnp.broadcast_to(want, (8, T, T)))
  g = _loss_grads(params, batch, "pt:L1H2")["blocks_0"]["qkv"]["kernel"]
  K, D = 8, 32
  assert np.abs(g[:, 2 * K:3 * K]).max() == 0 and np.abs(g[:, D + 2 * K:D + 3 * K]).max() == 0
  assert np.abs(g[:, 2 * D + 2 * K:2 * D + 3 * K]).max() > 0   # its values still learn


def test_ih_clamp_on_tokens(setup):
  params, batch = setup
  c, plan = _one("ih:L2H1@0.8")
  _, aux = model_lib.apply(params, batch, c, CFG, plan, sites=("blocks.1.pattern",))
  tgt_BT = tokens_lib.copy_targets(batch)
  want = targets.token_induction_pattern(tgt_BT, jnp.full((1,), 0.8))[:, 0]
  np.testing.assert_allclose(aux["blocks.1.pattern"][:, 1], want, atol=1e-6)
  tgt = np.asarray(tgt_BT)
  # The oracle targets are the declared copy: the token after x_t's earlier copy.
  tok, (a, b) = np.asarray(batch.tokens), np.asarray(batch.starts).T
  for bi, t in zip(*np.nonzero(tgt >= 0)):
    assert b[bi] <= t < b[bi] + LAYOUT.segment_len and tgt[bi, t] == a[bi] + t - b[bi] + 1
    assert tok[bi, tgt[bi, t] - 1] == tok[bi, t]
  assert (tgt >= 0).sum(1).tolist() == [LAYOUT.segment_len] * len(tgt)
  row = np.asarray(aux["blocks.1.pattern"][:, 1])
  for bi, t in zip(*np.nonzero(tgt >= 0)):   # s on the target, 1 - s on itself
    assert row[bi, t, tgt[bi, t]] == pytest.approx(0.8 + (0.2 if tgt[bi, t] == t else 0.0))
  for bi, t in zip(*np.nonzero(tgt < 0)):    # no earlier occurrence: key 0
    assert row[bi, t, 0] == 1.0
  g = _loss_grads(params, batch, "ih:L2H1")["blocks_1"]["qkv"]["kernel"]
  assert np.abs(g[:, 8:16]).max() == 0 and np.abs(g[:, 32 + 8:32 + 16]).max() == 0
  with pytest.raises(ValueError, match="previous layer"):
    clamps_lib.parse("ih:L1H0", 2, 4)


def test_ablation_and_preserve_on_tokens(setup):
  params, batch = setup
  c, plan = _one("ablate:L1H3")
  _, aux = model_lib.apply(params, batch, c, CFG, plan, sites=("blocks.0.head_out",))
  assert np.abs(aux["blocks.0.head_out"][..., 24:32]).max() == 0
  g = _loss_grads(params, batch, "ablate:L1H3")["blocks_0"]
  assert np.abs(g["qkv"]["kernel"][:, 64 + 24:64 + 32]).max() == 0
  assert np.abs(g["out"]["kernel"][24:32]).max() == 0
  base, _ = model_lib.apply(params, batch, None, CFG)
  for spec in ("preserve_pattern", "preserve_value"):
    c, plan = _one(spec)
    got, _ = model_lib.apply(params, batch, c, CFG, plan)
    numerics.assert_close(got, base, rtol=1e-5, rel_atol=1e-5, err_msg=spec)


@pytest.mark.parametrize("spec,kind", [("copy:L2H0", "copy"), ("perfect_l1", "perfect_l1"),
                                       ("perfect_l1;copy:L2H1", "copy")])
def test_few_shot_only_clamps_are_refused(setup, spec, kind):
  params, batch = setup
  with pytest.raises(ValueError, match=rf"{kind}.*few-shot task.*allowed there: none, .*ablate"):
    experiment.parse_conditions((spec,), 2, 4, tokens=True)
  c, plan = _one(spec)
  with pytest.raises(ValueError, match=rf"{kind}.*few-shot task"):
    model_lib.apply(params, batch, c, CFG, plan)


# ----------------------------------------------------------------------------- config

def _token_cfg(**over):
  d = {"task": {"kind": "tokens"}, "model": {"vocab_size": 16},
       "tokens": {"seq_len": 24, "segment_len": 6}}
  for k, v in over.items():
    d.setdefault(k, {}).update(v)
  return ExperimentConfig.from_dict(d)


@pytest.mark.parametrize("over,match", [
    ({"task": {"kind": "words"}}, "unknown task.kind 'words'"),
    ({"model": {"vocab_size": 0}}, "needs the token model"),
    ({"tokens": {"seq_len": 10}}, "too short"),
    ({"model": {"vocab_size": 1}}, "vocab_size must be 0"),
])
def test_config_errors(over, match):
  with pytest.raises(ValueError, match=match):
    _token_cfg(**over)
  with pytest.raises(ValueError, match="only the token task uses"):
    ExperimentConfig.from_dict({"model": {"vocab_size": 16}})


def test_metric_names_and_old_workdir_configs():
  assert tasks.get("fewshot")().metric_names == workdir_lib.METRIC_COLUMNS[8:]
  assert tasks.get("tokens")().metric_names == TOKEN_METRIC_NAMES
  # A config stored before the token task existed compares equal to today's default.
  old = ExperimentConfig().to_dict()
  del old["tokens"], old["task"]["kind"], old["model"]["vocab_size"]
  new = workdir_lib._as_json(ExperimentConfig().to_dict())  # pylint: disable=protected-access
  assert workdir_lib.config_diff(workdir_lib._with_defaults(workdir_lib._as_json(old)),  # pylint: disable=protected-access
                                 new) == []
  assert dataclasses.replace(ExperimentConfig()).task.kind == "fewshot"
