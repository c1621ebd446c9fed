"""MT-bench evaluation of Medusa heads (tokens/step, head accuracy, speed-up).

Usage: python scripts/eval_mtbench.py [--heads DIR] [--out DIR] [--num-questions N] [--bs1 N]
The same as `medusa-jax eval` (medusa_jax/app/eval.py).
"""

import sys

from medusa_jax.app.main import main

if __name__ == "__main__":
  sys.exit(main(["eval", *sys.argv[1:]]))
