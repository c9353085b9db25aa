"""Clamp pytree: parsing, validation, patterns, plans and gradient oracles."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ih_jax import clamps as cl
from ih_jax import model as model_lib
from ih_jax.interventions import targets
from ih_jax.tasks import fewshot as fewshot_task
from ih_jax.data import evalsets, sampler

import numerics
from conftest import assert_query_only_exact, make_batch

L, H, K, D = 2, 8, 8, 64


# ----------------------------------------------------------------------------- parsing

def test_head_names_paper_and_code_numbering_agree():
  assert cl.parse_heads("L2H3", L, H) == [(1, 3)]
  assert cl.parse_heads("1:3", L, H) == [(1, 3)]
  assert cl.parse_heads("L1H0-2,L2H*", L, H) == [(0, 0), (0, 1), (0, 2)] + [(1, h) for h in range(8)]
  assert cl.head_name((1, 3)) == "L2H3"


@pytest.mark.parametrize("spec,match", [
    ("ablate:L3H9", "unknown head 'L3H9'.*L1..L2.*H0..H7"),
    ("ablate:L2H8", "unknown head 'L2H8'"),
    ("ablate:2:0", "unknown head '2:0'"),
    ("ablate:L0H1", "paper layers start at L1"),
    ("ablate:X2", "cannot parse head 'X2'"),
    ("ablate:L2H5-3", "empty"),
    ("frobnicate:L2H1", "unknown clamp kind 'frobnicate'"),
    ("ablate", "needs heads"),
    ("ih:L1H2", "needs a previous layer"),
    ("copy:L1H2", "last-layer head"),
    ("copy:L2H1,L2H2", "exactly one head"),
    ("ih:L2H1@1.5", r"in \[0, 1\]"),
    ("ablate:L2H1@0.5", "only pt and ih take a strength"),
    ("perfect_l1;ablate:L1H0", "perfect_l1 replaces layer L1"),
    ("perfect_l1;preserve_value", "cannot be combined"),
    ("none:L2H1", "takes no heads"),
    ("", "empty clamp spec"),
])
def test_bad_specs_raise_clear_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    cl.parse(spec, L, H)


def test_perfect_l1_needs_two_layers():
  with pytest.raises(ValueError, match="at least 2 layers"):
    cl.parse("perfect_l1", 1, 8)


@pytest.mark.parametrize("spec", ["none", "ablate:L2H0-6", "pt:L1H2@0.7;ih:L2H3", "copy:L2H4",
                                  "perfect_l1;copy:L2H0", "preserve_pattern;ablate:L1H*"])
def test_describe_roundtrips(spec):
  c = cl.parse(spec, L, H)
  again = cl.parse(cl.describe(c), L, H)
  for k in cl.leaf_names():
    np.testing.assert_array_equal(c[k], again[k])


def test_keep_only_ablates_the_rest_of_that_layer():
  c = cl.parse("keep_only:L2H3", L, H)
  expect = np.ones((L, H))
  expect[1] = 0
  expect[1, 3] = 1
  np.testing.assert_array_equal(c["v_keep"], expect)


def test_all_conditions_share_one_structure():
  specs = ["none", "ablate:L2H1", "pt:L1H0", "ih:L2H2@0.3", "copy:L2H5", "perfect_l1",
           "preserve_value;ablate:L1H3"]
  stacked = cl.stack([cl.parse(s, L, H) for s in specs])
  chex.assert_trees_all_equal_shapes_and_dtypes(
      stacked, cl.stack([cl.identity(L, H)] * len(specs)))
  assert stacked["v_keep"].shape == (len(specs), L, H)
  with pytest.raises(ValueError, match="same model"):
    cl.stack([cl.identity(2, 8), cl.identity(3, 8)])


def test_plan_is_union_and_skips_unneeded_passes():
  assert cl.plan_for(cl.stack([cl.identity(L, H)])) == cl.NO_CLAMPS
  copy_only = cl.plan_for(cl.stack([cl.identity(L, H), cl.parse("copy:L2H1", L, H)]))
  assert copy_only.uses("copy") and not copy_only.needs_clean_pass and copy_only.num_passes == 1
  copy_abl = cl.plan_for(cl.stack([cl.parse("copy:L2H1", L, H), cl.parse("ablate:L1H0", L, H)]))
  assert not copy_abl.needs_clean_pass  # the copying run itself clamps nothing else
  copy_abl2 = cl.plan_for(cl.stack([cl.parse("copy:L2H1;ablate:L1H0", L, H)]))
  assert copy_abl2.needs_clean_pass and copy_abl2.num_passes == 2
  l1c = cl.plan_for(cl.stack([cl.parse("perfect_l1;copy:L2H1", L, H)]))
  assert l1c.uses("perfect_l1") and not l1c.needs_clean_pass and l1c.num_passes == 2


# ----------------------------------------------------------------------------- patterns

@pytest.mark.parametrize("T", [5, 9])
def test_prev_token_pattern(T):
  P = np.asarray(targets.prev_token_pattern(T, jnp.array([1.0, 0.7])))
  np.testing.assert_array_equal(P[0].argmax(-1), [0] + list(range(T - 1)))
  np.testing.assert_array_equal(P[0], np.eye(T, k=-1) + np.eye(T) * (np.arange(T) == 0)[:, None])
  assert P[1, 0, 0] == 1.0
  np.testing.assert_allclose(np.diagonal(P[1], -1), 0.7)
  np.testing.assert_allclose(np.diagonal(P[1])[1:], 0.3, atol=1e-6)
  np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-6)


def test_induction_row_paper_case():
  y = jnp.array([[3, 1, 3], [0, 2, 2]])  # query matches context 0, resp. context 1
  row = np.asarray(targets.induction_row(y, jnp.array([1.0, 0.8])))
  np.testing.assert_allclose(row[0, 0], [0, 1, 0, 0, 0])
  np.testing.assert_allclose(row[0, 1], [0, 0.8, 0, 0.2, 0], atol=1e-6)
  np.testing.assert_allclose(row[1, 1], [0, 0.2, 0, 0.8, 0], atol=1e-6)


def test_induction_row_generic_n_spreads_mass():
  y = jnp.array([[1, 2, 1, 4, 1]])  # n = 4: two matching labels, two others
  row = np.asarray(targets.induction_row(y, jnp.array([0.9])))[0, 0]
  np.testing.assert_allclose(row, [0, 0.45, 0, 0.05, 0, 0.45, 0, 0.05, 0], atol=1e-6)


def _run(params, cfg, batch, spec, sites=()):
  c = cl.parse(spec, cfg.num_layers, cfg.num_heads)
  plan = cl.plan_for(cl.stack([c]))
  return model_lib.apply(params, batch, jax.tree.map(jnp.asarray, c), cfg, plan, sites)


@pytest.mark.parametrize("n", [2, 3])
def test_pattern_clamps_act_in_the_model(params, cfg, feature_table, paper_splits, n):
  b = make_batch(feature_table, paper_splits, n=n, batch_size=8)
  T = 2 * n + 1
  sites = ("blocks.0.pattern", "blocks.1.pattern")
  _, clean = _run(params, cfg, b, "none", sites)
  _, aux = _run(params, cfg, b, "pt:L1H2;ih:L2H5@0.9", sites)
  P = targets.prev_token_pattern(T, jnp.array([1.0]))[0]
  np.testing.assert_array_equal(aux["blocks.0.pattern"][:, 2], np.broadcast_to(P, (8, T, T)))
  others = [h for h in range(8) if h != 2]
  # Unclamped heads of a clamped run (another program than the clean run): rounding only.
  numerics.assert_close(aux["blocks.0.pattern"][:, others], clean["blocks.0.pattern"][:, others],
                        rtol=1e-5, rel_atol=1e-5)
  ih = aux["blocks.1.pattern"][:, 5]
  np.testing.assert_allclose(ih[:, -1], targets.induction_row(b.y, jnp.array([0.9]))[:, 0],
                             atol=1e-6)
  assert not np.allclose(ih[:, :-1], 0)  # only the query row is replaced
  strength = (ih[:, -1, 1::2] * (b.y[:, :-1] == b.y[:, -1:])).sum(-1) - \
      (ih[:, -1, 1::2] * (b.y[:, :-1] != b.y[:, -1:])).sum(-1)
  np.testing.assert_allclose(strength, 2 * 0.9 - 1, atol=1e-6)  # IS = 2s - 1


def test_value_ablation_zeroes_head_but_keeps_out_bias(params, cfg, batch):
  p = jax.tree.map(lambda a: a, params)
  p["blocks_1"]["out"]["bias"] = jnp.full((64,), 0.5)
  c = cl.parse("ablate:L2H*", 2, 8)
  _, aux = model_lib.apply(p, batch, jax.tree.map(jnp.asarray, c), cfg,
                           cl.plan_for(cl.stack([c])), ("blocks.1.attn_out", "blocks.1.v"))
  np.testing.assert_array_equal(aux["blocks.1.v"], 0.0)
  np.testing.assert_allclose(aux["blocks.1.attn_out"], 0.5)


def test_perfect_copy_logits(params, cfg, batch):
  logits, aux = _run(params, cfg, batch, "copy:L2H4", ("blocks.1.scores",))
  q = np.asarray(logits[:, -1])
  s = np.asarray(aux["blocks.1.scores"][:, 4, -1])
  for i in range(batch.y.shape[0]):
    for c in range(2):
      assert q[i, batch.y[i, c]] == s[i, 2 * c + 1]
    absent = [k for k in range(5) if k not in np.asarray(batch.y[i, :2])]
    np.testing.assert_array_equal(q[i, absent], targets.COPY_FILL)


def test_perfect_l1_uses_shifted_embedding_patterns(params, cfg, batch):
  _, aux = _run(params, cfg, batch, "perfect_l1", ("embed", "blocks.1.pattern", "blocks.1.resid_pre"))
  np.testing.assert_allclose(aux["blocks.1.resid_pre"], aux["embed"])  # layer 0 removed
  E = aux["embed"]
  shifted = targets.shifted_embedding(E)
  np.testing.assert_array_equal(shifted[:, [0, 1, 2, 3, 4]], E[:, [0, 0, 1, 2, 4]])
  # Patterns = those of layer 1 run on the shifted residual.
  q, k, _ = model_lib.Block(cfg).apply({"params": params["blocks_1"]}, shifted,
                                       method=model_lib.Block.project)
  expect = jax.nn.softmax(model_lib.causal_scores(q, k, 8), axis=2).transpose(0, 3, 1, 2)
  numerics.assert_close(aux["blocks.1.pattern"], expect, rtol=1e-5, rel_atol=1e-5)


def test_preservation_is_identity_without_ablation(params, cfg, batch):
  base, _ = _run(params, cfg, batch, "none")
  for spec in ("preserve_pattern", "preserve_value", "preserve_pattern;preserve_value"):
    out, _ = _run(params, cfg, batch, spec)
    numerics.assert_close(out, base, rtol=1e-5, rel_atol=1e-5, err_msg=spec)


def test_pattern_preserving_ablation_keeps_layer1_patterns(params, cfg, batch):
  sites = ("blocks.1.pattern", "blocks.1.v")
  _, clean = _run(params, cfg, batch, "none", sites)
  _, pp = _run(params, cfg, batch, "preserve_pattern;ablate:L1H0-3", sites)
  _, pv = _run(params, cfg, batch, "preserve_value;ablate:L1H0-3", sites)
  numerics.assert_close(pp["blocks.1.pattern"], clean["blocks.1.pattern"], rtol=1e-5,
                        rel_atol=1e-5)
  assert not np.allclose(pp["blocks.1.v"], clean["blocks.1.v"], atol=1e-4)
  numerics.assert_close(pv["blocks.1.v"], clean["blocks.1.v"], rtol=1e-5, rel_atol=1e-5)
  assert not np.allclose(pv["blocks.1.pattern"], clean["blocks.1.pattern"], atol=1e-4)


def test_vmapped_conditions_equal_individual_runs(params, cfg, batch):
  specs = ["none", "ablate:L2H0-6", "pt:L1H1", "ih:L2H2@0.7;keep_only:L2H2", "copy:L2H3",
           "perfect_l1;copy:L2H0", "preserve_pattern;ablate:L1H5"]
  stacked = cl.stack([cl.parse(s, 2, 8) for s in specs])
  plan = cl.plan_for(stacked)
  out = jax.jit(jax.vmap(lambda c: model_lib.apply(params, batch, c, cfg, plan)[0]))(
      jax.tree.map(jnp.asarray, stacked))
  for i, s in enumerate(specs):
    alone, _ = _run(params, cfg, batch, s)
    numerics.assert_close(out[i], alone, rtol=1e-5, rel_atol=1e-5, err_msg=s)


# ----------------------------------------------------------------------------- gradients

def _grads(params, cfg, batch, spec):
  c = jax.tree.map(jnp.asarray, cl.parse(spec, 2, 8))
  plan = cl.plan_for(cl.stack([cl.parse(spec, 2, 8)]))
  loss = lambda p: model_lib.query_loss(model_lib.apply(p, batch, c, cfg, plan)[0], batch.y)
  return jax.tree.map(np.asarray, jax.grad(loss)(params))


def _qkv_cols(part: str, heads) -> np.ndarray:
  off = {"q": 0, "k": D, "v": 2 * D}[part]
  return np.concatenate([np.arange(off + K * h, off + K * h + K) for h in heads])


def _head_slices(g, layer, heads, parts):
  """Gradient entries of the named heads' Q/K/V slices (weights and biases) and W_O rows."""
  b = g[f"blocks_{layer}"]
  out = []
  for part in parts:
    if part == "o":
      rows = _qkv_cols("q", heads)
      out.append(b["out"]["kernel"][rows])
    else:
      cols = _qkv_cols(part, heads)
      out += [b["qkv"]["kernel"][:, cols], b["qkv"]["bias"][cols]]
  return out


