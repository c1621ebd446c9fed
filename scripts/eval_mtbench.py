"""MT-bench evaluation of Medusa heads (tokens/step, head accuracy, speed-up).

Usage: python scripts/eval_mtbench.py [--heads DIR] [--out DIR] [--num-questions N] [--bs1 N]
Same as `medusa-jax eval`; see medusa_jax/training/evaluate.py.
"""

import sys

from medusa_jax.training.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
