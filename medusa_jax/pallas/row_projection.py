"""A few rows through a layer's projections with their neighbours, in Pallas kernels on the
Triton backend, beside their jnp references.

For one token (batch 1, a plain decode step) every projection of a layer is a
vector-matrix product; for a tree's few nodes or a small batch, a product of a few rows.
XLA:GPU runs each as a reduce or a small GEMM and runs the RMSNorm before it, RoPE and the
cache write after the q/k/v projection, the combine of the attention's cache splits, the
SwiGLU and the residual adds as kernels of their own. At that size a decode step costs what
its kernels cost to launch and drain, not the bytes they read, so these kernels take what
comes before and after a projection along. :func:`row_projection`, per row::

  a   = x                                              (plain)
  a   = round(round(x * rsqrt(mean(x^2) + eps)) * g)   (norm: the layer's RMSNorm)
  a   = round(round(silu(x[:K])) * x[K:])              (gated: the MLP's SwiGLU)
  a   = round(sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s),  M = max_s m_s
                                                       (attention_stats: x = o [B, S, T, K],
                                                        the attention's unnormalised cache
                                                        splits, m, l [B, S, T, A] per head;
                                                        row b * T + t)
  y   = round(a @ w + bias)                            (f32 accumulation)
  out = round(y + residual)                            (residual)

and :func:`row_qkv_projection`, the attention's fused q/k/v projection (norm prologue)
with RoPE on q and k and the cache write in its epilogue, row ``m = b * T + t``::

  qkv = round(norm(x) @ w + bias)      [(Q + 2G) * D]: q heads, k heads, v heads
  q   = round(rope(qkv[q heads]))      returned, [M, Q * D]
  k_cache[b, s], v_cache[b, s] = round(rope(qkv[k heads])), qkv[v heads]   in place,
                                       s = clip(cache_index[b], 0, L - T) + t

``round`` is the cast to the compute dtype, where the model's XLA layers cast: the
kernels compute what :class:`~medusa_jax.models.llama.Block` computes, up to the order
of the f32 sums.

The grid is ``(cdiv(N, block_n), cdiv(M, block_m))``: a program owns ``block_n`` output
columns of ``block_m`` rows and streams ``w`` in ``[block_k, block_n]`` tiles
(``[block_n, block_k]``, contiguous along K, for a ``transposed`` ``[N, K]`` kernel:
``Llama``'s ``out_in``). One row (``block_m`` 1) accumulates elementwise products in an
f32 tile reduced once at the end; several rows (or ``mma``) run tensor-core dots of
``block_m >= 16`` rows, the rows past M masked. In :func:`row_qkv_projection` a program
owns ``block_n`` column pairs ``(c, c + D/2)`` of one head, the two halves that
rotate-half mixes, in two accumulators. A prologue that needs all of a row (the norm's
statistic) reads it in every program: a few KB, which costs less than a kernel of its own.

Blocks (:func:`default_blocks`): an H200 ran a whole batch-1 step's projections (SmolLM2
shapes, ``out_in``) fastest with 1,024-wide K tiles (one trip over K = 576), 4 columns per
program and 8 warps (``scripts/bench_gemv_layout.py --row-nk-blocks``, docs/perf.md): one
DRAM round trip per program and many programs beat deep loops. The several-row tiles are
not yet timed.

As the attention kernel, these are written for the Triton backend: they compile on NVIDIA
GPUs and run under ``interpret=True`` on CPU, where the tests run them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medusa_jax.errors import ConfigError
from medusa_jax.pallas import _compat

__all__ = ["MAX_ROWS", "MMA_ROWS", "default_blocks", "row_projection", "row_projection_reference",
           "row_qkv_projection", "row_qkv_projection_reference", "supports_qkv"]

Array = jax.Array

MMA_ROWS = 16
"""Triton's smallest dot operand side: several rows run as tensor-core dots of
``block_m >= 16`` rows (the rows past M zero)."""
MAX_ROWS = 64
"""Rows per program at most (an f32 accumulator of [64, block_n] per column set)."""


def default_blocks(rows: int) -> dict[str, Any]:
  """Launch parameters for ``rows`` rows (block_m, block_k, block_n, num_warps, mma).

  One row: an elementwise product over a K tile covering the hidden size (one DRAM round
  trip per program), 4 columns per program, 8 warps: the fastest of a sweep of a whole
  batch-1 step's projections on an H200 (SmolLM2 shapes, ``out_in``; docs/perf.md), 14 %
  under XLA's reduces. Several rows (not yet timed): a tensor-core dot per [block_m, 256] x
  [256, 16] tile, narrow for many programs (SmolLM2's o and down projections have 576 columns)
  and deep for few trips over K."""
  if rows <= 1:
    return dict(block_m=1, block_k=1024, block_n=4, num_warps=8, mma=False)
  return dict(block_m=min(MAX_ROWS, max(MMA_ROWS, 1 << (rows - 1).bit_length())),
              block_k=256, block_n=16, num_warps=4, mma=True)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What one kernel computes (static): sizes, prologue, epilogue, tiles."""
  M: int
  K: int
  N: int
  bm: int
  bk: int
  bn: int
  dtype: jnp.dtype
  mma: bool
  transposed: bool
  prologue: str = "plain"  # plain | norm | gated | combine
  eps: float = 0.0
  T: int = 1  # combine and qkv: tokens per batch row (row m is (m // T, m % T))
  splits: int = 1  # combine: S parts of x
  head_dim: int = 1  # combine: the columns of x per (m, l) head; qkv: D
  bias: bool = False
  residual: bool = False
  qkv: tuple[int, int] | None = None  # (Q, G): the q/k/v epilogue (RoPE, cache write)


def _blocks(what, rows, block_m, block_k, block_n, num_warps, mma):
  """The launch parameters with :func:`default_blocks` filled in, checked."""
  auto = default_blocks(rows)
  mma = auto["mma"] if mma is None else bool(mma)
  if block_m is None:  # one row in a dot: the dot's smallest side
    block_m = max(MMA_ROWS, auto["block_m"]) if mma else 1
  bm = block_m
  bk = auto["block_k"] if block_k is None else block_k
  bn = (max(MMA_ROWS, auto["block_n"]) if mma else auto["block_n"]) if block_n is None \
      else block_n
  warps = auto["num_warps"] if num_warps is None else num_warps
  if rows > 1 and not mma:
    raise ConfigError(f"{what}: {rows} rows need mma (one row's elementwise product only)")
  # Triton's dot takes no operand under 16 along any side; an elementwise tile any power of 2.
  least = 16 if mma else 1
  for name, b, lo in (("block_m", bm, least), ("block_k", bk, 16), ("block_n", bn, least)):
    if isinstance(b, bool) or not isinstance(b, int) or b < lo or b & (b - 1):
      raise ConfigError(f"{what}: {name}={b} must be a power of two >= {lo}"
                        + (" (mma)" if mma and name != "block_k" else ""))
  if not mma and bm != 1:
    raise ConfigError(f"{what}: block_m={bm} without mma (the elementwise product is one row)")
  return bm, bk, bn, warps, mma


def _check(x, w, norm_K, bias_N, residual_N, gated, attention_stats, transposed,
           what: str = "row_projection") -> tuple[int, int, int, int, int]:
  """(M, K, N, T, S), or a ConfigError naming the argument whose shape does not fit."""
  if w.ndim != 2:
    raise ConfigError(f"{what}: w must be {'[N, K]' if transposed else '[K, N]'},"
                      f" got shape {w.shape}")
  N, K = w.shape if transposed else w.shape[::-1]
  T = S = 1
  if attention_stats is not None:
    if norm_K is not None or gated:
      raise ConfigError(f"{what}: norm, gated and attention_stats are exclusive "
                        "(one prologue)")
    m, lsum = attention_stats
    if x.ndim != 4 or x.shape[3] != K:
      raise ConfigError(f"{what}: with attention_stats x must be [B, S, T, K] = "
                        f"[B, S, T, {K}], got {x.shape}")
    B, S, T, _ = x.shape
    if m.ndim != 4 or m.shape[:3] != (B, S, T) or lsum.shape != m.shape or K % m.shape[3]:
      raise ConfigError(f"{what}: attention_stats must be two [B, S, T, A] = [{B}, {S}, {T}, "
                        f"A] arrays with A dividing K = {K}, got {m.shape} and {lsum.shape}")
    M = B * T
    out = (M, N)
  else:
    if x.ndim not in (1, 2) or x.shape[-1] != (2 * K if gated else K):
      cols = "2K" if gated else "K"
      raise ConfigError(f"{what}: x must be [{cols}] or [M, {cols}] for w {w.shape}"
                        + (" (gate then up)" if gated else "") + f", got {x.shape}")
    M = 1 if x.ndim == 1 else x.shape[0]
    out = (N,) if x.ndim == 1 else (M, N)
  if M < 1:
    raise ConfigError(f"{what}: x has no rows ({x.shape})")
  for name, a, shape in (("norm", norm_K, (K,)), ("bias", bias_N, (N,)),
                         ("residual", residual_N, out)):
    if a is not None and a.shape != shape:
      raise ConfigError(f"{what}: {name} must be {list(shape)}, got {a.shape}")
  if norm_K is not None and gated:
    raise ConfigError(f"{what}: norm and gated are exclusive (one prologue)")
  return M, K, N, T, S


def _compute_dtype(dtype, x, w, attention_stats):
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.dtype(w.dtype if attention_stats is not None else x.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "gated", "dtype", "block_m", "block_k",
                                             "block_n", "num_warps", "num_stages", "mma",
                                             "transposed", "interpret"))
