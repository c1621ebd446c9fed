"""Shared config checks: integer fields and JSON config files."""

import dataclasses

import pytest

from medusa_jax.errors import ConfigError
from medusa_jax._validate import read_json_object, require_ints


@dataclasses.dataclass
class _Fields:
  a: object = 3
  b: object = 0


@pytest.mark.parametrize("value,minimum,allow_none,expected", [
    (0, 1, False, "a positive integer"), (True, 0, False, "a non-negative integer"),
    (1.0, 0, False, "a non-negative integer"), (-2, 0, True, "a non-negative integer or None"),
    (None, 1, False, "a positive integer"), ("3", 1, True, "a positive integer or None")])
def test_require_ints_rejects(value, minimum, allow_none, expected):
  with pytest.raises(ConfigError) as e:
    require_ints(_Fields(b=value), ("a", "b"), minimum=minimum, allow_none=allow_none,
                 prefix="Cfg.")
  assert str(e.value) == f"Cfg.b: expected {expected}, got {value!r}"


def test_require_ints_accepts():
  require_ints(_Fields(a=1, b=0), ("a", "b"), minimum=0)
  require_ints(_Fields(a=7, b=None), ("a", "b"), minimum=1, allow_none=True)


def test_read_json_object(tmp_path):
  path = tmp_path / "c.json"
  path.write_text('{"x": [1, 2]}')
  assert read_json_object(path) == {"x": [1, 2]}
  with pytest.raises(ConfigError, match=r"none\.json: no such thing file"):
    read_json_object(tmp_path / "none.json", what="thing file")
  path.write_text("{oops")
  with pytest.raises(ConfigError, match=r"c\.json: not valid JSON"):
    read_json_object(path)
  path.write_text("[1]")
  with pytest.raises(ConfigError, match=r"c\.json: expected a JSON object, got list"):
    read_json_object(path)
