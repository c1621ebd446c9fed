"""Draws the subpackage diagram of docs/architecture.md from the code's imports.

Prints a mermaid flowchart: one node per subpackage of medusa_jax, one edge A --> B for
every module of A that imports a module of B when it is imported, and a dotted edge
app -.-> B for the command line's dispatch (it imports the library inside ``run`` so that
``--help`` never loads JAX). ``tests/test_floor_plan.py``
checks that the diagram in the docs is this one.

  python scripts/draw_architecture.py            # print
  python scripts/draw_architecture.py --write    # replace the block in docs/architecture.md
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "architecture.md")
BEGIN, END = "<!-- imports:begin -->", "<!-- imports:end -->"
# Shared by everything; drawn as one box without edges to keep the picture readable.
CORE = ("config", "errors", "options", "_validate", "_atomic")
ORDER = ("app", "serving", "training", "decoding", "heads", "adapters", "models", "parallel", "pallas",
         "assets", "bundled")
LABELS = {
    "app": "app/<br/>medusa-jax COMMAND: one parser, a module per command",
    "serving": "serving/<br/>api · slots · scheduler · server (OpenAI routes, SSE) · metrics",
    "training": "training/<br/>data · distill · train · evaluate · pod_eval",
    "decoding": "decoding/<br/>requests · engine · decoder · step · strategies · tree",
    "heads": "heads/<br/>protocol · modules · routed · sharded",
    "adapters": "adapters/<br/>layout · files · io · weights · registry · segments · convert",
    "models": ("models/<br/>llama · llama_config · families · llama_weights · llama_sharding"
               " · tokenizer · chat · hub · gguf"),
    "parallel": "parallel/<br/>mesh: make_mesh, rules, place",
    "pallas": "pallas/<br/>segmented_matmul: reference · ragged · gpu · tpu",
    "assets": "assets/<br/>cache (pip download, sha256) · datasets",
    "bundled": "bundled/<br/>trained SmolLM2 heads",
}


def _group(module: str) -> str | None:
  parts = module.split(".")
  if parts[0] != "medusa_jax" or len(parts) < 2:
    return None
  return "core" if parts[1] in CORE else parts[1]


def edges(dispatch: bool = False) -> list[tuple[str, str]]:
  """(importer subpackage, imported subpackage), sorted.

  Module-level imports; with ``dispatch``, the app's imports inside functions instead.
  """
  found = set()
  package = os.path.join(ROOT, "medusa_jax")
  for root, _, files in os.walk(package):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(root, f)
      rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
      src = _group(rel)
      if src in (None, "core") or src not in ORDER or (dispatch and src != "app"):
        continue
      tree = ast.parse(open(path, encoding="utf-8").read())
      nodes = tree.body
      if dispatch:
        nodes = [n for n in ast.walk(tree) if n not in tree.body]
      for node in nodes:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        for name in names:
          dst = _group(name)
          if dst and dst != src and dst != "core" and dst in ORDER:
            found.add((src, dst))
  return sorted(found, key=lambda e: (ORDER.index(e[0]), ORDER.index(e[1])))


def mermaid() -> str:
  lines = ["```mermaid", "flowchart TD"]
  lines += [f'  {name}["{LABELS[name]}"]' for name in ORDER]
  lines.append('  core["config · errors · options · _validate · _atomic<br/>(imported by all)"]')
  solid = edges()
  lines += [f"  {a} --> {b}" for a, b in solid]
  lines += [f"  {a} -.-> {b}" for a, b in edges(dispatch=True) if (a, b) not in solid]
  lines.append("```")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  block = mermaid()
  if "--write" not in argv:
    print(block)
    return 0
  text = open(DOC, encoding="utf-8").read()
  start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
  with open(DOC, "w", encoding="utf-8") as f:
    f.write(text[:start] + "\n" + block + "\n" + text[end:])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
