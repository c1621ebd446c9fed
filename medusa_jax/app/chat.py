"""``medusa-jax chat``: a multi-turn conversation over stdin, one user turn per line."""

from __future__ import annotations

import argparse
import sys

from medusa_jax.app._flags import (add_engine_flags, add_request_flags, load_engine,
                                   sampling_params, stats_line, stderr)
from medusa_jax.app.generate import tolerate_bad_utf8
from medusa_jax.errors import MedusaError

HELP = "interactive chat over stdin in the model's chat template"
EPILOG = """\
examples:
  medusa-jax chat                                    # type, Enter; Ctrl-D ends
  printf 'Hi!\\nWhat did I just say?\\n' | medusa-jax chat --max-new-tokens 64
  medusa-jax chat --system "You answer in French." --speculate chain

commands inside the chat: /reset (forget the conversation), /exit
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  add_request_flags(p, max_new=256)
  add_engine_flags(p)
  p.add_argument("--system", help="a system message")
  p.add_argument("--stats", action="store_true", help="statistics after each answer (stderr)")


def run(ns: argparse.Namespace, *, stdin=None) -> int:
  params = sampling_params(ns)
  stdin = sys.stdin if stdin is None else stdin
  tolerate_bad_utf8(stdin)  # invalid UTF-8 becomes lone surrogates: that turn fails alone, typed
  interactive = stdin.isatty()
  engine = load_engine(ns, lambda m: stderr(f"note: {m}"))
  from medusa_jax.decoding.text import ChatSession  # CLI dispatch (after the engine: JAX)
  session = ChatSession(engine, params, system=ns.system)
  if interactive:
    stderr("chat: type a message and press Enter; /reset forgets, Ctrl-D or /exit ends")
  while True:
    if interactive:
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = stdin.readline()
    if not line:  # EOF
      break
    user = line.strip()
    if not user:
      continue
    if user in ("/exit", "/quit"):
      break
    if user == "/reset":
      session.reset()
      continue
    shown = []

    def on_text(text: str) -> None:
      shown.append(text)
      sys.stdout.write(text)
      sys.stdout.flush()

    try:
      _, stats = session.reply(user, on_text=on_text)
    except MedusaError as e:  # a bad turn fails alone; the chat goes on
      if shown:
        sys.stdout.write("\n")
        sys.stdout.flush()
      stderr(f"medusa-jax chat: error: {' '.join(str(e).split())}")
      continue
    sys.stdout.write("\n")
    sys.stdout.flush()
    if ns.stats:
      stderr(stats_line(stats))
  return 0
