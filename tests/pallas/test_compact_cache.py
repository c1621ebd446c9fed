"""The cache-compaction kernels (Pallas interpret mode on CPU) against a float64 NumPy loop
and against XLA's gather and scatter: overlapping source and destination slots, paths that
run past the cache, several dtypes, a hypothesis property, the model's speculative step
through either path, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medusa_jax.decoding import cache_ops
from medusa_jax.errors import ConfigError
from medusa_jax.models.llama import KVCache
from medusa_jax.pallas.compact_cache import compact_cache


def f64(arrays, lengths, path):
  """kv[b, len + j] <- kv[b, len + path[b, j]], every read before any write, in float64."""
  out = []
  for a in arrays:
    src = np.asarray(a, np.float64)
    dst = src.copy()
    L = src.shape[1]
    for b, n in enumerate(np.asarray(lengths)):
      for j, node in enumerate(np.asarray(path)[b]):
        if n + j < L:
          dst[b, n + j] = src[b, min(max(n + node, 0), L - 1)]
    out.append(dst)
  return out


def _tree_paths(rng, B, P, T):
  """Accepted paths as a verification gives them: node 0 first, each node after its
  depth, the last accepted node repeated past the accepted length."""
  path = np.zeros((B, P), np.int32)
  for b in range(B):
    accept = rng.integers(0, P)
    nodes = np.sort(rng.choice(np.arange(1, T), size=accept, replace=False)) if accept else []
    path[b, 1:accept + 1] = nodes
    path[b, accept + 1:] = path[b, accept]
  return path


def _arrays(rng, A, shape, dtype):
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(A))


@pytest.mark.parametrize("B,L,G,D,P,T,A", [
    (1, 64, 3, 64, 6, 64, 4),   # SmolLM2's heads, a 64-node tree at depth 5
    (3, 20, 2, 8, 4, 8, 3),     # rows near the cache's end
    (2, 16, 1, 5, 3, 5, 2),     # G and D not powers of two
    (4, 9, 8, 16, 1, 1, 2),     # plain: P = 1 (the root stays put)
])
def test_kernel_matches_float64_and_xla(B, L, G, D, P, T, A):
  rng = np.random.default_rng(B * 100 + L)
  arrays = _arrays(rng, A, (B, L, G, D), jnp.float32)
  lengths = jnp.asarray(rng.integers(0, L, B), jnp.int32)
  path = jnp.asarray(_tree_paths(rng, B, P, T))
  got = compact_cache(arrays, lengths, path)
  want = f64(arrays, lengths, path)
  for g, w, a in zip(got, want, arrays):
    assert g.shape == a.shape and g.dtype == a.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float64), w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(cache_ops.compact_layer(a, lengths,
                                                                                    path)))


def test_overlapping_slots_read_before_written():
  # Row 0 takes node 3 at depth 1 and node 5 at depth 3: slot 3 is read (for depth 1) and
  # written (depth 3), slot 1 is written and read by nobody; the reads must see the old slots.
  L, G, D = 12, 1, 4
  base = np.arange(L, dtype=np.float32)[None, :, None, None] * np.ones((1, L, G, D), np.float32)
  lengths = jnp.asarray([0], jnp.int32)
  path = jnp.asarray([[0, 3, 4, 5]], jnp.int32)
  (got,) = compact_cache((jnp.asarray(base),), lengths, path)
  np.testing.assert_array_equal(np.asarray(got)[0, :6, 0, 0], [0, 3, 4, 5, 4, 5])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int8])
def test_dtypes_are_moved_bit_for_bit(dtype):
  rng = np.random.default_rng(7)
  arrays = tuple(jnp.asarray(rng.integers(-100, 100, (2, 10, 2, 8)), dtype) for _ in range(2))
  lengths = jnp.asarray([2, 7], jnp.int32)
  path = jnp.asarray([[0, 2, 3], [0, 1, 4]], jnp.int32)
  for g, w in zip(compact_cache(arrays, lengths, path), f64(arrays, lengths, path)):
    assert g.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float64), w)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), L=st.integers(2, 24), G=st.integers(1, 4), D=st.integers(1, 12),
       P=st.integers(1, 6), A=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_property_any_shape_and_path(B, L, G, D, P, A, seed):
  rng = np.random.default_rng(seed)
  arrays = _arrays(rng, A, (B, L, G, D), jnp.float32)
  lengths = jnp.asarray(rng.integers(0, L, B), jnp.int32)
  path = jnp.asarray(rng.integers(0, L + 2, (B, P)), jnp.int32)  # any nodes, even past L
  for g, w in zip(compact_cache(arrays, lengths, path), f64(arrays, lengths, path)):
    np.testing.assert_array_equal(np.asarray(g, np.float64), w)


def test_cache_ops_routes_k_and_v_through_the_kernel():
  rng = np.random.default_rng(3)
  shape = (2, 16, 2, 4)
  cache = KVCache(k=_arrays(rng, 3, shape, jnp.float32), v=_arrays(rng, 3, shape, jnp.float32))
  lengths = jnp.asarray([1, 9], jnp.int32)
  path = jnp.asarray([[0, 2, 6], [0, 1, 1]], jnp.int32)
  fast = jax.jit(lambda c: cache_ops.compact_cache(c, lengths, path, kernel=True))(cache)
  slow = cache_ops.compact_cache(cache, lengths, path)
  for a, b in zip(fast.k + fast.v, slow.k + slow.v):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors_name_the_culprit():
  a = jnp.zeros((2, 8, 1, 4))
  lengths, path = jnp.zeros((2,), jnp.int32), jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ConfigError, match="no cache arrays"):
    compact_cache((), lengths, path)
  with pytest.raises(ConfigError, match=r"\[B, L, G, D\]"):
    compact_cache((jnp.zeros((2, 8, 4)),), lengths, path)
  with pytest.raises(ConfigError, match="array 1"):
    compact_cache((a, jnp.zeros((2, 8, 1, 4), jnp.bfloat16)), lengths, path)
  with pytest.raises(ConfigError, match="lengths must be"):
    compact_cache((a,), jnp.zeros((3,), jnp.int32), path)
  with pytest.raises(ConfigError, match="path must be"):
    compact_cache((a,), lengths, jnp.zeros((2, 0), jnp.int32))
  with pytest.raises(ConfigError, match="path must be"):
    compact_cache((a,), lengths, jnp.zeros((2,), jnp.int32))
