"""``segmented_matmul``: argument checks and dispatch over the backends.

Backends:
  * ``reference``: pure jnp, a loop over adapters (reads every adapter);
  * ``ragged_dot``: sort rows by adapter, ``jax.lax.ragged_dot``, unsort;
  * ``pallas_gpu``: Pallas Triton kernel (:mod:`medusa_jax.pallas.gpu`);
  * ``pallas_tpu``: Pallas TPU kernel with scalar-prefetched tile metadata
    (:mod:`medusa_jax.pallas.tpu`; tested in interpret mode only);
  * ``auto``: pallas_gpu on GPU, pallas_tpu on TPU, reference elsewhere.

Checks: shapes and dtypes at trace time; when the segment arrays are concrete
(not traced), their values on the host (bounds, overlaps, adapter range).
Inside jit nothing raises; the meaning given to bad values there is documented
in :func:`medusa_jax.pallas._schedule.row_adapters`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.errors import SegmentError
from medusa_jax.options import Option
from medusa_jax.pallas import _compat, gpu, tpu
from medusa_jax.pallas.ragged import segmented_matmul_ragged_dot
from medusa_jax.pallas.reference import segmented_matmul_reference

Array = jax.Array


class SegmentShapeError(SegmentError):
  """An argument of ``segmented_matmul`` has the wrong rank, shape or dtype."""


class SegmentLayoutError(SegmentError):
  """Concrete segment bounds or adapter indices are out of range, or overlap."""


class Backend(Option):
  """Which implementation ``segmented_matmul`` runs."""
  __error__ = SegmentError
  AUTO = "auto"
  REFERENCE = "reference"
  RAGGED_DOT = "ragged_dot"
  PALLAS_GPU = "pallas_gpu"
  PALLAS_TPU = "pallas_tpu"

  def resolve(self) -> "Backend":
    """AUTO -> the backend for the default platform; others unchanged."""
    if self is not Backend.AUTO:
      return self
    platform = jax.default_backend()
    if platform == "gpu" or platform == "cuda":
      return Backend.PALLAS_GPU
    if platform == "tpu":
      return Backend.PALLAS_TPU
    return Backend.REFERENCE


class Epilogue(Option):
  """What follows ``y = x @ W + b``: nothing, or the Medusa ResBlock."""
  __error__ = SegmentError
  NONE = "none"
  RESBLOCK = "resblock"


def segmented_matmul(x: Array, w: Array, b: Array | None, s_start, s_end, seg_weight, *,
                     backend: Backend | str = "auto", epilogue: Epilogue | str = "none",
                     interpret: bool | None = None, block_sizes=None) -> Array:
  """Per-segment matmul: rows of segment s use adapter ``seg_weight[s]``.

  ``y[r] = x[r] @ w[a] + b[a]`` for each row r in ``s_start[s]:s_end[s]`` with
  ``a = seg_weight[s]``; rows in no segment are 0. With
  ``epilogue="resblock"``, ``y[r, j] = x[r, j mod K] + silu((x[r] @ w[a] + b[a])[j])``
  (the Medusa V2 ResBlock of M // K fused heads). Rows need not be sorted by
  adapter and segments may be empty; only the weights of adapters that own at
  least one row are read by the Pallas backends. Accumulation is float32.

  Args:
    x: [N, K] floating.
    w: [A, K, M] floating (cast to ``x.dtype`` for the product).
    b: [A, M] floating, or None.
    s_start: [S] integer, first row of each segment.
    s_end: [S] integer, one past the last row (``s_end <= s_start``: empty).
    seg_weight: [S] integer, the adapter (index into ``w``) of each segment.
    backend: auto | reference | ragged_dot | pallas_gpu | pallas_tpu.
    epilogue: none | resblock (requires M % K == 0).
    interpret: run Pallas kernels in the interpreter; None = unless the
      default backend is the kernel's platform (GPU for pallas_gpu, TPU for
      pallas_tpu).
    block_sizes: the backend's ``BlockSizes`` (pallas backends), None = heuristic.

  Returns:
    [N, M] in ``x.dtype``.

  Raises:
    SegmentError: unknown backend or epilogue; wrong ranks, shapes or dtypes;
      with concrete segment arrays, bounds outside [0, N], ``seg_weight``
      outside [0, A), or overlapping non-empty segments.
  """
  backend = Backend.parse(backend).resolve()
  resblock = Epilogue.parse(epilogue) is Epilogue.RESBLOCK
  s_start, s_end, seg_weight = (jnp.asarray(v) if not isinstance(v, jax.Array) else v
                                for v in (s_start, s_end, seg_weight))
  _check_shapes(x, w, b, s_start, s_end, seg_weight, resblock)
  _check_layout_on_host(x.shape[0], w.shape[0], s_start, s_end, seg_weight)
  n_rows, m = x.shape[0], w.shape[2]
  if n_rows == 0 or s_start.shape[0] == 0:
    return jnp.zeros((n_rows, m), x.dtype)
  if backend is Backend.REFERENCE:
    return segmented_matmul_reference(x, w, b, s_start, s_end, seg_weight, resblock=resblock)
  if backend is Backend.RAGGED_DOT:
    return segmented_matmul_ragged_dot(x, w, b, s_start, s_end, seg_weight, resblock=resblock)
  if backend is Backend.PALLAS_GPU:
    sizes = block_sizes or gpu.BlockSizes.for_shape(n_rows, w.shape[0], x.shape[1], m)
    if interpret is None:
      interpret = _compat.default_interpret("gpu")
    return gpu.segmented_matmul_gpu(x, w, b, s_start, s_end, seg_weight, resblock=resblock,
                                    block_sizes=sizes, interpret=bool(interpret))
  sizes = block_sizes or tpu.BlockSizes.for_shape(n_rows, w.shape[0], x.shape[1], m)
  if interpret is None:
    interpret = _compat.default_interpret("tpu")
  return tpu.segmented_matmul_tpu(x, w, b, s_start, s_end, seg_weight, resblock=resblock,
                                  block_sizes=sizes, interpret=bool(interpret))


def _check_shapes(x, w, b, s_start, s_end, seg_weight, resblock: bool) -> None:
  if x.ndim != 2:
    raise SegmentShapeError(f"x: expected [N, K], got shape {x.shape}")
  if w.ndim != 3:
    raise SegmentShapeError(f"w: expected [A, K, M], got shape {w.shape}")
  n_rows, k = x.shape
  num_adapters, kw, m = w.shape
  if kw != k:
    raise SegmentShapeError(f"w: expected [A, {k}, M] to match x [N, {k}], got {w.shape}")
  if num_adapters < 1:
    raise SegmentShapeError(f"w: expected at least one adapter, got shape {w.shape}")
  for name, arr in (("x", x), ("w", w)) + ((("b", b),) if b is not None else ()):
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise SegmentShapeError(f"{name}.dtype: expected a floating dtype, got {arr.dtype}")
  if b is not None and tuple(b.shape) != (num_adapters, m):
    raise SegmentShapeError(f"b: expected [{num_adapters}, {m}], got {tuple(b.shape)}")
  segs = (("s_start", s_start), ("s_end", s_end), ("seg_weight", seg_weight))
  for name, arr in segs:
    if arr.ndim != 1:
      raise SegmentShapeError(f"{name}: expected [S], got shape {arr.shape}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
      raise SegmentShapeError(f"{name}.dtype: expected an integer dtype, got {arr.dtype}")
  if not (s_start.shape == s_end.shape == seg_weight.shape):
    raise SegmentShapeError(
        f"s_start, s_end, seg_weight: expected one shape [S], got {s_start.shape},"
        f" {s_end.shape}, {seg_weight.shape}")
  if resblock and (k == 0 or m % k):
    raise SegmentShapeError(f"epilogue=resblock: expected M % K == 0, got M={m}, K={k}")


def _is_concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_layout_on_host(n_rows: int, num_adapters: int, s_start, s_end, seg_weight) -> None:
  if not _is_concrete(s_start, s_end, seg_weight):
    return
  start, end, weight = (np.asarray(v).astype(np.int64) for v in (s_start, s_end, seg_weight))
  nonempty = end > start
  for name, arr in (("s_start", start), ("s_end", end)):
    bad = np.flatnonzero(nonempty & ((arr < 0) | (arr > n_rows)))
    if bad.size:
      s = int(bad[0])
      raise SegmentLayoutError(f"{name}[{s}]={int(arr[s])}: expected a row bound in [0, {n_rows}]")
  bad = np.flatnonzero(nonempty & ((weight < 0) | (weight >= num_adapters)))
  if bad.size:
    s = int(bad[0])
    raise SegmentLayoutError(
        f"seg_weight[{s}]={int(weight[s])}: expected an adapter index in [0, {num_adapters})")
  idx = np.flatnonzero(nonempty)
  idx = idx[np.argsort(start[idx], kind="stable")]
  for prev, nxt in zip(idx[:-1], idx[1:]):
    if start[nxt] < end[prev]:
      raise SegmentLayoutError(
          f"segments {int(prev)} [{int(start[prev])}, {int(end[prev])}) and {int(nxt)}"
          f" [{int(start[nxt])}, {int(end[nxt])}) overlap; expected disjoint row ranges")
