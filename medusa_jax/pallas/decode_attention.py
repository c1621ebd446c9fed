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

The grid is ``(B, G, row blocks, splits)``; a program takes ``block_m`` of the R * T
(query head, token) rows of one kv head, so the R query heads of a group share
each K/V tile they load. It streams the cache in tiles of ``block_k`` slots
with an online softmax (f32 statistics, running max and sum), and normalises
once at the end. With S > 1 splits (flash-decoding, the GPU default where the
grid is small: :func:`default_splits`), S programs share a row block's slots
and a jnp combine merges their softmax states: at batch 1 one program per
(kv head, row block) would walk a long cache alone. A fully masked row gives a
finite average, never NaN (as the model's XLA attention).

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

__all__ = ["MASK_VALUE", "combine_parts", "decode_attention", "decode_attention_parts",
           "decode_attention_reference",
           "decode_attention_update", "decode_attention_update_reference", "default_block_m",
           "default_blocks", "default_splits", "supports", "supports_update"]

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


def default_blocks(batch: int, rows: int, splits: int = 1) -> tuple[int, int]:
  """(block_k, num_warps) from one layer's attention timed alone on an H200 (SmolLM2 heads,
  cache 1024; docs/perf.md). One split (129 slots read): 128-slot tiles where a program
  holds 64 rows (a tree) or the batch is large, 64-slot tiles otherwise; 8 warps for 64-row
  programs. Several splits (128-1,000 slots read): 4 warps, 64-slot tiles, 128 from batch 64."""
  if splits > 1:
    return (128, 4) if batch >= 64 else (64, 4)
  if rows >= 64:
    return 128, 8
  if batch >= 64:
    return 128, 4
  return 64, 4


def _launch(batch, rows, block_m, block_k, num_warps, interpret, what, splits=1):
  """(block_m, block_k, num_warps, interpret) with the defaults filled in and checked."""
  bm = default_block_m(rows) if block_m is None else block_m
  auto_k, auto_warps = default_blocks(batch, rows, splits)
  block_k = auto_k if block_k is None else block_k
  num_warps = auto_warps if num_warps is None else num_warps
  for name, size in (("block_m", bm), ("block_k", block_k)):
    if size < 16 or size & (size - 1):
      raise ConfigError(f"{what}: {name}={size}; expected a power of two >= 16")
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  return bm, block_k, num_warps, interpret


def _int8_mask(mask):
  """The mask as int8 0/1 (nonzero is visible: a narrowing cast would wrap 256 to 0)."""
  return mask if mask.dtype == jnp.int8 else (mask != 0).astype(jnp.int8)


def default_splits(programs: int, cache_len: int) -> int:
  """Cache splits (:func:`decode_attention`'s ``splits``) for ``programs`` = B * G * row
  blocks over a cache of ``cache_len`` slots: 8 up to 64 programs, 4 up to 256, 2 up to
  1,024, else 1; never more than the cache's 64-slot tiles.

  One layer's attention alone on an H200 (SmolLM2 heads, cache 1024, 128-1,000 slots read,
  docs/perf.md): one program per (row, kv head, row block) walks its slots alone, 11-50 us
  per call growing with the slots at batch 1-16 (3-48 programs); 8 splits, their combine
  included, 10-17 us at every fill; at batch 64 (192 programs), 4 splits 15-29 us against
  23-36."""
  if programs <= 64:
    s = 8
  elif programs <= 256:
    s = 4
  elif programs <= 1024:
    s = 2
  else:
    s = 1
  return max(1, min(s, -(-cache_len // 64)))


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "num_warps", "num_stages",
                                             "splits", "interpret"))
def decode_attention(q_BxTxQxD: Array, k_BxLxGxD: Array, v_BxLxGxD: Array, mask_BxTxL: Array,
                     kv_len_B: Array, *, block_m: int | None = None,
                     block_k: int | None = None, num_warps: int | None = None,
                     num_stages: int = 2, splits: int | None = None,
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
    splits: S, programs per (row, kv head, row block) that share its cache slots
      (flash-decoding): split s streams the s-th of S runs of whole tiles of
      ``[0, kv_len)`` into its own online softmax (o, max, sum), and
      :func:`combine_parts` merges them. More programs walk a long cache side by side,
      for one more fusion per call. None: :func:`default_splits` on a GPU, 1 in the
      interpreter.
    interpret: run in the Pallas interpreter (None: unless the backend is a GPU).

  Returns:
    [B, T, Q, D] in ``q``'s dtype.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  out = _attention(q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask_BxTxL, kv_len_B, block_m=block_m,
                   block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                   splits=splits, interpret=interpret, parts=False)
  if not isinstance(out, tuple):
    return out
  return combine_parts(*out, dtype=q_BxTxQxD.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "num_warps", "num_stages",
                                             "splits", "interpret"))
def decode_attention_parts(q_BxTxQxD: Array, k_BxLxGxD: Array, v_BxLxGxD: Array,
                           mask_BxTxL: Array, kv_len_B: Array, *, block_m: int | None = None,
                           block_k: int | None = None, num_warps: int | None = None,
                           num_stages: int = 2, splits: int | None = None,
                           interpret: bool | None = None) -> tuple[Array, Array, Array]:
  """:func:`decode_attention` before the combine of its cache splits, for a consumer that
  merges them itself (the o projection's prologue,
  :func:`~medusa_jax.pallas.row_projection.row_projection`); arguments as there (S may be 1).

  Returns:
    o [B, S, T, Q, D] (unnormalised), running max m and sum l [B, S, T, Q], all f32:
    ``combine_parts(o, m, l)`` is :func:`decode_attention`'s result.
  """
  return _attention(q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask_BxTxL, kv_len_B, block_m=block_m,
                    block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                    splits=splits, interpret=interpret, parts=True)


def combine_parts(o_BxSxTxQxD: Array, m_BxSxTxQ: Array, l_BxSxTxQ: Array, *,
                  dtype=jnp.float32) -> Array:
  """Merges S cache splits' softmax states: ``o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M)
  l_s``, ``M = max_s m_s``; [B, T, Q, D] in ``dtype``."""
  w_BxSxTxQ = jnp.exp(m_BxSxTxQ - m_BxSxTxQ.max(axis=1, keepdims=True))
  o_BxTxQxD = jnp.sum(w_BxSxTxQ[..., None] * o_BxSxTxQxD, axis=1)
  l_BxTxQ = jnp.sum(w_BxSxTxQ * l_BxSxTxQ, axis=1)
  return (o_BxTxQxD / jnp.maximum(l_BxTxQ, 1e-30)[..., None]).astype(dtype)


def _attention(q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask_BxTxL, kv_len_B, *, block_m, block_k,
               num_warps, num_stages, splits, interpret, parts):
  """The kernel's call: the normalised output (one split, not ``parts``) or the splits'
  (o, m, l)."""
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
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  bm = default_block_m(rows) if block_m is None else block_m
  row_blocks = pl.cdiv(rows, bm)
  if splits is None:  # the interpreter runs programs one by one: nothing to gain there
    splits = 1 if interpret else default_splits(B * G * row_blocks, L)
  if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
    raise ConfigError(f"decode_attention: splits={splits!r}; expected a positive integer")
  bm, block_k, num_warps, interpret = _launch(B, rows, bm, block_k, num_warps, interpret,
                                              "decode_attention", splits)
  mask = _int8_mask(mask_BxTxL)
  normalise = splits == 1 and not parts
  kernel = functools.partial(_kernel, T=T, R=Q // G, L=L, D=D, Dp=_pow2_at_least(D), bm=bm,
                             bk=block_k, splits=splits, normalise=normalise,
                             scale=1.0 / math.sqrt(D))
  itemsize = jnp.dtype(q_BxTxQxD.dtype).itemsize
  cost = _compat.cost_estimate(
      flops=4 * B * T * Q * L * D,
      bytes_accessed=itemsize * (2 * B * L * G * D + 2 * B * T * Q * D) + B * T * L,
      transcendentals=B * T * Q * L)
  if normalise:
    out_shape = jax.ShapeDtypeStruct((B, T, Q, D), q_BxTxQxD.dtype)
  else:  # each split's unnormalised o, running max and sum, merged by combine_parts
    out_shape = (jax.ShapeDtypeStruct((B, splits, T, Q, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, T, Q), jnp.float32),
                 jax.ShapeDtypeStruct((B, splits, T, Q), jnp.float32))
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(B, G, row_blocks, splits),
      interpret=interpret,
      name="decode_attention",
      compiler_params=_compat.triton_compiler_params(num_warps, num_stages),
      cost_estimate=cost,
  )(kv_len_B.astype(jnp.int32), q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask)


