"""The row-projection kernels (Pallas interpret mode on CPU) and their jnp references against
a float64 NumPy computation of the same math: every prologue and epilogue (the attention
splits' combine included), the q/k/v kernel's RoPE and cache write, partial tiles, both
reductions, bf16, hypothesis properties over shapes and blocks, and the errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medusa_jax.errors import ConfigError
from medusa_jax.pallas.decode_attention import MASK_VALUE
from medusa_jax.pallas.row_projection import (
  default_blocks,
  row_projection,
  row_projection_reference,
  row_qkv_projection,
  row_qkv_projection_reference,
  supports_qkv,
)


def f64(x_K, w_KxN, *, norm_K=None, eps=1e-6, gated=False, bias_N=None, residual_N=None):
  """The module docstring's math in float64, without the intermediate casts."""
  K = w_KxN.shape[0]
  a = np.asarray(x_K, np.float64)
  if norm_K is not None:
    a = a / np.sqrt(np.mean(a * a) + eps) * np.asarray(norm_K, np.float64)
  elif gated:
    gate, up = a[:K], a[K:]
    a = gate / (1 + np.exp(-gate)) * up
  y = a @ np.asarray(w_KxN, np.float64)
  if bias_N is not None:
    y = y + np.asarray(bias_N, np.float64)
  if residual_N is not None:
    y = y + np.asarray(residual_N, np.float64)
  return y


def _inputs(rng, K, N, *, norm=False, gated=False, bias=False, residual=False,
            dtype=np.float32):
  x = rng.standard_normal(2 * K if gated else K).astype(dtype)
  w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
  kw = dict(gated=gated)
  if norm:
    kw.update(norm_K=(1 + 0.1 * rng.standard_normal(K)).astype(dtype), eps=1e-5)
  if bias:
    kw["bias_N"] = rng.standard_normal(N).astype(dtype)
  if residual:
    kw["residual_N"] = rng.standard_normal(N).astype(dtype)
  return x, w, kw


CASES = [  # K, N, prologue / epilogue, block_k, block_n
    (576, 960, dict(norm=True), 256, 16),                  # SmolLM2 qkv: norm, partial K tile
    (576, 576, dict(residual=True), 64, 32),                # o_proj + residual
    (96, 200, dict(gated=True, bias=True, residual=True), 32, 64),  # down: SwiGLU, partial N
    (40, 24, dict(norm=True, bias=True), 16, 16),           # Qwen2-style bias after the norm
]


def _held(w_KxN, transposed):
  """The kernel as the call takes it: [K, N], or [N, K] (contiguous) when transposed."""
  return jnp.asarray(np.ascontiguousarray(w_KxN.T) if transposed else w_KxN)


@pytest.mark.parametrize("mma,transposed", [(False, False), (False, True)])
@pytest.mark.parametrize("K,N,opts,bk,bn", CASES)
def test_kernel_and_reference_match_float64(K, N, opts, bk, bn, mma, transposed):
  rng = np.random.default_rng(K * 7 + N)
  x, w, kw = _inputs(rng, K, N, **opts)
  want = f64(x, w, **kw)
  jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
  w_held = _held(w, transposed)
  got = np.asarray(row_projection(jnp.asarray(x), w_held, block_k=bk, block_n=bn,
                                  mma=mma, transposed=transposed, **jkw), np.float64)
  ref = np.asarray(row_projection_reference(jnp.asarray(x), w_held, transposed=transposed,
                                            **jkw), np.float64)
  assert got.shape == (N,)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ref, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("opts,transposed", [(dict(norm=True), False),
                                             (dict(gated=True, residual=True), False),
                                             (dict(norm=True, bias=True), True)])
