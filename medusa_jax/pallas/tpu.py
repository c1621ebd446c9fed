"""Segmented matmul on TPU: a megablox-style Pallas kernel.

**Tested in interpret mode only** (no TPU was available while it was
written): the tests run it with ``interpret=True`` on CPU.

The rows are gathered into the padded, adapter-sorted tile layout of
:mod:`medusa_jax.pallas._schedule` (each tile holds ``block_m`` rows of one
adapter). The tile -> adapter table and the tile count are scalar-prefetched
into SMEM, where the ``index_map``s read them, so the pipeline DMAs the weight
block ``W[adapter(t), k-block, n-block]`` of each tile and never the weights
of an adapter without rows. Grid: ``(M // block_n, tiles, K // block_k)`` with
the K axis innermost, accumulating in a float32 VMEM scratch. Tiles past the
dynamic tile count, and null tiles (rows in no segment, written as zeros),
keep the previous block indices so that they cost no weight DMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medusa_jax.errors import SegmentError
from medusa_jax.pallas import _compat
from medusa_jax.pallas._schedule import build_schedule, row_adapters

Array = jax.Array


def _validate_args(x: Array, w: Array, block_sizes: "BlockSizes") -> None:
  if block_sizes.block_m % 8:
    raise SegmentError(f"block_m={block_sizes.block_m}: expected a multiple of 8 (sublanes)")
  for name, arr in (("x", x), ("w", w)):
    if arr.dtype not in (jnp.float32, jnp.bfloat16):
      raise SegmentError(f"{name}.dtype={arr.dtype}: pallas_tpu supports float32 and bfloat16")


# Tile schedule: medusa_jax.pallas._schedule.build_schedule (pure jnp, shared
# with the GPU kernel; its invariants are documented there).


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Tile sizes. ``block_k``/``block_n`` are preferences: the entry point uses
  the largest of 512/256/128 (at most the preference) that divides the dim,
  else the whole dim, as TPU blocks must be lane-aligned or full.

  Attributes:
    block_m: rows per tile (multiple of 8).
    block_n: preferred output columns per block.
    block_k: preferred contraction block.
  """
  block_m: int = 16
  block_n: int = 512
  block_k: int = 512

  @classmethod
  def for_shape(cls, n_rows: int, num_adapters: int, k: int, m: int) -> "BlockSizes":
    del k, m
    per_adapter = max(1, n_rows // max(1, num_adapters))
    return cls(block_m=min(128, max(16, 1 << (per_adapter - 1).bit_length())))


def _lane_block(dim: int, preferred: int, *, divides: tuple[int, ...] = ()) -> int:
  for size in (512, 256, 128):
    if size <= preferred and dim % size == 0 and all(d % size == 0 for d in divides):
      return size
  return dim


@functools.partial(jax.jit, static_argnames=("resblock", "block_sizes", "interpret"))
def segmented_matmul_tpu(x: Array, w: Array, b: Array | None, s_start: Array, s_end: Array,
                         seg_weight: Array, *, resblock: bool, block_sizes: BlockSizes,
                         interpret: bool = False) -> Array:
  """Segmented matmul with a Pallas TPU kernel (interpret-tested only).

  Args:
    x: [N, K] float32/bfloat16 (N >= 1).
    w: [A, K, M].
    b: [A, M] or None.
    s_start, s_end, seg_weight: [S] integer; see ``segmented_matmul``.
    resblock: fused ResBlock epilogue (M % K == 0).
    block_sizes: tiles.
    interpret: run in the Pallas interpreter.

  Returns:
    [N, M] in ``x.dtype``; rows in no segment are zero.
  """
  _validate_args(x, w, block_sizes)
  n_rows, k = x.shape
  num_adapters, _, m = w.shape
  bm = block_sizes.block_m
  bk = _lane_block(k, block_sizes.block_k)
  if resblock:
    # The residual block x[:, (j * bn) mod K] must not wrap: bn divides K.
    bn = _lane_block(m, block_sizes.block_n, divides=(k,))
    bn = k if bn == m else bn
  else:
    bn = _lane_block(m, block_sizes.block_n)
  adapter_N = row_adapters(n_rows, s_start, s_end, seg_weight, num_adapters)
  sched = build_schedule(adapter_N, num_adapters, bm, with_null=True)
  n_tiles = sched.tile_adapter.shape[0]
  slot_ok = sched.tile_rows >= 0
  x_pad = jnp.where(slot_ok[:, None], x[jnp.maximum(sched.tile_rows, 0)], 0).astype(x.dtype)
  nk = pl.cdiv(k, bk)
  maps = _IndexMaps(num_adapters=num_adapters, nk=nk, k_over_bn=k // bn)
  in_specs = [pl.BlockSpec((bm, bk), maps.x), pl.BlockSpec((None, bk, bn), maps.w)]
  args = [x_pad, w]
  if b is not None:
    in_specs.append(pl.BlockSpec((None, 1, bn), maps.bias))
    args.append(b.reshape(num_adapters, 1, m))
  if resblock:
    in_specs.append(pl.BlockSpec((bm, bn), maps.residual))
    args.append(x_pad)
  kernel = functools.partial(_kernel, num_adapters=num_adapters, nk=nk,
                             has_bias=b is not None, resblock=resblock)
  itemsize = jnp.dtype(w.dtype).itemsize
  cost = _compat.cost_estimate(
      flops=2 * n_tiles * bm * k * m,
      bytes_accessed=num_adapters * k * m * itemsize + 2 * n_rows * (k + m) * x.dtype.itemsize,
      transcendentals=n_rows * m if resblock else 0)
  out_pad = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_tiles * bm, m), x.dtype),
      grid_spec=_compat.tpu_prefetch_grid_spec(
          num_scalar_prefetch=2, grid=(m // bn, n_tiles, nk), in_specs=in_specs,
          out_specs=pl.BlockSpec((bm, bn), maps.out),
          scratch_shapes=[_compat.tpu_vmem((bm, bn), jnp.float32)]),
      compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="segmented_matmul_tpu",
      cost_estimate=cost,
  )(sched.tile_adapter, sched.num_tiles.reshape(1), *args)
  return out_pad[sched.row_slot]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _IndexMaps:
  """Block index maps; grid (j, t, kk), then the two prefetched refs.

  A tile that computes nothing (null or padding) keeps the last K block and a
  valid adapter, so the pipeline sees no new input block and issues no DMA.
  """
  num_adapters: int
  nk: int
  k_over_bn: int

  def _active(self, t, tile_adapter_ref, num_tiles_ref):
    tile = jnp.minimum(t, num_tiles_ref[0] - 1)
    adapter = tile_adapter_ref[tile]
    computes = adapter < self.num_adapters
    return tile, jnp.minimum(adapter, self.num_adapters - 1), computes

  def x(self, j, t, kk, tile_adapter_ref, num_tiles_ref):
    del j
    tile, _, computes = self._active(t, tile_adapter_ref, num_tiles_ref)
    return tile, jnp.where(computes, kk, self.nk - 1)

  def w(self, j, t, kk, tile_adapter_ref, num_tiles_ref):
    _, adapter, computes = self._active(t, tile_adapter_ref, num_tiles_ref)
    return adapter, jnp.where(computes, kk, self.nk - 1), j

  def bias(self, j, t, kk, tile_adapter_ref, num_tiles_ref):
    del kk
    _, adapter, _ = self._active(t, tile_adapter_ref, num_tiles_ref)
    return adapter, 0, j

  def residual(self, j, t, kk, tile_adapter_ref, num_tiles_ref):
    del kk
    tile, _, _ = self._active(t, tile_adapter_ref, num_tiles_ref)
    return tile, jax.lax.rem(j, self.k_over_bn)

  def out(self, j, t, kk, tile_adapter_ref, num_tiles_ref):
    del kk, tile_adapter_ref, num_tiles_ref
    return t, j


def _kernel(tile_adapter_ref, num_tiles_ref, x_ref, w_ref, *rest, num_adapters, nk, has_bias,
            resblock):
  """One (n-block, tile, k-block) step; accumulates in ``acc_ref``."""
  rest = list(rest)
  b_ref = rest.pop(0) if has_bias else None
  xres_ref = rest.pop(0) if resblock else None
  o_ref, acc_ref = rest
  t = pl.program_id(1)
  kk = pl.program_id(2)
  adapter = tile_adapter_ref[t]
  computes = (t < num_tiles_ref[0]) & (adapter < num_adapters)

  @pl.when(kk == 0)
  def _zero():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(computes)
  def _accumulate():
    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...].astype(x_ref.dtype),
                            preferred_element_type=jnp.float32)

  @pl.when(kk == nk - 1)
  def _store():
    y = acc_ref[...]
    if has_bias:
      y = y + b_ref[...].astype(jnp.float32)
    if resblock:
      y = xres_ref[...].astype(jnp.float32) + jax.nn.silu(y)
    o_ref[...] = jnp.where(computes, y, 0.0).astype(o_ref.dtype)
