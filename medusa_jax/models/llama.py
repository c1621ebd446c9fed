"""The Llama family in Flax NNX, with a static-shape KV cache.

Shapes: B batch, T new tokens per call (prompt chunk, one decode token, or the
nodes of a candidate tree), L cache length, H hidden, V vocab, Q query heads,
G key/value heads (GQA: query head i reads kv head ``i // (Q // G)``), D head
dim, F MLP width.

One forward call takes explicit RoPE positions and an attention mask over the
whole cache, so a tree of candidates is verified in one call: the caller puts
node t at position ``prefix + depth(t)`` and lets it see the cached prefix,
itself and its ancestors only.

Covers the families of :mod:`medusa_jax.models.families`: Llama 1/2/3/3.1,
Vicuna and SmolLM2, Mistral, Qwen2 (pre-norm, RMSNorm with a plain ``w``, RoPE
in Hugging Face's rotate-half layout with optional linear, dynamic or
Llama-3.1 frequency scaling, SiLU-gated MLP, optional q/k/v, o and MLP biases,
tied or untied embeddings). Sliding-window attention (Mistral, Qwen2's sliding
layers) is a mask on the cache: a query at position p sees the keys at
positions ``> p - W`` (as transformers' ``sliding_window_overlay``); the cache
keeps every slot, so prompts longer than the window are exact too.

The cache is written with one ``dynamic_update_slice`` per row; under
``jax.jit`` with the cache donated the update happens in place. An index with
``cache_index[b] + T > L`` is clamped by XLA (earlier slots get overwritten):
the caller keeps rows in range.

Numerics: matmuls take ``dtype`` operands (f32 or bf16) and accumulate in f32;
RMSNorm, RoPE and the softmax run in f32; logits are f32.

Speed: at decode sizes a step is bound by the number of kernels, not by bytes
(SmolLM2-135M reads 0.09 ms of weights but ran 1.5 ms per step on an H100).
So the RoPE tables are computed once per call and shared by every layer, and
:meth:`Llama.fuse_projections` turns q/k/v and gate/up into one matmul each
(``qkv_proj``, ``gate_up_proj``). Checkpoints load in the unfused layout (the
Hugging Face names, which the sharded loader also splits by columns); fusing
is a separate step for a single-device model. :class:`AttentionScores` picks
how the scores against the cache are laid out as a matmul, and
:meth:`Llama.with_kernel_layout` holds the projections ``[out, in]`` where XLA
runs a one-row product faster that way (a CUDA GPU: :data:`KERNEL_LAYOUTS`).

Checkpoints load through :mod:`medusa_jax.models.llama_weights` (``load_llama``,
also reachable from here).
"""

from __future__ import annotations

import enum
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.errors import ConfigError, RequestError
from medusa_jax.models.llama_config import LlamaConfig, RopeScaling, rope_inv_freq
from medusa_jax.pallas import decode_attention as decode_attention_kernel
from medusa_jax.pallas.row_projection import row_projection, row_qkv_projection

__all__ = ["AttentionScores", "KVCache", "Llama", "ROW_KERNEL_KINDS", "ROW_KERNEL_MAX_ROWS",
           "apply_rope", "causal_mask", "rope", "rope_tables", "window_mask"]

Array = jax.Array

# Added to masked-out attention scores. Finite, so a fully masked query row
# gives a uniform (not NaN) softmax; large enough that exp() underflows to 0.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)



class AttentionScores(enum.Enum):
  """How the scores of the new tokens against the cache are computed.

  Both give the same attention; they differ in the matmul XLA has to run.
  """
  GROUPED = "grouped"
  """One matmul per (row, kv head). Its batch dimensions (b, g) are not the
  leading ones of the cache layout [B, L, G, D], so a backend may copy the
  cache into [B, G, L, D] first, in every layer."""
  FLAT = "flat"
  """One matmul per row over all L * G cache entries ([B, L*G, D] is a free
  view of the cache), then each query head keeps the scores of its own kv
  head: G times the (small) score work and no copy of the cache. Used for
  calls of at most ``FLAT_MAX_TOKENS`` new tokens per row (decode and tree
  verification); longer calls (prefill) use GROUPED."""
  PALLAS = "pallas"
  """One Pallas kernel per layer (:func:`medusa_jax.pallas.decode_attention.decode_attention`):
  scores, mask, an online softmax and the weighted sum, reading only the slots
  below ``cache_index + T``. For calls of at most ``FLAT_MAX_TOKENS`` new tokens
  per row; longer calls use GROUPED. Compiled by Triton on a GPU, interpreted
  elsewhere (correct, slow: for tests)."""
  PALLAS_FUSED = "pallas_fused"
  """PALLAS with RoPE and the in-place cache write in the same kernel
  (:func:`medusa_jax.pallas.decode_attention.decode_attention_update`, from the fused
  q/k/v projection to the attention output): three to five fewer kernels per layer, but on
  an H200 (SmolLM2, bf16, cache 1024, in-graph) its plain step took 1.24 / 1.15 / 1.34 ms
  at batch 1 / 16 / 64 against PALLAS's 1.03 / 0.87 / 1.05 (tree steps 2.41 / 1.89 / 1.86
  against 1.65 / 1.19 / 1.38), so it is not the default. A model with unfused projections runs
  PALLAS's kernel."""
  AUTO = "auto"
  """PALLAS on an NVIDIA GPU, FLAT on ROCm (where the kernel is not tested), GROUPED
  elsewhere (XLA:CPU runs FLAT's transposed cache view about 3x slower, and would interpret
  the kernel). On an H200, SmolLM2 bf16, cache 1024, in-graph, the kernel's plain step took
  1.06 ms against FLAT's 1.04-1.31 at batch 1, 0.86 against 1.04 at batch 16 and 1.00
  against 1.56 at batch 64; tree steps equal at batch 1, 22-34 % faster at 16 and 64.
  Resolved when the model is built. A model placed on a mesh of several devices runs FLAT
  instead (:func:`medusa_jax.models.llama_sharding.partitionable`): XLA does not partition
  a Pallas call."""

  @classmethod
  def parse(cls, value: str | AttentionScores) -> AttentionScores:
    if isinstance(value, cls):
      return value
    try:
      return cls(value)
    except ValueError:
      raise ConfigError(f"attention_scores={value!r}; expected one of "
                        f"{', '.join(m.value for m in cls)}") from None

  def resolve(self) -> AttentionScores:
    """GROUPED, FLAT or PALLAS (AUTO by the default backend)."""
    if self is not AttentionScores.AUTO:
      return self
    if jax.default_backend() != "gpu":
      return AttentionScores.GROUPED
    # The kernel was built and measured on NVIDIA GPUs; elsewhere (ROCm) XLA's FLAT scores.
    return AttentionScores.PALLAS if _cuda() else AttentionScores.FLAT