def test_bfloat16_is_close_to_float64_and_to_the_reference(opts, transposed):
  rng = np.random.default_rng(3)
  x, w, kw = _inputs(rng, 320, 144, **opts)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
  jkw = {k: (bf(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
  w_held = bf(np.ascontiguousarray(w.T) if transposed else w)
  got = row_projection(bf(x), w_held, transposed=transposed, **jkw)
  assert got.dtype == jnp.bfloat16
  ref = row_projection_reference(bf(x), w_held, transposed=transposed, **jkw)
  want = f64(np.asarray(bf(x), np.float64), np.asarray(bf(w), np.float64),
             **{k: (np.asarray(v, np.float64) if hasattr(v, "dtype") else v)
                for k, v in jkw.items()})
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.02 * scale)
  # The same casts as the reference: equal up to one bf16 rounding of the sum.
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64),
                             atol=0.01 * scale)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(K=st.integers(1, 80), N=st.integers(1, 80), prologue=st.sampled_from(["", "norm", "gated"]),
       bias=st.booleans(), residual=st.booleans(), bk=st.sampled_from([16, 32]),
       bn=st.sampled_from([16, 64]), mma=st.booleans(), transposed=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_property_matches_float64(K, N, prologue, bias, residual, bk, bn, mma, transposed, seed):
  rng = np.random.default_rng(seed)
  x, w, kw = _inputs(rng, K, N, norm=prologue == "norm", gated=prologue == "gated",
                     bias=bias, residual=residual)
  jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
  got = np.asarray(row_projection(jnp.asarray(x), _held(w, transposed), block_k=bk, block_n=bn,
                                  mma=mma, transposed=transposed, **jkw), np.float64)
  np.testing.assert_allclose(got, f64(x, w, **kw), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("change,match", [
    (dict(w=np.zeros((8, 4, 2))), "w must be"),
    (dict(x=np.zeros(9)), "x must be"),
    (dict(x=np.zeros(8), gated=True), r"x must be \[2K\]"),
    (dict(norm_K=np.zeros(7)), "norm must be"),
    (dict(bias_N=np.zeros(5)), "bias must be"),
    (dict(residual_N=np.zeros((4, 1))), "residual must be"),
    (dict(x=np.zeros(16), gated=True, norm_K=np.zeros(8)), "exclusive"),
    (dict(block_k=24), "block_k=24"),
    (dict(block_n=8, mma=True), r"block_n=8 must be a power of two >= 16 \(mma\)"),
    (dict(block_n=12), "block_n=12"),
    (dict(w=np.zeros((8,)), transposed=True), r"w must be \[N, K\]"),
    (dict(w=np.zeros((8, 4)), transposed=True), r"x must be \[K\] or \[M, K\] for w \(8, 4\)"),
    (dict(x=np.zeros((0, 8))), "x has no rows"),
    (dict(x=np.zeros((2, 2, 8))), "x must be"),
    (dict(x=np.zeros((3, 8)), mma=False), "3 rows need mma"),
    (dict(x=np.zeros((3, 8)), block_m=8), r"block_m=8 must be a power of two >= 16 \(mma\)"),
    (dict(block_m=16), "block_m=16 without mma"),
    (dict(x=np.zeros((3, 8)), residual_N=np.zeros(4)), r"residual must be \[3, 4\]"),
])
def test_errors(change, match):
  args = dict(x=np.zeros(8), w=np.zeros((8, 4)))
  args.update(change)
  x, w = jnp.asarray(args.pop("x"), jnp.float32), jnp.asarray(args.pop("w"), jnp.float32)
  args = {k: (jnp.asarray(v, jnp.float32) if isinstance(v, np.ndarray) else v)
          for k, v in args.items()}
  with pytest.raises(ConfigError, match=match):
    row_projection(x, w, **args)


# ----------------------------------------------------------------- several rows


def f64_rows(x_MxK, w_KxN, **kw):
  """:func:`f64` row by row."""
  res = kw.pop("residual_N", None)
  out = np.stack([f64(row, w_KxN, **kw) for row in x_MxK])
  return out if res is None else out + np.asarray(res, np.float64)


@pytest.mark.parametrize("M,K,N,opts,bm,bk,bn,transposed", [
    (16, 576, 960, dict(norm=True), None, None, None, True),  # a 16-node tree's q/k/v
    (3, 40, 24, dict(gated=True, bias=True, residual=True), 16, 16, 16, False),  # partial block
    (70, 33, 20, dict(norm=True, residual=True), 32, 16, 16, True),  # three row blocks, odd
    (5, 17, 40, dict(), 16, 32, 32, False),                   # nothing fused
])
def test_rows_match_float64(M, K, N, opts, bm, bk, bn, transposed):
  """M rows in tensor-core dots (interpreted): every row as the one-row math."""
  rng = np.random.default_rng(M * 31 + K)
  x, w, kw = _inputs(rng, K, N, **opts)
  x = rng.standard_normal((M,) + x.shape).astype(np.float32)
  if "residual_N" in kw:
    kw["residual_N"] = rng.standard_normal((M, N)).astype(np.float32)
  jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
  got = row_projection(jnp.asarray(x), _held(w, transposed), block_m=bm, block_k=bk,
                       block_n=bn, transposed=transposed, **jkw)
  ref = row_projection_reference(jnp.asarray(x), _held(w, transposed), transposed=transposed,
                                 **jkw)
  want = f64_rows(x, w, **kw)
  assert got.shape == (M, N)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=3e-5, atol=3e-5)
  np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=3e-5, atol=3e-5)


