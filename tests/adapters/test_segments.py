"""Segments: LoRAX's test vectors, device routing, MedusaSegments through MedusaV2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import SegmentError
from medusa_jax.heads import MedusaModel
from medusa_jax.pallas import segmented_matmul
from medusa_jax.segments import (MedusaSegments, SegmentConcatBuilder, find_segments,
                                 route_rows, row_segments, slot_of_rows)


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


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(-1, 4), min_size=1, max_size=12), seed=st.integers(0, 2**31))
def test_route_rows_sorts_stably_and_matches_per_row(ids, seed):
  num_adapters = 4  # id 4 and -1 are out of range: those rows belong to no segment
  padded = ids + [0] * (12 - len(ids))  # one shape bucket, jit compiles once
  routing = jax.jit(route_rows, static_argnums=1)(jnp.asarray(padded), num_adapters)
  perm = np.asarray(routing.perm)
  keys = np.where((np.array(padded) >= 0) & (np.array(padded) < num_adapters), padded, 4)
  np.testing.assert_array_equal(perm, np.argsort(keys, kind="stable"))
  for a in range(num_adapters):
    rows = perm[int(routing.s_start[a]):int(routing.s_end[a])]
    assert all(padded[r] == a for r in rows) and len(rows) == padded.count(a)
  np.testing.assert_array_equal(np.asarray(routing.seg_weight), np.arange(num_adapters))
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((12, 8)).astype(np.float32)
  w = rng.standard_normal((num_adapters, 8, 8)).astype(np.float32)
  y_sorted = segmented_matmul(jnp.asarray(x)[routing.perm], jnp.asarray(w), None,
                              routing.s_start, routing.s_end, routing.seg_weight,
                              backend="ragged_dot")
  y = np.zeros_like(np.asarray(y_sorted)).copy()
  y[perm] = np.asarray(y_sorted)
  for r, a in enumerate(padded):
    want = x[r].astype(np.float64) @ w[a] if 0 <= a < num_adapters else np.zeros(8)
    np.testing.assert_allclose(y[r], want, rtol=1e-5, atol=1e-5)


def test_row_segments_and_slots():
  s0, s1, s2 = row_segments(jnp.array([3, 0, 2]))
  assert s0.tolist() == [0, 1, 2] and s1.tolist() == [1, 2, 3] and s2.tolist() == [3, 0, 2]
  table = jnp.array([0, 0, 2, 1], jnp.int32)  # id 1 has no weights -> default slot 0
  assert slot_of_rows(jnp.array([3, 1, 2, 9, -1, 0]), table).tolist() == [1, 0, 2, 0, 0, 0]


def _v2_model(seed: int, hidden: int, n: int) -> MedusaModel:
  cfg = MedusaConfig(base_model_name_or_path="base", medusa_num_heads=n, medusa_num_layers=1,
                     version=2.0)
  model = MedusaModel(cfg, hidden, rngs=nnx.Rngs(params=seed))
  rng = np.random.default_rng(seed)
  model.medusa.kernel.set_value(jnp.asarray(rng.standard_normal((hidden, n * hidden)) * 0.3,
                                            jnp.float32))
  model.medusa.bias.set_value(jnp.asarray(rng.standard_normal((n * hidden,)), jnp.float32))
  return model


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_medusa_segments_route_v2_heads_per_row(backend):
  hidden, n = 8, 3
  models = [_v2_model(s, hidden, n) for s in (11, 12, 13)]
  w = jnp.stack([m.medusa.kernel[...] for m in models])
  b = jnp.stack([m.medusa.bias[...] for m in models])
  row_slot = jnp.array([2, 0, 0, 1, 2], jnp.int32)
  segs = MedusaSegments.for_rows(w, b, row_slot, backend=backend)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, hidden)), jnp.float32)
  got = jax.jit(lambda s, x: models[0].medusa.heads_hidden(x, s))(segs, x)
  for r, slot in enumerate(row_slot.tolist()):
    xr = np.asarray(x[r], np.float64)
    y = xr @ np.asarray(w[slot], np.float64) + np.asarray(b[slot], np.float64)
    want = np.tile(xr, n) + y / (1 + np.exp(-y))
    np.testing.assert_allclose(np.asarray(got[r]).reshape(-1), want, rtol=1e-5, atol=1e-5)
