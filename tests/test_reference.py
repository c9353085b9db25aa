"""ih_jax.model (packed heads, slice-sum attention with custom backward passes, per-distinct-
token block 0, query-only last layer) against the textbook forward of ih_jax.reference."""
import jax
import jax.numpy as jnp
import pytest

from ih_jax import model as model_lib
from ih_jax import reference
from ih_jax.data.sampler import Batch, IndexedFeatures

import numerics

CONFIGS = {
    "paper": model_lib.ModelConfig(),
    "3 layers, 4 heads, no attention biases": model_lib.ModelConfig(
        num_layers=3, num_heads=4, attn_bias=False, num_labels=7),
    "MLP": model_lib.ModelConfig(mlp_ratio=2),
    "learned positions": model_lib.ModelConfig(pos_emb="learned"),
    "rope + learned": model_lib.ModelConfig(pos_emb="rope+learned"),
}


def _random_params(cfg, n, seed=0):
  """init_params' tree with every leaf (zero biases, unit LayerNorm scales too) perturbed."""
  params = model_lib.init_params(jax.random.key(seed), cfg, 32, num_context=n)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def _inputs(cfg, n, B=24, U=6, seed=2):
  """A batch as table rows (few distinct exemplars, as in training) and gathered."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  table = jax.random.normal(k1, (U, 32))
  ids = jax.random.randint(k2, (B, n + 1), 0, U)
  y = jax.random.randint(k3, (B, n + 1), 0, cfg.num_labels)
  return IndexedFeatures(table, ids), table[ids], y


@pytest.mark.parametrize("name,n", [("paper", 2), ("paper", 4)] +
                         [(name, 2) for name in CONFIGS if name != "paper"])
def test_model_matches_reference_forward_and_gradients(name, n):
  cfg = CONFIGS[name]
  params = _random_params(cfg, n)
  indexed, x, y = _inputs(cfg, n)
  # Each side compiled whole (jit), as training runs it (op by op the test took 2.3x longer).
  want = jax.jit(lambda p: reference.forward(p, x, y, cfg))(params)
  for inputs in (indexed, x):  # the per-distinct-token route and the per-token one
    apply = jax.jit(lambda p, q, inputs=inputs: model_lib.apply(
        p, Batch(inputs, y), None, cfg, query_only=q)[0], static_argnums=1)
    # Textbook reference vs the packed model: other op orders; per-leaf scale. A real
    # discrepancy (a head, position or bias wrong) is O(1) of the logits' scale.
    numerics.assert_close(apply(params, False), want, rtol=1e-4, rel_atol=1e-4)
    numerics.assert_close(apply(params, True)[:, 0], want[:, -1], rtol=1e-4, rel_atol=1e-4)

  want_g = jax.jit(jax.grad(lambda p: reference.query_loss(p, x, y, cfg)))(params)
  for inputs in (indexed, x):
    got_g = jax.jit(jax.grad(lambda p, inputs=inputs: model_lib.query_loss(
        model_lib.apply(p, Batch(inputs, y), None, cfg, query_only=True)[0], y)))(params)
    numerics.assert_close(got_g, want_g, rtol=1e-3, rel_atol=1e-4, atol=1e-10)


def test_reference_refuses_the_token_model():
  cfg = model_lib.ModelConfig(vocab_size=16)
  with pytest.raises(ValueError, match="few-shot model only"):
    reference.forward({}, jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32), cfg)
