"""``jax.lax.ragged_dot`` backend: sort rows by adapter, one ragged dot, unsort.

``ragged_dot`` needs rows grouped by adapter, so the rows are permuted with
the stable adapter sort (rows in no segment go last, past the sum of the
group sizes, where ``ragged_dot`` returns zero), multiplied, and permuted
back. On GPU (cuDNN < 9.22) and CPU XLA lowers ``ragged_dot`` to a masked
dense product over every group, so it reads all A adapters' weights, used or
not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medusa_jax.pallas._schedule import row_adapters
from medusa_jax.pallas.reference import apply_epilogue

Array = jax.Array


def segmented_matmul_ragged_dot(x: Array, w: Array, b: Array | None, s_start: Array,
                                s_end: Array, seg_weight: Array, *, resblock: bool) -> Array:
  """See :func:`medusa_jax.pallas.segmented_matmul`; x [N, K], w [A, K, M] -> [N, M]."""
  n_rows = x.shape[0]
  num_adapters = w.shape[0]
  adapter_N = row_adapters(n_rows, s_start, s_end, seg_weight, num_adapters)
  order_N = jnp.argsort(adapter_N, stable=True)
  inverse_N = jnp.zeros_like(order_N).at[order_N].set(jnp.arange(n_rows, dtype=order_N.dtype))
  sorted_adapter_N = adapter_N[order_N]
  group_sizes_A = jnp.sum(
      (adapter_N[:, None] == jnp.arange(num_adapters, dtype=jnp.int32)[None, :]).astype(jnp.int32),
      axis=0)
  y_NxM = jax.lax.ragged_dot(x[order_N], w.astype(x.dtype), group_sizes_A,
                             preferred_element_type=jnp.float32)
  covered_N = sorted_adapter_N < num_adapters
  if b is not None:
    b_NxM = b[jnp.minimum(sorted_adapter_N, num_adapters - 1)].astype(jnp.float32)
    y_NxM = y_NxM + b_NxM
  out_NxM = apply_epilogue(y_NxM, x[order_N], resblock)
  out_NxM = jnp.where(covered_N[:, None], out_NxM, 0.0)
  return out_NxM[inverse_N].astype(x.dtype)
