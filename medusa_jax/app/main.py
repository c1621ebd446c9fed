"""The ``medusa-jax`` command: one argument parser, one module per command.

Every command module in ``medusa_jax/app/`` exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(ns) -> int``. Command modules import only
light modules at their top; the library (and JAX) is imported inside ``run``,
so ``medusa-jax --help`` and ``medusa-jax COMMAND --help`` never import JAX.

Errors print as one line on stderr: user errors (a typed ``MedusaError``, a
bad flag, a missing file) exit with status 2, anything else with 1.
``--debug`` (anywhere before ``--``), or ``MEDUSA_JAX_DEBUG=1``, shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from medusa_jax import __version__
from medusa_jax.errors import MedusaError

USER_ERROR = 2
INTERNAL_ERROR = 1
DEBUG_ENV = "MEDUSA_JAX_DEBUG"

# command -> module in medusa_jax.app (the order of `--help`)
COMMANDS = {
    "fetch": "fetch",
    "demo": "demo",
    "generate": "generate",
    "chat": "chat",
    "bench": "bench",
    "serve": "serve",
    "train": "train",
    "eval": "eval",
    "convert": "convert",
    "info": "info",
    "pod_eval": "pod_eval",
}

_EPILOG = """\
examples:
  medusa-jax fetch                                  # model + data into $MEDUSA_JAX_HOME
  medusa-jax demo                                   # plain vs Medusa on MT-bench prompts
  medusa-jax generate "Write a haiku about JAX" --speculate tree
  echo "Hi!" | medusa-jax chat --max-new-tokens 64
  medusa-jax bench --json
  medusa-jax serve --port 8000                      # OpenAI-compatible server
  medusa-jax convert medusa_lm_head.pt my-adapter/ --base-model lmsys/vicuna-7b-v1.3
  medusa-jax info --json

Run `medusa-jax COMMAND --help` for a command's options.
"""


class UsageError(Exception):
  """A bad command line (raised instead of argparse's print-usage-and-exit)."""


class ArgumentParser(argparse.ArgumentParser):
  """An ``argparse`` parser whose errors are one line (via :class:`UsageError`).

  Examples in ``epilog`` keep their line breaks. Sub-parsers are of this class
  too, so every command's errors are one line.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    raise UsageError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
  return f"medusa-jax {__version__}"


def build_parser() -> ArgumentParser:
  """The one parser: global flags, then one sub-parser per command."""
  parser = ArgumentParser(
      prog="medusa-jax", epilog=_EPILOG,
      description="Medusa speculative decoding in JAX (GPU, TPU, CPU).")
  parser.add_argument("--version", action="version", version=_version())
  parser.add_argument("--debug", action="store_true",
                      help="show tracebacks on errors (also accepted after COMMAND)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
  for name, module_name in COMMANDS.items():
    path = f"medusa_jax.app.{module_name}"
    try:
      module = importlib.import_module(path)
    except ModuleNotFoundError as e:
      if e.name != path:
        raise
      p = sub.add_parser(name, help="(not available in this build)")
      p.set_defaults(run=_missing(name, path))
      continue
    p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                       epilog=getattr(module, "EPILOG", None))
    module.add_arguments(p)
    p.set_defaults(run=module.run)
  return parser


def _missing(name: str, path: str):
  def run(ns):
    del ns
    raise UsageError(f"`{name}` is not available in this build ({path} is missing)")
  return run


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
  """Removes ``--debug`` from argv (before any ``--``); returns (argv, debug)."""
  end = argv.index("--") if "--" in argv else len(argv)
  debug = "--debug" in argv[:end]
  rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
  return rest, debug


def _is_user_error(e: BaseException) -> bool:
  return isinstance(e, (MedusaError, UsageError, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError, PermissionError))


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns its exit status (0 ok, 2 user error, 1 internal error)."""
  argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
  debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  command = "medusa-jax"
  try:
    parser = build_parser()
    if not argv:
      raise UsageError(f"missing COMMAND; one of {', '.join(COMMANDS)} (see `medusa-jax"
                       " --help`)")
    if argv[0] in COMMANDS:
      command = f"medusa-jax {argv[0]}"
    ns = parser.parse_args(argv)
    if getattr(ns, "run", None) is None:
      raise UsageError("missing COMMAND (see `medusa-jax --help`)")
    return int(ns.run(ns) or 0)
  except KeyboardInterrupt:
    print(f"{command}: interrupted", file=sys.stderr)
    return 130
  except SystemExit as e:  # --help / --version (already printed)
    code = e.code
    return code if isinstance(code, int) else (0 if code is None else USER_ERROR)
  except BrokenPipeError:  # `medusa-jax generate ... | head`
    return 0
  except Exception as e:  # one line, not a traceback, unless --debug
    if debug:
      raise
    if _is_user_error(e):
      print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
      return USER_ERROR
    print(f"{command}: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the"
          " traceback)", file=sys.stderr)
    return INTERNAL_ERROR


if __name__ == "__main__":
  sys.exit(main())