def row_projection(x: Array, w: Array, *, norm_K: Array | None = None,
                   eps: float = 1e-6, gated: bool = False,
                   attention_stats: tuple[Array, Array] | None = None,
                   bias_N: Array | None = None, residual_N: Array | None = None,
                   dtype: Any = None, block_m: int | None = None, block_k: int | None = None,
                   block_n: int | None = None, num_warps: int | None = None,
                   num_stages: int = 2, mma: bool | None = None, transposed: bool = False,
                   interpret: bool | None = None) -> Array:
  """Rows through a projection with its prologue and epilogue (module docstring).

  Args:
    x: one row [K] or M rows [M, K] in the compute dtype ([2K] / [M, 2K]: gate then up,
      when ``gated``); with ``attention_stats``, the attention's unnormalised split
      outputs o [B, S, T, K] f32 (rows ``m = b * T + t``).
    w: the kernel ``[K, N]`` (``[N, K]`` with ``transposed``), read as the compute dtype.
    norm_K: RMSNorm weight [K]: normalise each row first (with ``eps``).
    eps: the RMSNorm epsilon.
    gated: each row is ``[gate, up]``; project ``silu(gate) * up``.
    attention_stats: (m, l), [B, S, T, A] f32 each: the running max and sum of A heads
      (K / A columns each) in S cache splits (:func:`~medusa_jax.pallas.decode_attention.
      decode_attention_parts`); project their combine.
    bias_N: added in f32 before the cast.
    residual_N: added after the cast, as the model's residual stream (the output's shape).
    dtype: the compute dtype (None: ``x``'s; ``w``'s with ``attention_stats``, where ``x``
      is f32).
    block_m, block_k, block_n: rows, K and N of a program's tile, powers of two (block_k
      >= 16; block_m and block_n >= 16 with ``mma``, block_m 1 without); None: by
      :func:`default_blocks` for M.
    num_warps, num_stages: Triton launch parameters (num_warps None: by
      :func:`default_blocks`).
    mma: reduce over K with tensor-core dots of block_m rows (required for M > 1), else
      (one row) with an elementwise product and a sum. None: by :func:`default_blocks`.
    transposed: ``w`` is ``[N, K]`` (``Llama``'s ``out_in`` layout): a program's tile is
      ``block_n`` rows of ``block_k`` contiguous weights.
    interpret: run in the Pallas interpreter (None: unless the backend is a GPU).

  Returns:
    [N] for a one-row ``x`` of one dimension, else [M, N], in the compute dtype.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  M, K, N, T, S = _check(x, w, norm_K, bias_N, residual_N, gated, attention_stats, transposed)
  bm, bk, bn, warps, mma = _blocks("row_projection", M, block_m, block_k, block_n, num_warps,
                                   mma)
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  dtype = _compute_dtype(dtype, x, w, attention_stats)
  prologue = ("combine" if attention_stats is not None else "norm" if norm_K is not None
              else "gated" if gated else "plain")
  spec = _Spec(M=M, K=K, N=N, bm=bm, bk=bk, bn=bn, dtype=dtype, mma=mma,
               transposed=transposed, prologue=prologue, eps=float(eps), T=T, splits=S,
               head_dim=K // attention_stats[0].shape[3] if attention_stats else 1,
               bias=bias_N is not None, residual=residual_N is not None)
  stats = list(attention_stats) if attention_stats is not None else []
  one_row = x.ndim == 1
  if one_row:  # the kernel sees rows
    x = x[None]
    residual_N = None if residual_N is None else residual_N[None]
  extras = [a for a in (norm_K, *stats, bias_N, residual_N) if a is not None]
  itemsize = dtype.itemsize
  cost = _compat.cost_estimate(
      flops=2 * M * K * N,
      bytes_accessed=itemsize * (K * N + 3 * M * K + 3 * M * N) + 4 * S * M * K,
      transcendentals=M * K if gated else S * M * K if stats else 0)
  out = pl.pallas_call(
      functools.partial(_kernel, spec=spec),
      out_shape=jax.ShapeDtypeStruct((M, N), dtype),
      grid=(pl.cdiv(N, bn), pl.cdiv(M, bm)),
      interpret=interpret,
      name="row_projection",
      compiler_params=_compat.triton_compiler_params(warps, num_stages),
      cost_estimate=cost,
  )(x, w, *extras)
  return out[0] if one_row else out


def supports_qkv(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether :func:`row_qkv_projection` takes this attention shape (RoPE: an even head dim)."""
  return num_heads > 0 and num_kv_heads > 0 and head_dim > 0 and head_dim % 2 == 0


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "eps", "block_m",
                                             "block_k", "block_n", "num_warps", "num_stages",
                                             "mma", "transposed", "interpret"))
