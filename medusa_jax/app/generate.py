"""``medusa-jax generate``: prompts in, streamed text out (plain, chain or tree speculation)."""

from __future__ import annotations

import argparse
import json
import sys

from medusa_jax.app._flags import (add_engine_flags, add_request_flags, load_engine,
                                   sampling_params, stats_line, stderr)
from medusa_jax.errors import MedusaError

HELP = "prompt in, streamed text out (plain, chain or tree speculation)"
EPILOG = """\
examples:
  medusa-jax generate "Explain speculative decoding in two sentences."
  medusa-jax generate "Hi" --speculate none --max-new-tokens 32
  medusa-jax generate "Tell a story" --temperature 0.7 --top-p 0.9
  medusa-jax generate "Hello" --model-dir ~/llama --adapter ~/my-medusa --json
  echo "What is JAX?" | medusa-jax generate -
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("prompts", nargs="+", metavar="PROMPT", help="a prompt, or - to read stdin")
  add_request_flags(p, max_new=256)
  add_engine_flags(p)
  p.add_argument("--raw", action="store_true", help="no chat template: continue the text")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object per prompt (text, token ids, stats), no streaming")
  p.add_argument("--quiet", action="store_true", help="no statistics on stderr")


def run(ns: argparse.Namespace) -> int:
  """Generates every prompt; a bad prompt fails alone (exit status 2 after the others)."""
  params = sampling_params(ns)
  if "-" in ns.prompts:
    tolerate_bad_utf8(sys.stdin)
  prompts = [sys.stdin.read() if x == "-" else x for x in ns.prompts]
  engine = load_engine(ns, None if ns.quiet else (lambda m: stderr(f"note: {m}")))
  from medusa_jax.decoding.text import chat_ids, stream_text, text_ids
  failed = 0
  for i, prompt in enumerate(prompts):
    started = False
    try:
      ids = text_ids(engine, prompt) if ns.raw else chat_ids(engine, prompt)
      if ns.json:
        tokens, pieces, stats = [], [], None
        for chunk in stream_text(engine, ids, params):
          tokens += chunk.tokens
          pieces.append(chunk.text)
          stats = chunk.stats or stats
        print(json.dumps({"prompt": prompt, "text": "".join(pieces), "tokens": tokens,
                          "stats": stats.to_json()}), flush=True)
        continue
      stats = None
      for chunk in stream_text(engine, ids, params):
        started = True
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        stats = chunk.stats or stats
    except MedusaError as e:  # this prompt fails alone; the others still run
      if len(prompts) == 1:
        raise  # one line and exit 2 from main (or the traceback, with --debug)
      failed += 1
      if started:
        sys.stdout.write("\n")
        sys.stdout.flush()
      stderr(f"medusa-jax generate: error: prompt {i}: {' '.join(str(e).split())}")
      continue
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not ns.quiet:
      stderr(stats_line(stats))
  return PROMPT_FAILED if failed else 0


PROMPT_FAILED = 2
"""Exit status when a prompt failed (the user-error status of ``app/main.py``)."""


def tolerate_bad_utf8(stream) -> None:
  """Reads invalid UTF-8 as lone surrogates, so that a bad prompt fails alone, typed."""
  reconfigure = getattr(stream, "reconfigure", None)
  if reconfigure is not None:
    reconfigure(errors="surrogateescape")