def _zero(arrays):
  return all(np.all(a == 0) for a in arrays)


def _nonzero(arrays):
  return all(np.any(a != 0) for a in arrays)


@pytest.fixture(scope="module")
def gbatch(feature_table, paper_splits):
  return make_batch(feature_table, paper_splits, batch_size=32, seed=11)


@pytest.fixture(scope="module")
def trained_ish(params):
  # Non-zero biases everywhere so "bias gets zero gradient" is not trivially true.
  return jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(a.size), a.shape),
                      params)


def test_grad_value_ablation(trained_ish, cfg, gbatch):
  g = _grads(trained_ish, cfg, gbatch, "ablate:L1H3")
  assert _zero(_head_slices(g, 0, [3], "qkvo"))
  assert _nonzero(_head_slices(g, 0, [2], "qkvo"))


def test_grad_prev_token_clamp(trained_ish, cfg, gbatch):
  g = _grads(trained_ish, cfg, gbatch, "pt:L1H3")
  assert _zero(_head_slices(g, 0, [3], "qk"))
  assert _nonzero(_head_slices(g, 0, [3], "vo"))


def test_grad_induction_clamp(trained_ish, cfg, gbatch):
  g = _grads(trained_ish, cfg, gbatch, "ih:L2H3")
  assert _zero(_head_slices(g, 1, [3], "qk"))
  assert _nonzero(_head_slices(g, 1, [3], "vo"))
  assert _nonzero([g["unembed"]["kernel"], g["blocks_0"]["qkv"]["kernel"],
                   g["embed_x"]["kernel"], g["embed_y"]["kernel"]])


