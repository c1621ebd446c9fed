"""Segments: which rows of a batch use which adapter.

Host side (LoRAX's bookkeeping, same results on the same inputs):
  * :func:`find_segments` turns per-row adapter ids into run boundaries;
  * :class:`SegmentConcatBuilder` concatenates the segments of batches.

Device side (static shapes, usable inside ``jax.jit``):
  * :func:`route_rows` sorts rows by adapter and gives one segment per
    adapter (empty ones included) and the permutation;
  * :func:`row_segments` gives one single-row segment per row, in place: the
    segmented-matmul kernels route rows themselves, so no permutation of the
    activations is needed;
  * :class:`MedusaSegments` carries stacked fused V2 weights and a layout into
    ``MedusaV2.heads_hidden`` (the ``HeadSegments`` protocol of heads.py).

Routing is always per row. (LoRAX routes prefill rows by prompt-token
segments, which assigns wrong heads to rows of a mixed batch; a row here
carries its own adapter id whatever the phase.)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.errors import SegmentError

Array = jax.Array


def find_segments(adapter_indices: Sequence[int] | np.ndarray | Array
                  ) -> tuple[list[int], list[int]]:
  """Run-length boundaries of per-row adapter ids (host side).

  ``[0, 0, 1, 1, 1, 0]`` -> ``([0, 2, 5, 6], [0, 1, 0])``: run k covers rows
  ``segments[k]:segments[k+1]`` and uses adapter ``segment_indices[k]``.

  Args:
    adapter_indices: [N] integer ids (list, NumPy or a concrete jax array).

  Returns:
    ``(segments [S + 1], segment_indices [S])`` as Python lists.

  Raises:
    SegmentError: the ids are not a 1-D integer sequence.
  """
  ids = np.asarray(adapter_indices)
  if ids.ndim != 1:
    raise SegmentError(f"adapter_indices: expected [N], got shape {ids.shape}")
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise SegmentError(f"adapter_indices.dtype: expected integers, got {ids.dtype}")
  if ids.size == 0:
    return [0], []
  starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
  segments = [int(s) for s in starts] + [int(ids.size)]
  return segments, [int(ids[s]) for s in starts]


class SegmentConcatBuilder:
  """Concatenates the segments of several batches, merging touching runs.

  For every batch after the first, the leading 0 is dropped and boundaries
  are offset by the previous batch's end; when the previous batch ends with
  the adapter this one starts with, the two runs merge.
  """

  def __init__(self):
    self._boundaries: list[int] = []
    self._indices: list[int] = []

  def concat(self, adapter_segments: Sequence[int] | np.ndarray | Array,
             segment_indices: Sequence[int]) -> "SegmentConcatBuilder":
    """Appends one batch's ``(segments [S + 1], segment_indices [S])``."""
    segments = [int(s) for s in np.asarray(adapter_segments).reshape(-1)]
    indices = [int(i) for i in segment_indices]
    if not segments or len(segments) != len(indices) + 1:
      raise SegmentError(f"adapter_segments: expected {len(indices) + 1} boundaries for"
                         f" {len(indices)} segment indices, got {len(segments)}")
    if not self._boundaries:
      self._boundaries, self._indices = segments, indices
      return self
    offset = self._boundaries[-1]
    shifted = [s + offset for s in segments[1:]]
    if self._indices and indices and self._indices[-1] == indices[0]:
      self._boundaries.pop()
      indices = indices[1:]
    self._boundaries.extend(shifted)
    self._indices.extend(indices)
    return self

  def build(self) -> tuple[np.ndarray, list[int]]:
    """``(segments [S + 1] int32, segment_indices [S])`` of everything concatenated."""
    return np.asarray(self._boundaries or [0], np.int32), list(self._indices)


class RowRouting(NamedTuple):
  """Rows sorted by adapter, one (possibly empty) segment per adapter.

  Attributes:
    perm: [N] int32; sorted row i is original row ``perm[i]`` (stable).
    s_start, s_end: [A] int32 bounds of adapter a's rows in sorted order.
    seg_weight: [A] int32, ``arange(A)``.
  """
  perm: Array
  s_start: Array
  s_end: Array
  seg_weight: Array


def route_rows(row_adapter: Array, num_adapters: int) -> RowRouting:
  """Sorts rows by adapter: static shapes, jit-safe.

  Rows whose id lies outside ``[0, A)`` sort last and belong to no segment
  (their output is zero).

  Args:
    row_adapter: [N] integer adapter id per row.
    num_adapters: A.

  Returns:
    A :class:`RowRouting`; ``x[perm]`` has adapter a's rows at
    ``s_start[a]:s_end[a]``.
  """
  row_adapter = jnp.asarray(row_adapter).astype(jnp.int32)
  valid_N = (row_adapter >= 0) & (row_adapter < num_adapters)
  key_N = jnp.where(valid_N, row_adapter, num_adapters)
  perm = jnp.argsort(key_N, stable=True).astype(jnp.int32)
  adapters_A = jnp.arange(num_adapters, dtype=jnp.int32)
  counts_A = jnp.sum((key_N[:, None] == adapters_A[None, :]).astype(jnp.int32), axis=0)
  s_end = jnp.cumsum(counts_A).astype(jnp.int32)
  return RowRouting(perm=perm, s_start=s_end - counts_A, s_end=s_end, seg_weight=adapters_A)


def row_segments(row_adapter: Array) -> tuple[Array, Array, Array]:
  """One single-row segment per row, rows left in place.

  Args:
    row_adapter: [N] integer adapter id per row.

  Returns:
    ``(s_start, s_end, seg_weight)``, each [N] int32: row r is segment r.
  """
  row_adapter = jnp.asarray(row_adapter).astype(jnp.int32)
  rows_N = jnp.arange(row_adapter.shape[0], dtype=jnp.int32)
  return rows_N, rows_N + 1, row_adapter


def slot_of_rows(adapter_indices: Array, slot_table: Array) -> Array:
  """Maps adapter ids to weight slots; ids outside the table go to slot 0.

  Args:
    adapter_indices: [N] integer adapter id per row.
    slot_table: [I] int32; ``slot_table[id]`` is the weight slot of adapter
      ``id`` (0, the default, for an adapter without weights of its own).

  Returns:
    [N] int32 slots.
  """
  ids_N = jnp.asarray(adapter_indices).astype(jnp.int32)
  inside_N = (ids_N >= 0) & (ids_N < slot_table.shape[0])
  return jnp.where(inside_N, slot_table[jnp.clip(ids_N, 0, slot_table.shape[0] - 1)], 0)


@flax.struct.dataclass
class MedusaSegments:
  """Stacked fused V2 weights and the per-row layout (``HeadSegments`` in heads.py).

  Attributes:
    w: [A, H, n*H] fused weights; slot 0 is the default adapter.
    b: [A, n*H] fused biases.
    s_start, s_end, seg_weight: [S] int32 segment layout (see ``segmented_matmul``).
    backend: the segmented-matmul backend (static).
  """
  w: Array
  b: Array
  s_start: Array
  s_end: Array
  seg_weight: Array
  backend: Any = flax.struct.field(pytree_node=False, default="auto")

  @classmethod
  def for_rows(cls, w: Array, b: Array, row_slot: Array, *, backend: Any = "auto"
               ) -> "MedusaSegments":
    """One segment per row: row r uses slot ``row_slot[r]`` ([N] int32)."""
    s_start, s_end, seg_weight = row_segments(row_slot)
    return cls(w=w, b=b, s_start=s_start, s_end=s_end, seg_weight=seg_weight, backend=backend)