def row_qkv_projection(x_MxH: Array, w: Array, k_BxLxGxD: Array, v_BxLxGxD: Array,
                       cache_index_B: Array, cos_MxD2: Array, sin_MxD2: Array, *,
                       num_heads: int, num_kv_heads: int, norm_H: Array,
                       eps: float = 1e-6, bias_N: Array | None = None,
                       block_m: int | None = None, block_k: int | None = None,
                       block_n: int | None = None, num_warps: int | None = None,
                       num_stages: int = 2, mma: bool | None = None, transposed: bool = False,
                       interpret: bool | None = None) -> tuple[Array, Array, Array]:
  """The tokens' normed q/k/v projection, RoPE and cache write (module docstring).

  Rows ``m = b * T + t``: token t of batch row b, written to cache slot ``start[b] + t``,
  ``start[b] = clip(cache_index[b], 0, L - T)`` (where ``dynamic_update_slice`` puts a
  block of T).

  Args:
    x_MxH: the tokens' residual stream, M = B * T rows, in the compute dtype.
    w: the fused q/k/v kernel ``[H, N]`` (``[N, H]`` with ``transposed``), N = (Q + 2G) * D.
    k_BxLxGxD, v_BxLxGxD: the layer's cache, the compute dtype; aliased to the outputs
      (written in place where the caller's buffer is dead after the call).
    cache_index_B: [B] int, each batch row's first new slot.
    cos_MxD2, sin_MxD2: f32 RoPE tables at the rows' positions.
    num_heads, num_kv_heads: Q and G.
    norm_H: the attention's RMSNorm weight [H]; ``eps`` its epsilon.
    bias_N: the projection's bias (Qwen2), added in f32 before the cast.
    block_n: column pairs per program (None: half of :func:`default_blocks`'s block_n, the
      same weight tile in two accumulators; at least 16 with ``mma``); block_m, block_k,
      num_warps, num_stages, mma, transposed, interpret: as :func:`row_projection`.

  Returns:
    q [M, Q * D] (RoPE applied) in the compute dtype, and the written k, v caches.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  Q, G = num_heads, num_kv_heads
  what = "row_qkv_projection"
  if k_BxLxGxD.ndim != 4 or v_BxLxGxD.shape != k_BxLxGxD.shape:
    raise ConfigError(f"{what}: k {k_BxLxGxD.shape} and v {v_BxLxGxD.shape} must be caches "
                      "[B, L, G, D] of one shape")
  B, L, Gc, D = k_BxLxGxD.shape
  if x_MxH.ndim != 2 or x_MxH.shape[0] % B:
    raise ConfigError(f"{what}: x must be [B * T, H] rows for a cache of batch {B}, got "
                      f"{x_MxH.shape}")
  M, K, N, _, _ = _check(x_MxH, w, norm_H, bias_N, None, False, None, transposed, what)
  T = M // B
  if Gc != G or N != (Q + 2 * G) * D or not supports_qkv(Q, G, D):
    raise ConfigError(f"{what}: w {w.shape} and cache {k_BxLxGxD.shape} do not make {Q} "
                      f"query heads over {G} kv heads of an even head dim (N = (Q + 2G) * D)")
  if cos_MxD2.shape != (M, D // 2) or sin_MxD2.shape != (M, D // 2):
    raise ConfigError(f"{what}: cos {cos_MxD2.shape} and sin {sin_MxD2.shape} must be "
                      f"[{M}, {D // 2}]")
  if cache_index_B.shape != (B,):
    raise ConfigError(f"{what}: cache_index must be [{B}], got {cache_index_B.shape}")
  if T > L:
    raise ConfigError(f"{what}: {T} tokens per row do not fit a cache of {L} slots")
  if k_BxLxGxD.dtype != x_MxH.dtype or v_BxLxGxD.dtype != x_MxH.dtype:
    raise ConfigError(f"{what}: the cache ({k_BxLxGxD.dtype}, {v_BxLxGxD.dtype}) must hold "
                      f"x's dtype {x_MxH.dtype}")
  if block_n is None:
    auto = default_blocks(M)
    uses_mma = auto["mma"] if mma is None else mma
    block_n = max(MMA_ROWS if uses_mma else 1, auto["block_n"] // 2)
  bm, bk, bn, warps, mma = _blocks(what, M, block_m, block_k, block_n, num_warps, mma)
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  spec = _Spec(M=M, K=K, N=N, bm=bm, bk=bk, bn=bn, dtype=jnp.dtype(x_MxH.dtype), mma=mma,
               transposed=transposed, prologue="norm", eps=float(eps), T=T, head_dim=D,
               bias=bias_N is not None, qkv=(Q, G))
  start_B = jnp.clip(cache_index_B.astype(jnp.int32), 0, L - T)
  extras = [a for a in (norm_H, bias_N) if a is not None]
  itemsize = jnp.dtype(x_MxH.dtype).itemsize
  cost = _compat.cost_estimate(flops=2 * M * K * N,
                               bytes_accessed=itemsize * (K * N + 2 * M * K + 2 * M * N))
  cache = jax.ShapeDtypeStruct(k_BxLxGxD.shape, k_BxLxGxD.dtype)
  n_in = 4 + len(extras)  # start, x, w, extras, cos, sin, k, v
  return pl.pallas_call(
      functools.partial(_kernel, spec=spec),
      out_shape=(jax.ShapeDtypeStruct((M, Q * D), x_MxH.dtype), cache, cache),
      grid=(pl.cdiv(N // 2, bn), pl.cdiv(M, bm)),
      input_output_aliases={n_in + 1: 1, n_in + 2: 2},
      interpret=interpret,
      name="row_qkv_projection",
      compiler_params=_compat.triton_compiler_params(warps, num_stages),
      cost_estimate=cost,
  )(start_B, x_MxH, w, *extras, cos_MxD2.astype(jnp.float32), sin_MxD2.astype(jnp.float32),
    k_BxLxGxD, v_BxLxGxD)


def _round(x, dtype):
  """The cast to the compute dtype where the model's layers cast, kept in f32."""
  return x.astype(dtype).astype(jnp.float32)


