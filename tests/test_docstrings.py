"""Every public name in ih_jax has a docstring: each module, each top-level function or
class not starting with `_`, and each public method (properties included) of such a class.
A method overriding a documented method of the same name in a base class is exempt: the
Intervention protocol for ih_jax/interventions/builtin.py, or a base defined in the same
module."""
import ast
import inspect
import os

from ih_jax.interventions.core import Intervention

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _missing(path: str, rel: str) -> list[str]:
  tree = ast.parse(open(path).read())
  out = [] if ast.get_docstring(tree) else [f"{rel}:<module>"]
  classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

  def documented(cls: ast.ClassDef, name: str) -> bool:
    if rel.endswith(os.path.join("interventions", "builtin.py")) and \
        inspect.getdoc(getattr(Intervention, name, None)):
      return True
    for b in cls.bases:
      base = classes.get(b.id if isinstance(b, ast.Name) else getattr(b, "attr", None))
      if base is not None and base is not cls and any(
          isinstance(m, DEFS[:2]) and m.name == name and ast.get_docstring(m)
          for m in base.body):
        return True
    return False

  for node in tree.body:
    if not isinstance(node, DEFS) or node.name.startswith("_"):
      continue
    if not ast.get_docstring(node):
      out.append(f"{rel}:{node.name}")
    if isinstance(node, ast.ClassDef):
      out += [f"{rel}:{node.name}.{m.name}" for m in node.body
              if isinstance(m, DEFS[:2]) and not m.name.startswith("_")
              and not ast.get_docstring(m) and not documented(node, m.name)]
  return out


def test_public_names_have_docstrings():
  missing = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, "ih_jax")):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        missing += _missing(path, os.path.relpath(path, ROOT))
  assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(
      sorted(missing))
