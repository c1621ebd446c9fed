"""Argument types shared by the commands: integers checked when the command line is parsed.

A bad count (``medusa-jax demo --prompts 0``) is a one-line usage error with
exit status 2 before anything loads, not an ``IndexError`` after the model did.
"""

from __future__ import annotations

import argparse


def _int_at_least(minimum: int, words: str):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r}: expected {words}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{text!r}: expected {words}")
    return value
  parse.__name__ = words  # argparse names the type in its message
  return parse


positive_int = _int_at_least(1, "an integer >= 1")
non_negative_int = _int_at_least(0, "an integer >= 0")