def test_default_blocks_by_rows():
  one = default_blocks(1)
  assert one == dict(block_m=1, block_k=1024, block_n=4, num_warps=8, mma=False)
  assert default_blocks(2)["block_m"] == 16 and default_blocks(16)["mma"]
  assert default_blocks(17)["block_m"] == 32 and default_blocks(500)["block_m"] == 64


# ----------------------------------------------------------- the attention's combine prologue


def _parts(rng, B, S, T, A, D, *, empty=0):
  """Random split states: o [B, S, T, A*D], m, l [B, S, T, A]; the first ``empty`` splits
  read no slot (0, the mask value, 0), as decode_attention_parts stores them."""
  o = rng.standard_normal((B, S, T, A * D)).astype(np.float32) * 3
  m = rng.standard_normal((B, S, T, A)).astype(np.float32) * 4
  lsum = rng.random((B, S, T, A)).astype(np.float32) * 5 + 0.5
  o[:, :empty], m[:, :empty], lsum[:, :empty] = 0, MASK_VALUE, 0
  return o, m, lsum


def combine_f64(o, m, lsum):
  """The splits' merge in float64, rows (b, t): sum_s e^(m_s - M) o_s / sum_s e^(m_s - M)
  l_s, [B * T, A * D]."""
  o, m, lsum = (np.asarray(a, np.float64) for a in (o, m, lsum))
  B, S, T, A = m.shape
  w = np.exp(m - m.max(axis=1, keepdims=True))
  num = np.einsum("bsta,bstad->btad", w, o.reshape(B, S, T, A, -1))
  return (num / (w * lsum).sum(axis=1)[..., None]).reshape(B * T, -1)


@pytest.mark.parametrize("B,S,T,A,D,N,empty,bk,bn,transposed", [
    (1, 8, 1, 9, 64, 576, 3, None, None, True),  # SmolLM2's o projection, 8 splits, 3 empty
    (1, 3, 1, 2, 8, 24, 0, 16, 16, False),       # K = 16: one exact tile
    (2, 3, 5, 2, 8, 24, 1, 16, 16, False),       # rows (b, t): two rows of 5 tokens, in dots
    (1, 4, 16, 9, 64, 576, 0, None, None, True),  # a 16-node tree's o projection, defaults
])
def test_attention_stats_prologue_projects_the_combine(B, S, T, A, D, N, empty, bk, bn,
                                                       transposed):
  rng = np.random.default_rng(S * 100 + D + T)
  o, m, lsum = _parts(rng, B, S, T, A, D, empty=empty)
  w = (rng.standard_normal((A * D, N)) / np.sqrt(A * D)).astype(np.float32)
  residual = rng.standard_normal((B * T, N)).astype(np.float32)
  bias = rng.standard_normal(N).astype(np.float32)
  want = combine_f64(o, m, lsum) @ w.astype(np.float64) + bias + residual
  args = (jnp.asarray(o), _held(w, transposed))
  kw = dict(attention_stats=(jnp.asarray(m), jnp.asarray(lsum)), bias_N=jnp.asarray(bias),
            residual_N=jnp.asarray(residual), transposed=transposed)
  got = row_projection(*args, block_k=bk, block_n=bn, **kw)
  ref = row_projection_reference(*args, **kw)
  assert got.dtype == jnp.float32 and got.shape == (B * T, N)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=3e-5, atol=3e-5)
  np.testing.assert_allclose(np.asarray(ref, np.float64), want, rtol=3e-5, atol=3e-5)


