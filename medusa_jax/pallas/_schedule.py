"""Row routing and tile schedule shared by the segmented-matmul backends.

Pure jnp with static shapes, so it runs inside ``jax.jit`` on any platform.
The segment description ``(s_start, s_end, seg_weight)`` becomes

1. ``row_adapter [N]``: the adapter each row uses, or ``A`` (the "null"
   group) for a row in no segment;
2. a padded, adapter-sorted layout of the rows in tiles of ``block_m`` rows:
   each adapter's rows fill whole tiles of their own, so a kernel that walks
   the tiles reads an adapter's weight tile once per ``block_m`` rows of that
   adapter, and never reads the weights of an adapter with no rows.

Rows need not be sorted on entry: the layout is the stable sort of the rows
by adapter, built from a one-hot cumulative sum (no sort kernel).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Schedule(NamedTuple):
  """The padded, adapter-sorted tile layout of the rows.

  Invariants (G = A + 1 groups when ``with_null`` else A; T = ``max_tiles``):
    * tile t < num_tiles holds rows of exactly one group ``tile_adapter[t]``;
      tiles of one group are consecutive and groups come in ascending order;
    * ``tile_adapter[t] == A`` marks a null tile (rows in no segment; their
      output is zero) and ``tile_adapter[t] == A + 1`` a padding tile
      (t >= num_tiles), which a kernel skips;
    * ``tile_rows[t * block_m + i]`` is the i-th row of tile t or -1 (empty
      slot); every scheduled row appears exactly once;
    * ``row_slot[r]`` is the position of row r in ``tile_rows`` (-1 when the
      row is not scheduled: a null row without ``with_null``).

  Attributes:
    row_adapter: [N] int32 adapter per row, A for rows in no segment.
    tile_adapter: [T] int32.
    tile_rows: [T * block_m] int32.
    row_slot: [N] int32.
    num_tiles: [] int32 number of non-padding tiles.
  """
  row_adapter: Array
  tile_adapter: Array
  tile_rows: Array
  row_slot: Array
  num_tiles: Array


def row_adapters(n_rows: int, s_start: Array, s_end: Array, seg_weight: Array,
                 num_adapters: int) -> Array:
  """The adapter of each row, ``num_adapters`` for a row in no segment.

  Inside jit nothing can raise, so bad layouts are given a meaning: a segment
  whose ``seg_weight`` is outside ``[0, A)`` is ignored (its rows come out
  zero), bounds outside ``[0, N]`` are clamped, ``s_end <= s_start`` is empty,
  and where segments overlap the one listed first wins.

  Args:
    n_rows: N.
    s_start, s_end, seg_weight: [S] integer.
    num_adapters: A.

  Returns:
    [N] int32 in ``[0, A]``.
  """
  rows_N = jnp.arange(n_rows, dtype=jnp.int32)
  if s_start.shape[0] == 0 or n_rows == 0:
    return jnp.full((n_rows,), num_adapters, jnp.int32)
  s_start = s_start.astype(jnp.int32)
  s_end = s_end.astype(jnp.int32)
  seg_weight = seg_weight.astype(jnp.int32)
  usable_S = (seg_weight >= 0) & (seg_weight < num_adapters)
  in_seg_SxN = ((rows_N[None, :] >= s_start[:, None]) & (rows_N[None, :] < s_end[:, None])
                & usable_S[:, None])
  first_N = jnp.argmax(in_seg_SxN, axis=0)
  covered_N = jnp.any(in_seg_SxN, axis=0)
  return jnp.where(covered_N, seg_weight[first_N], num_adapters).astype(jnp.int32)


def max_tiles(n_rows: int, num_groups: int, block_m: int) -> int:
  """Static bound on the number of tiles: sum_g ceil(c_g / bm) <= N//bm + min(G, N), and <= N."""
  return min(n_rows, n_rows // block_m + min(num_groups, n_rows))


def build_schedule(row_adapter: Array, num_adapters: int, block_m: int, *,
                   with_null: bool) -> Schedule:
  """Lays the rows out in adapter-sorted tiles of ``block_m`` rows.

  Steps: (1) one-hot of the row's group and its running count give each row
  its rank inside its group (stable); (2) each group gets ``ceil(count/bm)``
  tiles, starting at the exclusive cumsum of the tile counts; (3) a row goes to
  slot ``tile_begin[g] * bm + rank``; (4) tile t belongs to the group whose
  tile range contains it.

  Args:
    row_adapter: [N] int32 in ``[0, A]`` (A = no segment).
    num_adapters: A.
    block_m: rows per tile.
    with_null: schedule the rows in no segment as null tiles (a kernel then
      writes their zeros itself); otherwise they are left out.

  Returns:
    A :class:`Schedule` with ``max_tiles(N, G, block_m)`` tiles.
  """
  n_rows = row_adapter.shape[0]
  num_groups = num_adapters + 1 if with_null else num_adapters
  n_tiles = max_tiles(n_rows, num_groups, block_m)
  groups_G = jnp.arange(num_groups, dtype=jnp.int32)
  onehot_NxG = (row_adapter[:, None] == groups_G[None, :]).astype(jnp.int32)
  counts_G = jnp.sum(onehot_NxG, axis=0)
  rank_N = jnp.sum(jnp.cumsum(onehot_NxG, axis=0) * onehot_NxG, axis=1) - 1
  tiles_G = (counts_G + block_m - 1) // block_m
  tile_end_G = jnp.cumsum(tiles_G)
  tile_begin_G = tile_end_G - tiles_G
  num_tiles = tile_end_G[-1] if num_groups else jnp.int32(0)
  scheduled_N = row_adapter < num_groups
  group_N = jnp.minimum(row_adapter, num_groups - 1)
  row_slot = jnp.where(scheduled_N, tile_begin_G[group_N] * block_m + rank_N, -1)
  # Unscheduled rows scatter out of bounds and are dropped.
  target_N = jnp.where(scheduled_N, row_slot, n_tiles * block_m)
  tile_rows = jnp.full((n_tiles * block_m,), -1, jnp.int32).at[target_N].set(
      jnp.arange(n_rows, dtype=jnp.int32), mode="drop")
  t_T = jnp.arange(n_tiles, dtype=jnp.int32)
  tile_group_T = jnp.sum((tile_end_G[None, :] <= t_T[:, None]).astype(jnp.int32), axis=1)
  tile_adapter = jnp.where(t_T < num_tiles, tile_group_T, num_adapters + 1).astype(jnp.int32)
  return Schedule(row_adapter=row_adapter, tile_adapter=tile_adapter, tile_rows=tile_rows,
                  row_slot=row_slot.astype(jnp.int32), num_tiles=num_tiles.astype(jnp.int32))


def build_schedule_pairwise(row_adapter: Array, num_adapters: int, block_m: int, *,
                            with_null: bool) -> Schedule:
  """Same result as :func:`build_schedule`, from pairwise comparisons.

  Ranks come from an [N, N] "same group, earlier row" count and slots are
  filled by matching [slots, N] instead of a scatter: O(N^2) work but no
  cumulative sums or scatters, so XLA fuses it into a few kernels. At decode
  sizes (N <= a few hundred) launch count, not work, is what costs.
  """
  n_rows = row_adapter.shape[0]
  num_groups = num_adapters + 1 if with_null else num_adapters
  n_tiles = max_tiles(n_rows, num_groups, block_m)
  rows_N = jnp.arange(n_rows, dtype=jnp.int32)
  groups_G = jnp.arange(num_groups, dtype=jnp.int32)
  same_NxN = row_adapter[:, None] == row_adapter[None, :]
  rank_N = jnp.sum((same_NxN & (rows_N[None, :] < rows_N[:, None])).astype(jnp.int32), axis=1)
  counts_G = jnp.sum((row_adapter[:, None] == groups_G[None, :]).astype(jnp.int32), axis=0)
  tiles_G = (counts_G + block_m - 1) // block_m
  before_GxG = groups_G[None, :] < groups_G[:, None]
  tile_begin_G = jnp.sum(jnp.where(before_GxG, tiles_G[None, :], 0), axis=1)
  tile_end_G = tile_begin_G + tiles_G
  num_tiles = jnp.sum(tiles_G)
  scheduled_N = row_adapter < num_groups
  group_N = jnp.minimum(row_adapter, num_groups - 1)
  row_slot = jnp.where(scheduled_N, tile_begin_G[group_N] * block_m + rank_N, -1)
  slots_P = jnp.arange(n_tiles * block_m, dtype=jnp.int32)
  match_PxN = slots_P[:, None] == row_slot[None, :]
  tile_rows = jnp.where(jnp.any(match_PxN, axis=1),
                        jnp.argmax(match_PxN, axis=1).astype(jnp.int32), -1)
  t_T = jnp.arange(n_tiles, dtype=jnp.int32)
  tile_group_T = jnp.sum((tile_end_G[None, :] <= t_T[:, None]).astype(jnp.int32), axis=1)
  tile_adapter = jnp.where(t_T < num_tiles, tile_group_T, num_adapters + 1).astype(jnp.int32)
  return Schedule(row_adapter=row_adapter, tile_adapter=tile_adapter, tile_rows=tile_rows,
                  row_slot=row_slot.astype(jnp.int32), num_tiles=num_tiles.astype(jnp.int32))
