"""Checks shared across the package: integer fields, JSON config files, dtypes, finite values.

JAX is imported inside the functions that need it, so that the configs (which
import this module) load without it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Mapping

from medusa_jax.errors import ConfigError, TensorDtypeError

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
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
  except IsADirectoryError:
    raise ConfigError(f"{path}: is a directory; expected a {what}") from None
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw


def check_float_dtype(dtype: Any, what: str = "dtype"):
  """``dtype`` as a JAX dtype when it is floating point (bfloat16 included).

  Only float dtypes compute: int8 parameters would hold all-zero heads.

  Raises:
    TensorDtypeError: not a dtype, or not floating point (naming ``what``).
  """
  import jax.numpy as jnp
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise TensorDtypeError(f"{what}={dtype!r}: expected a floating-point dtype (float32,"
                           " bfloat16, float16, float64)")
  return dt


def nonfinite_leaves(tree: Any) -> list[str]:
  """The ``/``-joined paths of the array leaves of ``tree`` holding NaN or inf.

  One jitted reduction over every leaf on its device, and one host read of the
  [P] flags: cheap enough to run on every load.
  """
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    return []
  flags = jax.device_get(_all_finite()([leaf for _, leaf in leaves]))
  return [_path(p) for (p, _), ok in zip(leaves, flags) if not ok]


@functools.cache
def _all_finite():
  import jax
  import jax.numpy as jnp

  @jax.jit
  def all_finite(arrays):  # [P] bool
    return jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays])
  return all_finite


def _path(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)
