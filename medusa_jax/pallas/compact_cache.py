"""The accepted path's keys and values moved to contiguous slots in every layer's cache with
two Pallas kernels (Triton backend), instead of a gather and a scatter per array.

After a tree verification, row ``b`` of every cache array (one K and one V per
layer, ``[B, L, G, D]`` each) must get::

  kv[b, lengths[b] + j] <- kv[b, lengths[b] + path[b, j]]     j = 0 .. P-1

with the reads before the writes (a source slot of one ``j`` can be the
destination of another), sources clipped to the cache and destinations past
it dropped. XLA runs this as its own gather and scatter for each of the ``A``
arrays (60 for SmolLM2's 30 layers): at decode sizes each is a kernel launch
that moves a few hundred bytes. Here it takes two kernels whatever ``A``:

1. ``gather``: grid ``(A, B)``; program ``(a, b)`` reads array ``a``'s ``P``
   source slots of row ``b`` into a small buffer ``[A, B, P, G, D]``;
2. ``scatter``: the same grid writes the buffer into the destination slots,
   in place (the arrays are the kernel's aliased outputs).

The kernel boundary between the two is what orders every read before every
write: inside one kernel, threads of a program have no such order, and a
source slot may be a destination of another ``j``. A program selects its
array by ``pl.when`` (the arrays are separate buffers; a grid index cannot
pick a Python tuple's entry).

Like the attention kernel, it is written for the Triton backend: it compiles on
NVIDIA GPUs and runs under ``interpret=True`` on CPU, where the tests run it.
The XLA formulation (``decoding.cache_ops.compact_layer``) is the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medusa_jax.errors import ConfigError
from medusa_jax.pallas import _compat
from medusa_jax.pallas.decode_attention import _pow2_at_least

__all__ = ["compact_cache"]

Array = jax.Array


def _check(arrays: tuple[Array, ...], lengths_B: Array, path_BxP: Array) -> tuple[int, ...]:
  """(B, L, G, D, P), or a ConfigError naming what does not fit."""
  if not arrays:
    raise ConfigError("compact_cache: no cache arrays")
  shape, dtype = arrays[0].shape, arrays[0].dtype
  if len(shape) != 4:
    raise ConfigError(f"compact_cache: cache arrays must be [B, L, G, D], got {shape}")
  for i, a in enumerate(arrays):
    if a.shape != shape or a.dtype != dtype:
      raise ConfigError(f"compact_cache: array {i} is {a.shape} {a.dtype}, array 0 is "
                        f"{shape} {dtype}; all must match")
  B = shape[0]
  if lengths_B.shape != (B,):
    raise ConfigError(f"compact_cache: lengths must be [{B}], got {lengths_B.shape}")
  if path_BxP.ndim != 2 or path_BxP.shape[0] != B or path_BxP.shape[1] < 1:
    raise ConfigError(f"compact_cache: path must be [{B}, P] with P >= 1, got {path_BxP.shape}")
  return (*shape, path_BxP.shape[1])


@functools.partial(jax.jit, static_argnames=("num_warps", "interpret"))
def compact_cache(arrays: tuple[Array, ...], lengths_B: Array, path_BxP: Array, *,
                  num_warps: int = 1, interpret: bool | None = None) -> tuple[Array, ...]:
  """Moves each row's accepted path to contiguous slots in every array (module docstring).

  Args:
    arrays: A cache arrays, each [B, L, G, D], one dtype; DONATE them (the
      scatter writes in place: a caller that keeps using the inputs gets copies).
    lengths_B: [B] int32, committed length before the step.
    path_BxP: [B, P] int32, tree node per path position (node 0 = the root).
    num_warps: Triton warps per program.
    interpret: run in the Pallas interpreter (None: unless the backend is a GPU).

  Returns:
    The A arrays, compacted.

  Raises:
    ConfigError: arrays of different shapes or dtypes, or lengths / path that do not fit.
  """
  arrays = tuple(arrays)
  B, L, G, D, P = _check(arrays, lengths_B, path_BxP)
  A = len(arrays)
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  lengths_B = lengths_B.astype(jnp.int32)
  path_BxP = path_BxP.astype(jnp.int32)
  sizes = dict(A=A, L=L, G=G, D=D, P=P, Pp=_pow2_at_least(P, 1), Gp=_pow2_at_least(G, 1),
               Dp=_pow2_at_least(D, 1))
  itemsize = jnp.dtype(arrays[0].dtype).itemsize
  moved = A * B * P * G * D
  params = _compat.triton_compiler_params(num_warps, 1)
  buf = pl.pallas_call(
      functools.partial(_gather_kernel, **sizes),
      out_shape=jax.ShapeDtypeStruct((A, B, P, G, D), arrays[0].dtype),
      grid=(A, B),
      interpret=interpret,
      name="compact_cache_gather",
      compiler_params=params,
      cost_estimate=_compat.cost_estimate(flops=0, bytes_accessed=2 * moved * itemsize),
  )(lengths_B, path_BxP, *arrays)
  cache = jax.ShapeDtypeStruct((B, L, G, D), arrays[0].dtype)
  return tuple(pl.pallas_call(
      functools.partial(_scatter_kernel, **sizes),
      out_shape=(cache,) * A,
      grid=(A, B),
      input_output_aliases={2 + i: i for i in range(A)},
      interpret=interpret,
      name="compact_cache_scatter",
      compiler_params=params,
      cost_estimate=_compat.cost_estimate(flops=0, bytes_accessed=2 * moved * itemsize),
  )(lengths_B, buf, *arrays))


def _block(P, Pp, G, Gp, D, Dp):
  """Index arrays of one row's [Pp, Gp, Dp] tile and its in-bounds mask (P, G, D real)."""
  p = jax.lax.broadcasted_iota(jnp.int32, (Pp, Gp, Dp), 0)
  g = jax.lax.broadcasted_iota(jnp.int32, (Pp, Gp, Dp), 1)
  d = jax.lax.broadcasted_iota(jnp.int32, (Pp, Gp, Dp), 2)
  return p, g, d, (p < P) & (g < G) & (d < D)


