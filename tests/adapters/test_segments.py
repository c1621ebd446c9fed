"""Segments: LoRAX's host-side bookkeeping against LoRAX's test vectors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.adapters.segments import SegmentConcatBuilder, find_segments
from medusa_jax.errors import SegmentError


@pytest.mark.parametrize("ids,segments,indices", [
    ([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 1, 1], [0, 3, 5, 10, 12], [0, 1, 2, 1]),
    ([], [0], []),
    ([0], [0, 1], [0]),
    ([0, 0, 1, 1, 1, 0], [0, 2, 5, 6], [0, 1, 0]),
])
def test_find_segments_lorax_vectors(ids, segments, indices):
  assert find_segments(ids) == (segments, indices)
  assert find_segments(np.asarray(ids, np.int64)) == (segments, indices)
  if ids:
    assert find_segments(jnp.asarray(ids)) == (segments, indices)


def test_find_segments_errors():
  with pytest.raises(SegmentError, match=r"expected \[N\], got shape \(1, 2\)"):
    find_segments([[0, 1]])
  with pytest.raises(SegmentError, match="expected integers, got float"):
    find_segments([0.0, 1.0])


def test_segment_concat_builder_lorax_vector():
  builder = SegmentConcatBuilder()
  builder.concat([0, 1, 4, 7, 8], [2, 1, 2, 1])
  builder.concat([0, 2, 5], [1, 2])
  segments, indices = builder.build()
  assert segments.tolist() == [0, 1, 4, 7, 10, 13]
  assert indices == [2, 1, 2, 1, 2]


def test_segment_concat_builder_no_merge_and_errors():
  builder = SegmentConcatBuilder().concat(np.array([0, 3]), [1]).concat([0, 2], [0])
  segments, indices = builder.build()
  assert segments.tolist() == [0, 3, 5] and indices == [1, 0]
  segments, indices = SegmentConcatBuilder().build()
  assert segments.tolist() == [0] and indices == []
  with pytest.raises(SegmentError, match="expected 3 boundaries for 2 segment indices, got 2"):
    SegmentConcatBuilder().concat([0, 4], [1, 2])
