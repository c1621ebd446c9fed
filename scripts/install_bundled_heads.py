"""Replace the bundled SmolLM2 heads with a training run's, when the new heads are better.

Usage: python scripts/install_bundled_heads.py RUN_DIR [--baseline-eval JSON] [--force]
RUN_DIR: scripts/train_heads_gpu.sh output (heads/, eval.json, eval_baseline.json). Prints
the comparison (validation top-1, tree tokens per step overall and on the coding questions)
as JSON; writes nothing unless the new heads win on both (or --force).
"""

import argparse
import json
import sys

from medusa_jax.bundled import SMOLLM2_HEADS
from medusa_jax.errors import MedusaError
from medusa_jax.training.bundle import install


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dir")
  p.add_argument("--baseline-eval", help="eval.json of the installed heads"
                 " (default: RUN_DIR/eval_baseline.json)")
  p.add_argument("--dest", default=SMOLLM2_HEADS, help="the adapter directory to replace")
  p.add_argument("--force", action="store_true", help="install even if not better")
  ns = p.parse_args(argv)
  try:
    result = install(ns.run_dir, ns.dest, baseline_eval=ns.baseline_eval, force=ns.force)
  except MedusaError as e:
    print(f"install_bundled_heads: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1))
  return 0 if result["installed"] else 1


if __name__ == "__main__":
  sys.exit(main())