KERNEL_LAYOUTS = ("in_out", "out_in")
"""How a :class:`Linear` holds its kernel: ``in_out`` is ``[in, out]`` (``y = x @ w``, the
layout checkpoints load into), ``out_in`` is ``[out, in]`` (``y = x @ w^T``: PyTorch's and
GGUF's). The function is the same; the kernels XLA runs for it are not. At one row XLA
rewrites a small product into a multiply and a reduce, and ``in_out`` reduces over the
weight's major dimension: on the H200 the 30 layers' projections of SmolLM2-135M take
0.662 ms per step at batch 1 that way and 0.416 ms in ``out_in``, while batch 16 and 64 are
within 4 % either way (``scripts/bench_gemv_layout.py``, docs/perf.md). On a 2-core CPU
``out_in`` is 6-7 % faster at one row in f32 but 29-34 % slower at the 3-8 rows of a small
tree, so the CPU keeps ``in_out``."""


def default_kernel_layout() -> str:
  """What ``Llama.with_kernel_layout(None)`` picks: ``out_in`` on a CUDA GPU (measured
  there), ``in_out`` elsewhere."""
  return "out_in" if _cuda_gpu() else "in_out"


def _kernel_layout(value: str) -> str:
  if value not in KERNEL_LAYOUTS:
    raise ConfigError(f"kernel_layout: expected one of {KERNEL_LAYOUTS}, got {value!r}")
  return value


ROW_KERNEL_KINDS = ("qkv", "o", "gate_up", "down")
"""The row kernels of a layer, as ``row_kernel_blocks`` names them."""
_BLOCK_ARGS = ("block_m", "block_k", "block_n", "num_warps", "num_stages", "mma")


def _row_kernel_blocks(value) -> tuple:
  """``{kind: {arg: value}}`` as a sorted, hashable tuple (the module's static data)."""
  if value is None:
    return ()
  items = value.items() if isinstance(value, dict) else value
  out = []
  for kind, args in items:
    if kind not in ROW_KERNEL_KINDS:
      raise ConfigError(f"row_kernel_blocks: unknown kernel {kind!r}; expected one of "
                        f"{ROW_KERNEL_KINDS}")
    args = dict(args)
    for name, v in args.items():
      if name not in _BLOCK_ARGS:
        raise ConfigError(f"row_kernel_blocks[{kind!r}]: unknown argument {name!r}; expected "
                          f"some of {_BLOCK_ARGS}")
      if name == "mma" and not isinstance(v, bool):
        raise ConfigError(f"row_kernel_blocks[{kind!r}]['mma']: expected a bool, got {v!r}")
      if name != "mma" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ConfigError(f"row_kernel_blocks[{kind!r}][{name!r}]: expected a positive "
                          f"integer, got {v!r}")
    out.append((kind, tuple(sorted(args.items()))))
  return tuple(sorted(out))


def _row_kernel_rows(value: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not (
      1 <= value <= ROW_KERNEL_MAX_ROWS):
    raise ConfigError(f"row_kernel_rows: expected an integer in [1, {ROW_KERNEL_MAX_ROWS}], "
                      f"got {value!r}")
  return value


def _compact_kernel_default() -> bool:
  """Whether ``Llama(compact_kernel=None)`` moves the cache with the Pallas kernels."""
  return _cuda_gpu()


def _cuda_gpu() -> bool:
  """Whether the default backend is a CUDA GPU (what the GPU defaults were measured on)."""
  return jax.default_backend() == "gpu" and _cuda()


def _cuda() -> bool:
  """Whether the default GPU backend is CUDA (not ROCm)."""
  try:
    return "rocm" not in jax.devices()[0].client.platform_version.lower()
  except Exception:  # an unknown client: the kernel's own platform is the likelier
    return True


FLAT_MAX_TOKENS = 64
"""Longest call (new tokens per row) that :attr:`AttentionScores.FLAT` applies to."""

ROW_KERNEL_MAX_ROWS = 64
"""Most tokens in a call (batch times new tokens per row) that the row kernels take
(:meth:`Block._rows`; ``Llama(row_kernel_rows=...)`` up to this)."""


# --------------------------------------------------------------------------- cache


@flax.struct.dataclass
class KVCache:
  """Per-layer key and value buffers of static shape.

  Attributes:
    k: one [B, L, G, D] array per layer (RoPE already applied).
    v: one [B, L, G, D] array per layer.
  """
  k: tuple[Array, ...]
  v: tuple[Array, ...]

  @classmethod
  def init(cls, cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """An all-zero cache of ``batch`` rows and ``length`` slots per layer."""
    if batch <= 0 or length <= 0:
      raise ConfigError(f"KVCache.init: expected batch > 0 and length > 0, got {batch=}, {length=}")
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    n = cfg.num_hidden_layers
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(n)))

  @property
  def batch(self) -> int:
    return self.k[0].shape[0]

  @property
  def length(self) -> int:
    return self.k[0].shape[1]


def causal_mask(cache_index: Array, T: int, L: int) -> Array:
  """Causal mask over the cache for T new tokens written at ``cache_index``.

  Args:
    cache_index: [B] int32, the slot of each row's first new token.
    T: new tokens per row.
    L: cache length.

  Returns:
    [B, T, L] bool: query t sees slot s iff ``s <= cache_index[b] + t``.
  """
  q_BxT = cache_index[:, None] + jnp.arange(T, dtype=cache_index.dtype)[None, :]
  return jnp.arange(L, dtype=cache_index.dtype)[None, None, :] <= q_BxT[:, :, None]


