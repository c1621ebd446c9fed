"""Options parsed once at the API boundary.

Public functions accept an option as a string (``backend="auto"``,
``speculate="tree"``); inside the library it is an enum member. ``Option.parse``
does the conversion and, for a bad value, raises the option's typed error with
the valid values listed::

    Backend.parse("pallas_gpux")
    # SegmentError: backend='pallas_gpux'; expected one of auto, reference, ...
"""

from __future__ import annotations

import enum

from medusa_jax.errors import MedusaError


class Option(enum.Enum):
  """An enum whose members are parsed from their (case-insensitive) string values.

  Subclasses may set ``__option__`` (the name shown in errors; default: the
  class name in lower case) and ``__error__`` (the exception type; default
  ``MedusaError``).
  """

  @classmethod
  def parse(cls, value):
    """The member for ``value`` (a member, or its string value in any case)."""
    if isinstance(value, cls):
      return value
    if isinstance(value, str):
      for member in cls:
        if member.value == value.lower():
          return member
    name = cls.__dict__.get("__option__", cls.__name__.lower())
    error = cls.__dict__.get("__error__", MedusaError)
    valid = ", ".join(str(m.value) for m in cls)
    raise error(f"{name}={value!r}; expected one of {valid}")
