"""Model generality: depth L >= 1, MLP blocks, any width/heads, learned absolute
positions, and every clamp kind at any valid layer (the same clamp semantics and
zero-gradient checks as the paper's 2-layer model, at depth > 2 with MLPs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ih_jax import checkpoint, train
from ih_jax.train import experiment, state as state_lib
from ih_jax import clamps as cl
from ih_jax import model as model_lib
from ih_jax.interventions import targets
from ih_jax.config import ExperimentConfig

import numerics
from conftest import assert_query_only_exact, make_batch

F = 512  # feature width of the synthetic features


def expected_count(cfg: model_lib.ModelConfig, F: int = F, num_context: int = 2) -> int:
  """Parameter count by hand (d = d_model, r = mlp_ratio, C = num_labels, T = 2n + 1):

    embeddings        F*d + d (W_ex, b_ex)  +  C*d (W_lab, no bias)
    per layer         LN 2d + W_qkv 3d^2 + W_O d^2  (+ b_qkv 3d + b_O d with attn_bias)
    per layer, MLP    LN 2d + W_in r*d^2 + b_in r*d + W_out r*d^2 + b_out d   (r > 0)
    learned positions T*d                                                      (if learned)
    final LN 2d, unembedding d*C + C
  """
  d, r, C, L = cfg.d_model, cfg.mlp_ratio, cfg.num_labels, cfg.num_layers
  layer = 2 * d + 4 * d * d + (4 * d if cfg.attn_bias else 0)
  mlp = (2 * d + 2 * r * d * d + r * d + d) if r else 0
  pos = (2 * num_context + 1) * d if cfg.learned_pos else 0
  return F * d + d + C * d + L * (layer + mlp) + pos + 2 * d + d * C + C


@pytest.mark.parametrize("kw,by_hand", [
    ({}, 67_141),                                  # the paper
    ({"attn_bias": False}, 66_629),
    # 32,832 + 320 + 3 * (16,768 + 33,216) + 5 * 64 + 128 + 325
    ({"num_layers": 3, "mlp_ratio": 4, "pos_emb": "rope+learned"}, 183_877),
    # 4,617 + 45 + (378 + 369) + 45 + 18 + 50: odd head width is fine without RoPE
    ({"num_layers": 1, "num_heads": 3, "d_model": 9, "mlp_ratio": 2, "pos_emb": "learned"},
     5_522),
    ({"num_layers": 4, "num_heads": 2, "d_model": 32, "num_labels": 7, "attn_bias": False},
     None),
])
def test_param_counts_by_hand(kw, by_hand):
  cfg = model_lib.ModelConfig(**kw)
  params = model_lib.init_params(jax.random.key(0), cfg, F)
  assert model_lib.param_count(params) == expected_count(cfg)
  if by_hand is not None:
    assert model_lib.param_count(params) == by_hand


def test_paper_default_is_unchanged():
  cfg = model_lib.ModelConfig()
  assert (cfg.num_layers, cfg.mlp_ratio, cfg.pos_emb) == (2, 0, "rope")
  p = model_lib.init_params(jax.random.key(0), cfg, F)
  assert sorted(p) == ["blocks_0", "blocks_1", "embed_x", "embed_y", "ln_f", "unembed"]
  assert sorted(p["blocks_0"]) == ["ln", "out", "qkv"]
  assert "resid_mid" not in " ".join(model_lib.site_names(2))


def test_learned_position_table_and_init():
  cfg = model_lib.ModelConfig(num_layers=3, mlp_ratio=4, pos_emb="rope+learned")
  p = model_lib.init_params(jax.random.key(0), cfg, F, num_context=3)
  assert p["pos_embed"]["embedding"].shape == (7, 64)           # T = 2n + 1
  assert np.abs(p["pos_embed"]["embedding"]).max() <= 0.04 + 1e-6  # 0.02 truncated normal
  b = p["blocks_2"]
  assert b["mlp_in"]["kernel"].shape == (64, 256) and b["mlp_out"]["kernel"].shape == (256, 64)
  np.testing.assert_array_equal(b["mlp_ln"]["scale"], 1.0)


# ----------------------------------------------------------------------------- forward

CFG4 = model_lib.ModelConfig(num_layers=4)
CFG3 = model_lib.ModelConfig(num_layers=3, mlp_ratio=4, pos_emb="rope+learned")


@pytest.fixture(scope="module")
def batch(feature_table, paper_splits):
  return make_batch(feature_table, paper_splits, batch_size=16, seed=11)


@pytest.fixture(scope="module")
def p3(batch):
  # Non-zero biases and perturbed LNs so that "zero gradient" is never trivially true.
  p = model_lib.init_params(jax.random.key(2), CFG3, F)
  return jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(a.size), a.shape), p)


@pytest.mark.parametrize("cfg", [CFG4, CFG3], ids=["L4", "L3_mlp_learned"])
def test_forward_shapes_and_sites(cfg, batch):
  params = model_lib.init_params(jax.random.key(1), cfg, F)
  sites = model_lib.site_names(cfg.num_layers, mlp=cfg.mlp_ratio > 0)
  logits, aux = model_lib.apply(params, batch, None, cfg, sites=sites)
  B, L = batch.x.shape[0], cfg.num_layers
  assert logits.shape == (B, 3, 5) and np.isfinite(logits).all()
  for l in range(L):
    assert aux[f"blocks.{l}.pattern"].shape == (B, 8, 5, 5)
    assert aux[f"blocks.{l}.q"].shape == (B, 8, 5, 8)
    mid = aux[f"blocks.{l}.resid_pre"] + aux[f"blocks.{l}.attn_out"]
    if cfg.mlp_ratio:
      numerics.assert_close(aux[f"blocks.{l}.resid_mid"], mid, rtol=1e-5, rel_atol=1e-6)
      mid = mid + aux[f"blocks.{l}.mlp_out"]
      assert np.abs(aux[f"blocks.{l}.mlp_out"]).max() > 1e-3
    numerics.assert_close(aux[f"blocks.{l}.resid_post"], mid, rtol=1e-5, rel_atol=1e-6)
    if l:
      np.testing.assert_array_equal(aux[f"blocks.{l}.resid_pre"], aux[f"blocks.{l - 1}.resid_post"])
  if cfg.learned_pos:  # the positions are part of the embedding site
    E_tok = model_lib.Transformer(cfg).apply({"params": params}, batch.x, batch.y,
                                             method=model_lib.Transformer.embed)
    numerics.assert_close(aux["embed"], E_tok + params["pos_embed"]["embedding"], rtol=1e-5,
                          rel_atol=1e-6)
  with pytest.raises(ValueError, match="unknown activation sites"):
    model_lib.apply(params, batch, None, model_lib.ModelConfig(), sites=("blocks.0.mlp_out",))


def test_learned_only_positions_drop_rope_and_table_length_is_checked(batch, feature_table,
                                                                     paper_splits):
  cfg = model_lib.ModelConfig(pos_emb="learned")
  params = model_lib.init_params(jax.random.key(1), cfg, F)
  _, aux = model_lib.apply(params, batch, None, cfg, sites=("blocks.0.resid_pre", "blocks.0.q"))
  b0 = params["blocks_0"]
  u = aux["blocks.0.resid_pre"]
  u = (u - u.mean(-1, keepdims=True)) / jnp.sqrt(u.var(-1, keepdims=True) + 1e-5)
  q = (u * b0["ln"]["scale"] + b0["ln"]["bias"]) @ b0["qkv"]["kernel"][:, :64]
  # The model's fused LN + projection vs the formula by hand: other op orders (per-leaf
  # scale); a rotation would change q by O(1).
  numerics.assert_close(aux["blocks.0.q"], model_lib.to_heads(q + b0["qkv"]["bias"][:64], 8),
                        rtol=1e-5, rel_atol=1e-5)  # no rotation
  # A table built for n = 2 (T = 5) cannot serve n = 3 (T = 7).
  long = make_batch(feature_table, paper_splits, n=3, batch_size=2)
  with pytest.raises(ValueError, match="learned position table has 5 rows"):
    model_lib.apply(params, long, None, cfg)


# ----------------------------------------------------------------------------- clamps, L = 3

SPECS3 = ["none", "ablate:L2H1,L1H0", "pt:L2H3;keep_only:L3H3", "pt:L1H2;pt:L3H2@0.7",
          "ih:L2H1;ih:L3H3@0.8", "copy:L3H3", "perfect_l1;keep_only:L3H3",
          "perfect_l1;copy:L3H3", "perfect_l1;ih:L2H0;ablate:L3H1",
          "preserve_pattern;ablate:L1H0", "preserve_value;ablate:L2H2"]


def _parse(spec, cfg=CFG3):
  c = cl.parse(spec, cfg.num_layers, cfg.num_heads)
  return jax.tree.map(jnp.asarray, c), cl.plan_for(cl.stack([c]))


@pytest.mark.parametrize("spec", SPECS3)
def test_query_only_forward_is_exact_at_depth3_with_mlp(p3, batch, spec):
  c, plan = _parse(spec)
  assert_query_only_exact(p3, batch, c, CFG3, plan)


def test_clamps_act_in_middle_and_last_layers(p3, batch):
  sites = tuple(f"blocks.{l}.{s}" for l in range(3) for s in ("pattern", "v", "resid_pre"))
  c, plan = _parse("pt:L2H3@0.6;ih:L3H5;ablate:L2H1")
  _, aux = model_lib.apply(p3, batch, c, CFG3, plan, sites=sites + ("embed",))
  P = targets.prev_token_pattern(5, jnp.array([0.6]))[0]
  np.testing.assert_allclose(aux["blocks.1.pattern"][:, 3], np.broadcast_to(P, (16, 5, 5)))
  np.testing.assert_array_equal(aux["blocks.1.v"][:, 1], 0.0)
  np.testing.assert_allclose(aux["blocks.2.pattern"][:, 5, -1],
                             targets.induction_row(batch.y, jnp.array([1.0]))[:, 0], atol=1e-6)
  # perfect_l1 at L = 3: block 0 (attention and MLP) removed; layers 1 and 2 take their
  # patterns from a pass of layers 1..2 over the shifted input (positions unshifted).
  c, plan = _parse("perfect_l1")
  _, aux = model_lib.apply(p3, batch, c, CFG3, plan, sites=sites + ("embed",))
  np.testing.assert_allclose(aux["blocks.1.resid_pre"], aux["embed"], atol=1e-6)
  pos = p3["pos_embed"]["embedding"]
  shifted = targets.shifted_embedding(aux["embed"] - pos) + pos
  _, ref = model_lib.apply(p3, batch, None, CFG3, sites=("blocks.1.pattern", "blocks.2.pattern"))
  Tm = model_lib.Transformer(CFG3)
  h = shifted
  for l in (1, 2):
    q, k, _ = Tm.apply({"params": p3}, l, h, method=model_lib.Transformer.project)
    expect = jax.nn.softmax(model_lib.causal_scores(q, k, 8), axis=2).transpose(0, 3, 1, 2)
    numerics.assert_close(aux[f"blocks.{l}.pattern"], expect, rtol=1e-5, rel_atol=2e-5)
    h = Tm.apply({"params": p3}, l, h, method=lambda m, l, h: model_lib._layer(m, l, h))
  assert not np.allclose(aux["blocks.2.pattern"], ref["blocks.2.pattern"], atol=1e-3)


# ----------------------------------------------------------------------------- gradients

K, D = 8, 64


def _grads(params, batch, spec):
  c, plan = _parse(spec)
  loss = lambda p: model_lib.query_loss(model_lib.apply(p, batch, c, CFG3, plan)[0], batch.y)
  return jax.tree.map(np.asarray, jax.grad(loss)(params))


def _cols(part, heads):
  off = {"q": 0, "k": D, "v": 2 * D}[part]
  return np.concatenate([np.arange(off + K * h, off + K * h + K) for h in heads])


def _head(g, layer, heads, parts):
  """Gradients of the named heads' Q/K/V slices (weights and biases) and W_O rows."""
  b, out = g[f"blocks_{layer}"], []
  for part in parts:
    if part == "o":
      out.append(b["out"]["kernel"][_cols("q", heads)])
    else:
      out += [b["qkv"]["kernel"][:, _cols(part, heads)], b["qkv"]["bias"][_cols(part, heads)]]
  return out