def test_grad_perfect_copy(trained_ish, cfg, gbatch):
  g = _grads(trained_ish, cfg, gbatch, "copy:L2H3")
  others = [h for h in range(8) if h != 3]
  b1 = g["blocks_1"]
  assert _zero([b1["qkv"]["kernel"][:, _qkv_cols("v", range(8))], b1["qkv"]["bias"][128:],
                b1["out"]["kernel"], b1["out"]["bias"]])
  assert _zero(_head_slices(g, 1, others, "qk"))
  assert _zero(jax.tree.leaves(g["ln_f"]) + jax.tree.leaves(g["unembed"]))
  assert _nonzero(_head_slices(g, 1, [3], "qk") + jax.tree.leaves(b1["ln"]))
  assert _nonzero(jax.tree.leaves(g["blocks_0"]) + [g["embed_x"]["kernel"], g["embed_y"]["kernel"]])


def test_grad_perfect_l1(trained_ish, cfg, gbatch):
  g = _grads(trained_ish, cfg, gbatch, "perfect_l1")
  assert _zero(jax.tree.leaves(g["blocks_0"]))
  assert _nonzero(_head_slices(g, 1, range(8), "qk") + jax.tree.leaves(g["blocks_1"]["ln"]))
  assert _nonzero([g["embed_x"]["kernel"], g["embed_y"]["kernel"]])


