"""Test set-up: 8 fake CPU devices (for mesh tests), strict rank promotion, the budget tree policy.

Both must be configured before JAX initialises its backends.
"""

import os

# The suite compiles over a thousand small programs and runs each a few times: LLVM's
# optimisation level 0 (XLA's own HLO passes unchanged) saves more compile time than it
# costs in run time (measured: tests/decoding + tests/models 208 -> 164 s).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8"
                      " --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite runs the row-budget tree policy: the measured one (the library's
# default) times candidate trees on first use, which tests of it ask for.
os.environ.setdefault("MEDUSA_JAX_TREE_POLICY", "budget")
# One persistent compilation cache for the run: both xdist workers and every subprocess
# the tests start (the server, the demo, the notebook, the pod evaluation) read and write
# it, so a program compiled once is not compiled again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
# Programs of 0.05 s of compile time and more, not JAX's default of 1 s: most of the suite's
# programs are small, and the same ones recur across engines and workers (measured: tests/
# decoding + tests/models 254 -> 208 s on a cold cache).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
