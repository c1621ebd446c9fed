"""Evaluate Medusa heads on every host of a TPU pod (or GPU cluster) at once.

The same as `medusa-jax pod_eval` (medusa_jax/app/pod_eval.py): run it on every host.

  python scripts/tpu_pod_eval.py --medusa /path/to/heads --out /tmp/eval
"""

import sys

from medusa_jax.app.main import main

if __name__ == "__main__":
  sys.exit(main(["pod_eval", *sys.argv[1:]]))
