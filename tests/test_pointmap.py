"""ih_jax.analysis.pointmap: points split over the local devices give lax.map's numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax.analysis import pointmap


def _fn(point, shared):
  x, i = point
  return {"y": jnp.tanh(x @ shared["w"]) + i, "n": jnp.sum(x)}


def test_split_over_devices_equals_lax_map():
  rng = np.random.default_rng(0)
  shared = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
  for K in (1, 3, 5, 8):  # 3 and 5 need padding on 2 (or 4) devices
    x = jnp.asarray(rng.normal(size=(K, 4, 6)), jnp.float32)
    i = jnp.arange(K, dtype=jnp.float32)
    got = jax.jit(lambda p, s: pointmap.map_points(_fn, p, s, batch_size=2))((x, i), shared)
    want = jax.lax.map(lambda p: _fn(p, shared), (x, i))
    assert got["y"].shape == (K, 4, 3) and got["n"].shape == (K,)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["n"], want["n"], rtol=1e-6, atol=1e-5)
  assert pointmap.num_devices(100) == len(jax.local_devices())
  assert pointmap.num_devices(1) == 1
