"""decode_attention and decode_attention_update: the Pallas kernels (interpret mode) and their
jnp references against a float64 NumPy loop, hypothesis properties over shapes, block sizes
and masks, and every error path.

Shapes come from a few buckets (each new shape compiles the interpreted kernel);
masks, lengths and values vary per example.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medusa_jax.errors import ConfigError
from medusa_jax.pallas.decode_attention import (
  combine_parts,
  decode_attention,
  decode_attention_parts,
  decode_attention_reference,
  decode_attention_update,
  decode_attention_update_reference,
  default_block_m,
  default_blocks,
  default_splits,
  supports,
  supports_update,
)


def reference_f64(q, k, v, mask, kv_len):
  """The documented semantics, one (row, token, head) at a time in float64.

  A row whose every read slot is masked averages the read slots (as the
  kernel's finite mask value gives); slots at or past kv_len are never read.
  """
  B, T, Q, D = q.shape
  L, G = k.shape[1], k.shape[2]
  R = Q // G
  out = np.zeros((B, T, Q, D))
  for b in range(B):
    n = min(max(int(kv_len[b]), 1), L)
    for t in range(T):
      seen = mask[b, t, :n] != 0
      for h in range(Q):
        s = k[b, :n, h // R].astype(np.float64) @ q[b, t, h].astype(np.float64) / np.sqrt(D)
        if seen.any():
          s = np.where(seen, s, -np.inf)
        else:
          s = np.zeros_like(s)
        p = np.exp(s - s.max())
        out[b, t, h] = (p / p.sum()) @ v[b, :n, h // R].astype(np.float64)
  return out


def _inputs(rng, B, T, Q, G, D, L, *, dtype=np.float32, tree=False, empty_row=False):
  q = rng.standard_normal((B, T, Q, D)).astype(dtype)
  k = rng.standard_normal((B, L, G, D)).astype(dtype)
  v = rng.standard_normal((B, L, G, D)).astype(dtype)
  idx = rng.integers(0, L - T + 1, size=B)
  kv_len = idx + T
  slot = np.arange(L)[None, None, :]
  mask = slot <= (idx[:, None] + np.arange(T)[None, :])[:, :, None]  # causal
  if tree:  # a random ancestor mask among the new tokens, the prefix fully visible
    anc = np.tril(rng.random((T, T)) < 0.5) | np.eye(T, dtype=bool)
    for b in range(B):
      mask[b, :, idx[b]:idx[b] + T] = anc
  if empty_row:
    mask[0, 0] = False
  return q, k, v, mask, kv_len


CASES = [  # B, T, Q, G, D, L, block_k, splits
    (1, 1, 9, 3, 64, 160, 64, 1),     # SmolLM2 heads, one decode token, a partial last tile
    (1, 1, 9, 3, 64, 160, 32, 3),     # the same in 3 splits of 2 tiles (the last one partial)
    (3, 1, 4, 2, 8, 40, 16, 1),       # head dim padded 8 -> 16
    (2, 5, 4, 4, 80, 33, 32, 3),      # MHA, head dim 80 (padded to 128), L not a tile
                                      # multiple; 3 splits of at most 1 tile, some empty
    (2, 21, 6, 2, 16, 72, 16, 2),     # a 21-node tree: 63 rows per kv head in one block
    (1, 24, 9, 3, 32, 96, 32, 1),     # 72 rows: two row blocks of 64
]


@pytest.mark.parametrize("B,T,Q,G,D,L,bk,splits", CASES)
def test_kernel_and_reference_match_float64(B, T, Q, G, D, L, bk, splits):
  rng = np.random.default_rng(B * 1000 + T * 10 + D)
  q, k, v, mask, kv_len = _inputs(rng, B, T, Q, G, D, L, tree=T > 1, empty_row=B > 1)
  want = reference_f64(q, k, v, mask, kv_len)
  got = np.asarray(decode_attention(q, k, v, mask, jnp.asarray(kv_len), block_k=bk,
                                    splits=splits, interpret=True))
  ref = np.asarray(decode_attention_reference(q, k, v, mask, jnp.asarray(kv_len)))
  assert got.shape == (B, T, Q, D) and np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(ref, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("splits", [1, 3])
def test_parts_are_the_splits_softmax_states_and_combine_to_the_output(splits):
  """decode_attention_parts: per split, o unnormalised, m the running max and l the sum of
  exp(s - m) over the split's slots (float64 per split); combine_parts of them is
  decode_attention's output, one split included."""
  rng = np.random.default_rng(17)
  B, T, Q, G, D, L, bk = 2, 1, 4, 2, 16, 64, 16
  q, k, v, mask, kv_len = _inputs(rng, B, T, Q, G, D, L)
  kv_len = np.asarray([37, 64])
  mask = np.broadcast_to(np.arange(L)[None, None, :] < kv_len[:, None, None], (B, T, L))
  o, m, lsum = (np.asarray(a, np.float64) for a in decode_attention_parts(
      q, k, v, mask, jnp.asarray(kv_len), block_k=bk, splits=splits, interpret=True))
  assert o.shape == (B, splits, T, Q, D) and m.shape == lsum.shape == (B, splits, T, Q)
  R = Q // G
  for b in range(B):
    tiles = -(-(-(-kv_len[b] // bk)) // splits)
    for s in range(splits):
      lo, hi = s * tiles * bk, min(kv_len[b], (s + 1) * tiles * bk)
      for h in range(Q):
        sc = k[b, lo:hi, h // R].astype(np.float64) @ q[b, 0, h].astype(np.float64) / np.sqrt(D)
        if hi <= lo:  # a split past the row's slots weighs nothing
          assert lsum[b, s, 0, h] == 0 and not o[b, s, 0, h].any()
          continue
        np.testing.assert_allclose(m[b, s, 0, h], sc.max(), rtol=1e-5, atol=1e-6)
        p = np.exp(sc - sc.max())
        np.testing.assert_allclose(lsum[b, s, 0, h], p.sum(), rtol=1e-5)
        np.testing.assert_allclose(o[b, s, 0, h], p @ v[b, lo:hi, h // R], rtol=1e-5, atol=1e-5)
  parts = decode_attention_parts(q, k, v, mask, jnp.asarray(kv_len), block_k=bk, splits=splits,
                                 interpret=True)
  np.testing.assert_allclose(np.asarray(combine_parts(*parts)),
                             reference_f64(q, k, v, mask, kv_len), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("splits", [1, 4])
def test_slots_at_or_past_kv_len_are_never_read(splits):
  """NaN in every slot past kv_len (and in the masked ones' values of other rows) changes
  nothing: the kernel neither reads nor weighs them (with 4 splits, row 0's 5 slots leave
  three splits with no slot at all)."""
  rng = np.random.default_rng(3)
  B, T, Q, G, D, L = 2, 3, 4, 2, 16, 70
  q, k, v, mask, kv_len = _inputs(rng, B, T, Q, G, D, L)
  kv_len = np.asarray([5, 41])
  for b in range(B):
    k[b, kv_len[b]:] = np.nan
    v[b, kv_len[b]:] = np.nan
    mask[b] = np.arange(L)[None, :] < kv_len[b]
  got = np.asarray(decode_attention(q, k, v, mask, jnp.asarray(kv_len), block_k=16,
                                    splits=splits, interpret=True))
  np.testing.assert_allclose(got, reference_f64(q, k, v, mask, kv_len), rtol=1e-5, atol=2e-6)


def test_bfloat16_is_close_to_float64():
  rng = np.random.default_rng(4)
  q, k, v, mask, kv_len = _inputs(rng, 2, 4, 9, 3, 64, 128, tree=True)
  want = reference_f64(q, k, v, mask, kv_len)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
  got = decode_attention(*bf, mask, jnp.asarray(kv_len), interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=4e-2)


def test_cache_in_another_dtype_is_read_as_the_queries():
  """A bf16 cache under f32 queries: read as f32 (the XLA attention's rule)."""
  rng = np.random.default_rng(5)
  q, k, v, mask, kv_len = _inputs(rng, 1, 2, 4, 2, 16, 48)
  kb, vb = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
  got = decode_attention(q, kb, vb, mask, jnp.asarray(kv_len), block_k=16, interpret=True)
  want = reference_f64(q, np.asarray(kb, np.float32), np.asarray(vb, np.float32), mask, kv_len)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(2, 1, 6, 3, 16, 48), (1, 7, 4, 1, 32, 40), (2, 3, 8, 2, 16, 64)]),
       bk=st.sampled_from([16, 32]), bm=st.sampled_from([None, 16]),
       splits=st.sampled_from([1, 2, 5]), tree=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_property_matches_float64(shape, bk, bm, splits, tree, seed):
  rng = np.random.default_rng(seed)
  B, T, Q, G, D, L = shape
  q, k, v, mask, kv_len = _inputs(rng, B, T, Q, G, D, L, tree=tree, empty_row=rng.random() < 0.3)
  if rng.random() < 0.5:  # random extra holes in the mask
    mask &= rng.random(mask.shape) < 0.7
  got = np.asarray(decode_attention(q, k, v, mask.astype(np.int8), jnp.asarray(kv_len),
                                    block_k=bk, block_m=bm, splits=splits, interpret=True))
  np.testing.assert_allclose(got, reference_f64(q, k, v, mask, kv_len), rtol=1e-5, atol=3e-6)


def test_default_block_m():
  assert [default_block_m(r) for r in (1, 3, 16, 17, 63, 64, 65, 192)] == [16, 16, 16, 32, 64,
                                                                          64, 64, 64]
  assert supports(9, 3) and supports(4, 4) and not supports(9, 2) and not supports(4, 0)
  # (block_k, num_warps): 128-slot tiles for 64-row programs (trees) and large batches
  assert default_blocks(1, 3) == (64, 4) and default_blocks(16, 12) == (64, 4)
  assert default_blocks(1, 192) == (128, 8) and default_blocks(64, 3) == (128, 4)
  # with splits: 4 warps, 64-slot tiles below batch 64
  assert default_blocks(1, 192, 8) == (64, 4) and default_blocks(64, 3, 4) == (128, 4)


def test_default_splits_by_programs_and_cache_tiles():
  assert [default_splits(p, 1024) for p in (3, 9, 64, 65, 192, 256, 257, 1024, 1025)] == [
      8, 8, 8, 4, 4, 4, 2, 2, 1]
  assert default_splits(3, 64) == 1 and default_splits(3, 130) == 3 and default_splits(3, 1) == 1


@pytest.mark.parametrize("change,match", [
    (dict(k=(1, 16, 2, 8)), "k .* and v"),
    (dict(mask=(1, 2, 15)), "mask"),
    (dict(kv_len=(2,)), "kv_len"),
    (dict(q=(1, 2, 5, 16), k=(1, 16, 2, 16), v=(1, 16, 2, 16)), "5 query heads over 2"),
    (dict(block_k=24), "block_k=24"),
    (dict(block_m=8), "block_m=8"),
    (dict(splits=0), "splits=0"),
    (dict(splits=True), "splits=True"),
])
def test_errors(change, match):
  shapes = dict(q=(1, 2, 4, 16), k=(1, 16, 2, 16), v=(1, 16, 2, 16), mask=(1, 2, 16),
                kv_len=(1,))
  blocks = {n: change.pop(n) for n in ("block_k", "block_m", "splits") if n in change}
  shapes.update(change)
  args = [np.zeros(shapes[n], np.float32) for n in ("q", "k", "v")]
  args += [np.ones(shapes["mask"], bool), np.ones(shapes["kv_len"], np.int32)]
  with pytest.raises(ConfigError, match=match):
    decode_attention(*args, interpret=True, **blocks)


def test_an_integer_mask_sees_every_nonzero_slot():
  """int32 256 is visible (not wrapped to 0 by a narrowing cast)."""
  rng = np.random.default_rng(6)
  q, k, v, mask, kv_len = _inputs(rng, 1, 2, 4, 2, 16, 40)
  got = decode_attention(q, k, v, mask.astype(np.int32) * 256, jnp.asarray(kv_len), block_k=16,
                         interpret=True)
  np.testing.assert_allclose(np.asarray(got), reference_f64(q, k, v, mask, kv_len), rtol=1e-5,
                             atol=2e-6)


# --------------------------------------------------------------------------- with the update


def update_f64(qkv, cos, sin, k, v, mask, cache_index, Q):
  """decode_attention_update's documented semantics in float64: rotate-half RoPE, the write
  at ``clip(cache_index, 0, L - T)``, then :func:`reference_f64`. Returns (o, k, v)."""
  B, T, _ = qkv.shape
  L, G, D = k.shape[1:]
  x = qkv.astype(np.float64)
  q, kn, vn = (x[..., :Q * D].reshape(B, T, Q, D), x[..., Q * D:(Q + G) * D].reshape(B, T, G, D),
               x[..., (Q + G) * D:].reshape(B, T, G, D))
  c, s = cos.astype(np.float64)[:, :, None], sin.astype(np.float64)[:, :, None]

  def rope(y):
    y1, y2 = y[..., :D // 2], y[..., D // 2:]
    return np.concatenate([y1 * c - y2 * s, y2 * c + y1 * s], axis=-1)

  k2, v2 = k.astype(np.float64).copy(), v.astype(np.float64).copy()
  start = np.clip(cache_index, 0, L - T)
  for b in range(B):
    k2[b, start[b]:start[b] + T] = rope(kn)[b]
    v2[b, start[b]:start[b] + T] = vn[b]
  return reference_f64(rope(q), k2, v2, mask, start + T), k2, v2


def _update_inputs(rng, B, T, Q, G, D, L, *, dtype=np.float32, tree=False, empty_row=False,
                   overflow=False):
  """qkv, cos, sin, k, v, mask, cache_index; ``overflow`` puts row 0's index past L - T
  (the write is clamped, as dynamic_update_slice does)."""
  q, k, v, mask, kv_len = _inputs(rng, B, T, Q, G, D, L, dtype=dtype, tree=tree,
                                  empty_row=empty_row)
  idx = kv_len - T
  if overflow:
    idx[0] = L - T + 2
  qkv = rng.standard_normal((B, T, (Q + 2 * G) * D)).astype(dtype)
  angle = rng.uniform(-50, 50, (B, T, D // 2))
  return (qkv, np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32), k, v, mask,
          idx.astype(np.int32))


UPDATE_CASES = [  # B, T, Q, G, D, L, block_k
    (1, 1, 9, 3, 64, 160, 64),     # SmolLM2 heads, one decode token
    (3, 1, 4, 2, 8, 40, 16),       # head dim 8 padded to 16; row 0's index past the end
    (2, 5, 4, 4, 80, 33, 32),      # MHA, head dim 80 (its halves are not powers of two)
    (1, 24, 9, 3, 32, 96, 32),     # 216 rows: four row blocks, only the first writes
]


@pytest.mark.parametrize("B,T,Q,G,D,L,bk", UPDATE_CASES)
def test_update_kernel_and_reference_match_float64(B, T, Q, G, D, L, bk):
  rng = np.random.default_rng(B * 7 + T * 3 + D)
  args = _update_inputs(rng, B, T, Q, G, D, L, tree=T > 1, empty_row=B > 1, overflow=B == 3)
  want = update_f64(*args, Q)
  got = decode_attention_update(*args, num_heads=Q, num_kv_heads=G, block_k=bk, interpret=True)
  ref = decode_attention_update_reference(*args, num_heads=Q, num_kv_heads=G)
  for g, r, w in zip(got, ref, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=5e-6)
    np.testing.assert_allclose(np.asarray(r), w, rtol=1e-5, atol=5e-6)
  # Every slot outside the written span keeps its value, bit for bit.
  k, start = args[3], np.clip(args[6], 0, L - T)
  for b in range(B):
    keep = np.ones(L, bool)
    keep[start[b]:start[b] + T] = False
    np.testing.assert_array_equal(np.asarray(got[1])[b, keep], k[b, keep])
  assert supports_update(9, 3, 64) and not supports_update(9, 3, 63)


def test_update_in_bf16_and_into_a_bf16_cache():
  """bf16 qkv and cache: within bf16 rounding of float64; f32 qkv into a bf16 cache: the
  cache holds the bf16-rounded keys and values."""
  rng = np.random.default_rng(9)
  qkv, cos, sin, k, v, mask, idx = _update_inputs(rng, 2, 3, 6, 2, 32, 48, tree=True)
  want = update_f64(qkv, cos, sin, k, v, mask, idx, 6)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (qkv, k, v)]
  o, k2, v2 = decode_attention_update(bf[0], cos, sin, bf[1], bf[2], mask, idx, num_heads=6,
                                      num_kv_heads=2, interpret=True)
  assert o.dtype == k2.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(o, np.float64), want[0], atol=0.08)
  o, k2, v2 = decode_attention_update(qkv, cos, sin, bf[1], bf[2], mask, idx, num_heads=6,
                                      num_kv_heads=2, interpret=True)
  assert o.dtype == jnp.float32 and k2.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(k2, np.float32),
                                np.asarray(jnp.asarray(want[1], jnp.bfloat16), np.float32))
  np.testing.assert_allclose(np.asarray(o), want[0], atol=0.05)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(2, 1, 6, 3, 16, 48), (1, 7, 4, 1, 32, 40), (2, 3, 8, 2, 16, 64)]),
       bk=st.sampled_from([16, 32]), bm=st.sampled_from([None, 16]),
       tree=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_update_property_matches_float64(shape, bk, bm, tree, seed):
  rng = np.random.default_rng(seed)
  B, T, Q, G, D, L = shape
  args = list(_update_inputs(rng, B, T, Q, G, D, L, tree=tree, empty_row=rng.random() < 0.3,
                             overflow=rng.random() < 0.2))
  if rng.random() < 0.5:
    args[5] = args[5] & (rng.random(args[5].shape) < 0.7)
  want = update_f64(*args, Q)
  got = decode_attention_update(*args, num_heads=Q, num_kv_heads=G, block_k=bk, block_m=bm,
                                interpret=True)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("change,match", [
    (dict(qkv=(1, 2, 100)), "do not make 4 query heads"),
    (dict(k=(1, 16, 2, 15), v=(1, 16, 2, 15), qkv=(1, 2, 120)), "even head dim"),
    (dict(v=(1, 16, 2, 8)), "k .* and v"),
    (dict(qkv=(1, 20, 128), mask=(1, 20, 16), cos=(1, 20, 8), sin=(1, 20, 8)), "L >= T"),
    (dict(cos=(1, 2, 16)), "cos"),
    (dict(mask=(1, 2, 15)), "mask"),
    (dict(cache_index=(2,)), "cache_index"),
    (dict(block_k=24), "block_k=24"),
])
def test_update_errors(change, match):
  shapes = dict(qkv=(1, 2, 128), cos=(1, 2, 8), sin=(1, 2, 8), k=(1, 16, 2, 16),
                v=(1, 16, 2, 16), mask=(1, 2, 16), cache_index=(1,))
  blocks = {n: change.pop(n) for n in ("block_k",) if n in change}
  shapes.update(change)
  args = [np.zeros(shapes[n], np.float32) for n in ("qkv", "cos", "sin", "k", "v")]
  args += [np.ones(shapes["mask"], bool), np.zeros(shapes["cache_index"], np.int32)]
  with pytest.raises(ConfigError, match=match):
    decode_attention_update(*args, num_heads=4, num_kv_heads=2, interpret=True, **blocks)
