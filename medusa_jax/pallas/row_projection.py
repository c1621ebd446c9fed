"""A one-row projection with its neighbours in one kernel: a Pallas kernel on the Triton
backend, and its jnp reference.

For one token (batch 1, a plain decode step) every projection of a layer is a
vector-matrix product. XLA:GPU rewrites each into a multiply and a reduce (two
kernels, the ``[K, N]`` f32 product written between them) and runs the RMSNorm
before it, the SwiGLU between the MLP's two projections and the residual add
after it as kernels of their own. At that size a decode step costs what its
kernels cost to launch and drain, not the bytes they read; this kernel does
one projection with what comes before and after it::

  a   = x                                              (plain)
  a   = round(round(x * rsqrt(mean(x^2) + eps)) * g)   (norm: the layer's RMSNorm)
  a   = round(round(silu(x[:K])) * x[K:])              (gated: the MLP's SwiGLU)
  y   = round(a @ w + bias)                            (f32 accumulation)
  out = round(y + residual)                            (residual)

``round`` is the cast to the compute dtype, where the model's XLA layers cast:
the kernel computes what :class:`~medusa_jax.models.llama.Block` computes, up
to the order of the f32 sums.

The grid is ``(cdiv(N, block_n),)``: a program owns ``block_n`` output
columns and streams ``w`` in ``[block_k, block_n]`` tiles (``[block_n, block_k]``,
contiguous along K, for a ``transposed`` ``[N, K]`` kernel: ``Llama``'s ``out_in``),
accumulating the products in an f32 tile reduced once at the end (or, with ``mma``, in a
tensor-core dot whose first row is ``x``). A ``norm`` program first
reads the whole row (K elements, a few KB) for its statistics; every program
does, which costs less than a second kernel.

As the attention kernel, it is written for the Triton backend: it compiles on
NVIDIA GPUs and runs under ``interpret=True`` on CPU, where the tests run it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medusa_jax.errors import ConfigError
from medusa_jax.pallas import _compat

__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_N", "row_projection", "row_projection_reference"]

Array = jax.Array

# The fastest of those timed in a whole batch-1 step on an H200 (docs/perf.md): with so
# little work per call, few loop trips and many programs win; the tensor-core
# reduction (mma) lost to the elementwise one at every size tried.
DEFAULT_BLOCK_K = 256
DEFAULT_BLOCK_N = 16
MMA_ROWS = 16
"""Rows of the tensor-core dot that carries the one row (Triton's smallest M)."""


def _check(x_K: Array, w_KxN: Array, norm_K, bias_N, residual_N, gated: bool,
           transposed: bool = False) -> tuple[int, int]:
  """(K, N), or a ConfigError naming the argument whose shape does not fit."""
  if w_KxN.ndim != 2:
    raise ConfigError(f"row_projection: w must be {'[N, K]' if transposed else '[K, N]'},"
                      f" got shape {w_KxN.shape}")
  N, K = w_KxN.shape if transposed else w_KxN.shape[::-1]
  if x_K.shape != ((2 * K,) if gated else (K,)):
    what = "[2K] (gate then up)" if gated else "[K]"
    raise ConfigError(f"row_projection: x must be {what} for w {w_KxN.shape}, got {x_K.shape}")
  for name, a, n in (("norm", norm_K, K), ("bias", bias_N, N), ("residual", residual_N, N)):
    if a is not None and a.shape != (n,):
      raise ConfigError(f"row_projection: {name} must be [{n}], got {a.shape}")
  if norm_K is not None and gated:
    raise ConfigError("row_projection: norm and gated are exclusive (one prologue)")
  return K, N


@functools.partial(jax.jit, static_argnames=("eps", "gated", "block_k", "block_n", "num_warps",
                                             "num_stages", "mma", "transposed", "interpret"))
def row_projection(x_K: Array, w_KxN: Array, *, norm_K: Array | None = None,
                   eps: float = 1e-6, gated: bool = False, bias_N: Array | None = None,
                   residual_N: Array | None = None, block_k: int = DEFAULT_BLOCK_K,
                   block_n: int = DEFAULT_BLOCK_N, num_warps: int = 4, num_stages: int = 2,
                   mma: bool = False, transposed: bool = False,
                   interpret: bool | None = None) -> Array:
  """One row through a projection with its prologue and epilogue (module docstring).

  Args:
    x_K: the row, [K] ([2K]: gate then up, when ``gated``), in the compute dtype.
    w_KxN: the kernel ``[K, N]`` (``[N, K]`` with ``transposed``), read as ``x``'s dtype.
    norm_K: RMSNorm weight [K]: normalise ``x`` first (with ``eps``).
    eps: the RMSNorm epsilon.
    gated: ``x`` is ``[gate, up]``; project ``silu(gate) * up``.
    bias_N: added in f32 before the cast.
    residual_N: added after the cast, as the model's residual stream.
    block_k, block_n: tile of ``w``, powers of two >= 16.
    num_warps, num_stages: Triton launch parameters.
    mma: reduce over K with a tensor-core dot (the row padded to :data:`MMA_ROWS`), else
      with an elementwise product and a sum.
    transposed: ``w`` is ``[N, K]`` (``Llama``'s ``out_in`` layout): a program's tile is
      ``block_n`` rows of ``block_k`` contiguous weights.
    interpret: run in the Pallas interpreter (None: unless the backend is a GPU).

  Returns:
    [N] in ``x``'s dtype.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  K, N = _check(x_K, w_KxN, norm_K, bias_N, residual_N, gated, transposed)
  for name, b in (("block_k", block_k), ("block_n", block_n)):
    if b < 16 or b & (b - 1):
      raise ConfigError(f"row_projection: {name}={b} must be a power of two >= 16")
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  extras = [a for a in (norm_K, bias_N, residual_N) if a is not None]
  kernel = functools.partial(_kernel, K=K, N=N, bk=block_k, bn=block_n, eps=float(eps),
                             norm=norm_K is not None, gated=gated, bias=bias_N is not None,
                             residual=residual_N is not None, dtype=x_K.dtype, mma=mma,
                             transposed=transposed)
  itemsize = jnp.dtype(x_K.dtype).itemsize
  cost = _compat.cost_estimate(flops=2 * K * N, bytes_accessed=itemsize * (K * N + 3 * K + 3 * N),
                               transcendentals=K if gated else 0)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((N,), x_K.dtype),
      grid=(pl.cdiv(N, block_n),),
      interpret=interpret,
      name="row_projection",
      compiler_params=_compat.triton_compiler_params(num_warps, num_stages),
      cost_estimate=cost,
  )(x_K, w_KxN, *extras)


def _round(x, dtype):
  """The cast to the compute dtype where the model's layers cast, kept in f32."""
  return x.astype(dtype).astype(jnp.float32)



def _kernel(x_ref, w_ref, *refs, K, N, bk, bn, eps, norm, gated, bias, residual, dtype, mma,
            transposed):
  """One block of ``bn`` output columns; see the module docstring. Accesses use index
  arrays (``start + iota``), which the Triton lowering turns into pointer arithmetic and
  the interpreter supports; tiles past K or N are masked."""
  refs = list(refs)
  g_ref = refs.pop(0) if norm else None
  b_ref = refs.pop(0) if bias else None
  r_ref = refs.pop(0) if residual else None
  (o_ref,) = refs
  col_N = pl.program_id(0) * bn + jax.lax.iota(jnp.int32, bn)
  col_ok_N = col_N < N
  steps = pl.cdiv(K, bk)

  def load(ref, idx, ok):
    return _compat.triton_load(ref.at[idx], mask=ok, other=0).astype(jnp.float32)

  scale = None
  if norm:
    def sumsq(j, acc_K):
      k_K = j * bk + jax.lax.iota(jnp.int32, bk)
      x_K = load(x_ref, k_K, k_K < K)
      return acc_K + x_K * x_K

    ss_K = jax.lax.fori_loop(0, steps, sumsq, jnp.zeros((bk,), jnp.float32))
    scale = jax.lax.rsqrt(jnp.sum(ss_K) / K + eps)

  def tile(j, acc):
    k_K = j * bk + jax.lax.iota(jnp.int32, bk)
    k_ok_K = k_K < K
    a_K = load(x_ref, k_K, k_ok_K)
    if norm:
      a_K = _round(_round(a_K * scale, dtype) * _round(load(g_ref, k_K, k_ok_K), dtype), dtype)
    elif gated:
      up_K = load(x_ref, K + k_K, k_ok_K)
      a_K = _round(_round(jax.nn.silu(a_K), dtype) * up_K, dtype)
    if transposed:
      w_NxK = _compat.triton_load(w_ref.at[col_N[:, None], k_K[None, :]],
                                  mask=col_ok_N[:, None] & k_ok_K[None, :], other=0).astype(dtype)
      if mma:
        a_MxK = jnp.where(jax.lax.iota(jnp.int32, MMA_ROWS)[:, None] == 0, a_K[None, :], 0.0)
        return acc + jax.lax.dot_general(
            a_MxK.astype(dtype), w_NxK, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32, precision=_compat.triton_dot_precision(dtype))
      return acc + w_NxK.astype(jnp.float32) * a_K[None, :]
    w_KxN = _compat.triton_load(w_ref.at[k_K[:, None], col_N[None, :]],
                                mask=k_ok_K[:, None] & col_ok_N[None, :], other=0).astype(dtype)
    if mma:
      # The row as the first of MMA_ROWS (the rest zero): the tensor cores' dot does the
      # K reduction, with its operand loads; the wasted rows cost no bandwidth.
      a_MxK = jnp.where(jax.lax.iota(jnp.int32, MMA_ROWS)[:, None] == 0, a_K[None, :], 0.0)
      return acc + jnp.dot(a_MxK.astype(dtype), w_KxN, preferred_element_type=jnp.float32,
                           precision=_compat.triton_dot_precision(dtype))
    return acc + a_K[:, None] * w_KxN.astype(jnp.float32)

  if mma:
    init, axis = jnp.zeros((MMA_ROWS, bn), jnp.float32), 0
  else:  # the products of every K tile, summed over K once at the end
    init, axis = jnp.zeros((bn, bk) if transposed else (bk, bn), jnp.float32), (
        1 if transposed else 0)
  y_N = jnp.sum(jax.lax.fori_loop(0, steps, tile, init), axis=axis)
  if bias:
    y_N = y_N + load(b_ref, col_N, col_ok_N)
  y_N = _round(y_N, dtype)
  if residual:
    y_N = y_N + load(r_ref, col_N, col_ok_N)
  _compat.triton_store(o_ref.at[col_N], y_N.astype(o_ref.dtype), mask=col_ok_N)


def row_projection_reference(x_K: Array, w_KxN: Array, *, norm_K: Array | None = None,
                             eps: float = 1e-6, gated: bool = False, bias_N: Array | None = None,
                             residual_N: Array | None = None, transposed: bool = False) -> Array:
  """:func:`row_projection` in plain jnp (the same casts; XLA's own reduction order)."""
  K, _ = _check(x_K, w_KxN, norm_K, bias_N, residual_N, gated, transposed)
  if transposed:
    w_KxN = w_KxN.T
  dtype = x_K.dtype
  a = x_K.astype(jnp.float32)
  if norm_K is not None:
    a = _round(_round(a * jax.lax.rsqrt(jnp.mean(a * a) + eps), dtype)
               * _round(norm_K.astype(jnp.float32), dtype), dtype)
  elif gated:
    a = _round(_round(jax.nn.silu(a[:K]), dtype) * a[K:], dtype)
  y = jnp.dot(a, _round(w_KxN.astype(jnp.float32), dtype),
              precision=jax.lax.Precision.HIGHEST)
  if bias_N is not None:
    y = y + bias_N.astype(jnp.float32)
  y = _round(y, dtype)
  if residual_N is not None:
    y = y + residual_N.astype(jnp.float32)
  return y.astype(dtype)
