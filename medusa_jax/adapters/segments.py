"""Segments: LoRAX's host-side bookkeeping of which rows use which adapter.

Same results as LoRAX on the same inputs:
  * :func:`find_segments` turns per-row adapter ids into run boundaries;
  * :class:`SegmentConcatBuilder` concatenates the segments of batches.

On device, heads route every row by its own weight slot (``heads/routed.py``),
in prefill and decode alike, so no permutation of the activations is needed.
(LoRAX routes prefill rows by prompt-token segments, which assigns wrong heads
to rows of a mixed batch.)
"""

from __future__ import annotations

from typing import Sequence

import jax
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
