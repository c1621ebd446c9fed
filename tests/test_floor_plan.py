"""The floor plan: what lives at the top of the package, import direction, no cycles, and a
``--help`` that never imports JAX."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "medusa_jax")
TOP_LEVEL = {"__init__", "__main__", "config", "errors", "options", "_validate", "_atomic"}
SUBPACKAGES = {"adapters", "app", "assets", "bundled", "decoding", "heads", "models", "pallas",
               "parallel", "serving", "training"}


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
  return out


def _module_level_imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """Package modules that ``name`` imports when it is imported (not inside functions)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found = set()
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
  return {m for m in found if m in modules and m != name}


def test_top_level_holds_only_the_public_init_config_errors_and_utilities():
  entries = os.listdir(PACKAGE)
  modules = {e[:-3] for e in entries if e.endswith(".py")}
  folders = {e for e in entries if os.path.isdir(os.path.join(PACKAGE, e)) and e != "__pycache__"}
  assert modules == TOP_LEVEL
  assert folders == SUBPACKAGES


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _module_level_imports(m, p, modules) for m, p in modules.items()}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for dep in sorted(graph[m]):
      if state.get(dep) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
      if dep not in state:
        visit(dep)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_library_never_imports_the_app():
  for name, path in _modules().items():
    if name.startswith("medusa_jax.app") or name == "medusa_jax.__main__":
      continue
    source = open(path, encoding="utf-8").read()
    assert "medusa_jax.app" not in source.replace("medusa_jax.application", ""), name


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["serve", "--help"],
                                  ["train", "--help"], ["convert", "--help"], ["--version"]])
def test_help_imports_no_jax(argv):
  code = ("import sys\nfrom medusa_jax.app.main import main\n"
          f"rc = main({argv!r})\n"
          "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'torch') if m in sys.modules)\n"
          "print('HEAVY', heavy, rc)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
  assert out.returncode == 0, out.stderr
  assert "HEAVY [] 0" in out.stdout, out.stdout


def test_python_dash_m_and_version():
  out = subprocess.run([sys.executable, "-m", "medusa_jax", "--version"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
  assert out.returncode == 0 and out.stdout.startswith("medusa-jax 0."), out


def test_architecture_diagram_is_drawn_from_the_code():
  """docs/architecture.md shows the import graph as it is (scripts/draw_architecture.py)."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  try:
    import draw_architecture
  finally:
    sys.path.pop(0)
  doc = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
  assert draw_architecture.mermaid() in doc, "run: python scripts/draw_architecture.py --write"