def test_grad_perfect_l1_plus_copy(trained_ish, cfg, gbatch):
  g = _grads(trained_ish, cfg, gbatch, "perfect_l1;copy:L2H3")
  learn = _head_slices(g, 1, [3], "qk") + jax.tree.leaves(g["blocks_1"]["ln"]) + \
      [g["embed_x"]["kernel"], g["embed_x"]["bias"]]
  assert _nonzero(learn)
  # Zero everything else: mask out the learning entries and check the rest.
  rest = jax.tree.map(np.copy, g)
  b1 = rest["blocks_1"]
  cols = _qkv_cols("q", [3]).tolist() + _qkv_cols("k", [3]).tolist()
  b1["qkv"]["kernel"][:, cols] = 0
  b1["qkv"]["bias"][cols] = 0
  b1["ln"] = jax.tree.map(np.zeros_like, b1["ln"])
  rest["embed_x"] = jax.tree.map(np.zeros_like, rest["embed_x"])
  # Everything else, the label embedding included, has exactly zero gradient.
  nonzero = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(rest)
             if np.any(v != 0)]
  assert not nonzero


# ----------------------------------------------------------------------------- graft-in

def _graft_clamps(donor):
  c = cl.parse("graft:d", 2, 8, donors=("d",))
  plan = cl.plan_for(cl.stack([c]))
  return dict(jax.tree.map(jnp.asarray, c), graft_params=donor), plan


