"""One row through a layer's projections with their neighbours, in Pallas kernels on the
Triton backend, beside their jnp references.

For one token (batch 1, a plain decode step) every projection of a layer is a
vector-matrix product. XLA:GPU rewrites each into a reduce (the weight read once, a few
KB out) and runs the RMSNorm before it, RoPE and the cache write after the q/k/v
projection, the combine of the attention's cache splits, the SwiGLU and the residual
adds as kernels of their own. At that size a decode step costs what its kernels cost to
launch and drain, not the bytes they read, so these kernels take what comes before and
after a projection along. :func:`row_projection`::

  a   = x                                              (plain)
  a   = round(round(x * rsqrt(mean(x^2) + eps)) * g)   (norm: the layer's RMSNorm)
  a   = round(round(silu(x[:K])) * x[K:])              (gated: the MLP's SwiGLU)
  a   = round(sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s),  M = max_s m_s
                                                       (attention_stats: x = o [S, K], the
                                                        attention's unnormalised cache
                                                        splits, m, l [S, A] per head)
  y   = round(a @ w + bias)                            (f32 accumulation)
  out = round(y + residual)                            (residual)

and :func:`row_qkv_projection`, the attention's fused q/k/v projection (norm prologue)
with RoPE on q and k and the cache write in its epilogue::

  qkv = round(norm(x) @ w + bias)      [(Q + 2G) * D]: q heads, k heads, v heads
  q   = round(rope(qkv[q heads]))      returned, [Q * D]
  k_cache[0, s], v_cache[0, s] = round(rope(qkv[k heads])), qkv[v heads]   in place,
                                       s = clip(cache_index, 0, L - 1)

``round`` is the cast to the compute dtype, where the model's XLA layers cast: the
kernels compute what :class:`~medusa_jax.models.llama.Block` computes, up to the order
of the f32 sums.

The grid is ``(cdiv(N, block_n),)``: a program owns ``block_n`` output columns and
streams ``w`` in ``[block_k, block_n]`` tiles (``[block_n, block_k]``, contiguous along
K, for a ``transposed`` ``[N, K]`` kernel: ``Llama``'s ``out_in``), accumulating the
products in an f32 tile reduced once at the end (or, with ``mma``, in a tensor-core dot
whose first row is ``x``). In :func:`row_qkv_projection` a program owns ``block_n``
column pairs ``(c, c + D/2)`` of one head, the two halves that rotate-half mixes, in two
accumulators. A prologue that needs all of ``x`` (the norm's statistic) reads it in every
program: a few KB, which costs less than a kernel of its own.

Blocks: an H200 ran a whole batch-1 step's projections (SmolLM2 shapes, ``out_in``) fastest
with 1,024-wide K tiles (one trip over K = 576), 4 columns per program and 8 warps
(``scripts/bench_gemv_layout.py --row-nk-blocks``, docs/perf.md): one DRAM round trip per
program and many programs beat deep loops.

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

__all__ = ["DEFAULT_BLOCK_K", "DEFAULT_BLOCK_N", "DEFAULT_NUM_WARPS", "row_projection",
           "row_projection_reference", "row_qkv_projection", "row_qkv_projection_reference",
           "supports_qkv"]

Array = jax.Array

# The fastest of a sweep on an H200 (module docstring): a K tile covering the hidden size,
# few columns per program, 8 warps. The tensor-core reduction (mma) lost to the elementwise
# one at every size tried.
DEFAULT_BLOCK_K = 1024
DEFAULT_BLOCK_N = 4
DEFAULT_NUM_WARPS = 8
MMA_ROWS = 16
"""Rows of the tensor-core dot that carries the one row (Triton's smallest M)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What one kernel computes (static): sizes, prologue, epilogue, tiles."""
  K: int
  N: int
  bk: int
  bn: int
  dtype: jnp.dtype
  prologue: str = "plain"  # plain | norm | gated | combine
  eps: float = 0.0
  splits: int = 1  # combine: S parts of x
  head_dim: int = 1  # combine: the columns of x per (m, l) head; qkv: D
  bias: bool = False
  residual: bool = False
  mma: bool = False
  transposed: bool = False
  qkv: tuple[int, int] | None = None  # (Q, G): the q/k/v epilogue (RoPE, cache write)


def _check_blocks(what: str, block_k: int, block_n: int, mma: bool) -> None:
  # Triton's dot takes no operand under 16 along any side; an elementwise tile any power of 2.
  least_n = 16 if mma else 1
  for name, b, least in (("block_k", block_k, 16), ("block_n", block_n, least_n)):
    if isinstance(b, bool) or not isinstance(b, int) or b < least or b & (b - 1):
      raise ConfigError(f"{what}: {name}={b} must be a power of two >= {least}"
                        + (" (mma)" if mma and name == "block_n" else ""))


def _check(x, w, norm_K, bias_N, residual_N, gated, attention_stats, transposed,
           what: str = "row_projection") -> tuple[int, int, int]:
  """(K, N, S), or a ConfigError naming the argument whose shape does not fit."""
  if w.ndim != 2:
    raise ConfigError(f"{what}: w must be {'[N, K]' if transposed else '[K, N]'},"
                      f" got shape {w.shape}")
  N, K = w.shape if transposed else w.shape[::-1]
  S = 1
  if attention_stats is not None:
    if norm_K is not None or gated:
      raise ConfigError(f"{what}: norm, gated and attention_stats are exclusive "
                        "(one prologue)")
    m, lsum = attention_stats
    if x.ndim != 2 or x.shape[1] != K:
      raise ConfigError(f"{what}: with attention_stats x must be [S, K] = [S, {K}], "
                        f"got {x.shape}")
    S = x.shape[0]
    if m.ndim != 2 or m.shape[0] != S or lsum.shape != m.shape or K % m.shape[1]:
      raise ConfigError(f"{what}: attention_stats must be two [S, A] = [{S}, A] "
                        f"arrays with A dividing K = {K}, got {m.shape} and {lsum.shape}")
  elif x.shape != ((2 * K,) if gated else (K,)):
    want = "[2K] (gate then up)" if gated else "[K]"
    raise ConfigError(f"{what}: x must be {want} for w {w.shape}, got {x.shape}")
  for name, a, n in (("norm", norm_K, K), ("bias", bias_N, N), ("residual", residual_N, N)):
    if a is not None and a.shape != (n,):
      raise ConfigError(f"{what}: {name} must be [{n}], got {a.shape}")
  if norm_K is not None and gated:
    raise ConfigError(f"{what}: norm and gated are exclusive (one prologue)")
  return K, N, S


@functools.partial(jax.jit, static_argnames=("eps", "gated", "dtype", "block_k", "block_n",
                                             "num_warps", "num_stages", "mma", "transposed",
                                             "interpret"))
def row_projection(x: Array, w: Array, *, norm_K: Array | None = None,
                   eps: float = 1e-6, gated: bool = False,
                   attention_stats: tuple[Array, Array] | None = None,
                   bias_N: Array | None = None, residual_N: Array | None = None,
                   dtype: Any = None, block_k: int = DEFAULT_BLOCK_K,
                   block_n: int = DEFAULT_BLOCK_N,
                   num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = 2,
                   mma: bool = False, transposed: bool = False,
                   interpret: bool | None = None) -> Array:
  """One row through a projection with its prologue and epilogue (module docstring).

  Args:
    x: the row, [K] in the compute dtype ([2K]: gate then up, when ``gated``; [S, K] f32:
      the attention's unnormalised split outputs, with ``attention_stats``).
    w: the kernel ``[K, N]`` (``[N, K]`` with ``transposed``), read as the compute dtype.
    norm_K: RMSNorm weight [K]: normalise ``x`` first (with ``eps``).
    eps: the RMSNorm epsilon.
    gated: ``x`` is ``[gate, up]``; project ``silu(gate) * up``.
    attention_stats: (m, l), [S, A] f32 each: the running max and sum of A heads (K / A
      columns each) in S cache splits (:func:`~medusa_jax.pallas.decode_attention.
      decode_attention_parts`); project their combine.
    bias_N: added in f32 before the cast.
    residual_N: added after the cast, as the model's residual stream.
    dtype: the compute dtype (None: ``x``'s; ``w``'s with ``attention_stats``, where ``x``
      is f32).
    block_k, block_n: tile of ``w``, powers of two; block_k >= 16, block_n >= 16 with ``mma``.
    num_warps, num_stages: Triton launch parameters.
    mma: reduce over K with a tensor-core dot (the row padded to :data:`MMA_ROWS`), else
      with an elementwise product and a sum.
    transposed: ``w`` is ``[N, K]`` (``Llama``'s ``out_in`` layout): a program's tile is
      ``block_n`` rows of ``block_k`` contiguous weights.
    interpret: run in the Pallas interpreter (None: unless the backend is a GPU).

  Returns:
    [N] in the compute dtype.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  K, N, S = _check(x, w, norm_K, bias_N, residual_N, gated, attention_stats, transposed)
  _check_blocks("row_projection", block_k, block_n, mma)
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  dtype = _compute_dtype(dtype, x, w, attention_stats)
  prologue = ("combine" if attention_stats is not None else "norm" if norm_K is not None
              else "gated" if gated else "plain")
  spec = _Spec(K=K, N=N, bk=block_k, bn=block_n, dtype=jnp.dtype(dtype), prologue=prologue,
               eps=float(eps), splits=S,
               head_dim=K // attention_stats[0].shape[1] if attention_stats else 1,
               bias=bias_N is not None, residual=residual_N is not None, mma=mma,
               transposed=transposed)
  stats = list(attention_stats) if attention_stats is not None else []
  extras = [a for a in (norm_K, *stats, bias_N, residual_N) if a is not None]
  itemsize = jnp.dtype(dtype).itemsize
  cost = _compat.cost_estimate(flops=2 * K * N,
                               bytes_accessed=itemsize * (K * N + 3 * K + 3 * N) + 4 * S * K,
                               transcendentals=K if gated else S * K if stats else 0)
  return pl.pallas_call(
      functools.partial(_kernel, spec=spec),
      out_shape=jax.ShapeDtypeStruct((N,), dtype),
      grid=(pl.cdiv(N, block_n),),
      interpret=interpret,
      name="row_projection",
      compiler_params=_compat.triton_compiler_params(num_warps, num_stages),
      cost_estimate=cost,
  )(x, w, *extras)


def _compute_dtype(dtype, x, w, attention_stats):
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.dtype(w.dtype if attention_stats is not None else x.dtype)


def supports_qkv(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether :func:`row_qkv_projection` takes this attention shape (RoPE: an even head dim)."""
  return num_heads > 0 and num_kv_heads > 0 and head_dim > 0 and head_dim % 2 == 0


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "eps", "block_k",
                                             "block_n", "num_warps", "num_stages", "mma",
                                             "transposed", "interpret"))
