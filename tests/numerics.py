"""Float comparisons that hold on any CPU: tolerances scaled to each array's own magnitude.

XLA:CPU picks kernels, fusions and summation orders per CPU model (and per program), so two
computations of the same quantity by different programs agree only to rounding relative to
the magnitude of the terms summed, not relative to each element: an element that is nearly
zero because of cancellation carries the absolute error of its larger neighbours. A fixed
tiny ``atol`` then fails on some machines, and a pure ``rtol`` fails on near-zero elements.

``assert_close`` judges every leaf (array) of a pytree against its own scale:

  |got - want| <= atol + rel_atol * max|want_leaf| + rtol * |want|      (elementwise)

so a near-zero element inside a leaf is allowed the leaf's rounding, while an error of a
small fraction of the leaf's magnitude (a real bug) still fails. Integer and bool leaves
must match exactly. Import with ``import numerics`` (tests/ is on sys.path under pytest's
default rootdir-based import mode, as for ``from conftest import ...``).
"""
import os

import jax
import numpy as np

# IH_NUMERICS_REPORT=1 (with pytest -s) prints each call's worst |diff| / tol: how much
# margin a comparison has on this machine (audits; a ratio near 1 is a flaky test).
_REPORT = os.environ.get("IH_NUMERICS_REPORT") == "1"


def _is_scalar_seq(x):
  """A plain list/tuple of numbers is one array (a list of losses), not a pytree of scalars."""
  return type(x) in (list, tuple) and len(x) > 0 and all(
      isinstance(e, (int, float, np.number)) or (hasattr(e, "ndim") and e.ndim == 0)
      for e in x)


def leaf_scale(x) -> float:
  """max |x| over the finite entries of one array (0 for an empty or all-zero one)."""
  a = np.abs(np.asarray(x, np.float64))
  a = a[np.isfinite(a)]
  return float(a.max()) if a.size else 0.0


def assert_close(got, want, *, rtol=1e-5, rel_atol=1e-6, atol=0.0, err_msg=""):
  """Asserts got ~= want leaf by leaf, with atol = atol + rel_atol * max|want| PER LEAF.

  Args:
    got, want: arrays, scalars, lists of numbers, or pytrees of those (same structure).
    rtol: tolerance relative to each element of want.
    rel_atol: absolute tolerance as a fraction of the leaf's largest |want|.
    atol: an absolute floor added to the above (for leaves that may be all zeros).
    err_msg: prefixed to the failure message.
  """
  got_leaves, got_def = jax.tree.flatten(got, is_leaf=_is_scalar_seq)
  want_paths, want_def = jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_scalar_seq)
  if got_def != want_def:
    raise AssertionError(f"{err_msg}\ntree structures differ:\n got:  {got_def}\n want: {want_def}")
  failures, worst_ratio = [], (0.0, "")
  for g, (path, w) in zip(got_leaves, want_paths):
    name = jax.tree_util.keystr(path) or "<root>"
    g, w = np.asarray(g), np.asarray(w)
    if w.shape != g.shape:
      if w.ndim == 0:
        w = np.broadcast_to(w, g.shape)  # compare against a constant
      else:
        failures.append(f"{name}: shape {g.shape} != {w.shape}")
        continue
    if not (np.issubdtype(g.dtype, np.inexact) or np.issubdtype(w.dtype, np.inexact)):
      if not np.array_equal(g, w):  # integers / bools are exact by construction
        bad = np.flatnonzero(np.asarray(g != w).ravel())
        failures.append(f"{name}: {bad.size} of {g.size} integer entries differ "
                        f"(first at flat index {bad[0]}: {g.ravel()[bad[0]]} vs {w.ravel()[bad[0]]})")
      continue
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    scale = leaf_scale(w64)
    tol = atol + rel_atol * scale + rtol * np.abs(w64)
    with np.errstate(invalid="ignore", divide="ignore"):
      diff = np.abs(g64 - w64)
      ok = (diff <= tol) | (np.isnan(g64) & np.isnan(w64)) | (g64 == w64)  # == covers +-inf
      if _REPORT and g.size:
        r = float(np.nanmax(np.where(ok, np.where(g64 == w64, 0.0, diff / tol), np.inf)))
        if r > worst_ratio[0]:
          worst_ratio = (r, name)
    if not ok.all():
      bad = np.flatnonzero(~ok.ravel())
      worst = bad[np.argmax(np.where(np.isnan(diff.ravel()[bad]), np.inf, diff.ravel()[bad]))]
      idx = np.unravel_index(worst, g.shape) if g.ndim else ()
      failures.append(
          f"{name}: {bad.size} of {g.size} entries differ; worst at {idx}: got "
          f"{g64.ravel()[worst]:.9g}, want {w64.ravel()[worst]:.9g} (|diff| "
          f"{diff.ravel()[worst]:.3g} > tol {np.ravel(tol)[worst]:.3g}; leaf max|want| "
          f"{scale:.3g}, rtol={rtol}, rel_atol={rel_atol}, atol={atol})")
  if _REPORT:
    import inspect
    caller = inspect.stack()[1]
    print(f"\nnumerics {os.path.basename(caller.filename)}:{caller.lineno} {err_msg}: worst "
          f"diff/tol {worst_ratio[0]:.3g} at {worst_ratio[1]}")
  if failures:
    raise AssertionError("\n".join(([err_msg] if err_msg else []) + failures))


def without_key_bias(params):
  """The key bias's gradient is zero in exact arithmetic (a softmax ignores a constant
  shift of its scores), so Adam turns the rounding noise there into O(lr) steps that any
  change of program reorders; the other parameters are compared."""
  out = jax.tree.map(np.array, params)
  for name, block in out.items():
    if name.startswith("blocks_"):
      bias = block["qkv"]["bias"]
      third = bias.shape[-1] // 3   # [q | k | v]
      bias[..., third:2 * third] = 0.0
  return out
