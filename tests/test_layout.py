"""The import graph of ih_jax shows the pipeline: no cycles, no hidden (in-function)
imports between ih_jax modules, and no imports upward (analysis never reaches into
training; training never into analysis; data and interventions stay on their floors)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)

# Upward imports still in the code, each with what removes it (none left).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, str]:
  mods = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "ih_jax")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        mods[name.removesuffix(".__init__")] = path
  return mods


def _imports(mods: dict[str, str]) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
  """(module -> ih_jax modules it imports at run time, [(module, target, line)] of
  imports inside functions or other blocks); `if TYPE_CHECKING:` blocks are skipped."""
  edges: dict[str, set[str]] = {m: set() for m in mods}
  hidden = []
  for mod, path in mods.items():
    tree = ast.parse(open(path).read())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.dump(node.test) for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if id(node) in type_only:
        continue
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                   else node.module for a in node.names]
      else:
        continue
      for t in targets:
        if t in mods and t != mod:
          edges[mod].add(t)
          if id(node) not in top:
            hidden.append((mod, t, node.lineno))
  return edges, hidden


@pytest.fixture(scope="module")
def graph():
  mods = _modules()
  return mods, *_imports(mods)


def test_no_import_cycles(graph):
  mods, edges, _ = graph
  state: dict[str, int] = {}
  cycles = []

  def visit(m, stack):
    state[m] = 1
    stack.append(m)
    for t in sorted(edges[m]):
      if state.get(t) == 1:
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t, stack)
    stack.pop()
    state[m] = 2

  for m in sorted(mods):
    if m not in state:
      visit(m, [])
  assert not cycles, cycles


APP = "ih_jax.experiments"  # the application layer: launchers, configs, the paper registry


def test_no_hidden_imports_between_ih_jax_modules(graph):
  _, _, hidden = graph
  # Only optional third-party packages are imported late; the launchers may import the
  # library inside main() so `--help` answers before JAX and Flax load.
  hidden = [h for h in hidden if not h[0].startswith(APP)]
  assert not hidden, hidden


def test_library_never_imports_the_application_layer(graph):
  """Flags are parsed only in ih_jax.experiments; nothing below it imports it."""
  _, edges, _ = graph
  bad = [(m, t) for m, ts in edges.items() if not m.startswith(APP)
         for t in ts if t.startswith(APP)]
  assert not bad, bad


def _floor_violations(edges, source_prefixes, allowed_prefixes):
  out = []
  for m, targets in edges.items():
    if not m.startswith(source_prefixes):
      continue
    out += [(m, t) for t in targets if not t.startswith(allowed_prefixes)]
  return out


def test_no_upward_imports(graph):
  _, edges, _ = graph
  training = ("ih_jax.train", "ih_jax.sweep")
  bad = [(m, t) for m, ts in edges.items() if m.startswith("ih_jax.analysis")
         for t in ts if t.startswith(training)]
  top = ("ih_jax.analysis", "ih_jax.api", APP)  # the notebook API and launchers sit above analysis
  bad += [(m, t) for m, ts in edges.items() if not m.startswith(top) and m != "ih_jax"
          for t in ts if t.startswith("ih_jax.analysis")]
  bad += _floor_violations(edges, ("ih_jax.data",), ("ih_jax.data",))
  bad += _floor_violations(edges, ("ih_jax.interventions.core", "ih_jax.interventions.targets",
                                   "ih_jax.interventions.builtin"), ("ih_jax.interventions",))
  # data -> metrics -> tasks -> model: a task never reaches the model or the trainer.
  bad += _floor_violations(edges, ("ih_jax.metrics",), ("ih_jax.data",))
  bad += _floor_violations(edges, ("ih_jax.tasks",), ("ih_jax.data", "ih_jax.metrics",
                                                      "ih_jax.tasks"))
  bad += _floor_violations(edges, ("ih_jax.model",),
                           ("ih_jax.data", "ih_jax.interventions", "ih_jax.clamps",
                            "ih_jax.metrics", "ih_jax.tasks"))
  # Inside ih_jax.train only the package's API imports the host driver, which sits on top.
  bad += [(m, "ih_jax.train.driver") for m, ts in edges.items()
          if m.startswith("ih_jax.train.") and m != "ih_jax.train.driver"
          and "ih_jax.train.driver" in ts]
  assert set(bad) <= KNOWN_UPWARD, sorted(set(bad) - KNOWN_UPWARD)
  still = KNOWN_UPWARD & set(bad)
  assert still == KNOWN_UPWARD, f"no longer upward, drop from KNOWN_UPWARD: {KNOWN_UPWARD - still}"
