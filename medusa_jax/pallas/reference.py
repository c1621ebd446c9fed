"""Pure-jnp segmented matmul: the ``reference`` backend.

Loops (``lax.fori_loop``) over the A adapters and keeps, for each row, the
product with its own adapter's weight. It reads every adapter's weights and
does A times the useful flops: it is the readable definition, and the CPU
default, not a fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medusa_jax.pallas._schedule import row_adapters

Array = jax.Array


def apply_epilogue(y_NxM: Array, x_NxK: Array, resblock: bool) -> Array:
  """``y`` or the ResBlock ``x[:, j mod K] + silu(y[:, j])``, in float32.

  Args:
    y_NxM: [N, M] float32, bias included.
    x_NxK: [N, K]; M % K == 0 when ``resblock``.
    resblock: apply the fused ResBlock epilogue.
  """
  if not resblock:
    return y_NxM
  reps = y_NxM.shape[1] // x_NxK.shape[1]
  x_NxM = jnp.tile(x_NxK.astype(jnp.float32), (1, reps))
  return x_NxM + jax.nn.silu(y_NxM)


def segmented_matmul_reference(x: Array, w: Array, b: Array | None, s_start: Array,
                               s_end: Array, seg_weight: Array, *, resblock: bool) -> Array:
  """See :func:`medusa_jax.pallas.segmented_matmul`.

  Args:
    x: [N, K].
    w: [A, K, M].
    b: [A, M] or None.
    s_start, s_end, seg_weight: [S] integer.
    resblock: fused ResBlock epilogue.

  Returns:
    [N, M] in ``x.dtype``; rows in no segment are zero.
  """
  n_rows = x.shape[0]
  num_adapters, _, m = w.shape
  adapter_N = row_adapters(n_rows, s_start, s_end, seg_weight, num_adapters)

  def add_adapter(a, y_NxM):
    w_KxM = jax.lax.dynamic_index_in_dim(w, a, keepdims=False).astype(x.dtype)
    ya_NxM = jnp.matmul(x, w_KxM, preferred_element_type=jnp.float32)
    if b is not None:
      ya_NxM = ya_NxM + jax.lax.dynamic_index_in_dim(b, a, keepdims=True).astype(jnp.float32)
    return jnp.where((adapter_N == a)[:, None], ya_NxM, y_NxM)

  y_NxM = jax.lax.fori_loop(0, num_adapters, add_adapter, jnp.zeros((n_rows, m), jnp.float32))
  out_NxM = apply_epilogue(y_NxM, x, resblock)
  covered_N = adapter_N < num_adapters
  return jnp.where(covered_N[:, None], out_NxM, 0.0).astype(x.dtype)
