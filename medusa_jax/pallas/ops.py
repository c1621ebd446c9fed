"""Dispatch of ``segmented_matmul`` over its backends (placeholder: reference only)."""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from medusa_jax.errors import SegmentError


class Backend(enum.Enum):
  AUTO = "auto"
  REFERENCE = "reference"

  @classmethod
  def parse(cls, value):
    if isinstance(value, cls):
      return value
    try:
      return cls(value)
    except ValueError:
      raise SegmentError(f"backend={value!r}; expected one of "
                         + ", ".join(b.value for b in cls)) from None


class Epilogue(enum.Enum):
  NONE = "none"
  RESBLOCK = "resblock"

  @classmethod
  def parse(cls, value):
    if isinstance(value, cls):
      return value
    try:
      return cls(value)
    except ValueError:
      raise SegmentError(f"epilogue={value!r}; expected one of "
                         + ", ".join(b.value for b in cls)) from None


def segmented_matmul(x, w, b, s_start, s_end, seg_weight, *, backend="auto", epilogue="none"):
  """y[r] = x[r] @ w[seg_weight[s]] + b[seg_weight[s]] for rows r of segment s; else 0."""
  Backend.parse(backend)
  epilogue = Epilogue.parse(epilogue)
  n_rows = x.shape[0]
  rows = jnp.arange(n_rows)
  in_seg = (rows[None, :] >= s_start[:, None]) & (rows[None, :] < s_end[:, None])  # [S, N]
  covered = in_seg.any(axis=0)
  row_adapter = jnp.where(covered, jnp.argmax(in_seg, axis=0), 0)
  row_adapter = jnp.asarray(seg_weight)[row_adapter]
  y = jnp.einsum("nk,nkm->nm", x, w[row_adapter].astype(x.dtype),
                 preferred_element_type=jnp.float32)
  if b is not None:
    y = y + b[row_adapter].astype(jnp.float32)
  if epilogue is Epilogue.RESBLOCK:
    reps = w.shape[-1] // x.shape[-1]
    y = jnp.tile(x.astype(jnp.float32), (1, reps)) + jax.nn.silu(y)
  y = jnp.where(covered[:, None], y, 0.0)
  return y.astype(x.dtype)