def window_mask(positions_BxT: Array, cache_index_B: Array, L: int, window: int) -> Array:
  """Sliding-window mask over the cache: [B, T, L] bool, key position > query position - W.

  A slot's position is ``s`` for the committed slots ``s < cache_index[b]``
  and the new token's own position for the T slots written by this call
  (tree nodes: ``prefix + depth``); later slots are stale and masked by the
  call's mask anyway.

  Args:
    positions_BxT: [B, T] int32 query positions.
    cache_index_B: [B] int32 slot of each row's first new token.
    L: cache length.
    window: W >= 1 (transformers' ``sliding_window``).
  """
  T = positions_BxT.shape[1]
  slot_L = jnp.arange(L, dtype=jnp.int32)
  rel_BxL = slot_L[None, :] - cache_index_B.astype(jnp.int32)[:, None]
  new_BxL = (rel_BxL >= 0) & (rel_BxL < T)
  new_pos_BxL = jnp.take_along_axis(positions_BxT.astype(jnp.int32),
                                    jnp.clip(rel_BxL, 0, T - 1), axis=1)
  key_pos_BxL = jnp.where(new_BxL, new_pos_BxL, slot_L[None, :])
  return key_pos_BxL[:, None, :] > positions_BxT.astype(jnp.int32)[:, :, None] - window


def _write(cache_BxLxGxD: Array, new_BxTxGxD: Array, cache_index_B: Array) -> Array:
  """Writes each row's T entries at its own offset (the caller keeps them in range)."""
  new_BxTxGxD = new_BxTxGxD.astype(cache_BxLxGxD.dtype)

  def one(c_LxGxD, u_TxGxD, i):
    return jax.lax.dynamic_update_slice(c_LxGxD, u_TxGxD, (i, 0, 0))

  return jax.vmap(one)(cache_BxLxGxD, new_BxTxGxD, cache_index_B.astype(jnp.int32))


# --------------------------------------------------------------------------- layers


