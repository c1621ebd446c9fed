"""Test set-up: 8 fake CPU devices (for mesh tests), strict rank promotion, the budget tree policy.

Both must be configured before JAX initialises its backends.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite runs the row-budget tree policy: the measured one (the library's
# default) times candidate trees on first use, which tests of it ask for.
os.environ.setdefault("MEDUSA_JAX_TREE_POLICY", "budget")
# One persistent compilation cache for the run: both xdist workers and every subprocess
# the tests start (the server, the demo, the notebook, the pod evaluation) read and write
# it, so a program compiled once (over a second of XLA time) is not compiled again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