def _kernel(kv_len_ref, q_ref, k_ref, v_ref, mask_ref, *out_refs, T, R, L, D, Dp, bm, bk,
            splits, normalise, scale):
  """One (row b, kv head g, row block i, split s) program; see the module docstring.

  Rows as in :func:`_program_rows`. Accesses use index arrays (``start + iota``), which the
  Triton lowering turns into pointer arithmetic and the interpreter supports.
  The head dim is padded to Dp (a power of two, as Triton's tiles need) with
  zeros, which change no dot product. Unless ``normalise`` (one split, the output
  wanted) the program streams its split's run of tiles and stores (o, max, sum)
  unnormalised; a split
  past the row's slots stores (0, MASK_VALUE, 0), which the combine weighs 0
  (or, in a fully masked row, exactly as the splits that read slots).
  """
  b, g, i, s = (pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3))
  t_M, h_M, row_ok_M, d_D, d_ok_D = _program_rows(g, i, T=T, R=R, D=D, Dp=Dp, bm=bm)
  row_ok_MxD = row_ok_M[:, None] & d_ok_D[None, :]
  q_MxD = _compat.triton_load(q_ref.at[b, t_M[:, None], h_M[:, None], d_D[None, :]],
                              mask=row_ok_MxD, other=0)
  limit = jnp.clip(kv_len_ref[b], 1, L)
  # Whole tiles per split, so that no tile straddles two splits.
  tiles = pl.cdiv(pl.cdiv(limit, bk), splits)
  first, stop = s * tiles, jnp.minimum(limit, (s + 1) * tiles * bk)
  init = (jnp.zeros((bm, Dp), jnp.float32), jnp.full((bm,), MASK_VALUE, jnp.float32),
          jnp.zeros((bm,), jnp.float32))
  o_MxD, m_M, l_M = _cache_tiles([(q_MxD, 0, d_D, d_ok_D)], k_ref, v_ref, mask_ref, b, g,
                                 t_M, row_ok_M, d_D, d_ok_D, stop, init, bk=bk, scale=scale,
                                 first=first)
  if normalise:
    (o_ref,) = out_refs
    out_MxD = o_MxD / jnp.maximum(l_M, 1e-30)[:, None]
    _compat.triton_store(o_ref.at[b, t_M[:, None], h_M[:, None], d_D[None, :]],
                         out_MxD.astype(o_ref.dtype), mask=row_ok_MxD)
    return
  o_ref, m_ref, l_ref = out_refs
  _compat.triton_store(o_ref.at[b, s, t_M[:, None], h_M[:, None], d_D[None, :]], o_MxD,
                       mask=row_ok_MxD)
  _compat.triton_store(m_ref.at[b, s, t_M, h_M], m_M, mask=row_ok_M)
  _compat.triton_store(l_ref.at[b, s, t_M, h_M], l_M, mask=row_ok_M)


