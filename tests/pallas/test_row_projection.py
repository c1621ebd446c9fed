"""The row-projection kernel (Pallas interpret mode on CPU) and its jnp reference against a
float64 NumPy computation of the same math: every prologue and epilogue, partial tiles,
both reductions, bf16, a hypothesis property over shapes and blocks, and the errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medusa_jax.errors import ConfigError
from medusa_jax.pallas.row_projection import row_projection, row_projection_reference


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
    (17, 33, dict(), 16, 16),                               # nothing fused, odd sizes
]


def _held(w_KxN, transposed):
  """The kernel as the call takes it: [K, N], or [N, K] (contiguous) when transposed."""
  return jnp.asarray(np.ascontiguousarray(w_KxN.T) if transposed else w_KxN)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mma", [False, True])
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


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    (dict(block_n=8), "block_n=8"),
    (dict(w=np.zeros((8,)), transposed=True), r"w must be \[N, K\]"),
    (dict(w=np.zeros((8, 4)), transposed=True), r"x must be \[K\] for w \(8, 4\)"),
])
def test_errors(change, match):
  args = dict(x=np.zeros(8), w=np.zeros((8, 4)))
  args.update(change)
  x, w = jnp.asarray(args.pop("x"), jnp.float32), jnp.asarray(args.pop("w"), jnp.float32)
  args = {k: (jnp.asarray(v, jnp.float32) if isinstance(v, np.ndarray) else v)
          for k, v in args.items()}
  with pytest.raises(ConfigError, match=match):
    row_projection(x, w, **args)
