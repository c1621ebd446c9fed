"""Static-shape buckets: batch sizes, prompt lengths and cache lengths.

Jitted steps compile once per shape, so every variable size is rounded up to
a small set of values (powers of two) and the rest is masked.
"""

from __future__ import annotations


def next_power_of_two(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


def batch_bucket(batch: int) -> int:
  """Rows of the jitted batch for ``batch`` requests (1, 2, 4, 8, ...)."""
  return next_power_of_two(batch)


def cache_bucket(needed: int, max_cache_len: int, minimum: int = 64) -> int:
  """Cache slots for ``needed`` (<= max_cache_len): a power of two, capped at the maximum."""
  return min(next_power_of_two(needed, minimum), max_cache_len)


def prompt_bucket(longest: int, cache_len: int, minimum: int = 8) -> int:
  """Padded prompt width for prefill: a power of two, at most the cache length."""
  return min(next_power_of_two(longest, minimum), cache_len)