def _dense(x: Array, w: Array) -> Array:
  """x [..., K] @ w [K, M] with f32 accumulation -> [..., M] float32."""
  return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _dense_t(x: Array, w: Array) -> Array:
  """x [..., K] @ w[M, K]^T with f32 accumulation -> [..., M] float32."""
  return jnp.einsum("...k,mk->...m", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def rope_tables(positions_BxT: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """cos and sin of the RoPE angles, [B, T, 1, D/2] float32 each (shared by all layers)."""
  f_BxTxD2 = positions_BxT.astype(jnp.float32)[:, :, None] * jnp.asarray(
      inv_freq, jnp.float32)[None, None, :]
  return jnp.cos(f_BxTxD2)[:, :, None, :], jnp.sin(f_BxTxD2)[:, :, None, :]


def apply_rope(x_BxTxNxD: Array, cos_BxTx1xD2: Array, sin_BxTx1xD2: Array) -> Array:
  """Rotates ``x`` (rotate-half layout) in f32 by :func:`rope_tables`; same dtype as ``x``."""
  D = x_BxTxNxD.shape[-1]
  x = x_BxTxNxD.astype(jnp.float32)
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  out = jnp.concatenate([x1 * cos_BxTx1xD2 - x2 * sin_BxTx1xD2,
                         x2 * cos_BxTx1xD2 + x1 * sin_BxTx1xD2], axis=-1)
  return out.astype(x_BxTxNxD.dtype)


def rope(x_BxTxNxD: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embedding in Hugging Face's rotate-half layout, computed in f32.

  Args:
    x_BxTxNxD: queries or keys.
    positions_BxT: int positions.
    inv_freq: [D/2] inverse frequencies (:func:`rope_inv_freq`).

  Returns:
    [B, T, N, D], same dtype as ``x``.
  """
  return apply_rope(x_BxTxNxD, *rope_tables(positions_BxT, inv_freq))


class RMSNorm(nnx.Module):
  """``x * rsqrt(mean(x^2) + eps) * w`` with the statistics in f32."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> [..., H] in the compute dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = self.weight[...].astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    return y.astype(self.dtype) * w


class Linear(nnx.Module):
  """A projection with an optional ``[out]`` bias and f32 accumulation; its kernel is
  ``[in, out]``, or ``[out, in]`` with ``transposed`` (see :data:`KERNEL_LAYOUTS`)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, use_bias: bool = False,
               transposed: bool = False):
    self.dtype = dtype
    self.transposed = bool(transposed)
    init = nnx.initializers.normal(0.02)
    shape = (out_features, in_features) if self.transposed else (in_features, out_features)
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

  def __call__(self, x: Array) -> Array:
    """x: [..., K] -> [..., M] in the compute dtype (the bias added in f32)."""
    y = (_dense_t if self.transposed else _dense)(x.astype(self.dtype), self.kernel[...])
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))
    return y.astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query attention over a KV cache, with an explicit mask.

  Unfused it holds ``q_proj``, ``k_proj``, ``v_proj`` (the checkpoint layout);
  fused (``fused=True``) one ``qkv_proj`` whose kernel (and bias) is their column
  concatenation ``[H, (Q + 2G) * D]``: one matmul instead of three.
  """

  def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_theta: float, rngs: nnx.Rngs, rope_scaling: RopeScaling = RopeScaling(),
               dtype=jnp.float32, param_dtype=jnp.float32, fused: bool = False,
               scores: AttentionScores = AttentionScores.GROUPED, qkv_bias: bool = False,
               o_bias: bool = False, transposed: bool = False):
    self.num_heads = num_heads
    self.scores = AttentionScores.parse(scores).resolve()
    if (self.scores in (AttentionScores.PALLAS, AttentionScores.PALLAS_FUSED)
        and not decode_attention_kernel.supports(num_heads, num_kv_heads)):
      raise ConfigError(f"attention_scores=pallas: {num_heads} query heads over {num_kv_heads} "
                        "kv heads (the kernel needs a whole number of query heads per kv head)")
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    # A static tuple (not an array attribute) so that nnx treats it as graph data.
    self.inv_freq = tuple(float(f) for f in rope_inv_freq(head_dim, rope_theta, rope_scaling))
    self.dtype = dtype
    self.fused = bool(fused)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, transposed=transposed)
    if self.fused:
      self.qkv_proj = Linear(hidden, (num_heads + 2 * num_kv_heads) * head_dim,
                             use_bias=qkv_bias, **kw)
    else:
      self.q_proj = Linear(hidden, num_heads * head_dim, use_bias=qkv_bias, **kw)
      self.k_proj = Linear(hidden, num_kv_heads * head_dim, use_bias=qkv_bias, **kw)
      self.v_proj = Linear(hidden, num_kv_heads * head_dim, use_bias=qkv_bias, **kw)
    self.o_proj = Linear(num_heads * head_dim, hidden, use_bias=o_bias, **kw)

  def _qkv(self, x_BxTxH: Array) -> tuple[Array, Array, Array]:
    """Queries [B, T, Q, D], keys and values [B, T, G, D], compute dtype, before RoPE."""
    B, T, _ = x_BxTxH.shape
    Q, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    if self.fused:
      return self.split_qkv(self.qkv_proj(x_BxTxH))
    q, k, v = self.q_proj(x_BxTxH), self.k_proj(x_BxTxH), self.v_proj(x_BxTxH)
    return q.reshape(B, T, Q, D), k.reshape(B, T, G, D), v.reshape(B, T, G, D)

  def __call__(self, x_BxTxH: Array, rope_cs: tuple[Array, Array], k_BxLxGxD: Array,
               v_BxLxGxD: Array, cache_index_B: Array, mask_Bx1x1xTxL: Array
               ) -> tuple[Array, Array, Array]:
    """Attends the T new tokens to the cache after writing their K/V into it.

    Args:
      x_BxTxH: normed input.
      rope_cs: (cos, sin) from :func:`rope_tables` at the tokens' positions.
      k_BxLxGxD, v_BxLxGxD: this layer's cache.
      cache_index_B: [B] slot of each row's first new token.
      mask_Bx1x1xTxL: bool, query t sees slot s (the call's mask, shared by all layers).

    Returns:
      out [B, T, H] (compute dtype) and the updated k, v caches [B, L, G, D].
    """
    B, T, _ = x_BxTxH.shape
    Q, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    L = k_BxLxGxD.shape[1]
    if (self.scores is AttentionScores.PALLAS_FUSED and self.fused and T <= FLAT_MAX_TOKENS
        and decode_attention_kernel.supports_update(Q, G, D)):
      cos_BxTx1xD2, sin_BxTx1xD2 = rope_cs
      o_BxTxQxD, k_BxLxGxD, v_BxLxGxD = decode_attention_kernel.decode_attention_update(
          self.qkv_proj(x_BxTxH), cos_BxTx1xD2.reshape(B, T, D // 2),
          sin_BxTx1xD2.reshape(B, T, D // 2), k_BxLxGxD, v_BxLxGxD,
          mask_Bx1x1xTxL.reshape(B, T, L), cache_index_B, num_heads=Q, num_kv_heads=G)
      out_BxTxH = self.o_proj(o_BxTxQxD.astype(self.dtype).reshape(B, T, Q * D))
      return out_BxTxH, k_BxLxGxD, v_BxLxGxD
    o_BxTxQxD, k_BxLxGxD, v_BxLxGxD = self.attend(
        *self._qkv(x_BxTxH), rope_cs, k_BxLxGxD, v_BxLxGxD, cache_index_B, mask_Bx1x1xTxL)
    out_BxTxH = self.o_proj(o_BxTxQxD.astype(self.dtype).reshape(B, T, Q * D))
    return out_BxTxH, k_BxLxGxD, v_BxLxGxD

  def split_qkv(self, qkv_BxTxN: Array) -> tuple[Array, Array, Array]:
    """The fused projection's output [B, T, (Q + 2G) * D] as queries, keys and values."""
    B, T, _ = qkv_BxTxN.shape
    Q, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    return (qkv_BxTxN[..., :Q * D].reshape(B, T, Q, D),
            qkv_BxTxN[..., Q * D:(Q + G) * D].reshape(B, T, G, D),
            qkv_BxTxN[..., (Q + G) * D:].reshape(B, T, G, D))

  def attend(self, q_BxTxQxD: Array, k_BxTxGxD: Array, v_BxTxGxD: Array,
             rope_cs: tuple[Array, Array], k_BxLxGxD: Array, v_BxLxGxD: Array,
             cache_index_B: Array, mask_Bx1x1xTxL: Array) -> tuple[Array, Array, Array]:
    """RoPE, the cache write and attention of projected tokens (before ``o_proj``).

    Returns:
      o [B, T, Q, D] and the updated k, v caches [B, L, G, D].
    """
    B, T = q_BxTxQxD.shape[:2]
    L = k_BxLxGxD.shape[1]
    # Rotated apart: a joint [q; k] array would be one more buffer to write and read.
    q_BxTxQxD = apply_rope(q_BxTxQxD, *rope_cs)
    k_BxTxGxD = apply_rope(k_BxTxGxD, *rope_cs)
    k_BxLxGxD = _write(k_BxLxGxD, k_BxTxGxD, cache_index_B)
    v_BxLxGxD = _write(v_BxLxGxD, v_BxTxGxD, cache_index_B)

    # Query head g*R + r reads kv head g (Hugging Face's repeat_kv order).
    if (self.scores in (AttentionScores.PALLAS, AttentionScores.PALLAS_FUSED)
        and T <= FLAT_MAX_TOKENS):
      o_BxTxQxD = decode_attention_kernel.decode_attention(
          q_BxTxQxD, k_BxLxGxD, v_BxLxGxD,
          mask_Bx1x1xTxL.reshape(B, T, L), cache_index_B + T)
    elif self.scores is AttentionScores.FLAT and T <= FLAT_MAX_TOKENS:
      o_BxTxQxD = self._flat(q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask_Bx1x1xTxL)
    else:
      o_BxTxQxD = self._grouped(q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask_Bx1x1xTxL)
    return o_BxTxQxD, k_BxLxGxD, v_BxLxGxD

  def _grouped(self, q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask_Bx1x1xTxL):
    """Attention output [B, T, Q, D] f32, batched over (row, kv head)."""
    B, T, Q, D = q_BxTxQxD.shape
    G = self.num_kv_heads
    q_BxTxGxRxD = q_BxTxQxD.reshape(B, T, G, Q // G, D)
    s_BxGxRxTxL = jnp.einsum("btgrd,bsgd->bgrts", q_BxTxGxRxD,
                             k_BxLxGxD.astype(q_BxTxGxRxD.dtype),
                             preferred_element_type=jnp.float32)
    # A select, not an additive bias: XLA fuses it into the softmax either way, and
    # the select gives fewer fusions on the CPU backend.
    s_BxGxRxTxL = jnp.where(mask_Bx1x1xTxL, s_BxGxRxTxL * (1.0 / math.sqrt(D)), _MASK_VALUE)
    p_BxGxRxTxL = jax.nn.softmax(s_BxGxRxTxL, axis=-1)  # f32
    o_BxTxGxRxD = jnp.einsum("bgrts,bsgd->btgrd", p_BxGxRxTxL.astype(self.dtype),
                             v_BxLxGxD.astype(self.dtype), preferred_element_type=jnp.float32)
    return o_BxTxGxRxD.reshape(B, T, Q, D)

  def _flat(self, q_BxTxQxD, k_BxLxGxD, v_BxLxGxD, mask_Bx1x1xTxL):
    """Attention output [B, T, Q, D] f32, one matmul per row over all L * G entries."""
    B, T, Q, D = q_BxTxQxD.shape
    L, G = k_BxLxGxD.shape[1], self.num_kv_heads
    R = Q // G
    own_GxG = np.eye(G, dtype=bool)  # query group g keeps the scores of kv head g
    s_BxMxN = jnp.einsum("bmd,bnd->bmn", q_BxTxQxD.reshape(B, T * Q, D),
                         k_BxLxGxD.reshape(B, L * G, D).astype(q_BxTxQxD.dtype),
                         preferred_element_type=jnp.float32)
    s_BxTxGxRxLxG = s_BxMxN.reshape(B, T, G, R, L, G)
    # Adding exact zeros: the kept score is bit-identical to the grouped one.
    s_BxTxGxRxL = jnp.sum(jnp.where(own_GxG[None, None, :, None, None, :], s_BxTxGxRxLxG, 0.0),
                          axis=-1)
    mask_BxTx1x1xL = jnp.moveaxis(mask_Bx1x1xTxL, 3, 1)
    p_BxTxGxRxL = jax.nn.softmax(
        jnp.where(mask_BxTx1x1xL, s_BxTxGxRxL * (1.0 / math.sqrt(D)), _MASK_VALUE), axis=-1)
    p_BxTxGxRxLxG = jnp.where(own_GxG[None, None, :, None, None, :],
                              p_BxTxGxRxL.astype(self.dtype)[..., None],
                              jnp.zeros((), self.dtype))
    o_BxMxD = jnp.einsum("bmn,bnd->bmd", p_BxTxGxRxLxG.reshape(B, T * Q, L * G),
                         v_BxLxGxD.reshape(B, L * G, D).astype(self.dtype),
                         preferred_element_type=jnp.float32)
    return o_BxMxD.reshape(B, T, Q, D)


class MLP(nnx.Module):
  """``down(silu(gate(x)) * up(x))``; fused, gate and up are one ``gate_up_proj`` [H, 2F]."""

  def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, fused: bool = False, use_bias: bool = False,
               transposed: bool = False):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
              transposed=transposed)
    self.intermediate = intermediate
    self.fused = bool(fused)
    if self.fused:
      self.gate_up_proj = Linear(hidden, 2 * intermediate, **kw)
    else:
      self.gate_proj = Linear(hidden, intermediate, **kw)
      self.up_proj = Linear(hidden, intermediate, **kw)
    self.down_proj = Linear(intermediate, hidden, **kw)

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> [..., H]."""
    if self.fused:
      gu = self.gate_up_proj(x)
      gate, up = gu[..., :self.intermediate], gu[..., self.intermediate:]
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  """Pre-norm decoder layer: attention then MLP, each with a residual."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, fused: bool = False,
               scores: AttentionScores = AttentionScores.GROUPED, window: int | None = None,
               row_kernels: bool = False, row_kernel_rows: int = 1,
               row_kernel_blocks: tuple = (), transposed: bool = False):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.window = window
    """Sliding window W of this layer (None: full attention); picks the call's mask."""
    # LlamaConfig already keeps the shapes the kernels take (grouped heads, an even head dim).
    self.row_kernels = bool(row_kernels) and bool(fused)
    self.row_kernel_rows = row_kernel_rows
    self.row_kernel_blocks = row_kernel_blocks
    """Launch parameters per row kernel (``Llama``'s, normalised)."""
    """Most tokens in a call (B * T) that run the row kernels."""
    """One token (batch 1, T = 1) runs through the row kernels (:meth:`_one_row`; fused
    projections only)."""
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads,
                               cfg.num_key_value_heads, cfg.head_dim,
                               rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                               fused=fused, scores=scores, qkv_bias=cfg.qkv_bias,
                               o_bias=cfg.o_bias, transposed=transposed, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fused=fused, use_bias=cfg.mlp_bias,
                   transposed=transposed, **kw)

  def __call__(self, x_BxTxH, rope_cs, k, v, cache_index_B, mask_Bx1x1xTxL):
    B, T, _ = x_BxTxH.shape
    if (self.row_kernels and B * T <= self.row_kernel_rows and k.dtype == x_BxTxH.dtype
        and T <= FLAT_MAX_TOKENS):
      return self._rows(x_BxTxH, rope_cs, k, v, cache_index_B, mask_Bx1x1xTxL)
    a_BxTxH, k, v = self.self_attn(self.input_layernorm(x_BxTxH), rope_cs, k, v,
                                   cache_index_B, mask_Bx1x1xTxL)
    x_BxTxH = x_BxTxH + a_BxTxH
    x_BxTxH = x_BxTxH + self.mlp(self.post_attention_layernorm(x_BxTxH))
    return x_BxTxH, k, v

  def _rows(self, x_BxTxH, rope_cs, k, v, cache_index_B, mask_Bx1x1xTxL):
    """:meth:`__call__` for a few tokens (M = B * T rows) in five kernels: the q/k/v
    projection with its norm, RoPE and the cache write (:func:`row_qkv_projection`); the
    attention's cache splits (:func:`~medusa_jax.pallas.decode_attention.
    decode_attention_parts`); the o projection with their combine and the residual;
    gate/up with its norm; down with the SwiGLU and the residual (:func:`row_projection`)."""
    attn, mlp = self.self_attn, self.mlp
    Q, G, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    B, T, H = x_BxTxH.shape
    L, M = k.shape[1], B * T
    dtype = x_BxTxH.dtype
    bias = lambda lin: None if lin.bias is None else lin.bias[...]  # noqa: E731
    x_MxH = x_BxTxH.reshape(M, H)
    t = attn.o_proj.transposed  # every projection of the layer shares the layout
    cos, sin = rope_cs
    blocks = {kind: dict(args) for kind, args in self.row_kernel_blocks}
    q_MxQD, k, v = row_qkv_projection(
        x_MxH, attn.qkv_proj.kernel[...], k, v, cache_index_B, cos.reshape(M, -1),
        sin.reshape(M, -1), num_heads=Q, num_kv_heads=G, norm_H=self.input_layernorm.weight[...],
        eps=self.input_layernorm.eps, bias_N=bias(attn.qkv_proj), transposed=t,
        **blocks.get("qkv", {}))
    o_BxSxTxQxD, m_BxSxTxQ, l_BxSxTxQ = decode_attention_kernel.decode_attention_parts(
        q_MxQD.reshape(B, T, Q, D), k, v, mask_Bx1x1xTxL.reshape(B, T, L), cache_index_B + T)
    S = o_BxSxTxQxD.shape[1]
    x_MxH = row_projection(o_BxSxTxQxD.reshape(B, S, T, Q * D), attn.o_proj.kernel[...],
                           attention_stats=(m_BxSxTxQ, l_BxSxTxQ), dtype=dtype, transposed=t,
                           bias_N=bias(attn.o_proj), residual_N=x_MxH, **blocks.get("o", {}))
    gu_MxN = row_projection(x_MxH, mlp.gate_up_proj.kernel[...], transposed=t,
                            norm_K=self.post_attention_layernorm.weight[...],
                            eps=self.post_attention_layernorm.eps, bias_N=bias(mlp.gate_up_proj),
                            **blocks.get("gate_up", {}))
    x_MxH = row_projection(gu_MxN, mlp.down_proj.kernel[...], gated=True, transposed=t,
                           bias_N=bias(mlp.down_proj), residual_N=x_MxH,
                           **blocks.get("down", {}))
    return x_MxH.reshape(B, T, H), k, v