def row_qkv_projection(x_H: Array, w: Array, k_1xLxGxD: Array, v_1xLxGxD: Array,
                       cache_index_1: Array, cos_D2: Array, sin_D2: Array, *,
                       num_heads: int, num_kv_heads: int, norm_H: Array,
                       eps: float = 1e-6, bias_N: Array | None = None,
                       block_k: int = DEFAULT_BLOCK_K, block_n: int = DEFAULT_BLOCK_N // 2,
                       num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = 2,
                       mma: bool = False, transposed: bool = False,
                       interpret: bool | None = None) -> tuple[Array, Array, Array]:
  """One token's normed q/k/v projection, RoPE and cache write (module docstring).

  Args:
    x_H: the token's residual stream [H] in the compute dtype.
    w: the fused q/k/v kernel ``[H, N]`` (``[N, H]`` with ``transposed``), N = (Q + 2G) * D.
    k_1xLxGxD, v_1xLxGxD: the layer's cache (batch 1), the compute dtype; aliased to the
      outputs (written in place where the caller donates them).
    cache_index_1: [1] int, the token's slot (clipped to [0, L - 1], as
      ``dynamic_update_slice`` clips).
    cos_D2, sin_D2: f32 RoPE tables at the token's position, [D/2] each.
    num_heads, num_kv_heads: Q and G.
    norm_H: the attention's RMSNorm weight [H]; ``eps`` its epsilon.
    bias_N: the projection's bias (Qwen2), added in f32 before the cast.
    block_k: K tile; block_n: column pairs per program; num_warps, num_stages, mma,
      transposed, interpret: as :func:`row_projection`.

  Returns:
    q [Q * D] (RoPE applied) in the compute dtype, and the written k, v caches.

  Raises:
    ConfigError: shapes or block sizes the kernel does not take.
  """
  Q, G = num_heads, num_kv_heads
  if k_1xLxGxD.ndim != 4 or k_1xLxGxD.shape[0] != 1 or v_1xLxGxD.shape != k_1xLxGxD.shape:
    raise ConfigError(f"row_qkv_projection: k {k_1xLxGxD.shape} and v {v_1xLxGxD.shape} must "
                      "be one row's cache [1, L, G, D]")
  _, L, Gc, D = k_1xLxGxD.shape
  K, N, _ = _check(x_H, w, norm_H, bias_N, None, False, None, transposed,
                   "row_qkv_projection")
  if Gc != G or N != (Q + 2 * G) * D or not supports_qkv(Q, G, D):
    raise ConfigError(f"row_qkv_projection: w {w.shape} and cache {k_1xLxGxD.shape} do not "
                      f"make {Q} query heads over {G} kv heads of an even head dim "
                      "(N = (Q + 2G) * D)")
  if cos_D2.shape != (D // 2,) or sin_D2.shape != (D // 2,):
    raise ConfigError(f"row_qkv_projection: cos {cos_D2.shape} and sin {sin_D2.shape} must be "
                      f"[{D // 2}]")
  if cache_index_1.shape != (1,):
    raise ConfigError(f"row_qkv_projection: cache_index must be [1], got {cache_index_1.shape}")
  if k_1xLxGxD.dtype != x_H.dtype or v_1xLxGxD.dtype != x_H.dtype:
    raise ConfigError(f"row_qkv_projection: the cache ({k_1xLxGxD.dtype}, {v_1xLxGxD.dtype}) "
                      f"must hold x's dtype {x_H.dtype}")
  _check_blocks("row_qkv_projection", block_k, block_n, mma)
  if interpret is None:
    interpret = _compat.default_interpret("gpu")
  spec = _Spec(K=K, N=N, bk=block_k, bn=block_n, dtype=jnp.dtype(x_H.dtype), prologue="norm",
               eps=float(eps), head_dim=D, bias=bias_N is not None, mma=mma,
               transposed=transposed, qkv=(Q, G))
  start_1 = jnp.clip(cache_index_1.astype(jnp.int32), 0, L - 1)
  extras = [a for a in (norm_H, bias_N) if a is not None]
  itemsize = jnp.dtype(x_H.dtype).itemsize
  cost = _compat.cost_estimate(flops=2 * K * N, bytes_accessed=itemsize * (K * N + 2 * K + 2 * N),
                               transcendentals=0)
  cache = jax.ShapeDtypeStruct(k_1xLxGxD.shape, k_1xLxGxD.dtype)
  n_in = 4 + len(extras)  # start, x, w, extras, cos, sin, k, v
  return pl.pallas_call(
      functools.partial(_kernel, spec=spec),
      out_shape=(jax.ShapeDtypeStruct((Q * D,), x_H.dtype), cache, cache),
      grid=(pl.cdiv(N // 2, block_n),),
      input_output_aliases={n_in + 1: 1, n_in + 2: 2},
      interpret=interpret,
      name="row_qkv_projection",
      compiler_params=_compat.triton_compiler_params(num_warps, num_stages),
      cost_estimate=cost,
  )(start_1, x_H, w, *extras, cos_D2.astype(jnp.float32), sin_D2.astype(jnp.float32),
    k_1xLxGxD, v_1xLxGxD)


def _round(x, dtype):
  """The cast to the compute dtype where the model's layers cast, kept in f32."""
  return x.astype(dtype).astype(jnp.float32)


def _load(ref_view, ok):
  return _compat.triton_load(ref_view, mask=ok, other=0).astype(jnp.float32)


def _prologue(x_ref, refs, spec: _Spec):
  """``a(k_K, ok_K)``: the projection's input at columns ``k_K`` (f32, rounded), after
  whatever the whole row needs first (the norm's statistic). Pops its refs off ``refs``."""
  K, bk, dtype = spec.K, spec.bk, spec.dtype
  if spec.prologue == "norm":
    g_ref = refs.pop(0)

    def sumsq(j, acc_K):
      k_K = j * bk + jax.lax.iota(jnp.int32, bk)
      x_K = _load(x_ref.at[k_K], k_K < K)
      return acc_K + x_K * x_K

    ss_K = jax.lax.fori_loop(0, pl.cdiv(K, bk), sumsq, jnp.zeros((bk,), jnp.float32))
    scale = jax.lax.rsqrt(jnp.sum(ss_K) / K + spec.eps)
    return lambda k_K, ok_K: _round(_round(_load(x_ref.at[k_K], ok_K) * scale, dtype)
                                    * _round(_load(g_ref.at[k_K], ok_K), dtype), dtype)
  if spec.prologue == "gated":
    return lambda k_K, ok_K: _round(_round(jax.nn.silu(_load(x_ref.at[k_K], ok_K)), dtype)
                                    * _load(x_ref.at[K + k_K], ok_K), dtype)
  if spec.prologue == "combine":
    m_ref, l_ref = refs.pop(0), refs.pop(0)

    def combined(k_K, ok_K):
      head_K = jnp.where(ok_K, k_K // spec.head_dim, 0)
      m_SK = [_load(m_ref.at[s, head_K], ok_K) for s in range(spec.splits)]
      top_K = functools.reduce(jnp.maximum, m_SK)
      num_K = den_K = jnp.zeros((bk,), jnp.float32)
      for s in range(spec.splits):
        w_K = jnp.exp(m_SK[s] - top_K)
        num_K = num_K + w_K * _load(x_ref.at[s, k_K], ok_K)
        den_K = den_K + w_K * _load(l_ref.at[s, head_K], ok_K)
      return _round(num_K / jnp.maximum(den_K, 1e-30), dtype)
    return combined
  return lambda k_K, ok_K: _round(_load(x_ref.at[k_K], ok_K), dtype)


def _kernel(*refs, spec: _Spec):
  """One program: ``bn`` output columns (column pairs with ``spec.qkv``); see the module
  docstring. Accesses use index arrays (``start + iota``), which the Triton lowering turns
  into pointer arithmetic and the interpreter supports; tiles past K or N are masked."""
  refs = list(refs)
  start_ref = refs.pop(0) if spec.qkv else None
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  a = _prologue(x_ref, refs, spec)
  b_ref = refs.pop(0) if spec.bias else None
  r_ref = refs.pop(0) if spec.residual else None
  K, N, bk, bn, dtype = spec.K, spec.N, spec.bk, spec.bn, spec.dtype
  first = pl.program_id(0) * bn + jax.lax.iota(jnp.int32, bn)
  if spec.qkv:  # column pairs (c, c + D/2) of one head
    half = spec.head_dim // 2
    pair_ok = first < N // 2
    head, j = first // half, first % half
    col_a = jnp.where(pair_ok, head * spec.head_dim + j, 0)
    cols = [(col_a, pair_ok), (col_a + half, pair_ok)]
  else:
    cols = [(first, first < N)]

  def product(a_K, k_K, k_ok_K, col_N, ok_N):
    if spec.transposed:
      w_NxK = _compat.triton_load(w_ref.at[col_N[:, None], k_K[None, :]],
                                  mask=ok_N[:, None] & k_ok_K[None, :], other=0).astype(dtype)
      if spec.mma:
        a_MxK = jnp.where(jax.lax.iota(jnp.int32, MMA_ROWS)[:, None] == 0, a_K[None, :], 0.0)
        return jax.lax.dot_general(
            a_MxK.astype(dtype), w_NxK, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32, precision=_compat.triton_dot_precision(dtype))
      return w_NxK.astype(jnp.float32) * a_K[None, :]
    w_KxN = _compat.triton_load(w_ref.at[k_K[:, None], col_N[None, :]],
                                mask=k_ok_K[:, None] & ok_N[None, :], other=0).astype(dtype)
    if spec.mma:
      # The row as the first of MMA_ROWS (the rest zero): the tensor cores' dot does the
      # K reduction, with its operand loads; the wasted rows cost no bandwidth.
      a_MxK = jnp.where(jax.lax.iota(jnp.int32, MMA_ROWS)[:, None] == 0, a_K[None, :], 0.0)
      return jnp.dot(a_MxK.astype(dtype), w_KxN, preferred_element_type=jnp.float32,
                     precision=_compat.triton_dot_precision(dtype))
    return a_K[:, None] * w_KxN.astype(jnp.float32)

  def tile(step, accs):
    k_K = step * bk + jax.lax.iota(jnp.int32, bk)
    k_ok_K = k_K < K
    a_K = a(k_K, k_ok_K)
    return tuple(acc + product(a_K, k_K, k_ok_K, c, ok) for acc, (c, ok) in zip(accs, cols))

  if spec.mma:
    shape, axis = (MMA_ROWS, bn), 0
  else:  # the products of every K tile, summed over K once at the end
    shape, axis = ((bn, bk), 1) if spec.transposed else ((bk, bn), 0)
  accs = jax.lax.fori_loop(0, pl.cdiv(K, bk), tile,
                           tuple(jnp.zeros(shape, jnp.float32) for _ in cols))
  ys = []
  for acc, (c, ok) in zip(accs, cols):
    y_N = jnp.sum(acc, axis=axis)
    if spec.bias:
      y_N = y_N + _load(b_ref.at[c], ok)
    ys.append(_round(y_N, dtype))
  if spec.qkv:
    _qkv_epilogue(start_ref, refs, ys, head, j, pair_ok, spec)
    return
  (y_N,) = ys
  (col_N, ok_N), (o_ref,) = cols[0], refs
  if spec.residual:
    y_N = y_N + _load(r_ref.at[col_N], ok_N)
  _compat.triton_store(o_ref.at[col_N], y_N.astype(o_ref.dtype), mask=ok_N)


def _qkv_epilogue(start_ref, refs, ys, head_N, j_N, ok_N, spec: _Spec):
  """RoPE on the q and k heads' pairs, then q to its output and k, v to the cache slot."""
  cos_ref, sin_ref, _, _, q_ref, k_ref, v_ref = refs
  Q, G = spec.qkv
  D, half = spec.head_dim, spec.head_dim // 2
  lo_N, hi_N = ys
  rotate_N = head_N < Q + G
  cos_N = jnp.where(rotate_N, _load(cos_ref.at[j_N], ok_N), 1.0)
  sin_N = jnp.where(rotate_N, _load(sin_ref.at[j_N], ok_N), 0.0)
  lo_N, hi_N = lo_N * cos_N - hi_N * sin_N, hi_N * cos_N + lo_N * sin_N
  start = start_ref[0]
  is_q, is_k = ok_N & (head_N < Q), ok_N & (head_N >= Q) & rotate_N
  is_v = ok_N & (head_N >= Q + G)
  # A masked lane points past its output's end: the Triton store never touches it, and
  # the interpreter's scatter drops it instead of racing with a real lane's write.
  q_col = jnp.where(is_q, head_N * D + j_N, Q * D)
  k_slot = jnp.where(is_k, start, k_ref.shape[1])
  v_slot = jnp.where(is_v, start, v_ref.shape[1])
  k_head = jnp.clip(head_N - Q, 0, G - 1)
  v_head = jnp.clip(head_N - Q - G, 0, G - 1)
  q_at = lambda off: q_ref.at[q_col + off]  # noqa: E731
  k_at = lambda off: k_ref.at[0, k_slot, k_head, j_N + off]  # noqa: E731
  v_at = lambda off: v_ref.at[0, v_slot, v_head, j_N + off]  # noqa: E731
  for at, out_ref, mask in ((q_at, q_ref, is_q), (k_at, k_ref, is_k), (v_at, v_ref, is_v)):
    _compat.triton_store(at(0), lo_N.astype(out_ref.dtype), mask=mask)
    _compat.triton_store(at(half), hi_N.astype(out_ref.dtype), mask=mask)


def row_projection_reference(x: Array, w: Array, *, norm_K: Array | None = None,
                             eps: float = 1e-6, gated: bool = False,
                             attention_stats: tuple[Array, Array] | None = None,
                             bias_N: Array | None = None, residual_N: Array | None = None,
                             dtype: Any = None, transposed: bool = False) -> Array:
  """:func:`row_projection` in plain jnp (the same casts; XLA's own reduction order)."""
  K, _, _ = _check(x, w, norm_K, bias_N, residual_N, gated, attention_stats, transposed)
  w_KxN = w.T if transposed else w
  dtype = _compute_dtype(dtype, x, w, attention_stats)
  a = x.astype(jnp.float32)
  if norm_K is not None:
    a = _round(_round(a * jax.lax.rsqrt(jnp.mean(a * a) + eps), dtype)
               * _round(norm_K.astype(jnp.float32), dtype), dtype)
  elif gated:
    a = _round(_round(jax.nn.silu(a[:K]), dtype) * a[K:], dtype)
  elif attention_stats is not None:
    m_SxA, l_SxA = (s.astype(jnp.float32) for s in attention_stats)
    S, A = m_SxA.shape
    w_SxA = jnp.exp(m_SxA - m_SxA.max(axis=0, keepdims=True))
    o_SxAxD = a.reshape(S, A, K // A)
    num_AxD = jnp.sum(w_SxA[..., None] * o_SxAxD, axis=0)
    den_A = jnp.sum(w_SxA * l_SxA, axis=0)
    a = _round((num_AxD / jnp.maximum(den_A, 1e-30)[:, None]).reshape(K), dtype)
  y = jnp.dot(a, _round(w_KxN.astype(jnp.float32), dtype), precision=jax.lax.Precision.HIGHEST)
  if bias_N is not None:
    y = y + bias_N.astype(jnp.float32)
  y = _round(y, dtype)
  if residual_N is not None:
    y = y + residual_N.astype(jnp.float32)
  return y.astype(dtype)


def row_qkv_projection_reference(x_H: Array, w: Array, k_1xLxGxD: Array, v_1xLxGxD: Array,
                                 cache_index_1: Array, cos_D2: Array, sin_D2: Array, *,
                                 num_heads: int, num_kv_heads: int, norm_H: Array,
                                 eps: float = 1e-6, bias_N: Array | None = None,
                                 transposed: bool = False) -> tuple[Array, Array, Array]:
  """:func:`row_qkv_projection` in plain jnp: the projection, RoPE in f32 and a
  ``dynamic_update_slice`` of the caches."""
  Q, G = num_heads, num_kv_heads
  D = k_1xLxGxD.shape[-1]
  qkv = row_projection_reference(x_H, w, norm_K=norm_H, eps=eps, bias_N=bias_N,
                                 transposed=transposed).astype(jnp.float32)
  heads = qkv.reshape(Q + 2 * G, D)
  lo, hi = heads[:Q + G, :D // 2], heads[:Q + G, D // 2:]
  cos, sin = cos_D2.astype(jnp.float32)[None, :], sin_D2.astype(jnp.float32)[None, :]
  rotated = jnp.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
  q, k, v = rotated[:Q], rotated[Q:], heads[Q + G:]
  at = (0, cache_index_1[0].astype(jnp.int32), 0, 0)
  k_cache = jax.lax.dynamic_update_slice(k_1xLxGxD, k.astype(k_1xLxGxD.dtype)[None, None], at)
  v_cache = jax.lax.dynamic_update_slice(v_1xLxGxD, v.astype(v_1xLxGxD.dtype)[None, None], at)
  return q.reshape(-1).astype(x_H.dtype), k_cache, v_cache