def _gather_kernel(lengths_ref, path_ref, *refs, A, L, G, D, P, Pp, Gp, Dp):
  """Program (a, b): array a's source slots of row b into ``buf[a, b]``."""
  arrays, buf_ref = refs[:A], refs[A]
  a, b = pl.program_id(0), pl.program_id(1)
  p, g, d, ok = _block(P, Pp, G, Gp, D, Dp)
  node = _compat.triton_load(path_ref.at[b, jnp.minimum(p, P - 1)])
  src = jnp.clip(lengths_ref[b] + node, 0, L - 1)
  for i, ref in enumerate(arrays):
    @pl.when(a == i)
    def _(ref=ref):
      x = _compat.triton_load(ref.at[b, src, g, d], mask=ok, other=0)
      _compat.triton_store(buf_ref.at[a, b, p, g, d], x, mask=ok)


def _scatter_kernel(lengths_ref, buf_ref, *refs, A, L, G, D, P, Pp, Gp, Dp):
  """Program (a, b): ``buf[a, b]`` into array a's destination slots of row b, in place
  (``refs`` are the A aliased inputs, then the A outputs: the same buffers)."""
  outs = refs[A:]
  a, b = pl.program_id(0), pl.program_id(1)
  p, g, d, ok = _block(P, Pp, G, Gp, D, Dp)
  dst = lengths_ref[b] + p
  write = ok & (dst >= 0) & (dst < L)
  x = _compat.triton_load(buf_ref.at[a, b, jnp.minimum(p, P - 1), g, d], mask=ok, other=0)
  for i, ref in enumerate(outs):
    @pl.when(a == i)
    def _(ref=ref):
      # Masked lanes keep their out-of-range slots (never clipped onto a real one): the
      # interpreter drops them, where a duplicate index would write the old value back.
      _compat.triton_store(ref.at[b, dst, g, d], x, mask=write)