def _load(ref_view, ok):
  return _compat.triton_load(ref_view, mask=ok, other=0).astype(jnp.float32)


def _prologue(x_ref, refs, spec: _Spec, row_M, row_ok_M):
  """``a(k_K, ok_K)``: the program's rows of the projection's input at columns ``k_K``,
  [bm, bk] f32 (rounded), after whatever a whole row needs first (the norm's statistic).
  Pops its refs off ``refs``."""
  K, bk, dtype = spec.K, spec.bk, spec.dtype

  def rows(ref, k_K, ok_K, off=0):
    return _load(ref.at[row_M[:, None], off + k_K[None, :]], row_ok_M[:, None] & ok_K[None, :])

  if spec.prologue == "norm":
    g_ref = refs.pop(0)

    def sumsq(j, acc_MxK):
      k_K = j * bk + jax.lax.iota(jnp.int32, bk)
      x_MxK = rows(x_ref, k_K, k_K < K)
      return acc_MxK + x_MxK * x_MxK

    ss_MxK = jax.lax.fori_loop(0, pl.cdiv(K, bk), sumsq, jnp.zeros((spec.bm, bk), jnp.float32))
    scale_Mx1 = jax.lax.rsqrt(jnp.sum(ss_MxK, axis=1) / K + spec.eps)[:, None]
    return lambda k_K, ok_K: _round(_round(rows(x_ref, k_K, ok_K) * scale_Mx1, dtype)
                                    * _round(_load(g_ref.at[k_K], ok_K), dtype)[None, :], dtype)
  if spec.prologue == "gated":
    return lambda k_K, ok_K: _round(_round(jax.nn.silu(rows(x_ref, k_K, ok_K)), dtype)
                                    * rows(x_ref, k_K, ok_K, K), dtype)
  if spec.prologue == "combine":
    m_ref, l_ref = refs.pop(0), refs.pop(0)
    b_Mx1, t_Mx1 = (row_M // spec.T)[:, None], (row_M % spec.T)[:, None]

    def combined(k_K, ok_K):
      ok_MxK = row_ok_M[:, None] & ok_K[None, :]
      head_1xK = jnp.where(ok_K, k_K // spec.head_dim, 0)[None, :]
      m_S = [_load(m_ref.at[b_Mx1, s, t_Mx1, head_1xK], ok_MxK) for s in range(spec.splits)]
      top = functools.reduce(jnp.maximum, m_S)
      num = den = jnp.zeros((spec.bm, bk), jnp.float32)
      for s in range(spec.splits):
        w = jnp.exp(m_S[s] - top)
        num = num + w * _load(x_ref.at[b_Mx1, s, t_Mx1, k_K[None, :]], ok_MxK)
        den = den + w * _load(l_ref.at[b_Mx1, s, t_Mx1, head_1xK], ok_MxK)
      return _round(num / jnp.maximum(den, 1e-30), dtype)
    return combined
  return lambda k_K, ok_K: _round(rows(x_ref, k_K, ok_K), dtype)


def _kernel(*refs, spec: _Spec):
  """One program: ``bm`` rows by ``bn`` output columns (column pairs with ``spec.qkv``);
  see the module docstring. Accesses use index arrays (``start + iota``), which the Triton
  lowering turns into pointer arithmetic and the interpreter supports; tiles past M, K or
  N are masked."""
  refs = list(refs)
  start_ref = refs.pop(0) if spec.qkv else None
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  M, K, N, bk, bn, dtype = spec.M, spec.K, spec.N, spec.bk, spec.bn, spec.dtype
  row_M = pl.program_id(1) * spec.bm + jax.lax.iota(jnp.int32, spec.bm)
  # A row past M points past the last row: masked accesses never touch it, and the
  # interpreter's scatter drops it instead of racing on a real row.
  row_ok_M = row_M < M
  row_M = jnp.where(row_ok_M, row_M, M)
  a = _prologue(x_ref, refs, spec, row_M, row_ok_M)
  b_ref = refs.pop(0) if spec.bias else None
  r_ref = refs.pop(0) if spec.residual else None
  first = pl.program_id(0) * bn + jax.lax.iota(jnp.int32, bn)
  if spec.qkv:  # column pairs (c, c + D/2) of one head
    half = spec.head_dim // 2
    pair_ok = first < N // 2
    head, j = first // half, first % half
    col_a = jnp.where(pair_ok, head * spec.head_dim + j, 0)
    cols = [(col_a, pair_ok), (col_a + half, pair_ok)]
  else:
    cols = [(first, first < N)]
  precision = _compat.triton_dot_precision(dtype)

  def product(a_MxK, k_K, k_ok_K, col_N, ok_N):
    if spec.transposed:
      w_NxK = _compat.triton_load(w_ref.at[col_N[:, None], k_K[None, :]],
                                  mask=ok_N[:, None] & k_ok_K[None, :], other=0).astype(dtype)
      if spec.mma:
        return jax.lax.dot_general(a_MxK.astype(dtype), w_NxK, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32, precision=precision)
      return w_NxK.astype(jnp.float32) * a_MxK  # one row, broadcast over the N tile
    w_KxN = _compat.triton_load(w_ref.at[k_K[:, None], col_N[None, :]],
                                mask=k_ok_K[:, None] & ok_N[None, :], other=0).astype(dtype)
    if spec.mma:
      return jnp.dot(a_MxK.astype(dtype), w_KxN, preferred_element_type=jnp.float32,
                     precision=precision)
    return jnp.sum(a_MxK, axis=0)[:, None] * w_KxN.astype(jnp.float32)

  def tile(step, accs):
    k_K = step * bk + jax.lax.iota(jnp.int32, bk)
    k_ok_K = k_K < K
    a_MxK = a(k_K, k_ok_K)
    return tuple(acc + product(a_MxK, k_K, k_ok_K, c, ok) for acc, (c, ok) in zip(accs, cols))

  if spec.mma:
    shape = (spec.bm, bn)
  else:  # one row: the products of every K tile, summed over K once at the end
    shape = (bn, bk) if spec.transposed else (bk, bn)
  accs = jax.lax.fori_loop(0, pl.cdiv(K, bk), tile,
                           tuple(jnp.zeros(shape, jnp.float32) for _ in cols))
  ys = []
  for acc, (c, ok) in zip(accs, cols):
    if spec.mma:
      y_MxN = acc
    else:
      y_MxN = jnp.sum(acc, axis=1 if spec.transposed else 0)[None, :]
    if spec.bias:
      y_MxN = y_MxN + _load(b_ref.at[c], ok)[None, :]
    ys.append(_round(y_MxN, dtype))
  if spec.qkv:
    _qkv_epilogue(start_ref, refs, ys, row_M, row_ok_M, head, j, pair_ok, spec)
    return
  (y_MxN,) = ys
  (col_N, ok_N), (o_ref,) = cols[0], refs
  ok_MxN = row_ok_M[:, None] & ok_N[None, :]
  if spec.residual:
    y_MxN = y_MxN + _load(r_ref.at[row_M[:, None], col_N[None, :]], ok_MxN)
  _compat.triton_store(o_ref.at[row_M[:, None], col_N[None, :]], y_MxN.astype(o_ref.dtype),
                       mask=ok_MxN)


def _qkv_epilogue(start_ref, refs, ys, row_M, row_ok_M, head_N, j_N, ok_N, spec: _Spec):
  """RoPE on the q and k heads' pairs, then q to its output and k, v to the cache slots."""
  cos_ref, sin_ref, _, _, q_ref, k_ref, v_ref = refs
  Q, G = spec.qkv
  D, half, L = spec.head_dim, spec.head_dim // 2, k_ref.shape[1]
  lo, hi = ys
  ok_MxN = row_ok_M[:, None] & ok_N[None, :]
  rotate_1xN = (head_N < Q + G)[None, :]
  at = (row_M[:, None], j_N[None, :])
  cos = jnp.where(rotate_1xN, _load(cos_ref.at[at], ok_MxN), 1.0)
  sin = jnp.where(rotate_1xN, _load(sin_ref.at[at], ok_MxN), 0.0)
  lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
  b_Mx1 = (row_M // spec.T)[:, None]
  slot_Mx1 = _compat.triton_load(start_ref.at[row_M // spec.T], mask=row_ok_M,
                                 other=0)[:, None] + (row_M % spec.T)[:, None]
  is_q = ok_MxN & (head_N < Q)[None, :]
  is_k = ok_MxN & ((head_N >= Q) & (head_N < Q + G))[None, :]
  is_v = ok_MxN & (head_N >= Q + G)[None, :]
  # A masked lane points past its output's end: the Triton store never touches it, and
  # the interpreter's scatter drops it instead of racing with a real lane's write.
  q_col = jnp.where(is_q, (head_N * D + j_N)[None, :], Q * D)
  k_slot = jnp.where(is_k, slot_Mx1, L)
  v_slot = jnp.where(is_v, slot_Mx1, L)
  k_head = jnp.clip(head_N - Q, 0, G - 1)[None, :]
  v_head = jnp.clip(head_N - Q - G, 0, G - 1)[None, :]
  j_1xN = j_N[None, :]
  q_at = lambda off: q_ref.at[row_M[:, None], q_col + off]  # noqa: E731
  k_at = lambda off: k_ref.at[b_Mx1, k_slot, k_head, j_1xN + off]  # noqa: E731
  v_at = lambda off: v_ref.at[b_Mx1, v_slot, v_head, j_1xN + off]  # noqa: E731
  for out_at, out_ref, mask in ((q_at, q_ref, is_q), (k_at, k_ref, is_k), (v_at, v_ref, is_v)):
    _compat.triton_store(out_at(0), lo.astype(out_ref.dtype), mask=mask)
    _compat.triton_store(out_at(half), hi.astype(out_ref.dtype), mask=mask)


def row_projection_reference(x: Array, w: Array, *, norm_K: Array | None = None,
                             eps: float = 1e-6, gated: bool = False,
                             attention_stats: tuple[Array, Array] | None = None,
                             bias_N: Array | None = None, residual_N: Array | None = None,
                             dtype: Any = None, transposed: bool = False) -> Array:
  """:func:`row_projection` in plain jnp (the same casts; XLA's own reduction order)."""
  M, K, N, T, S = _check(x, w, norm_K, bias_N, residual_N, gated, attention_stats, transposed)
  w_KxN = w.T if transposed else w
  dtype = _compute_dtype(dtype, x, w, attention_stats)
  a = x.astype(jnp.float32)
  lead = lambda v: v.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))  # noqa: E731
  if norm_K is not None:
    a = _round(_round(a * jax.lax.rsqrt(jnp.mean(a * a, axis=-1, keepdims=True) + eps), dtype)
               * _round(lead(norm_K), dtype), dtype)
  elif gated:
    a = _round(_round(jax.nn.silu(a[..., :K]), dtype) * a[..., K:], dtype)
  elif attention_stats is not None:
    m, lsum = (s.astype(jnp.float32) for s in attention_stats)
    A = m.shape[3]
    w_BxSxTxA = jnp.exp(m - m.max(axis=1, keepdims=True))
    o = a.reshape(*a.shape[:3], A, K // A)
    num_BxTxAxD = jnp.sum(w_BxSxTxA[..., None] * o, axis=1)
    den_BxTxA = jnp.sum(w_BxSxTxA * lsum, axis=1)
    a = _round((num_BxTxAxD / jnp.maximum(den_BxTxA, 1e-30)[..., None]).reshape(M, K), dtype)
  else:
    a = _round(a, dtype)
  y = jnp.dot(a, _round(w_KxN.astype(jnp.float32), dtype), precision=jax.lax.Precision.HIGHEST)
  if bias_N is not None:
    y = y + bias_N.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))
  y = _round(y, dtype)
  if residual_N is not None:
    y = y + residual_N.astype(jnp.float32)
  return y.astype(dtype)


def row_qkv_projection_reference(x_MxH: Array, w: Array, k_BxLxGxD: Array, v_BxLxGxD: Array,
                                 cache_index_B: Array, cos_MxD2: Array, sin_MxD2: Array, *,
                                 num_heads: int, num_kv_heads: int, norm_H: Array,
                                 eps: float = 1e-6, bias_N: Array | None = None,
                                 transposed: bool = False) -> tuple[Array, Array, Array]:
  """:func:`row_qkv_projection` in plain jnp: the projection, RoPE in f32 and a
  ``dynamic_update_slice`` of each batch row's cache."""
  Q, G = num_heads, num_kv_heads
  B, L, _, D = k_BxLxGxD.shape
  M = x_MxH.shape[0]
  T = M // B
  qkv = row_projection_reference(x_MxH, w, norm_K=norm_H, eps=eps, bias_N=bias_N,
                                 transposed=transposed).astype(jnp.float32)
  heads = qkv.reshape(M, Q + 2 * G, D)
  lo, hi = heads[:, :Q + G, :D // 2], heads[:, :Q + G, D // 2:]
  cos, sin = (c.astype(jnp.float32)[:, None, :] for c in (cos_MxD2, sin_MxD2))
  rotated = jnp.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
  q, k, v = rotated[:, :Q], rotated[:, Q:], heads[:, Q + G:]

  def write(cache_LxGxD, new_TxGxD, i):
    return jax.lax.dynamic_update_slice(cache_LxGxD, new_TxGxD.astype(cache_LxGxD.dtype),
                                        (i, 0, 0))

  idx = cache_index_B.astype(jnp.int32)
  k_cache = jax.vmap(write)(k_BxLxGxD, k.reshape(B, T, G, D), idx)
  v_cache = jax.vmap(write)(v_BxLxGxD, v.reshape(B, T, G, D), idx)
  return q.reshape(M, Q * D).astype(x_MxH.dtype), k_cache, v_cache