def test_attention_stats_in_bfloat16_round_the_combine_as_the_model():
  """With a bf16 kernel (and ``dtype``) the combine is rounded to bf16 before the
  projection, as Block's attention output is: equal to the reference up to the sum order."""
  rng = np.random.default_rng(5)
  o, m, lsum = _parts(rng, 1, 4, 1, 3, 16, empty=1)
  w = jnp.asarray(rng.standard_normal((48, 40)) / 7, jnp.bfloat16)
  kw = dict(attention_stats=(jnp.asarray(m), jnp.asarray(lsum)), dtype=jnp.bfloat16)
  got = row_projection(jnp.asarray(o), w, **kw)
  ref = row_projection_reference(jnp.asarray(o), w, **kw)
  assert got.dtype == jnp.bfloat16
  a = np.asarray(combine_f64(o, m, lsum), np.float64)
  want = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) @ np.asarray(w, np.float64)
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.01 * scale)
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64),
                             atol=0.01 * scale)


# ----------------------------------------------------------- q/k/v: norm, RoPE, cache write


def qkv_f64(x, w, g, eps, bias, cos, sin, k, v, index, Q, G):
  """row_qkv_projection's math in float64: q [M, Q*D], and the caches with batch row b's
  T tokens written from slot ``clip(index[b], 0, L - T)``."""
  x = np.asarray(x, np.float64)
  a = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * np.asarray(g, np.float64)
  y = a @ np.asarray(w, np.float64) + (0 if bias is None else np.asarray(bias, np.float64))
  B, L, _, D = k.shape
  M = x.shape[0]
  T = M // B
  heads = y.reshape(M, Q + 2 * G, D)
  lo, hi = heads[..., :D // 2].copy(), heads[..., D // 2:].copy()
  c, s = (np.asarray(t, np.float64)[:, None, :] for t in (cos, sin))
  rot = np.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)
  heads = np.concatenate([rot[:, :Q + G], heads[:, Q + G:]], axis=1)
  k, v = np.array(k, np.float64), np.array(v, np.float64)
  for b in range(B):
    start = min(max(int(index[b]), 0), L - T)
    k[b, start:start + T] = heads[b * T:(b + 1) * T, Q:Q + G]
    v[b, start:start + T] = heads[b * T:(b + 1) * T, Q + G:]
  return heads[:, :Q].reshape(M, -1), k, v


def _qkv_inputs(rng, Q, G, D, H, L, *, B=1, T=1, bias=False, dtype=np.float32):
  N, M = (Q + 2 * G) * D, B * T
  x = rng.standard_normal((M, H)).astype(dtype)
  w = (rng.standard_normal((H, N)) / np.sqrt(H)).astype(dtype)
  g = (1 + 0.1 * rng.standard_normal(H)).astype(dtype)
  angles = rng.random((M, D // 2)) * 50
  cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
  k = rng.standard_normal((B, L, G, D)).astype(dtype)
  v = rng.standard_normal((B, L, G, D)).astype(dtype)
  b = rng.standard_normal(N).astype(dtype) if bias else None
  return x, w, g, b, cos, sin, k, v


def _qkv_call(fn, x, w, g, b, cos, sin, k, v, index, Q, G, transposed, **kw):
  j = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
  return fn(j(x), jnp.asarray(np.ascontiguousarray(w.T) if transposed else w), j(k), j(v),
            jnp.asarray(index, jnp.int32), j(cos), j(sin), num_heads=Q, num_kv_heads=G,
            norm_H=j(g), eps=1e-5, bias_N=j(b), transposed=transposed, **kw)


QKV_CASES = [  # Q, G, D, H, L, B, T, index, bias, block_k, block_n (pairs), transposed
    (9, 3, 64, 576, 12, 1, 1, [7], False, None, None, True),  # SmolLM2's heads, default blocks
    (9, 3, 64, 576, 12, 1, 1, [7], False, None, None, False),
    (4, 2, 8, 40, 6, 1, 1, [9], True, 16, 16, True),  # Qwen2-style bias; more pairs than a
                                                      # program; index past the cache: clipped
    (3, 3, 4, 17, 3, 1, 1, [0], True, 32, 4, False),  # MHA, head dim 4, odd hidden size
    (9, 3, 64, 576, 40, 1, 16, [20], False, None, None, True),  # a 16-node tree, defaults
    (4, 2, 8, 40, 9, 3, 2, [0, 8, 3], True, 16, 16, False),  # 3 rows of 2 tokens; row 1 -> 7
]


@pytest.mark.parametrize("Q,G,D,H,L,B,T,index,bias,bk,bn,transposed", QKV_CASES)
def test_qkv_kernel_and_reference_match_float64(Q, G, D, H, L, B, T, index, bias, bk, bn,
                                                transposed):
  rng = np.random.default_rng(Q * 100 + D * 10 + H + T)
  x, w, g, b, cos, sin, k, v = _qkv_inputs(rng, Q, G, D, H, L, B=B, T=T, bias=bias)
  want = qkv_f64(x, w, g, 1e-5, b, cos, sin, k, v, index, Q, G)
  args = (x, w, g, b, cos, sin, k, v, index, Q, G, transposed)
  got = _qkv_call(row_qkv_projection, *args, block_k=bk, block_n=bn)
  ref = _qkv_call(row_qkv_projection_reference, *args)
  for name, a, r, want_a in zip(("q", "k cache", "v cache"), got, ref, want):
    assert a.shape == want_a.shape and a.dtype == jnp.float32, name
    np.testing.assert_allclose(np.asarray(a, np.float64), want_a, rtol=3e-5, atol=3e-5,
                               err_msg=name)
    np.testing.assert_allclose(np.asarray(r, np.float64), want_a, rtol=3e-5, atol=3e-5,
                               err_msg=name)


def test_qkv_one_row_in_a_dot_matches_float64():
  rng = np.random.default_rng(12)
  args = (*_qkv_inputs(rng, 4, 2, 8, 40, 6, bias=True), [3], 4, 2, True)
  want = qkv_f64(*args[:3], 1e-5, *args[3:-1])
  got = _qkv_call(row_qkv_projection, *args, mma=True)
  for a, want_a in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float64), want_a, rtol=3e-5, atol=3e-5)


