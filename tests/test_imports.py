"""Imports only run downward: the package's modules form layers (pure math at the
bottom, the command lines on top), no module imports one of a higher layer, and
the import graph, function-level imports included, has no cycle."""

import ast
import os

from modalimmune_jax import methods
from tests.helpers import ROOT

PACKAGE = "modalimmune_jax"
# Lowest first; a module may import its own layer and those below. "x.*" = x's submodules.
LAYERS = (
    # pure math, configuration rules, bookkeeping
    ("modalimmune_jax", "schema", "linalg", "finite", "spectral", "curvature", "hypergrad",
     "controller", "masking", "metrics", "checkpoint", "provenance", "tensorboard"),
    ("data", "data.*", "protocol", "reference", "plots"),   # data, protocol, metrics
    ("model",),                                              # the NNX model
    ("build",),                                              # data set, model, optimiser
    ("methods", "methods.*"),                                # one module per method
    ("config", "step"),                                      # the schema; the pure step
    ("train", "train.*"),                                    # the training package
    ("cli", "main", "compare", "tune", "data.__main__"),     # command lines
)


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """Module -> the package's modules it imports anywhere in its file (module
  level or inside functions); the method registry's built-ins included."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    deps = set()
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        if base.split(".")[0] == PACKAGE:
          deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names}
    graph[name] = {d for d in deps if d != name}
  graph[f"{PACKAGE}.methods"] |= {f"{PACKAGE}.methods.{n}" for n in methods.BUILTIN}
  return graph


def layer(module: str) -> int:
  """The module's layer: where it is named, else where ``parent.*`` is."""
  short = module[len(PACKAGE) + 1:] if module != PACKAGE else PACKAGE
  named = [i for i, names in enumerate(LAYERS) if short in names]
  wild = [i for i, names in enumerate(LAYERS) for p in names
          if p.endswith(".*") and short.startswith(p[:-1])]
  assert named or wild, f"{module} is in no layer of tests/test_imports.py"
  return (named or wild)[0]


def test_every_import_runs_downward():
  upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
            for m, deps in import_graph().items() for d in sorted(deps) if layer(d) > layer(m)]
  assert not upward, "\n".join(upward)


def test_no_method_imports_the_training_package_or_the_command_lines():
  for m, deps in import_graph().items():
    if m.startswith(f"{PACKAGE}.methods"):
      bad = [d for d in deps if d.split(".")[1] in ("train", "compare", "main", "cli",
                                                     "config")]
      assert not bad, f"{m} imports {bad}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_import_graph_has_no_cycle():
  assert cycles(import_graph()) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
  """The test's own machinery: a planted cycle and an upward edge are found."""
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert layer(f"{PACKAGE}.methods.ebr") > layer(f"{PACKAGE}.build")
  assert layer(f"{PACKAGE}.train.loop") > layer(f"{PACKAGE}.methods")
  assert f"{PACKAGE}.build" in import_graph()[f"{PACKAGE}.methods.distill"]