def supports_update(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether :func:`decode_attention_update` takes this shape (RoPE needs an even head dim)."""
  return supports(num_heads, num_kv_heads) and head_dim % 2 == 0


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "block_m", "block_k",
                                             "num_warps", "num_stages", "interpret"))
def decode_attention_update(qkv_BxTxN: Array, cos_BxTxD2: Array, sin_BxTxD2: Array,
                            k_BxLxGxD: Array, v_BxLxGxD: Array, mask_BxTxL: Array,
                            cache_index_B: Array, *, num_heads: int, num_kv_heads: int,
                            block_m: int | None = None, block_k: int | None = None,
                            num_warps: int | None = None, num_stages: int = 2,
                            interpret: bool | None = None) -> tuple[Array, Array, Array]:
  """RoPE, the cache write and the attention of a decode or verify call, in one kernel.

  With ``q, k, v`` the column blocks [Q*D | G*D | G*D] of ``qkv`` and
  ``start[b] = clip(cache_index[b], 0, L - T)`` (where ``dynamic_update_slice`` puts
  the new entries)::

    q', k'  = rope(q), rope(k)                rotate-half, f32, back to qkv's dtype
    cache[b, start[b] + t] = k'[b, t], v[b, t]   in the cache's dtype, in place
    o = decode_attention(q', cache, cache, mask, start + T)

  The new tokens' keys and values are attended from ``qkv`` (registers), the committed
  slots ``[0, start)`` from the cache; the (row block 0) program of each (row, kv head)
  writes the new entries, which no program reads from the cache, so the in-place write
  races with nothing. It replaces XLA's RoPE fusions and the two cache updates (150
  kernels per SmolLM2 step), yet measured 17-45 % slower per step than those kernels plus
  :func:`decode_attention` on an H200 (``AttentionScores.PALLAS_FUSED``, docs/perf.md).

  Args:
    qkv_BxTxN: the fused q/k/v projection, N = (Q + 2G) * D, before RoPE; f32 or bf16.
    cos_BxTxD2, sin_BxTxD2: f32 RoPE tables of the new tokens' positions (D/2 frequencies).
    k_BxLxGxD, v_BxLxGxD: the cache before the write; donated (aliased to the outputs).
    mask_BxTxL: bool or integer over the cache after the write, as :func:`decode_attention`.
    cache_index_B: [B] int, slot of each row's first new token.
    num_heads, num_kv_heads: Q and G.
    block_m, block_k, num_warps, num_stages, interpret: as :func:`decode_attention`.

  Returns:
    o [B, T, Q, D] in qkv's dtype, and the written k, v caches.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  B, T, N = qkv_BxTxN.shape
  _, L, G, D = k_BxLxGxD.shape
  Q = num_heads
  if G != num_kv_heads or N != (Q + 2 * G) * D or not supports_update(Q, G, D):
    raise ConfigError(f"decode_attention_update: qkv {qkv_BxTxN.shape} and cache "
                      f"{k_BxLxGxD.shape} do not make {Q} query heads over {num_kv_heads} kv "
                      f"heads of an even head dim (N = (Q + 2G) * D)")
  if v_BxLxGxD.shape != k_BxLxGxD.shape or k_BxLxGxD.shape[0] != B or T > L:
    raise ConfigError(f"decode_attention_update: k {k_BxLxGxD.shape} and v {v_BxLxGxD.shape} "
                      f"must be [B, L, G, D] with B = {B}, L >= T = {T}")
  if cos_BxTxD2.shape != (B, T, D // 2) or sin_BxTxD2.shape != (B, T, D // 2):
    raise ConfigError(f"decode_attention_update: cos {cos_BxTxD2.shape} and sin "
                      f"{sin_BxTxD2.shape} must be {(B, T, D // 2)}")
  if mask_BxTxL.shape != (B, T, L) or cache_index_B.shape != (B,):
    raise ConfigError(f"decode_attention_update: mask {mask_BxTxL.shape} must be {(B, T, L)} "
                      f"and cache_index {cache_index_B.shape} must be {(B,)}")
  rows = (Q // G) * T
  bm, block_k, num_warps, interpret = _launch(B, rows, block_m, block_k, num_warps, interpret,
                                              "decode_attention_update")
  mask = _int8_mask(mask_BxTxL)
  start_B = jnp.clip(cache_index_B.astype(jnp.int32), 0, L - T)
  kernel = functools.partial(_update_kernel, T=T, Tp=_pow2_at_least(T), R=Q // G, Q=Q, G=G,
                             L=L, D=D, Dh=_pow2_at_least(D // 2), Dp=_pow2_at_least(D), bm=bm,
                             bk=block_k,
                             scale=1.0 / math.sqrt(D))
  itemsize = jnp.dtype(k_BxLxGxD.dtype).itemsize
  cost = _compat.cost_estimate(
      flops=4 * B * T * Q * L * D,
      bytes_accessed=itemsize * (2 * B * L * G * D + 2 * B * T * (Q + G) * D) + B * T * L,
      transcendentals=B * T * Q * L)
  cache = jax.ShapeDtypeStruct(k_BxLxGxD.shape, k_BxLxGxD.dtype)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, T, Q, D), qkv_BxTxN.dtype), cache, cache),
      grid=(B, G, pl.cdiv(rows, bm)),
      input_output_aliases={4: 1, 5: 2},
      interpret=interpret,
      name="decode_attention_update",
      compiler_params=_compat.triton_compiler_params(num_warps, num_stages),
      cost_estimate=cost,
  )(start_B, qkv_BxTxN, cos_BxTxD2.astype(jnp.float32), sin_BxTxD2.astype(jnp.float32),
    k_BxLxGxD, v_BxLxGxD, mask)