# --------------------------------------------------------------------------- model


class Llama(nnx.Module):
  """A Llama-family decoder with a static KV cache and an explicit attention mask.

  Example::

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    cache = KVCache.init(model.cfg, batch=2, length=64)
    idx = jnp.zeros((2,), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    h, cache = model(tokens, pos, cache, idx, causal_mask(idx, 5, 64))
    logits = model.lm_head(h[:, -1])
    fast = model.fuse_projections()   # same function, fewer kernels per step
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, fused_projections: bool = False,
               attention_scores: AttentionScores | str = AttentionScores.AUTO,
               row_kernels: bool | None = None, row_kernel_rows: int = 1,
               row_kernel_blocks=None, compact_kernel: bool | None = None,
               kernel_layout: str = "in_out"):
    """Args:
      cfg: the architecture.
      rngs: initialisation keys.
      dtype: compute dtype.
      param_dtype: storage dtype of the parameters.
      fused_projections: build the fused layout (``qkv_proj``, ``gate_up_proj``)
        directly; checkpoints load into the unfused one (see
        :meth:`fuse_projections`).
      attention_scores: how attention scores are computed (:class:`AttentionScores`;
        AUTO is resolved here, by the default backend).
      row_kernels: a call of at most ``row_kernel_rows`` tokens runs each layer in five
        Pallas kernels (:meth:`Block._rows`): the projections as
        :mod:`~medusa_jax.pallas.row_projection` kernels with the norms, RoPE, the cache
        write, the attention splits' combine, the SwiGLU and the residual adds fused into
        them, beside the attention kernel (fused layout only; else ignored). None (the
        default): on where the kernels compile (a CUDA GPU: on the H200 the batch-1 step
        runs 168 kernels in 0.567 ms instead of 472 in 0.789, docs/perf.md), off
        elsewhere, where they would only be interpreted. Meshes turn it off
        (``llama_sharding``).
      row_kernel_rows: the most tokens in a call (B * T, 1 to :data:`ROW_KERNEL_MAX_ROWS`)
        that ``row_kernels`` applies to: 1 (the default) is the batch-1 decode step, the
        one timed on a GPU; more take a tree's verify step, a batch of decode tokens or a
        short prefill into tensor-core dots of up to 64 rows (tested, not yet timed:
        ``bench_decode.py --row-kernel-rows``).
      row_kernel_blocks: launch parameters per row kernel, ``{kind: {arg: value}}`` with
        kinds :data:`ROW_KERNEL_KINDS` and the args of
        :func:`~medusa_jax.pallas.row_projection.row_projection` (block_m, block_k,
        block_n, num_warps, num_stages, mma); None: its defaults
        (``scripts/bench_row_blocks.py`` times alternatives in a whole step).
      compact_kernel: a speculative step moves the accepted path's K/V into place with
        :func:`~medusa_jax.pallas.compact_cache.compact_cache` (two Pallas kernels for
        every layer) instead of a gather and a scatter per layer and K or V (see
        ``decoding.cache_ops.compact_cache``). None (the default): on where the
        kernels compile (a CUDA GPU; on the H200 they take 178 kernels and 5-7 % of
        its in-graph time off a tree step, docs/perf.md), off elsewhere, where they
        would only be interpreted. Meshes turn it off (``llama_sharding``).
      kernel_layout: how the projections hold their kernels (:data:`KERNEL_LAYOUTS`);
        checkpoints load into ``in_out``, :meth:`with_kernel_layout` converts.

    Raises:
      ConfigError: an unknown ``attention_scores`` or ``kernel_layout``,
        ``row_kernel_rows`` out of range, or ``row_kernel_blocks`` naming an unknown kernel
        or argument.
    """
    self.cfg = cfg
    self.dtype = dtype
    self.fused_projections = bool(fused_projections)
    self.attention_scores = AttentionScores.parse(attention_scores).resolve()
    self.row_kernels = _cuda_gpu() if row_kernels is None else bool(row_kernels)
    self.row_kernel_rows = _row_kernel_rows(row_kernel_rows)
    self.row_kernel_blocks = _row_kernel_blocks(row_kernel_blocks)
    self.compact_kernel = _compact_kernel_default() if compact_kernel is None \
        else bool(compact_kernel)
    self.kernel_layout = _kernel_layout(kernel_layout)
    init = nnx.initializers.normal(0.02)
    self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                       param_dtype))
    self.layers = nnx.List([Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                  fused=fused_projections, scores=self.attention_scores,
                                  window=cfg.layer_window(i), row_kernels=self.row_kernels,
                                  row_kernel_rows=self.row_kernel_rows,
                                  row_kernel_blocks=self.row_kernel_blocks,
                                  transposed=self.kernel_layout == "out_in")
                            for i in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)
    if cfg.tie_word_embeddings:
      self.lm_head_kernel = None
    else:
      self.lm_head_kernel = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size),
                                           param_dtype))

  def fuse_projections(self) -> Llama:
    """The same model with q/k/v and gate/up fused into one kernel each.

    Computes the same function (each output column is the same dot product)
    with two matmuls fewer per attention and one fewer per MLP: at decode
    sizes, where a step is bound by kernel launches, that is the speed-up.
    The parameters are concatenated once here (the model's memory doubles
    until the unfused one is dropped); ``self`` is left unchanged. A model
    already fused is returned as is.

    Returns:
      A new :class:`Llama` with ``fused_projections=True``.
    """
    if self.fused_projections:
      return self
    cfg = self.cfg
    param_dtype = self.embed_tokens.get_value().dtype
    fused = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=self.dtype,
                                         param_dtype=param_dtype, fused_projections=True,
                                         attention_scores=self.attention_scores,
                                         row_kernels=self.row_kernels,
                                         row_kernel_rows=self.row_kernel_rows,
                                         row_kernel_blocks=self.row_kernel_blocks,
                                         compact_kernel=self.compact_kernel,
                                         kernel_layout=self.kernel_layout))
    out_axis = 0 if self.kernel_layout == "out_in" else -1  # the kernels' output dimension

    def fill(dst: Linear, *srcs: Linear) -> None:
      dst.kernel.set_value(jnp.concatenate([s.kernel.get_value() for s in srcs], out_axis))
      if dst.bias is not None:
        dst.bias.set_value(jnp.concatenate([s.bias.get_value() for s in srcs], -1))
    fused.embed_tokens.set_value(self.embed_tokens.get_value())
    fused.norm.weight.set_value(self.norm.weight.get_value())
    if self.lm_head_kernel is not None:
      fused.lm_head_kernel.set_value(self.lm_head_kernel.get_value())
    for src, dst in zip(self.layers, fused.layers):
      a, m = src.self_attn, src.mlp
      fill(dst.self_attn.qkv_proj, a.q_proj, a.k_proj, a.v_proj)
      fill(dst.self_attn.o_proj, a.o_proj)
      fill(dst.mlp.gate_up_proj, m.gate_proj, m.up_proj)
      fill(dst.mlp.down_proj, m.down_proj)
      for norm in ("input_layernorm", "post_attention_layernorm"):
        getattr(dst, norm).weight.set_value(getattr(src, norm).weight.get_value())
    return fused

  def with_attention_scores(self, scores: AttentionScores | str) -> Llama:
    """The same model (sharing its parameter arrays) computing scores by ``scores``.

    Raises:
      ConfigError: an unknown ``scores``.
    """
    scores = AttentionScores.parse(scores).resolve()
    if scores is self.attention_scores:
      return self
    return self._rebuilt(attention_scores=scores)

  def with_row_kernels(self, row_kernels: bool | None) -> Llama:
    """The same model (parameters shared) with ``row_kernels`` set (see ``__init__``;
    None: the backend's default)."""
    if row_kernels is None:
      row_kernels = _cuda_gpu()
    if bool(row_kernels) == self.row_kernels:
      return self
    return self._rebuilt(row_kernels=bool(row_kernels))

  def with_row_kernel_blocks(self, blocks) -> Llama:
    """The same model (parameters shared) with ``row_kernel_blocks`` set (see ``__init__``)."""
    if _row_kernel_blocks(blocks) == self.row_kernel_blocks:
      return self
    return self._rebuilt(row_kernel_blocks=blocks)

  def with_row_kernel_rows(self, rows: int) -> Llama:
    """The same model (parameters shared) with ``row_kernel_rows`` set (see ``__init__``)."""
    if _row_kernel_rows(rows) == self.row_kernel_rows:
      return self
    return self._rebuilt(row_kernel_rows=rows)

  def with_compact_kernel(self, compact_kernel: bool | None) -> Llama:
    """The same model (parameters shared) with ``compact_kernel`` set (see ``__init__``;
    None: the backend's default)."""
    if compact_kernel is None:
      compact_kernel = _compact_kernel_default()
    if bool(compact_kernel) == self.compact_kernel:
      return self
    return self._rebuilt(compact_kernel=bool(compact_kernel))

  def with_kernel_layout(self, layout: str | None) -> Llama:
    """The same function with the projections' kernels in ``layout`` (:data:`KERNEL_LAYOUTS`;
    None: :func:`default_kernel_layout`).

    The kernels are transposed once here (their memory doubles until ``self`` is dropped);
    every other parameter is shared. A model already in ``layout`` is returned as is.

    Raises:
      ConfigError: an unknown layout.
    """
    if layout is None:
      layout = default_kernel_layout()
    if _kernel_layout(layout) == self.kernel_layout:
      return self
    new = self._rebuilt(kernel_layout=layout)
    for src, dst in zip(self._linears(), new._linears()):
      dst.kernel.set_value(jnp.swapaxes(src.kernel.get_value(), 0, 1))
    return new

  def static_options(self) -> dict[str, Any]:
    """The options that change which kernels a step runs (not the function it computes):
    what a cached step timing belongs to (``decoding.policy.load_or_measure``)."""
    return {"fused_projections": self.fused_projections,
            "attention_scores": self.attention_scores.value, "row_kernels": self.row_kernels,
            "row_kernel_rows": self.row_kernel_rows,
            "row_kernel_blocks": {k: dict(v) for k, v in self.row_kernel_blocks},
            "compact_kernel": self.compact_kernel,
            "kernel_layout": self.kernel_layout}

  def _linears(self) -> list[Linear]:
    """Every projection of every layer, in a fixed order."""
    out = []
    for layer in self.layers:
      a, m = layer.self_attn, layer.mlp
      out += [a.qkv_proj] if a.fused else [a.q_proj, a.k_proj, a.v_proj]
      out += [a.o_proj]
      out += [m.gate_up_proj] if m.fused else [m.gate_proj, m.up_proj]
      out += [m.down_proj]
    return out

  def _rebuilt(self, **changes) -> Llama:
    """A new module of the same parameters (shared, not copied) with other static options
    (a new ``kernel_layout`` gets the old kernels: the caller transposes them)."""
    kw = dict(dtype=self.dtype, param_dtype=self.embed_tokens.get_value().dtype,
              fused_projections=self.fused_projections,
              attention_scores=self.attention_scores, row_kernels=self.row_kernels,
              row_kernel_rows=self.row_kernel_rows, row_kernel_blocks=self.row_kernel_blocks,
              compact_kernel=self.compact_kernel,
              kernel_layout=self.kernel_layout)
    kw.update(changes)
    new = nnx.eval_shape(lambda: Llama(self.cfg, rngs=nnx.Rngs(0), **kw))
    nnx.update(new, nnx.state(self))
    return new

  def embed(self, tokens: Array) -> Array:
    """tokens: [...] int32 -> [..., H] in the compute dtype."""
    return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

  def lm_head(self, h: Array) -> Array:
    """h: [..., H] -> logits [..., V] float32 (tied: ``h @ embed^T``)."""
    if self.lm_head_kernel is None:
      w_VxH = self.embed_tokens[...].astype(self.dtype)
      return jnp.einsum("...h,vh->...v", h.astype(self.dtype), w_VxH,
                        preferred_element_type=jnp.float32)
    return _dense(h.astype(self.dtype), self.lm_head_kernel[...])

  def __call__(self, tokens: Array, positions: Array, cache: KVCache, cache_index: Array,
               attn_mask: Array) -> tuple[Array, KVCache]:
    """Runs T new tokens per row through the decoder.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] int32 RoPE positions (``prefix + depth`` for tree nodes).
      cache: the KV cache, L slots per row.
      cache_index: [B] int32; row b's new K/V go to slots ``cache_index[b] + t``
        (the caller keeps ``cache_index[b] + T <= L``).
      attn_mask: [B, T, L] bool over the whole cache after the write: query t
        attends slot s iff ``attn_mask[b, t, s]``; it must include the new
        tokens' own slots (causal, or a tree mask). A row with no visible slot
        gives finite garbage, never NaN. Sliding layers also drop the slots
        outside the window (:func:`window_mask`), which takes a committed slot
        ``s < cache_index[b]`` to hold position ``s`` (every caller keeps the
        committed tokens at slot = position).

    Returns:
      hidden [B, T, H] after the final RMSNorm (compute dtype), and the new cache.
    """
    B, T = tokens.shape
    L = cache.length
    if positions.shape != (B, T):
      raise RequestError(f"positions: expected shape {(B, T)}, got {positions.shape}")
    if cache_index.shape != (B,):
      raise RequestError(f"cache_index: expected shape {(B,)}, got {cache_index.shape}")
    if attn_mask.shape != (B, T, L):
      raise RequestError(f"attn_mask: expected shape {(B, T, L)}, got {attn_mask.shape}")
    if cache.batch != B or len(cache.k) != len(self.layers):
      raise RequestError(f"cache: expected batch {B} and {len(self.layers)} layers, got batch "
                        f"{cache.batch} and {len(cache.k)} layers")
    x_BxTxH = self.embed(tokens)
    # Shared by every layer: computed once per call, not once per layer.
    rope_cs = rope_tables(positions, np.asarray(self.layers[0].self_attn.inv_freq, np.float32))
    masks = {None: attn_mask.astype(bool)[:, None, None]}  # per window, [B, 1, 1, T, L]
    for w in {layer.window for layer in self.layers} - {None}:
      masks[w] = (attn_mask.astype(bool) & window_mask(positions, cache_index, L, w))[
          :, None, None]
    ks, vs = [], []
    for layer, k, v in zip(self.layers, cache.k, cache.v):
      x_BxTxH, k, v = layer(x_BxTxH, rope_cs, k, v, cache_index, masks[layer.window])
      ks.append(k)
      vs.append(v)
    return self.norm(x_BxTxH), KVCache(k=tuple(ks), v=tuple(vs))
