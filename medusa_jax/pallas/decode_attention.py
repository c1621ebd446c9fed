"""Decode attention in one kernel: a Pallas kernel on the Triton backend, and its jnp reference.

Shapes: B rows, T new tokens per row (1 for a decode step, the nodes of a
tree when verifying), Q query heads, G key/value heads (query head h reads kv
head ``h // (Q // G)``), D head dim, L cache slots.

For every row b, query head h and new token t::

  s[l]   = q[b, t, h] . k[b, l, h // R] / sqrt(D)       for l < kv_len[b]
  s[l]   = MASK_VALUE                                  where not mask[b, t, l]
  o[b, t, h] = sum_l softmax(s)[l] * v[b, l, h // R]

Why a kernel: at decode sizes a step is bound by how many kernels it runs,
not by bytes. XLA splits this attention into a score matmul, the mask and the
softmax's reductions and a second matmul, several kernels per layer; here it
is one, which also reads only the ``kv_len[b]`` slots a row has written (XLA
reads all L of the static cache).

The grid is ``(B, G, row blocks)``; a program takes ``block_m`` of the R * T
(query head, token) rows of one kv head, so the R query heads of a group share
each K/V tile they load. It streams the cache in tiles of ``block_k`` slots
with an online softmax (f32 statistics, running max and sum), and normalises
once at the end. A fully masked row gives a finite average, never NaN (as the
model's XLA attention).

The Triton backend is used because the same kernel compiles on the H100/H200
(JAX 0.11, where it is deprecated but works) and runs under ``interpret=True``
on CPU, where the tests run it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from medusa_jax.errors import ConfigError
from medusa_jax.pallas import _compat

__all__ = ["MASK_VALUE", "decode_attention", "decode_attention_reference", "default_block_m",
           "default_blocks", "supports"]

Array = jax.Array

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
"""Score of a masked slot: finite, so a fully masked row averages instead of NaN."""


def supports(num_heads: int, num_kv_heads: int) -> bool:
  """Whether the kernel takes this attention shape (every head dim is: it is padded to a
  power of two >= 16 in registers)."""
  return num_kv_heads > 0 and num_heads % num_kv_heads == 0


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << max(0, (n - 1).bit_length()))


def default_block_m(rows: int) -> int:
  """Rows (query head, token pairs) per program: all of them up to 64 (a tree of 21 nodes at
  R = 3), then 64 (an f32 [64, D] accumulator per program keeps 4 warps' registers)."""
  return min(64, _pow2_at_least(rows))


def default_blocks(batch: int, rows: int) -> tuple[int, int]:
  """(block_k, num_warps) from one layer's attention timed alone on an H200 (SmolLM2 heads,
  cache 1024, 129 slots read; docs/perf.md): 128-slot tiles where a program holds 64 rows (a
  tree) or the batch is large, 64-slot tiles otherwise; 8 warps for 64-row programs."""
  if rows >= 64:
    return 128, 8
  if batch >= 64:
    return 128, 4
  return 64, 4


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def decode_attention(q_BxTxQxD: Array, k_BxLxGxD: Array, v_BxLxGxD: Array, mask_BxTxL: Array,
                     kv_len_B: Array, *, block_m: int | None = None,
                     block_k: int | None = None, num_warps: int | None = None,
                     num_stages: int = 2,
                     interpret: bool | None = None) -> Array:
  """Attention of T new tokens per row over a KV cache, in one Pallas kernel.

  Args:
    q_BxTxQxD: queries (RoPE applied), f32 or bf16.
    k_BxLxGxD, v_BxLxGxD: the cache after this call's write (read as ``q``'s dtype).
    mask_BxTxL: bool or integer; query t of row b sees slot l iff nonzero.
    kv_len_B: [B] int, clipped to [1, L]; slots ``l >= kv_len[b]`` are never read (a
      caller passes ``cache_index + T``: later slots are stale and masked anyway).
    block_m: (head, token) rows per program, a power of two >= 16 (None: by
      :func:`default_block_m`).
    block_k: cache slots per tile, a power of two >= 16 (None: by :func:`default_blocks`).
    num_warps: Triton warps per program (None: by :func:`default_blocks`).
    num_stages: Triton software-pipelining depth.
    interpret: run in the Pallas interpreter (None: unless the backend is a GPU).

  Returns:
    [B, T, Q, D] in ``q``'s dtype.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  B, T, Q, D = q_BxTxQxD.shape
  _, L, G, _ = k_BxLxGxD.shape
  if k_BxLxGxD.shape != (B, L, G, D) or v_BxLxGxD.shape != (B, L, G, D):
    raise ConfigError(f"decode_attention: k {k_BxLxGxD.shape} and v {v_BxLxGxD.shape} must be "
                      f"[B, L, G, D] = [{B}, L, G, {D}]")
  if mask_BxTxL.shape != (B, T, L) or kv_len_B.shape != (B,):
    raise ConfigError(f"decode_attention: mask {mask_BxTxL.shape} must be {(B, T, L)} and "
                      f"kv_len {kv_len_B.shape} must be {(B,)}")
  if not supports(Q, G):
    raise ConfigError(f"decode_attention: {Q} query heads over {G} kv heads: needs Q % G == 0")
  rows = (Q // G) * T
  bm = default_block_m(rows) if block_m is None else block_m
  auto_k, auto_warps = default_blocks(B, rows)
  block_k = auto_k if block_k is None else block_k
  num_warps = auto_warps if num_warps is None else num_warps
  for name, size in (("block_m", bm), ("block_k", block_k)):
    if size < 16 or size & (size - 1):
      raise ConfigError(f"decode_attention: {name}={size}; expected a power of two >= 16")
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  mask = mask_BxTxL if mask_BxTxL.dtype == jnp.int8 else (mask_BxTxL != 0).astype(jnp.int8)
  kernel = functools.partial(_kernel, T=T, R=Q // G, L=L, D=D, Dp=_pow2_at_least(D), bm=bm,
                             bk=block_k,
                             scale=1.0 / math.sqrt(D))
  itemsize = jnp.dtype(q_BxTxQxD.dtype).itemsize
  cost = _compat.cost_estimate(
      flops=4 * B * T * Q * L * D,
      bytes_accessed=itemsize * (2 * B * L * G * D + 2 * B * T * Q * D) + B * T * L,
      transcendentals=B * T * Q * L)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((B, T, Q, D), q_BxTxQxD.dtype),
      grid=(B, G, pl.cdiv(rows, bm)),
      interpret=interpret,
      name="decode_attention",
      compiler_params=_compat.triton_compiler_params(num_warps, num_stages),
      cost_estimate=cost,
  )(kv_len_B.astype(jnp.int32), q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask)


def _kernel(kv_len_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, *, T, R, L, D, Dp, bm, bk, scale):
  """One (row b, kv head g, row block i) program; see the module docstring.

  Rows are ordered (r, t): row ``i * bm + m`` is query head ``g * R + m // T``
  at token ``m % T``. Accesses use index arrays (``start + iota``), which the
  Triton lowering turns into pointer arithmetic and the interpreter supports.
  The head dim is padded to Dp (a power of two, as Triton's tiles need) with
  zeros, which change no dot product.
  """
  b, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row_M = i * bm + jax.lax.iota(jnp.int32, bm)
  row_ok_M = row_M < R * T
  # A row past R * T points past the last token: masked accesses never touch it, and
  # the interpreter's scatter drops it instead of racing on a real row.
  t_M = jnp.where(row_ok_M, row_M % T, T)
  h_M = g * R + jnp.where(row_ok_M, row_M // T, 0)
  # Plain iotas along the head dim and the slots (no select on them), so that Triton
  # sees contiguous addresses and vectorises the loads.
  d_D = jax.lax.iota(jnp.int32, Dp)
  d_ok_D = d_D < D
  row_ok_MxD = row_ok_M[:, None] & d_ok_D[None, :]
  q_MxD = _compat.triton_load(q_ref.at[b, t_M[:, None], h_M[:, None], d_D[None, :]],
                              mask=row_ok_MxD, other=0)
  precision = (jax.lax.Precision.HIGHEST if q_MxD.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)

  limit = jnp.clip(kv_len_ref[b], 1, L)

  def tile(j, carry):
    o_MxD, m_M, l_M = carry
    s_K = j * bk + jax.lax.iota(jnp.int32, bk)
    s_ok_K = s_K < limit
    slot_K = s_K
    s_ok_KxD = s_ok_K[:, None] & d_ok_D[None, :]
    k_KxD = _compat.triton_load(k_ref.at[b, slot_K[:, None], g, d_D[None, :]],
                                mask=s_ok_KxD, other=0).astype(q_MxD.dtype)
    scores_MxK = jax.lax.dot_general(q_MxD, k_KxD, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32,
                                     precision=precision) * scale
    seen_MxK = _compat.triton_load(mask_ref.at[b, t_M[:, None], slot_K[None, :]],
                                   mask=row_ok_M[:, None] & s_ok_K[None, :], other=0)
    scores_MxK = jnp.where(seen_MxK != 0, scores_MxK, MASK_VALUE)
    m_new_M = jnp.maximum(m_M, jnp.max(scores_MxK, axis=1))
    correction_M = jnp.exp(m_M - m_new_M)
    # Slots at or past kv_len (the last tile's overhang) are not read: weight 0.
    p_MxK = jnp.where(s_ok_K[None, :], jnp.exp(scores_MxK - m_new_M[:, None]), 0.0)
    v_KxD = _compat.triton_load(v_ref.at[b, slot_K[:, None], g, d_D[None, :]],
                                mask=s_ok_KxD, other=0).astype(q_MxD.dtype)
    pv_MxD = jnp.dot(p_MxK.astype(q_MxD.dtype), v_KxD, preferred_element_type=jnp.float32,
                     precision=precision)
    return (o_MxD * correction_M[:, None] + pv_MxD, m_new_M,
            l_M * correction_M + jnp.sum(p_MxK, axis=1))

  n_tiles = pl.cdiv(limit, bk)
  o_MxD, _, l_M = jax.lax.fori_loop(
      0, n_tiles, tile,
      (jnp.zeros((bm, Dp), jnp.float32), jnp.full((bm,), MASK_VALUE, jnp.float32),
       jnp.zeros((bm,), jnp.float32)))
  out_MxD = o_MxD / jnp.maximum(l_M, 1e-30)[:, None]
  _compat.triton_store(o_ref.at[b, t_M[:, None], h_M[:, None], d_D[None, :]],
                       out_MxD.astype(o_ref.dtype), mask=row_ok_MxD)


def decode_attention_reference(q_BxTxQxD: Array, k_BxLxGxD: Array, v_BxLxGxD: Array,
                               mask_BxTxL: Array, kv_len_B: Array) -> Array:
  """The same attention in plain jnp (f32 scores and softmax), for tests and non-GPU backends.

  Same arguments and result as :func:`decode_attention`.
  """
  B, T, Q, D = q_BxTxQxD.shape
  L, G = k_BxLxGxD.shape[1], k_BxLxGxD.shape[2]
  q = q_BxTxQxD.reshape(B, T, G, Q // G, D)
  s = jnp.einsum("btgrd,blgd->bgrtl", q, k_BxLxGxD.astype(q.dtype),
                 preferred_element_type=jnp.float32) / math.sqrt(D)
  read_BxL = jnp.arange(L)[None, :] < jnp.clip(kv_len_B, 1, L)[:, None]
  seen = (mask_BxTxL != 0) & read_BxL[:, None, :]
  s = jnp.where(seen[:, None, None], s, MASK_VALUE)
  s = jnp.where(read_BxL[:, None, None, None, :], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bgrtl,blgd->btgrd", p.astype(q.dtype), v_BxLxGxD.astype(q.dtype),
                 preferred_element_type=jnp.float32)
  return o.reshape(B, T, Q, D).astype(q_BxTxQxD.dtype)
