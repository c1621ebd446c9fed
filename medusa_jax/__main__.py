"""``python -m medusa_jax``: the ``medusa-jax`` command."""

import sys

from medusa_jax.app.main import main

sys.exit(main())