def _mlp(g, layer):
  b = g[f"blocks_{layer}"]
  return jax.tree.leaves([b["mlp_ln"], b["mlp_in"], b["mlp_out"]])


def _zero(arrays):
  return all(np.all(a == 0) for a in arrays)


def _nonzero(arrays):
  return all(np.any(a != 0) for a in arrays)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_grad_value_ablation_any_layer(p3, batch, layer):
  g = _grads(p3, batch, f"ablate:{layer}:3")
  assert _zero(_head(g, layer, [3], "qkvo"))
  assert _nonzero(_head(g, layer, [2], "qkvo") + _mlp(g, layer))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_grad_prev_token_clamp_any_layer(p3, batch, layer):
  g = _grads(p3, batch, f"pt:{layer}:3")
  assert _zero(_head(g, layer, [3], "qk"))
  assert _nonzero(_head(g, layer, [3], "vo") + _head(g, layer, [2], "qk"))


@pytest.mark.parametrize("layer", [1, 2])
def test_grad_induction_clamp_middle_and_last_layer(p3, batch, layer):
  g = _grads(p3, batch, f"ih:{layer}:3")
  if layer == 2:  # last layer: only the query row reaches the loss, and it is clamped
    assert _zero(_head(g, layer, [3], "qk"))
  else:  # middle layer: the unclamped rows still feed layer 2, so Q/K keep learning
    assert _nonzero(_head(g, layer, [3], "qk"))
  assert _nonzero(_head(g, layer, [3], "vo") + _mlp(g, 2) + _mlp(g, 0) +
                  [g["unembed"]["kernel"], g["blocks_0"]["qkv"]["kernel"], g["embed_x"]["kernel"],
                   g["embed_y"]["kernel"], g["pos_embed"]["embedding"]])


