"""Masks over the cache and KV compaction against NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_jax.decoding import cache_ops
from medusa_jax.decoding.tree import build_tree


def _tree_mask_ref(lengths, tree_mask, cache_len):
  b, t = len(lengths), tree_mask.shape[0]
  out = np.zeros((b, t, cache_len), bool)
  for i in range(b):
    for q in range(t):
      for s in range(cache_len):
        rel = s - lengths[i]
        out[i, q, s] = rel < 0 or (rel < t and tree_mask[q, rel])
  return out


@pytest.mark.parametrize("jit", [False, True])
def test_tree_attention_mask_matches_loop(jit):
  tree = build_tree([[0], [1], [0, 0], [1, 0], [0, 0, 0]])
  lengths = np.array([0, 3, 9, 14], np.int32)  # 14 + 6 nodes overflows a 16-slot cache
  fn = jax.jit(cache_ops.tree_attention_mask, static_argnums=2) if jit else \
      cache_ops.tree_attention_mask
  got = np.asarray(fn(jnp.asarray(lengths), jnp.asarray(tree.attn_mask), 16))
  np.testing.assert_array_equal(got, _tree_mask_ref(lengths, tree.attn_mask, 16))


def test_tree_attention_mask_hand_checked():
  # Tree [[0],[1],[0,0]] (Medusa's test vector), one committed token.
  tree = build_tree([[0], [1], [0, 0]])
  got = np.asarray(cache_ops.tree_attention_mask(jnp.array([1], jnp.int32),
                                                 jnp.asarray(tree.attn_mask), 6))[0]
  want = np.array([[1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 0, 1, 0, 0],
                   [1, 1, 1, 0, 1, 0]], bool)
  np.testing.assert_array_equal(got, want)


def test_prefill_mask_is_causal_from_slot_zero():
  got = np.asarray(cache_ops.prefill_attention_mask(jnp.array([2, 4], jnp.int32), 4, 6))
  want = np.arange(6)[None, :] <= np.arange(4)[:, None]
  np.testing.assert_array_equal(got, np.broadcast_to(want, (2, 4, 6)))


def _compact_ref(kv, lengths, path):
  out = kv.copy()
  for b in range(kv.shape[0]):
    moved = [kv[b, lengths[b] + p].copy() for p in path[b]]  # read all, then write
    for j, row in enumerate(moved):
      if lengths[b] + j < kv.shape[1]:
        out[b, lengths[b] + j] = row
  return out


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_compact_layer_matches_loop(data):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  tree = build_tree([[0], [1], [2], [0, 0], [1, 0], [0, 0, 0], [1, 0, 0]])
  b, cache_len = data.draw(st.integers(1, 4)), 24
  t, d = tree.num_nodes, tree.depth
  lengths = rng.integers(0, cache_len - t + 1, size=b).astype(np.int32)
  best = rng.integers(0, t, size=b)
  path = tree.path_to_node[best].astype(np.int32)
  kv = rng.standard_normal((b, cache_len, 2, 3)).astype(np.float32)
  got = np.asarray(cache_ops.compact_layer(jnp.asarray(kv), jnp.asarray(lengths),
                                           jnp.asarray(path)))
  np.testing.assert_array_equal(got, _compact_ref(kv, lengths, path))
  # The committed prefix is never touched.
  for i in range(b):
    np.testing.assert_array_equal(got[i, :lengths[i]], kv[i, :lengths[i]])
  assert path.shape == (b, d + 1)


def test_compact_layer_drops_writes_past_the_cache():
  rng = np.random.default_rng(7)
  kv = rng.standard_normal((1, 6, 1, 2)).astype(np.float32)
  path = np.array([[0, 2, 2]], np.int32)  # accepted a=1; padding repeats the node
  got = np.asarray(cache_ops.compact_layer(jnp.asarray(kv), jnp.array([4], jnp.int32),
                                           jnp.asarray(path)))
  np.testing.assert_array_equal(got[0, :4], kv[0, :4])
  np.testing.assert_array_equal(got, _compact_ref_clip(kv, [4], path))
  np.testing.assert_array_equal(got[0, 5], kv[0, 5])  # source slot 6 clips to 5


def _compact_ref_clip(kv, lengths, path):
  out = kv.copy()
  n = kv.shape[1]
  for b in range(kv.shape[0]):
    moved = [kv[b, min(lengths[b] + p, n - 1)].copy() for p in path[b]]
    for j, row in enumerate(moved):
      if lengths[b] + j < n:
        out[b, lengths[b] + j] = row
  return out
