"""Segmented matmul on GPU: a Pallas kernel on the Triton backend.

Decode-sized segmented matmuls are bound by reading weights, so the kernel is
built to read each active adapter's weights once and nothing else:

* the rows are laid out (by :mod:`medusa_jax.pallas._schedule`, on device) in
  tiles of ``block_m`` rows, each tile holding rows of one adapter only;
* the grid is ``(tiles, M // block_n)``, tiles fastest, so the tiles of one
  adapter that share a weight tile run side by side and share it through L2;
* a program gathers its rows of ``x`` straight from the unsorted input
  (``x_ref[rows, k-slice]``), streams ``W[a, :, n-tile]`` through a
  software-pipelined K loop with f32 accumulation, applies the bias and the
  optional ResBlock epilogue, and scatters the result rows back; no sort or
  unsort pass over the activations is needed;
* a tile of rows in no segment stores zeros without touching any weight, and
  padding tiles (past the dynamic tile count) exit at once.

The Triton backend is chosen because the same kernel runs compiled on the
H100 (JAX 0.11, where that backend is deprecated but works) and under plain
``interpret=True`` on CPU, where the tests run it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medusa_jax.errors import SegmentError
from medusa_jax.pallas import _compat
from medusa_jax.pallas._schedule import build_schedule, build_schedule_pairwise, row_adapters

Array = jax.Array


def _validate_args(x: Array, w: Array, block_sizes: "BlockSizes") -> None:
  for name in ("block_m", "block_n", "block_k"):
    size = getattr(block_sizes, name)
    if size < 16 or size & (size - 1):
      raise SegmentError(f"{name}={size}: the Triton kernel needs a power of two >= 16")
  if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise SegmentError(f"x.dtype={x.dtype}: pallas_gpu supports float32, bfloat16, float16")
  if w.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise SegmentError(f"w.dtype={w.dtype}: pallas_gpu supports float32, bfloat16, float16")


# The tile schedule is the pure-jnp builder shared with the TPU kernel:
# medusa_jax.pallas._schedule.build_schedule (its invariants are documented there).


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Tile sizes and Triton launch knobs (all powers of two; block dims >= 16).

  Attributes:
    block_m: rows per tile (tensor-core minimum 16); an adapter with c rows
      reads its weights ceil(c / block_m) times (the later reads hit L2).
    block_n: output columns per program.
    block_k: contraction slice per pipelined step.
    num_warps: warps per program.
    num_stages: software-pipelining depth of the K loop.
    pairwise_schedule: build the tile schedule from pairwise comparisons
      (fewer XLA kernels) rather than cumulative sums and a scatter.
  """
  block_m: int = 16
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 4
  pairwise_schedule: bool = True

  @classmethod
  def for_shape(cls, n_rows: int, num_adapters: int, k: int, m: int) -> "BlockSizes":
    """Heuristic from H100/H200 sweeps (docs/perf_segmented_matmul.md).

    The kernel is bound by weight reads: padding rows cost nothing, while
    splitting one adapter's rows over several tiles re-reads its weights. So
    block_m is the next power of two of N in [16, 64]; from N = 256 on, 128
    rows with 8 warps (256 rows on one adapter: 93 us vs 116 us at 64 rows).
    """
    del num_adapters, k, m
    if n_rows >= 256:
      return cls(block_m=128, num_warps=8, num_stages=3)
    return cls(block_m=min(64, max(16, 1 << max(0, (n_rows - 1).bit_length()))))


def _pow2_at_most(value: int, cap: int) -> int:
  return max(16, min(cap, 1 << max(0, (value - 1).bit_length())))


@functools.partial(jax.jit, static_argnames=("resblock", "block_sizes", "interpret"))
def segmented_matmul_gpu(x: Array, w: Array, b: Array | None, s_start: Array, s_end: Array,
                         seg_weight: Array, *, resblock: bool, block_sizes: BlockSizes,
                         interpret: bool = False) -> Array:
  """Segmented matmul with a Pallas Triton kernel.

  Args:
    x: [N, K] float32/bfloat16/float16 (N >= 1).
    w: [A, K, M].
    b: [A, M] or None.
    s_start, s_end, seg_weight: [S] integer; see ``segmented_matmul``.
    resblock: fused ResBlock epilogue (M % K == 0).
    block_sizes: tiles; ``block_k``/``block_n`` larger than K/M are shrunk.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    [N, M] in ``x.dtype``; rows in no segment are zero.
  """
  _validate_args(x, w, block_sizes)
  n_rows, k = x.shape
  num_adapters, _, m = w.shape
  bm = block_sizes.block_m
  bn = min(block_sizes.block_n, _pow2_at_most(m, block_sizes.block_n))
  bk = min(block_sizes.block_k, _pow2_at_most(k, block_sizes.block_k))
  adapter_N = row_adapters(n_rows, s_start, s_end, seg_weight, num_adapters)
  builder = build_schedule_pairwise if block_sizes.pairwise_schedule else build_schedule
  sched = builder(adapter_N, num_adapters, bm, with_null=True)
  n_tiles = sched.tile_adapter.shape[0]
  grid = (n_tiles, pl.cdiv(m, bn))
  kernel = functools.partial(_kernel, num_adapters=num_adapters, k=k, m=m, bm=bm, bn=bn, bk=bk,
                             resblock=resblock, has_bias=b is not None)
  args = [sched.tile_adapter, sched.tile_rows, x, w] + ([b] if b is not None else [])
  itemsize = jnp.dtype(w.dtype).itemsize
  cost = _compat.cost_estimate(
      flops=2 * n_rows * k * m,
      bytes_accessed=num_adapters * k * m * itemsize + 2 * n_rows * (k + m) * x.dtype.itemsize,
      transcendentals=n_rows * m if resblock else 0)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_rows, m), x.dtype),
      grid=grid,
      interpret=interpret,
      name="segmented_matmul_gpu",
      compiler_params=_compat.triton_compiler_params(block_sizes.num_warps,
                                                     block_sizes.num_stages),
      cost_estimate=cost,
  )(*args)