def test_grad_perfect_l1_depth3(p3, batch):
  g = _grads(p3, batch, "perfect_l1")
  assert _zero(jax.tree.leaves(g["blocks_0"]))  # attention and MLP of block 0
  assert _nonzero(_head(g, 1, range(8), "qk") + _head(g, 2, range(8), "qkvo") + _mlp(g, 1) +
                  _mlp(g, 2) + [g["embed_x"]["kernel"], g["embed_y"]["kernel"],
                                g["pos_embed"]["embedding"]])


def test_grad_perfect_copy_depth3(p3, batch):
  g = _grads(p3, batch, "copy:L3H3")
  b2, others = g["blocks_2"], [h for h in range(8) if h != 3]
  assert _zero([b2["qkv"]["kernel"][:, 2 * D:], b2["qkv"]["bias"][2 * D:],
                b2["out"]["kernel"], b2["out"]["bias"]] + _head(g, 2, others, "qk") + _mlp(g, 2)
               + jax.tree.leaves(g["ln_f"]) + jax.tree.leaves(g["unembed"]))
  assert _nonzero(_head(g, 2, [3], "qk") + jax.tree.leaves(b2["ln"]) + _mlp(g, 0) + _mlp(g, 1)
                  + _head(g, 1, range(8), "qkvo") + _head(g, 0, range(8), "qkvo")
                  + [g["embed_x"]["kernel"], g["embed_y"]["kernel"], g["pos_embed"]["embedding"]])


