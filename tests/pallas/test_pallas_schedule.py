"""The tile schedule: its documented invariants, and both builders agree."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_jax.pallas._schedule import build_schedule, build_schedule_pairwise, max_tiles


@functools.lru_cache(maxsize=None)
def _builders(num_adapters, block_m, with_null):
  return tuple(jax.jit(functools.partial(f, num_adapters=num_adapters, block_m=block_m,
                                         with_null=with_null))
               for f in (build_schedule, build_schedule_pairwise))


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 3), min_size=1, max_size=20), block_m=st.sampled_from([1, 4]),
       with_null=st.booleans())
def test_schedule_invariants_and_builders_agree(ids, block_m, with_null):
  num_adapters = 3  # id 3 == A: a row in no segment
  ids = ids + [3] * (20 - len(ids))  # one shape bucket
  row_adapter = jnp.asarray(ids, jnp.int32)
  cumsum, pairwise = (f(row_adapter) for f in _builders(num_adapters, block_m, with_null))
  for field in cumsum._fields:
    np.testing.assert_array_equal(np.asarray(getattr(cumsum, field)),
                                  np.asarray(getattr(pairwise, field)), err_msg=field)
  groups = num_adapters + 1 if with_null else num_adapters
  n_tiles = max_tiles(len(ids), groups, block_m)
  tile_adapter = np.asarray(cumsum.tile_adapter)
  tile_rows = np.asarray(cumsum.tile_rows).reshape(n_tiles, block_m)
  num_tiles = int(cumsum.num_tiles)
  want_tiles = sum(-(-ids.count(g) // block_m) for g in range(groups))
  assert num_tiles == want_tiles <= n_tiles
  assert (tile_adapter[num_tiles:] == num_adapters + 1).all()  # padding tiles
  assert (np.diff(tile_adapter[:num_tiles]) >= 0).all()  # groups ascending, contiguous
  seen = []
  for t in range(num_tiles):
    rows = tile_rows[t][tile_rows[t] >= 0]
    assert len(rows) and all(ids[r] == tile_adapter[t] for r in rows)
    assert (np.diff(rows) > 0).all()  # stable order inside a group
    seen.extend(rows.tolist())
  scheduled = [r for r, a in enumerate(ids) if a < groups]
  assert sorted(seen) == scheduled  # every scheduled row exactly once
  slot = np.asarray(cumsum.row_slot)
  for r in range(len(ids)):
    if r in scheduled:
      assert tile_rows.reshape(-1)[slot[r]] == r
    else:
      assert slot[r] == -1
