"""The truncated-JSON-array reader behind ShareGPT loading (files: tests/test_assets.py)."""

import json

import numpy as np
import pytest

from medusa_jax.assets.datasets import iter_json_array_objects
from medusa_jax.errors import DataFormatError, MedusaError


def test_iter_objects_stops_at_any_cut():
  rng = np.random.default_rng()
  objs = [{"k": int(v), "s": "x]" * int(v)} for v in rng.integers(0, 9, 12)]
  parts = [json.dumps(o) for o in objs]
  text = "[" + ", ".join(parts) + "]"
  ends, pos = [], 1
  for part in parts:  # index just past each element
    pos += len(part)
    ends.append(pos)
    pos += 2
  for cut in rng.integers(1, len(text), 30):
    got = list(iter_json_array_objects(text[:cut]))
    assert got == objs[:sum(e <= cut for e in ends)]
  assert list(iter_json_array_objects(text)) == objs


@pytest.mark.parametrize("text", ['{"id": 1}', "x [1]", ""])
def test_not_an_array_raises(text):
  with pytest.raises(DataFormatError, match="top-level array"):
    list(iter_json_array_objects(text))
  assert issubclass(DataFormatError, MedusaError)