def test_grad_graft_depth3(p3, batch):
  c = cl.parse("graft:d", 3, 8, donors=("d",))
  plan = cl.plan_for(cl.stack([c]))
  donor = model_lib.init_params(jax.random.key(9), CFG3, F)
  c = dict(jax.tree.map(jnp.asarray, c), graft_params=donor)
  loss = lambda p: model_lib.query_loss(model_lib.apply(p, batch, c, CFG3, plan)[0], batch.y)
  g = jax.tree.map(np.asarray, jax.grad(loss)(p3))
  assert _zero(jax.tree.leaves([g["blocks_0"], g["embed_x"], g["embed_y"], g["pos_embed"]]))
  assert _nonzero(jax.tree.leaves(g["blocks_1"]["qkv"]) + _mlp(g, 1) + _mlp(g, 2))


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("spec,match", [
    ("ih:L1H*", "needs a previous layer"),
    ("match:0:2", "needs a previous layer"),
    ("copy:L2H0", "last-layer head; use a head of L3"),
    ("copy:L1H0", "last-layer head"),
    ("perfect_l1;pt:L1H1", "perfect_l1 replaces layer L1"),
    ("ablate:L4H0", "unknown head 'L4H0'.*L1..L3"),
])
def test_bad_specs_at_depth3(spec, match):
  with pytest.raises(ValueError, match=match):
    cl.parse(spec, 3, 8)