def test_graft_parse_and_validation():
  c = cl.parse("graft:b;keep_only:L2H3", 2, 8, donors=("a", "b"))
  assert bool(c["graft_on"]) and int(c["graft_donor"]) == 1
  assert cl.describe(c, ("a", "b")) == "ablate:L2H0;ablate:L2H1;ablate:L2H2;ablate:L2H4;" \
      "ablate:L2H5;ablate:L2H6;ablate:L2H7;graft:b"
  assert cl.plan_for(cl.stack([c])).uses("graft")
  with pytest.raises(ValueError, match="not declared"):
    cl.parse("graft:zz", 2, 8, donors=("a",))
  with pytest.raises(ValueError, match="perfect_l1"):
    cl.parse("graft:a;perfect_l1", 2, 8, donors=("a",))


def test_graft_replaces_block0_residual_with_the_donors(params, cfg, gbatch):
  donor = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size + 1),
                                                               a.shape), params)
  c, plan = _graft_clamps(donor)
  _, aux = model_lib.apply(params, gbatch, c, cfg, plan, sites=("blocks.1.resid_pre",))
  _, ref = model_lib.apply(donor, gbatch, None, cfg, sites=("blocks.0.resid_post",))
  numerics.assert_close(aux["blocks.1.resid_pre"], ref["blocks.0.resid_post"], rtol=1e-5,
                        rel_atol=1e-5)


def test_grad_graft(trained_ish, params, cfg, gbatch):
  """Graft-in: this model's embeddings and layer 0 get no gradient; layer 1+ learns."""
  c, plan = _graft_clamps(params)
  loss = lambda p: model_lib.query_loss(model_lib.apply(p, gbatch, c, cfg, plan)[0], gbatch.y)
  g = jax.tree.map(np.asarray, jax.grad(loss)(trained_ish))
  assert _zero(jax.tree.leaves(g["blocks_0"]) + jax.tree.leaves(g["embed_x"]) +
               jax.tree.leaves(g["embed_y"]))
  assert _nonzero(jax.tree.leaves(g["blocks_1"]["qkv"]) + jax.tree.leaves(g["unembed"]))
  # And the donor is a constant: no gradient reaches it.
  g_donor = jax.grad(lambda d: model_lib.query_loss(model_lib.apply(
      trained_ish, gbatch, dict(c, graft_params=d), cfg, plan)[0], gbatch.y))(params)
  assert _zero(jax.tree.leaves(jax.tree.map(np.asarray, g_donor)))


