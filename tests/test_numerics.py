"""The scaled comparison helper (tests/numerics.py) passes rounding noise, fails real errors."""
import numpy as np
import pytest

import numerics


def _leaf(seed=0, n=320):
  x = np.random.default_rng(seed).normal(size=n).astype(np.float32)
  x[7] = -2.7e-5 * np.abs(x).max()  # one element near zero, as after cancellation
  return x


def test_rounding_noise_passes_even_on_near_zero_elements():
  want = {"a": _leaf(0), "b": 1e-3 * _leaf(1), "n": np.arange(4)}
  # A few float32 ulps of the leaf's scale on every element: the near-zero element's
  # relative error is then ~1e-2, which a plain rtol (or a fixed tiny atol) would reject.
  noise = lambda x: x + 3e-7 * np.abs(x).max() * np.sign(np.random.default_rng(2).normal(
      size=x.shape))
  got = {"a": noise(want["a"]), "b": noise(want["b"]), "n": np.arange(4)}
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(got["a"], want["a"], rtol=1e-4, atol=1e-8)
  numerics.assert_close(got, want)
  numerics.assert_close([1.0, 2.0], np.array([1.0, 2.0 + 1e-6]))  # lists of numbers
  numerics.assert_close(np.zeros(3), 0.0)  # against a constant


@pytest.mark.parametrize("where", [7, 100])  # the near-zero element, an ordinary one
def test_real_errors_fail(where):
  want = {"a": _leaf(0), "b": 1e-3 * _leaf(1)}
  for key in ("a", "b"):  # each leaf judged against its own scale, the small one too
    got = {k: v.copy() for k, v in want.items()}
    got[key][where] += 1e-3 * np.abs(want[key]).max()
    with pytest.raises(AssertionError, match=rf"\['{key}'\]: 1 of 320 entries differ"):
      numerics.assert_close(got, want)
    with pytest.raises(AssertionError):  # even with loose tolerances
      numerics.assert_close(got, want, rtol=1e-4, rel_atol=1e-4)


def test_structure_shape_nan_and_integers_are_checked():
  with pytest.raises(AssertionError, match="structures differ"):
    numerics.assert_close({"a": np.ones(2)}, {"b": np.ones(2)})
  with pytest.raises(AssertionError, match="shape"):
    numerics.assert_close(np.ones(2), np.ones(3))
  with pytest.raises(AssertionError):
    numerics.assert_close(np.array([1.0, np.nan]), np.array([1.0, 1.0]))
  numerics.assert_close(np.array([1.0, np.nan, np.inf]), np.array([1.0, np.nan, np.inf]))
  with pytest.raises(AssertionError, match="integer entries differ"):
    numerics.assert_close(np.array([1, 2]), np.array([1, 3]), rtol=1.0, rel_atol=1.0)
  with pytest.raises(AssertionError, match="leaf max"):
    numerics.assert_close(np.zeros(3) + 1e-12, np.zeros(3))  # all-zero leaf: exact, or atol
  numerics.assert_close(np.zeros(3) + 1e-12, np.zeros(3), atol=1e-9)
