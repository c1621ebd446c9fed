"""The ``medusa-jax`` command: thin subcommands over library functions.

Each subcommand is ``module.function(argv) -> int``, imported only when run, so
``--help`` is instant and JAX loads only for commands that need it.

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
from typing import Callable, Sequence

USER_ERROR = 2
INTERNAL_ERROR = 1
DEBUG_ENV = "MEDUSA_JAX_DEBUG"

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "fetch": ("medusa_jax.assets.cache", "main",
              "download, verify and convert SmolLM2 + ShareGPT + MT-bench"),
    "demo": ("medusa_jax.app.demo", "main", "MT-bench prompts: plain vs Medusa decoding on SmolLM2"),
    "generate": ("medusa_jax.app.generate", "generate_main",
                 "prompt in, streamed text out (plain, chain or tree speculation)"),
    "chat": ("medusa_jax.app.generate", "chat_main", "interactive ChatML chat over stdin"),
    "bench": ("medusa_jax.app.generate", "bench_main",
              "tokens/s, tokens per step and speed-up of plain vs Medusa decoding"),
    "train": ("medusa_jax.training.train", "main", "train Medusa heads (optax, orbax)"),
    "eval": ("medusa_jax.training.evaluate", "main",
             "MT-bench: tokens per step, head accuracy, speed-up"),
    "convert": ("medusa_jax.adapters.convert", "main",
                "convert heads: Medusa .pt/.safetensors, LoRAX dirs, Orbax checkpoints"),
    "info": ("medusa_jax.app.info", "main", "cached assets, devices and library versions"),
}

_EPILOG = """\
examples:
  medusa-jax fetch                                  # model + data into $MEDUSA_JAX_HOME
  medusa-jax demo                                   # plain vs Medusa on MT-bench prompts
  medusa-jax generate "Write a haiku about JAX" --speculate tree
  echo "Hi!" | medusa-jax chat --max-new-tokens 64
  medusa-jax bench --json
  medusa-jax convert medusa_lm_head.pt my-adapter/ --base-model lmsys/vicuna-7b-v1.3
  medusa-jax info --json

Run `medusa-jax COMMAND --help` for a command's options.
"""


class UsageError(Exception):
  """A bad command line (raised instead of argparse's print-usage-and-exit)."""


class ArgumentParser(argparse.ArgumentParser):
  """An ``argparse`` parser whose errors are one line (via :class:`UsageError`).

  Examples in ``epilog`` keep their line breaks.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    raise UsageError(f"{message} (see `{self.prog} --help`)")


def _resolve(name: str) -> Callable[[Sequence[str]], int]:
  module, func, _ = _COMMANDS[name]
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module:
      raise
    raise UsageError(f"`{name}` is not available in this build ({module} is missing)") from None
  return getattr(mod, func)


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
  """Removes ``--debug`` from argv (before any ``--``); returns (argv, debug)."""
  end = argv.index("--") if "--" in argv else len(argv)
  debug = "--debug" in argv[:end]
  rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
  return rest, debug


def _is_user_error(e: BaseException) -> bool:
  from medusa_jax.errors import MedusaError
  return isinstance(e, (MedusaError, UsageError, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError, PermissionError))


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv: Sequence[str] | None = None) -> int:
  argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
  debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  commands = "\n".join(f"  {k:9s} {v[2]}" for k, v in _COMMANDS.items())
  parser = ArgumentParser(
      prog="medusa-jax",
      description=f"Medusa speculative decoding in JAX (GPU, TPU, CPU).\n\ncommands:\n{commands}",
      epilog=_EPILOG)
  parser.add_argument("--debug", action="store_true",
                      help="show tracebacks on errors (also accepted after COMMAND)")
  parser.add_argument("command", metavar="COMMAND", choices=list(_COMMANDS),
                      help="one of the commands above")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
  command = "medusa-jax"
  try:
    if not argv:
      raise UsageError(f"missing COMMAND; one of {', '.join(_COMMANDS)} (see `medusa-jax"
                       " --help`)")
    ns = parser.parse_args(argv)
    command = f"medusa-jax {ns.command}"
    return int(_resolve(ns.command)(ns.args) or 0)
  except KeyboardInterrupt:
    print(f"{command}: interrupted", file=sys.stderr)
    return 130
  except SystemExit as e:  # --help, or a subcommand's own argparse error (already printed)
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
  # Through the package module, so that `python -m medusa_jax.app.main` and the console
  # script share one UsageError class with the subcommands.
  from medusa_jax.app.main import main as _main
  sys.exit(_main())