def test_bad_combinations_and_configs():
  with pytest.raises(ValueError, match="single layer"):
    cl.parse("ih:L1H0", 1, 8)
  with pytest.raises(ValueError, match="at least 2 layers"):
    cl.parse("perfect_l1", 1, 8)
  with pytest.raises(ValueError, match="graft replaces .* L1 heads"):
    cl.parse("graft:d;ablate:L1H0", 3, 8, donors=("d",))
  assert cl.parse("copy:L1H2", 1, 8)["copy_on"][2]  # one layer: L1 is the last layer
  with pytest.raises(ValueError, match="unknown pos_emb 'alibi'"):
    model_lib.ModelConfig(pos_emb="alibi")
  with pytest.raises(ValueError, match="mlp_ratio must be an integer >= 0"):
    model_lib.ModelConfig(mlp_ratio=-1)
  with pytest.raises(ValueError, match="not divisible"):
    model_lib.ModelConfig(d_model=50, num_heads=8)
  with pytest.raises(ValueError, match="even head width"):
    model_lib.ModelConfig(d_model=9, num_heads=3)
  with pytest.raises(ValueError, match="num_layers >= 1"):
    model_lib.ModelConfig(num_layers=0)
  with pytest.raises(ValueError, match="unknown pos_emb"):
    ExperimentConfig.from_dict({"model": {"pos_emb": "none"}})


# ----------------------------------------------------------------------------- training

def test_training_smoke_depth3_mlp(tmp_path):
  cfg = ExperimentConfig.from_dict({
      "model": {"num_layers": 3, "mlp_ratio": 2, "pos_emb": "rope+learned"},
      "train": {"num_seqs": 320, "eval_every": 160, "progress_every_s": 1e9},
      "evaluators": [{"name": "fsl_train", "size": 100}],
      "checkpoint": {"every": 160},
      "sweep": {"conditions": ["none", "m=ih:L3H0;keep_only:L3H0", "l1c=perfect_l1;copy:L3H1",
                               "pt=pt:L2H2"]}})
  res = train.train_and_evaluate(cfg, str(tmp_path / "w"), verbose=False)
  assert [r.condition for r in res.runs] == ["none", "m", "l1c", "pt"]
  assert res.train_loss.shape[0] == 4 and np.isfinite(res.train_loss).all()
  assert {m["seqs"] for m in res.metrics} == {0, 160, 320}
  assert all(np.isfinite(m["loss"]) for m in res.metrics)
  final = checkpoint.load_params(str(tmp_path / "w"), 2)
  init = state_lib.init_state(experiment.setup_experiment(cfg)).params
  assert final["blocks_2"]["mlp_in"]["kernel"].shape == (64, 128)
  # perfect_l1 run (index 2): block 0, attention and MLP, never moved.
  for a, b in zip(jax.tree.leaves(init["blocks_0"]), jax.tree.leaves(final["blocks_0"])):
    np.testing.assert_array_equal(np.asarray(a)[2], np.asarray(b))
  assert not np.array_equal(np.asarray(init["blocks_0"]["mlp_in"]["kernel"])[0],
                            np.asarray(res.params["blocks_0"]["mlp_in"]["kernel"])[0])
