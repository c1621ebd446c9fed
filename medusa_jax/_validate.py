"""Checks shared by the config dataclasses: integer fields and JSON config files."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from medusa_jax.errors import ConfigError

_INT_WORDS = {0: "a non-negative integer", 1: "a positive integer"}


def require_ints(obj: Any, names: Iterable[str], *, minimum: int, allow_none: bool = False,
                 prefix: str = "") -> None:
  """Raises ConfigError unless every field ``names`` of ``obj`` is an int >= ``minimum``.

  A bool is not an int here. With ``allow_none`` a field may also be None.

  Args:
    obj: the (dataclass) instance.
    names: its fields to check.
    minimum: 0 or 1.
    allow_none: None is a valid value.
    prefix: put before the field name in messages (e.g. ``"LlamaConfig."``).
  """
  expected = _INT_WORDS[minimum] + (" or None" if allow_none else "")
  for name in names:
    value = getattr(obj, name)
    if allow_none and value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"{prefix}{name}: expected {expected}, got {value!r}")


def read_json_object(path: str | os.PathLike, *, what: str = "config file") -> Mapping[str, Any]:
  """The JSON object in ``path``.

  Raises:
    ConfigError: no such file, not valid JSON, or not a JSON object (the path named).
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path}: no such {what} (not found)") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw
