"""segmented_matmul: every backend against a float64 NumPy loop, and every error path.

Shapes come from a few buckets (jit caches compiled programs per shape); the
segment layouts, values, dtypes, bias and epilogue vary per example. Pallas
backends run in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medusa_jax.errors import SegmentError
from medusa_jax.pallas import Backend, Epilogue, segmented_matmul
from medusa_jax.pallas import gpu as pallas_gpu
from medusa_jax.pallas import tpu as pallas_tpu
from medusa_jax.pallas.ops import SegmentLayoutError, SegmentShapeError

K, M = 8, 16  # M % K == 0 so both epilogues apply


def reference_f64(x, w, b, s_start, s_end, seg_weight, resblock):
  """The documented semantics, one row at a time in float64."""
  n_rows, k = x.shape
  num_adapters, _, m = w.shape
  y = np.zeros((n_rows, m))
  taken = np.zeros(n_rows, bool)
  for s in range(len(s_start)):
    a = int(seg_weight[s])
    if not 0 <= a < num_adapters:
      continue
    for r in range(max(0, int(s_start[s])), min(n_rows, int(s_end[s]))):
      if taken[r]:
        continue  # the first listed segment wins
      taken[r] = True
      v = x[r].astype(np.float64) @ w[a].astype(np.float64)
      if b is not None:
        v = v + b[a].astype(np.float64)
      if resblock:
        v = np.tile(x[r].astype(np.float64), m // k) + v / (1.0 + np.exp(-v))
      y[r] = v
  return y


@st.composite
def layouts(draw, n_rows: int, num_adapters: int):
  """Per-row adapter ids (-1: padding row in no segment) laid out as segments.

  Styles: one segment per row; runs of equal ids (unsorted adapters); both
  padded with empty segments at random places to a fixed count S = N + 2.
  """
  mode = draw(st.sampled_from(["random", "all_default", "one_adapter", "with_padding"]))
  if mode == "all_default":
    ids = [0] * n_rows
  elif mode == "one_adapter":
    ids = [draw(st.integers(0, num_adapters - 1))] * n_rows
  else:
    low = -1 if mode == "with_padding" else 0
    ids = draw(st.lists(st.integers(low, num_adapters - 1), min_size=n_rows, max_size=n_rows))
  if draw(st.booleans()):
    segs = [(r, r + 1, a) for r, a in enumerate(ids)]
  else:
    segs, start = [], 0
    for r in range(1, n_rows + 1):
      if r == n_rows or ids[r] != ids[start]:
        segs.append((start, r, ids[start]))
        start = r
  segs = [s for s in segs if s[2] >= 0]
  while len(segs) < n_rows + 2:
    pos = draw(st.integers(0, len(segs)))
    at = draw(st.integers(0, n_rows))
    segs.insert(pos, (at, at, draw(st.integers(0, num_adapters - 1))))
  arr = np.asarray(segs, np.int32).reshape(-1, 3)
  return arr[:, 0], arr[:, 1], arr[:, 2]


@functools.lru_cache(maxsize=None)
def _jitted(backend: str, resblock: bool):
  epilogue = "resblock" if resblock else "none"
  return jax.jit(lambda x, w, b, s0, s1, s2: segmented_matmul(
      x, w, b, s0, s1, s2, backend=backend, epilogue=epilogue, interpret=True))


def _check(backend, data, n_rows, num_adapters, dtype, has_bias, resblock, seed):
  rng = np.random.default_rng(seed)
  s_start, s_end, seg_weight = data.draw(layouts(n_rows, num_adapters))
  x = jnp.asarray(rng.standard_normal((n_rows, K)), dtype)
  w = jnp.asarray(rng.standard_normal((num_adapters, K, M)) / np.sqrt(K), dtype)
  b = jnp.asarray(rng.standard_normal((num_adapters, M)), dtype) if has_bias else None
  out = _jitted(backend, resblock)(x, w, b, s_start, s_end, seg_weight)
  assert out.shape == (n_rows, M) and out.dtype == dtype
  as64 = lambda a: None if a is None else np.asarray(a.astype(jnp.float32), np.float64)
  ref = reference_f64(as64(x), as64(w), as64(b), s_start, s_end, seg_weight, resblock)
  got = np.asarray(out.astype(jnp.float32), np.float64)
  assert np.isfinite(got).all()
  covered = np.zeros(n_rows, bool)
  for s0, s1, _ in zip(s_start, s_end, seg_weight):
    covered[s0:s1] = True
  np.testing.assert_array_equal(got[~covered], 0.0)  # rows in no segment are exactly zero
  if np.linalg.norm(ref) == 0:
    np.testing.assert_array_equal(got, 0.0)
    return
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= tol


@pytest.mark.parametrize("backend", ["reference", "ragged_dot"])
@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_rows=st.sampled_from([1, 5, 13]), num_adapters=st.sampled_from([1, 4]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), has_bias=st.booleans(),
       resblock=st.booleans(), seed=st.integers(0, 2**31))
def test_xla_backends_match_float64(backend, data, n_rows, num_adapters, dtype, has_bias,
                                    resblock, seed):
  _check(backend, data, n_rows, num_adapters, dtype, has_bias, resblock, seed)


# Interpret-mode kernels compile slowly: fewer shape buckets, fewer examples.
PALLAS_COMBOS = [(13, jnp.float32, True, False), (13, jnp.bfloat16, False, True),
                 (13, jnp.float32, False, True), (1, jnp.bfloat16, True, False)]


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("n_rows,dtype,has_bias,resblock", PALLAS_COMBOS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**31))
def test_pallas_backends_match_float64(backend, n_rows, dtype, has_bias, resblock, data, seed):
  _check(backend, data, n_rows, 3, dtype, has_bias, resblock, seed)


@pytest.mark.parametrize("backend", ["reference", "ragged_dot", "pallas_gpu", "pallas_tpu"])
def test_ragged_dims_and_zero_rows(backend):
  """K and M not multiples of any block (masked tails), unsorted rows, a gap row."""
  rng = np.random.default_rng(3)
  n_rows, k, m = 9, 5, 10
  x = rng.standard_normal((n_rows, k)).astype(np.float32)
  w = rng.standard_normal((3, k, m)).astype(np.float32)
  b = rng.standard_normal((3, m)).astype(np.float32)
  s_start, s_end, seg_weight = np.array([6, 0, 4, 4]), np.array([9, 3, 5, 4]), np.array([0, 2, 1, 0])
  for resblock in (False, True):
    out = segmented_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), s_start, s_end,
                           seg_weight, backend=backend, interpret=True,
                           epilogue="resblock" if resblock else "none")
    ref = reference_f64(x, w, b, s_start, s_end, seg_weight, resblock)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[3], 0.0)


def test_zero_rows_and_zero_segments():
  x = jnp.zeros((0, K), jnp.float32)
  w = jnp.asarray(np.random.default_rng(0).standard_normal((2, K, M)), jnp.float32)
  out = segmented_matmul(x, w, None, np.zeros(0, np.int32), np.zeros(0, np.int32),
                         np.zeros(0, np.int32), backend="pallas_gpu")
  assert out.shape == (0, M)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, K)), jnp.float32)
  out = segmented_matmul(x, w, None, np.zeros(0, np.int32), np.zeros(0, np.int32),
                         np.zeros(0, np.int32), backend="reference")
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_backend_and_epilogue_parsing():
  assert Backend.parse("pallas_tpu") is Backend.PALLAS_TPU
  assert Backend.parse(Backend.RAGGED_DOT) is Backend.RAGGED_DOT
  assert Backend.AUTO.resolve() is Backend.REFERENCE  # tests run on CPU
  assert Epilogue.parse("resblock") is Epilogue.RESBLOCK
  with pytest.raises(SegmentError, match="backend='pallas_gpux'; expected one of auto, reference,"
                     " ragged_dot, pallas_gpu, pallas_tpu"):
    Backend.parse("pallas_gpux")
  with pytest.raises(SegmentError, match="epilogue='gelu'; expected one of none, resblock"):
    Epilogue.parse("gelu")


def _args(rng, n_rows=6, num_adapters=2):
  x = jnp.asarray(rng.standard_normal((n_rows, K)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((num_adapters, K, M)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((num_adapters, M)), jnp.float32)
  return x, w, b, np.array([0, 3]), np.array([3, 6]), np.array([1, 0])


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.ones((6,), jnp.float32)), r"x: expected \[N, K\]"),
    (dict(w=jnp.ones((2, K + 1, M), jnp.float32)), r"w: expected \[A, 8, M\]"),
    (dict(w=jnp.ones((K, M), jnp.float32)), r"w: expected \[A, K, M\]"),
    (dict(w=jnp.ones((0, K, M), jnp.float32)), r"at least one adapter"),
    (dict(b=jnp.ones((2, M + 1), jnp.float32)), r"b: expected \[2, 16\]"),
    (dict(s_end=np.array([3, 6, 6])), r"one shape \[S\]"),
    (dict(s_start=np.array([[0, 3]])), r"s_start: expected \[S\]"),
    (dict(seg_weight=np.array([1.0, 0.0])), r"seg_weight.dtype: expected an integer"),
    (dict(x=jnp.ones((6, K), jnp.int32)), r"x.dtype: expected a floating"),
])
def test_shape_and_dtype_errors(change, match):
  x, w, b, s0, s1, s2 = _args(np.random.default_rng(0))
  kw = dict(x=x, w=w, b=b, s_start=s0, s_end=s1, seg_weight=s2)
  kw.update(change)
  with pytest.raises(SegmentShapeError, match=match):
    segmented_matmul(kw["x"], kw["w"], kw["b"], kw["s_start"], kw["s_end"], kw["seg_weight"])


def test_resblock_needs_m_multiple_of_k():
  x, _, _, s0, s1, s2 = _args(np.random.default_rng(0))
  w = jnp.ones((2, K, 12), jnp.float32)
  with pytest.raises(SegmentShapeError, match="M % K == 0, got M=12, K=8"):
    segmented_matmul(x, w, None, s0, s1, s2, epilogue="resblock")


@pytest.mark.parametrize("s0,s1,s2,match", [
    ([0, 3], [3, 6], [1, 2], r"seg_weight\[1\]=2: expected an adapter index in \[0, 2\)"),
    ([0, 3], [3, 6], [-1, 0], r"seg_weight\[0\]=-1"),
    ([0, 2], [3, 6], [0, 1], r"segments 0 \[0, 3\) and 1 \[2, 6\) overlap"),
    ([0, 3], [3, 7], [0, 1], r"s_end\[1\]=7: expected a row bound in \[0, 6\]"),
    ([-1, 3], [3, 6], [0, 1], r"s_start\[0\]=-1"),
])
def test_layout_errors_on_host(s0, s1, s2, match):
  x, w, b, *_ = _args(np.random.default_rng(0))
  with pytest.raises(SegmentLayoutError, match=match):
    segmented_matmul(x, w, b, np.array(s0), np.array(s1), np.array(s2), backend="reference")


def test_empty_segment_with_any_weight_is_fine():
  x, w, b, *_ = _args(np.random.default_rng(0))
  out = segmented_matmul(x, w, b, np.array([0, 2, 9]), np.array([6, 2, 9]), np.array([1, 7, -3]),
                         backend="reference")
  ref = reference_f64(np.asarray(x), np.asarray(w), np.asarray(b), [0], [6], [1], False)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_inside_jit_bad_layouts_are_masked(backend):
  """Traced values cannot raise: out-of-range adapters give zero rows, the first
  overlapping segment wins, bounds are clamped."""
  rng = np.random.default_rng(5)
  x, w, b, *_ = _args(rng)
  s0, s1, s2 = np.array([0, 2, 4]), np.array([3, 5, 99]), np.array([5, 1, 0])
  f = jax.jit(lambda s0, s1, s2: segmented_matmul(x, w, b, s0, s1, s2, backend=backend))
  out = np.asarray(f(s0, s1, s2))
  ref = reference_f64(np.asarray(x), np.asarray(w), np.asarray(b), s0, s1, s2, False)
  np.testing.assert_array_equal(out[:2], 0.0)  # rows of the out-of-range segment
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_block_size_errors():
  x, w, b, s0, s1, s2 = _args(np.random.default_rng(0))
  with pytest.raises(SegmentError, match="block_m=12: the Triton kernel needs a power of two"):
    segmented_matmul(x, w, b, s0, s1, s2, backend="pallas_gpu",
                     block_sizes=pallas_gpu.BlockSizes(block_m=12))
  with pytest.raises(SegmentError, match="block_m=12: expected a multiple of 8"):
    segmented_matmul(x, w, b, s0, s1, s2, backend="pallas_tpu",
                     block_sizes=pallas_tpu.BlockSizes(block_m=12))
  with pytest.raises(SegmentError, match="pallas_tpu supports float32 and bfloat16"):
    segmented_matmul(x.astype(jnp.float16), w, b, s0, s1, s2, backend="pallas_tpu")


def test_block_size_heuristics():
  assert pallas_gpu.BlockSizes.for_shape(1, 1, 4096, 16384).block_m == 16
  assert pallas_gpu.BlockSizes.for_shape(128, 1, 4096, 16384).block_m == 64
  assert pallas_gpu.BlockSizes.for_shape(256, 1, 4096, 16384).block_m == 128
  assert pallas_gpu.BlockSizes.for_shape(8, 32, 4096, 16384).block_m == 16
  assert pallas_gpu.BlockSizes.for_shape(256, 32, 4096, 16384).num_warps == 8
  assert pallas_tpu.BlockSizes.for_shape(256, 1, 4096, 16384).block_m == 128