@pytest.mark.parametrize("spec", [
    "none", "ablate:L2H1,L1H0", "pt:L1H3;keep_only:L2H3", "pt:L2H2@0.7", "ih:L2H3@0.8",
    "copy:L2H3", "perfect_l1;keep_only:L2H3", "perfect_l1;copy:L2H3",
    "preserve_pattern;ablate:L1H0", "preserve_value;ablate:L1H2"])
def test_query_only_forward_gives_the_same_query_logits(trained_ish, cfg, gbatch, spec):
  c = jax.tree.map(jnp.asarray, cl.parse(spec, 2, 8))
  assert_query_only_exact(trained_ish, gbatch, c, cfg, cl.plan_for(cl.stack([cl.parse(spec, 2, 8)])))


@pytest.fixture(scope="module")
def ibatch(feature_table, paper_splits):
  """A training batch as the program samples it: distinct exemplars + row ids."""
  spec = evalsets.train_spec(paper_splits)
  table, lookup = sampler.compact_table(feature_table, spec)
  return sampler.sample_indexed_batch(jax.random.key(11), table, lookup, spec, 32, 2)


def distinct(x, cfg):
  """Whether the few-shot task embeds `x` per distinct token in the model."""
  return fewshot_task.distinct_tokens(x, cfg, model_lib.SLICE_MAX_B)


@pytest.mark.parametrize("spec", [
    "none", "pt:L1H3;keep_only:L2H3", "ih:L2H3@0.8", "perfect_l1;copy:L2H3",
    "preserve_pattern;ablate:L1H0", "preserve_value;ablate:L1H2"])
def test_distinct_token_route_matches_the_per_token_route(trained_ish, cfg, ibatch, spec):
  """Block 0's projection computed once per distinct token (training batches) gives the
  per-token forward's logits and gradients, under every kind of clamp."""
  gathered = sampler.Batch(ibatch.x.table[ibatch.x.ids], ibatch.y)
  assert distinct(ibatch.x, cfg)
  assert not distinct(gathered.x, cfg)
  c = jax.tree.map(jnp.asarray, cl.parse(spec, 2, 8))
  plan = cl.plan_for(cl.stack([cl.parse(spec, 2, 8)]))
  loss = lambda p, b: model_lib.query_loss(
      model_lib.apply(p, b, c, cfg, plan, query_only=True)[0], b.y)
  for qo in (False, True):
    lg_i = model_lib.apply(trained_ish, ibatch, c, cfg, plan, query_only=qo)[0]
    lg_g = model_lib.apply(trained_ish, gathered, c, cfg, plan, query_only=qo)[0]
    numerics.assert_close(lg_i, lg_g, rtol=1e-5, rel_atol=1e-5)
  g_i, g_g = jax.grad(loss)(trained_ish, ibatch), jax.grad(loss)(trained_ish, gathered)
  numerics.assert_close(g_i, g_g, rtol=1e-4, rel_atol=1e-5)
  # Recorded sites hold the same activations (the gather is invisible to users).
  sites = ("embed", "blocks.0.q", "blocks.0.k", "blocks.0.v", "blocks.0.pattern")
  a_i = model_lib.apply(trained_ish, ibatch, c, cfg, plan, sites=sites)[1]
  a_g = model_lib.apply(trained_ish, gathered, c, cfg, plan, sites=sites)[1]
  numerics.assert_close(a_i, a_g, rtol=1e-5, rel_atol=1e-5)


def test_distinct_token_route_is_skipped_where_it_does_not_apply(cfg, ibatch):
  assert not distinct(ibatch.x, model_lib.ModelConfig(pos_emb="learned"))
  big = sampler.IndexedFeatures(ibatch.x.table, jnp.zeros((model_lib.SLICE_MAX_B + 1, 3),
                                                          jnp.int32))
  assert not distinct(big, cfg)  # eval sets: the gather would cost more
  many = sampler.IndexedFeatures(jnp.zeros((32 * 5, 512)), ibatch.x.ids)
  assert not distinct(many, cfg)  # no fewer distinct tokens than tokens