def test_qkv_in_bfloat16_rounds_as_the_model_and_writes_one_slot():
  """bf16: near float64 (of the bf16 inputs) and the reference; every other cache slot is
  left bit for bit."""
  rng = np.random.default_rng(8)
  Q, G, D, H, L = 9, 3, 64, 576, 9
  x, w, g, b, cos, sin, k, v = _qkv_inputs(rng, Q, G, D, H, L)
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16))  # noqa: E731
  x, w, g, k, v = bf(x), bf(w), bf(g), bf(k), bf(v)
  args = (x, w, g, None, cos, sin, k, v, [4], Q, G, True)
  got = _qkv_call(row_qkv_projection, *args)
  ref = _qkv_call(row_qkv_projection_reference, *args)
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  want = qkv_f64(f(x), f(w), f(g), 1e-5, None, cos, sin, f(k), f(v), [4], Q, G)
  for a, r, want_a in zip(got, ref, want):
    assert a.dtype == jnp.bfloat16
    scale = np.abs(want_a).max()
    np.testing.assert_allclose(f(a), want_a, atol=0.02 * scale)
    np.testing.assert_allclose(f(a), f(r), atol=0.01 * scale)
  for cache, before in zip(got[1:], (k, v)):
    others = np.arange(L) != 4
    np.testing.assert_array_equal(np.asarray(cache)[0, others], np.asarray(before)[0, others])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), D=st.sampled_from([2, 6, 16]),
       H=st.integers(1, 40), L=st.integers(3, 6), BT=st.sampled_from([(1, 1), (1, 3), (2, 1)]),
       index=st.integers(-2, 8), bias=st.booleans(), bk=st.sampled_from([16, 64]),
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_qkv_property_matches_float64(heads, D, H, L, BT, index, bias, bk, transposed, seed):
  (Q, G), (B, T) = heads, BT
  rng = np.random.default_rng(seed)
  x, w, g, b, cos, sin, k, v = _qkv_inputs(rng, Q, G, D, H, L, B=B, T=T, bias=bias)
  idx = [index + i for i in range(B)]
  got = _qkv_call(row_qkv_projection, x, w, g, b, cos, sin, k, v, idx, Q, G, transposed,
                  block_k=bk)
  for a, want_a in zip(got, qkv_f64(x, w, g, 1e-5, b, cos, sin, k, v, idx, Q, G)):
    np.testing.assert_allclose(np.asarray(a, np.float64), want_a, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("change,match", [
    (dict(o=np.zeros((3, 24))), r"with attention_stats x must be \[B, S, T, K\]"),
    (dict(m=np.zeros((1, 2, 1, 3))), r"attention_stats must be two \[B, S, T, A\]"),
    (dict(m=np.zeros((1, 3, 1, 5)), lsum=np.zeros((1, 3, 1, 5))), "A dividing K = 24"),
    (dict(norm_K=np.zeros(24)), "exclusive"),
    (dict(residual_N=np.zeros(8)), r"residual must be \[1, 8\]"),
])
def test_attention_stats_errors(change, match):
  args = dict(o=np.zeros((1, 3, 1, 24)), m=np.zeros((1, 3, 1, 4)), lsum=np.zeros((1, 3, 1, 4)))
  args.update(change)
  j = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  extra = {k: j(v) for k, v in args.items() if k not in ("o", "m", "lsum")}
  with pytest.raises(ConfigError, match=match):
    row_projection(j(args["o"]), j(np.zeros((24, 8))),
                   attention_stats=(j(args["m"]), j(args["lsum"])), **extra)


@pytest.mark.parametrize("change,match", [
    (dict(x=np.zeros((2, 8, 1))), "row_qkv_projection: x must be"),
    (dict(v=np.zeros((1, 5, 1, 4))), r"caches \[B, L, G, D\] of one shape"),
    (dict(k=np.zeros((2, 4, 1, 4)), v=np.zeros((2, 4, 1, 4)), x=np.zeros((3, 8))),
     r"x must be \[B \* T, H\] rows for a cache of batch 2"),
    (dict(w=np.zeros((8, 20))), "do not make 2 query heads over 1 kv heads"),
    (dict(num_kv_heads=2), "do not make"),
    (dict(cos=np.zeros((1, 3))), r"cos \(1, 3\) and sin \(1, 2\) must be \[1, 2\]"),
    (dict(index=np.zeros((1, 1), np.int32)), r"cache_index must be \[1\]"),
    (dict(norm_H=np.zeros(7)), r"row_qkv_projection: norm must be \[8\]"),
    (dict(bias_N=np.zeros(3)), r"row_qkv_projection: bias must be \[16\]"),
    (dict(x=np.zeros((1, 9))), r"row_qkv_projection: x must be \[K\] or \[M, K\]"),
    (dict(x=np.zeros((5, 8)), cos=np.zeros((5, 2)), sin=np.zeros((5, 2))),
     "5 tokens per row do not fit a cache of 4 slots"),
    (dict(block_n=3), "block_n=3"),
    (dict(block_k=8), "block_k=8"),
    (dict(x=np.zeros((2, 8)), cos=np.zeros((2, 2)), sin=np.zeros((2, 2)), mma=False),
     "2 rows need mma"),
])
def test_qkv_errors(change, match):
  args = dict(x=np.zeros((1, 8)), w=np.zeros((8, 16)), k=np.zeros((1, 4, 1, 4)),
              v=np.zeros((1, 4, 1, 4)), index=np.zeros(1, np.int32), cos=np.zeros((1, 2)),
              sin=np.zeros((1, 2)), num_heads=2, num_kv_heads=1, norm_H=np.zeros(8))
  args.update(change)
  arr = lambda a: jnp.asarray(a, a.dtype if a.dtype == np.int32 else jnp.float32)  # noqa: E731
  args = {k: (arr(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
  with pytest.raises(ConfigError, match=match):
    row_qkv_projection(args.pop("x"), args.pop("w"), args.pop("k"), args.pop("v"),
                       args.pop("index"), args.pop("cos"), args.pop("sin"), **args)


def test_qkv_cache_of_another_dtype_and_an_odd_head_dim_are_refused():
  f = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  with pytest.raises(ConfigError, match="must hold x's dtype float32"):
    row_qkv_projection(f(1, 8), f(8, 16), f(1, 4, 1, 4).astype(jnp.bfloat16),
                       f(1, 4, 1, 4).astype(jnp.bfloat16), jnp.zeros(1, jnp.int32), f(1, 2),
                       f(1, 2), num_heads=2, num_kv_heads=1, norm_H=f(8))
  assert not supports_qkv(2, 1, 5) and supports_qkv(2, 1, 4) and not supports_qkv(2, 0, 4)
  with pytest.raises(ConfigError, match="even head dim"):
    row_qkv_projection(f(1, 8), f(8, 20), f(1, 4, 1, 5), f(1, 4, 1, 5),
                       jnp.zeros(1, jnp.int32), f(1, 2), f(1, 2), num_heads=2, num_kv_heads=1,
                       norm_H=f(8))