def _update_kernel(start_ref, qkv_ref, cos_ref, sin_ref, k_ref, v_ref, mask_ref, o_ref,
                   k_out_ref, v_out_ref, *, T, Tp, R, Q, G, L, D, Dh, Dp, bm, bk, scale):
  """One (row b, kv head g, row block i) program of :func:`decode_attention_update`.

  Queries and keys are kept as their two RoPE halves (columns ``[0, D/2)`` and
  ``[D/2, D)``, each padded to Dh lanes): rotate-half is then elementwise on contiguous
  loads, and a score is the sum of the halves' dots. ``k_ref``/``v_ref`` and
  ``k_out_ref``/``v_out_ref`` are the same buffers.
  """
  b, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t_M, h_M, row_ok_M, d_D, d_ok_D = _program_rows(g, i, T=T, R=R, D=D, Dp=Dp, bm=bm)
  half = D // 2
  c_H = jax.lax.iota(jnp.int32, Dh)
  c_ok_H = c_H < half
  dtype = qkv_ref.dtype
  precision = _compat.triton_dot_precision(dtype)

  def rotated(tok_X, col_X, ok_X):
    """rope(x) as (low, high) halves [X, Dh], qkv's dtype, for the D columns from
    ``col_X`` of tokens ``tok_X``: low' = low cos - high sin, high' = high cos + low sin."""
    ok_XxH = ok_X[:, None] & c_ok_H[None, :]
    at = lambda off: qkv_ref.at[b, tok_X[:, None], col_X[:, None] + off + c_H[None, :]]  # noqa: E731
    lo = _compat.triton_load(at(0), mask=ok_XxH, other=0).astype(jnp.float32)
    hi = _compat.triton_load(at(half), mask=ok_XxH, other=0).astype(jnp.float32)
    cos = _compat.triton_load(cos_ref.at[b, tok_X[:, None], c_H[None, :]], mask=ok_XxH, other=0)
    sin = _compat.triton_load(sin_ref.at[b, tok_X[:, None], c_H[None, :]], mask=ok_XxH, other=0)
    return (lo * cos - hi * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype)

  q_lo, q_hi = rotated(t_M, h_M * D, row_ok_M)
  start = start_ref[b]

  # The T new tokens, from qkv: keys rotated, both rounded through the cache's dtype as the
  # cache holds them; a padded token (j >= T) points past the cache's end.
  j_N = jax.lax.iota(jnp.int32, Tp)
  new_N = j_N < T
  k_lo, k_hi = rotated(j_N, jnp.full((Tp,), (Q + g) * D, jnp.int32), new_N)
  k_lo, k_hi = k_lo.astype(k_out_ref.dtype), k_hi.astype(k_out_ref.dtype)
  v_NxD = _compat.triton_load(qkv_ref.at[b, j_N[:, None], (Q + G + g) * D + d_D[None, :]],
                              mask=new_N[:, None] & d_ok_D[None, :], other=0
                              ).astype(v_out_ref.dtype)
  slot_N = jnp.where(new_N, start + j_N, L)
  seen_MxN = _compat.triton_load(mask_ref.at[b, t_M[:, None], slot_N[None, :]],
                                 mask=row_ok_M[:, None] & new_N[None, :], other=0)
  # Row block 0 writes the new entries (every block computes them; only one stores).
  first = i == 0
  write_NxH = new_N[:, None] & c_ok_H[None, :] & first
  _compat.triton_store(k_out_ref.at[b, slot_N[:, None], g, c_H[None, :]], k_lo, mask=write_NxH)
  _compat.triton_store(k_out_ref.at[b, slot_N[:, None], g, half + c_H[None, :]], k_hi,
                       mask=write_NxH)
  _compat.triton_store(v_out_ref.at[b, slot_N[:, None], g, d_D[None, :]], v_NxD,
                       mask=new_N[:, None] & d_ok_D[None, :] & first)

  dims = (((1,), (1,)), ((), ()))
  scores_MxN = (jax.lax.dot_general(q_lo, k_lo.astype(dtype), dims,
                                    preferred_element_type=jnp.float32, precision=precision)
                + jax.lax.dot_general(q_hi, k_hi.astype(dtype), dims,
                                      preferred_element_type=jnp.float32, precision=precision))
  scores_MxN = jnp.where(seen_MxN != 0, scores_MxN * scale, MASK_VALUE)
  init = (jnp.zeros((bm, Dp), jnp.float32), jnp.full((bm,), MASK_VALUE, jnp.float32),
          jnp.zeros((bm,), jnp.float32))
  carry = _online(init, scores_MxN, new_N, v_NxD.astype(dtype), precision)
  # Then the committed slots [0, start), from the cache (which this call writes only at and
  # after start).
  o_MxD, _, l_M = _cache_tiles([(q_lo, 0, c_H, c_ok_H), (q_hi, half, c_H, c_ok_H)], k_ref,
                               v_ref, mask_ref, b, g, t_M, row_ok_M, d_D, d_ok_D, start, carry,
                               bk=bk, scale=scale)
  out_MxD = o_MxD / jnp.maximum(l_M, 1e-30)[:, None]
  _compat.triton_store(o_ref.at[b, t_M[:, None], h_M[:, None], d_D[None, :]],
                       out_MxD.astype(o_ref.dtype), mask=row_ok_M[:, None] & d_ok_D[None, :])