def _kernel(tile_adapter_ref, tile_rows_ref, x_ref, w_ref, *rest, num_adapters, k, m, bm, bn,
            bk, resblock, has_bias):
  """One (tile, column-block) program; see the module docstring.

  Every access is written with index arrays (``start + iota``), which the
  Triton lowering turns into the same pointer arithmetic as a slice, and which
  the interpreter supports alongside the row gather.
  """
  if has_bias:
    b_ref, o_ref = rest
  else:
    (o_ref,) = rest
  t = pl.program_id(0)
  j = pl.program_id(1)
  adapter = tile_adapter_ref[t]
  rows_R = tile_rows_ref[pl.ds(t * bm, bm)]
  row_ok_R = rows_R >= 0
  # Empty slots point past the last row: a masked access never touches them,
  # and the interpreter's scatter drops them instead of racing on row 0.
  safe_rows_R = jnp.where(row_ok_R, rows_R, x_ref.shape[0])
  cols_C, col_ok_C = _span(j * bn, bn, m)
  store_mask_RxC = _mask2(row_ok_R, col_ok_C, (bm, bn))
  out_view = o_ref.at[safe_rows_R[:, None], cols_C[None, :]]

  @pl.when(adapter < num_adapters)
  def _compute():
    def k_step(kk, acc_RxC):
      ks_K, k_ok_K = _span(kk * bk, bk, k)
      x_RxK = _compat.triton_load(x_ref.at[safe_rows_R[:, None], ks_K[None, :]],
                                  mask=_mask2(row_ok_R, k_ok_K, (bm, bk)), other=0)
      w_mask = _mask2(k_ok_K, col_ok_C, (bk, bn))
      w_KxC = _compat.triton_load(w_ref.at[adapter, ks_K[:, None], cols_C[None, :]],
                                  mask=w_mask, other=None if w_mask is None else 0)
      return acc_RxC + jnp.dot(x_RxK, w_KxC.astype(x_RxK.dtype),
                               preferred_element_type=jnp.float32)

    acc_RxC = jax.lax.fori_loop(0, pl.cdiv(k, bk), k_step, jnp.zeros((bm, bn), jnp.float32))
    if has_bias:
      bias_C = _compat.triton_load(b_ref.at[adapter, cols_C], mask=col_ok_C,
                                   other=None if col_ok_C is None else 0)
      acc_RxC = acc_RxC + bias_C.astype(jnp.float32)[None, :]
    if resblock:
      res_cols_C = jax.lax.rem(cols_C, k)
      x_res = _compat.triton_load(x_ref.at[safe_rows_R[:, None], res_cols_C[None, :]],
                                  mask=store_mask_RxC, other=0)
      acc_RxC = x_res.astype(jnp.float32) + jax.nn.silu(acc_RxC)
    _compat.triton_store(out_view, acc_RxC.astype(o_ref.dtype), mask=store_mask_RxC)

  @pl.when(adapter == num_adapters)
  def _zero_rows():
    _compat.triton_store(out_view, jnp.zeros((bm, bn), o_ref.dtype), mask=store_mask_RxC)


def _span(start, size: int, limit: int):
  """Indices ``start + [0, size)`` into a dim of length ``limit``, and their
  mask (None when ``limit`` is a multiple of ``size``: no access overruns)."""
  idx = start + jax.lax.iota(jnp.int32, size)
  if limit % size == 0:
    return idx, None
  return idx, idx < limit


def _mask2(first_ok, second_ok, shape):
  """The [R, C] mask of a 2-D access, or None when nothing is masked."""
  if first_ok is None and second_ok is None:
    return None
  mask = jnp.ones(shape, jnp.bool_)
  if first_ok is not None:
    mask = mask & first_ok[:, None]
  if second_ok is not None:
    mask = mask & second_ok[None, :]
  return mask
