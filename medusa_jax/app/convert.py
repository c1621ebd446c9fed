"""``medusa-jax convert``: Medusa heads between the original Medusa, LoRAX and Orbax formats."""

from __future__ import annotations

import argparse
import json


TARGETS = ("lorax", "orbax", "safetensors")  # adapters.convert.Target's values (tested)
HELP = "convert heads: Medusa .pt/.safetensors, LoRAX dirs, Orbax checkpoints"
EPILOG = """\
examples:
  # original Medusa heads (5 heads in the file, config says 2) -> LoRAX adapter, all 5 heads
  medusa-jax convert medusa-vicuna-7b-v1.3/ vicuna-medusa-lorax/
  # keep 3 heads, name the base model
  medusa-jax convert medusa_lm_head.pt out/ --num-heads 3 --base-model lmsys/vicuna-7b-v1.3
  # LoRAX/TGI adapter <-> Orbax checkpoint
  medusa-jax convert my-adapter/ my-adapter-orbax/ --to orbax
  medusa-jax convert my-adapter-orbax/ my-adapter-again/ --to lorax
  # torch pickle -> one safetensors file (no torch needed afterwards)
  medusa-jax convert medusa_lm_head.pt medusa_lm_head.safetensors --to safetensors
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", help="source: adapter dir, weight file, or Orbax checkpoint dir")
  p.add_argument("dst", help="destination directory (lorax, orbax) or file (safetensors)")
  p.add_argument("--to", default="lorax", choices=TARGETS, help="target format (default: lorax)")
  p.add_argument("--num-heads", type=int, default=None,
                 help="keep the first N heads (default: every head in the source)")
  p.add_argument("--base-model", default=None,
                 help="base_model_name_or_path to write (default: from the source config)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
  p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(ns: argparse.Namespace) -> int:
  from medusa_jax.adapters.convert import convert  # CLI dispatch: the library loads here
  result = convert(ns.src, ns.dst, to=ns.to, num_heads=ns.num_heads, base_model=ns.base_model,
                   overwrite=ns.overwrite)
  if ns.json:
    print(json.dumps(result.to_json()))
    return 0
  cfg = result.config
  what = (f"{cfg.medusa_num_heads} heads, {cfg.medusa_num_layers} layer(s), version"
          f" {cfg.version:g}" if cfg else f"{result.heads_in_source} heads")
  for note in result.notes:
    print(f"note: {note}")
  print(f"wrote {result.to.value} {result.dst} ({what})")
  return 0
