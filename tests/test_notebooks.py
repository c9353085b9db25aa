"""The Colab notebooks run top to bottom, headless, at a tiny scale (so they cannot rot)."""
import os

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is in the 'test' extra")
nbformat = pytest.importorskip("nbformat", reason="nbformat is in the 'test' extra")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")


def _execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)   # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def _text(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def test_quickstart_notebook_runs(tmp_path):
  nb = _execute("quickstart.ipynb", {"IH_JAX_NOTEBOOK_SCALE": "tiny"})
  out = _text(nb)
  assert out.count("Run(") == 6 and "Run('l1_copy', seed=6" in out   # ih_jax.run's Sweep
  assert "l1_copy  seed 6: learning time" in out
  assert "induction strength of layer 2:" in out
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2   # loss curves and attention patterns


def test_reproduce_notebook_runs(tmp_path):
  nb = _execute("reproduce_figure.ipynb", {"IH_JAX_NOTEBOOK_SCALE": "smoke",
                                           "IH_JAX_FIGURE": "5a",
                                           "IH_JAX_WORKDIR": str(tmp_path / "r")})
  assert "5a:" in _text(nb)
  assert os.path.exists(tmp_path / "r" / "REPORT.md")
