"""Memory bandwidth of the default device, timed the way the decode floors need it.

``device_copy_bandwidth``: 20 dependent copies of a 1 GiB array inside one
jitted loop (the loop keeps XLA from fusing them), timed end to end, so one
dispatch and one sync are spread over 20 copies. ``host_copy_bandwidth``: one
jitted 256 MiB copy per call, median of 10; it includes the dispatch and the
sync and so reads low (kept to show the difference). Both in bytes/s, read +
written.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def device_copy_bandwidth(repeats: int = 3) -> float:
  x = jax.random.normal(jax.random.PRNGKey(0), (256 * 1024 * 1024,), jnp.float32)
  loop = jax.jit(lambda a: jax.lax.fori_loop(0, 20, lambda i, b: b * 1.0001, a))
  loop(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    loop(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * 20 * x.nbytes / best


def host_copy_bandwidth(calls: int = 10) -> float:
  y = jax.random.normal(jax.random.PRNGKey(1), (64 * 1024 * 1024,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  f(y).block_until_ready()
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    f(y).block_until_ready()
    times.append(time.perf_counter() - t)
  times.sort()
  return 2 * y.nbytes / times[len(times) // 2]