def _program_rows(g, i, *, T, R, D, Dp, bm):
  """A program's rows and head-dim lanes: token t [bm], query head h [bm], row valid [bm],
  lane d [Dp], lane valid [Dp]. Rows are ordered (r, t): row ``i * bm + m`` is query head
  ``g * R + m // T`` at token ``m % T``."""
  row_M = i * bm + jax.lax.iota(jnp.int32, bm)
  row_ok_M = row_M < R * T
  # A row past R * T points past the last token: masked accesses never touch it, and
  # the interpreter's scatter drops it instead of racing on a real row.
  t_M = jnp.where(row_ok_M, row_M % T, T)
  h_M = g * R + jnp.where(row_ok_M, row_M // T, 0)
  # Plain iotas along the head dim (no select on them), so that Triton sees contiguous
  # addresses and vectorises the loads.
  d_D = jax.lax.iota(jnp.int32, Dp)
  return t_M, h_M, row_ok_M, d_D, d_D < D



def _online(carry, scores_MxK, read_K, v_KxD, precision):
  """One online-softmax step: fold a tile's scores and values into (o, running max, sum);
  slots with ``read_K`` false weigh 0."""
  o_MxD, m_M, l_M = carry
  m_new_M = jnp.maximum(m_M, jnp.max(scores_MxK, axis=1))
  correction_M = jnp.exp(m_M - m_new_M)
  p_MxK = jnp.where(read_K[None, :], jnp.exp(scores_MxK - m_new_M[:, None]), 0.0)
  pv_MxD = jnp.dot(p_MxK.astype(v_KxD.dtype), v_KxD, preferred_element_type=jnp.float32,
                   precision=precision)
  return (o_MxD * correction_M[:, None] + pv_MxD, m_new_M,
          l_M * correction_M + jnp.sum(p_MxK, axis=1))


def _cache_tiles(q_parts, k_ref, v_ref, mask_ref, b, g, t_M, row_ok_M, d_D, d_ok_D, limit,
                 init, *, bk, scale, first=0):
  """Streams cache slots ``[first * bk, limit)`` of row b, kv head g in tiles of ``bk`` into
  the online softmax ``init`` (o [bm, Dp], max [bm], sum [bm], f32).

  ``q_parts``: (q [bm, W], first column, lanes [W], lanes valid [W]) pieces of the query
  along the head dim; a score is the sum of their dots with the same columns of the key.
  """
  dtype = q_parts[0][0].dtype
  precision = _compat.triton_dot_precision(dtype)

  def tile(j, carry):
    # Plain iotas along the head dim and the slots (no select on them), so that Triton
    # sees contiguous addresses and vectorises the loads.
    slot_K = j * bk + jax.lax.iota(jnp.int32, bk)
    read_K = slot_K < limit
    scores_MxK = None
    for q_MxW, col, c_W, c_ok_W in q_parts:
      k_KxW = _compat.triton_load(k_ref.at[b, slot_K[:, None], g, col + c_W[None, :]],
                                  mask=read_K[:, None] & c_ok_W[None, :], other=0).astype(dtype)
      part = jax.lax.dot_general(q_MxW, k_KxW, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32, precision=precision)
      scores_MxK = part if scores_MxK is None else scores_MxK + part
    seen_MxK = _compat.triton_load(mask_ref.at[b, t_M[:, None], slot_K[None, :]],
                                   mask=row_ok_M[:, None] & read_K[None, :], other=0)
    scores_MxK = jnp.where(seen_MxK != 0, scores_MxK * scale, MASK_VALUE)
    v_KxD = _compat.triton_load(v_ref.at[b, slot_K[:, None], g, d_D[None, :]],
                                mask=read_K[:, None] & d_ok_D[None, :], other=0).astype(dtype)
    return _online(carry, scores_MxK, read_K, v_KxD, precision)

  return jax.lax.fori_loop(first, jnp.maximum(first, pl.cdiv(limit, bk)), tile, init)


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


def decode_attention_update_reference(qkv_BxTxN: Array, cos_BxTxD2: Array, sin_BxTxD2: Array,
                                      k_BxLxGxD: Array, v_BxLxGxD: Array, mask_BxTxL: Array,
                                      cache_index_B: Array, *, num_heads: int,
                                      num_kv_heads: int) -> tuple[Array, Array, Array]:
  """:func:`decode_attention_update` in plain jnp: split, rotate, ``dynamic_update_slice``,
  :func:`decode_attention_reference`. Same arguments and results."""
  B, T, _ = qkv_BxTxN.shape
  L, G, D = k_BxLxGxD.shape[1:]
  Q = num_heads
  q = qkv_BxTxN[..., :Q * D].reshape(B, T, Q, D)
  k = qkv_BxTxN[..., Q * D:(Q + G) * D].reshape(B, T, G, D)
  v = qkv_BxTxN[..., (Q + G) * D:].reshape(B, T, G, D)

  def rope(x):
    x32 = x.astype(jnp.float32)
    c, s_ = cos_BxTxD2[:, :, None, :], sin_BxTxD2[:, :, None, :]
    x1, x2 = x32[..., :D // 2], x32[..., D // 2:]
    return jnp.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_], axis=-1).astype(x.dtype)

  start_B = jnp.clip(cache_index_B.astype(jnp.int32), 0, L - T)
  write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (i, 0, 0)))
  k_cache = write(k_BxLxGxD, rope(k), start_B)
  v_cache = write(v_BxLxGxD, v, start_B)
  o = decode_attention_reference(rope(q), k_cache, v_cache, mask_BxTxL, start_B + T)
  return o, k_cache, v_cache
