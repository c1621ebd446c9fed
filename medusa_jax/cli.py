"""The ``medusa-jax`` command: thin subcommands over library functions.

JAX is imported lazily inside each subcommand so that ``--help`` is instant.
Errors raised by medusa_jax (typed ``MedusaError``s) print as one line and
exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

# subcommand -> (module, function taking argv and returning an exit code, help)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "fetch": ("medusa_jax.assets", "main", "download, verify and convert SmolLM2 + ShareGPT + MT-bench"),
    "demo": ("medusa_jax.demo", "main", "MT-bench prompts: plain vs Medusa decoding on SmolLM2"),
}


def _resolve(name: str) -> Callable[[Sequence[str]], int]:
  module, func, _ = _COMMANDS[name]
  return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog="medusa-jax",
      description="Medusa speculative decoding in JAX (GPU, TPU, CPU).",
      epilog="Run `medusa-jax COMMAND --help` for a command's options.")
  parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
  parser.add_argument("command", choices=sorted(_COMMANDS), help="; ".join(
      f"{k}: {v[2]}" for k, v in sorted(_COMMANDS.items())))
  parser.add_argument("args", nargs=argparse.REMAINDER)
  ns = parser.parse_args(argv)
  try:
    return int(_resolve(ns.command)(ns.args) or 0)
  except KeyboardInterrupt:
    print("medusa-jax: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # one line, not a traceback, unless --debug
    if ns.debug:
      raise
    from medusa_jax.errors import MedusaError
    kind = "error" if isinstance(e, MedusaError) else type(e).__name__
    print(f"medusa-jax {ns.command}: {kind}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
