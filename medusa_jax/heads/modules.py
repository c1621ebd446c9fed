"""Medusa heads in Flax NNX, with LoRAX's exact math.

Shapes: N rows entering the LM head, H hidden, V vocab, n heads, L ResBlocks
per head. Arrays in memory are ``[in, out]`` so that ``y = x @ w``.

* ``ResBlock``: ``x + silu(x @ W + b)``.
* ``MedusaHead``: L ResBlocks, then an output projection ``[H, V]`` (no bias).
* ``MedusaV1``: n independent heads; ``spec[:, k] = head_k(x)``.
* ``MedusaV2``: all heads' first (and only) ResBlock fused in one ``[H, n*H]``
  linear (head-major columns); the n hidden states and ``x`` itself go through
  the base ``lm_head`` in **one** call over ``[N, n+1, H]``; row 0 gives the
  base logits.
* ``MedusaModel``: V1 when L > 1 or head 0 has its own output projection,
  else V2 (LoRAX's rule: the architecture follows the tensors, not ``version``).

Matmuls take bf16 (or f32) operands and accumulate in f32; the activation and
residual are computed in f32 and cast back to the input dtype once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import ArchitectureError, ConfigError

Array = jax.Array
LMHead = Callable[[Array], Array]  # [..., H] -> [..., V]

MAX_BATCH_ENV = "LORAX_SPECULATION_MAX_BATCH_SIZE"
DEFAULT_MAX_BATCH = 32


def speculation_max_batch_size(limit: int | None = None) -> int:
  """The speculation max-batch guard: ``limit``, else env, else 32.

  V2 heads skip drafting when the rows entering the LM head exceed it.
  """
  if limit is None:
    raw = os.environ.get(MAX_BATCH_ENV)
    if raw is None or raw.strip() == "":
      return DEFAULT_MAX_BATCH
    try:
      limit = int(raw)
    except ValueError:
      limit = -1
    if limit < 0:
      raise ConfigError(f"{MAX_BATCH_ENV}={raw!r}: expected a non-negative integer")
    return limit
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise ConfigError(f"max_batch_size: expected a non-negative integer, got {limit!r}")
  return limit


class HeadSegments(Protocol):
  """Per-row adapter routing for the fused V2 projection (see segments.py).

  Attributes:
    w: [A, H, n*H] stacked fused weights of the A adapters.
    b: [A, n*H] their biases.
    s_start, s_end: [S] int32 row ranges; segment s covers rows
      ``s_start[s]:s_end[s]`` and uses adapter ``seg_weight[s]``.
    seg_weight: [S] int32.
    backend: a segmented-matmul backend name.
  """
  w: Array
  b: Array
  s_start: Array
  s_end: Array
  seg_weight: Array
  backend: Any


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HeadsSharding:
  """Partition specs of the head parameters; all None = unsharded.

  Names end with the axes they cover: ``fused_w_hm`` is the V2 ``[H, n*H]``
  weight, ``fused_b_m`` its bias, ``block_w_hh``/``block_b_h`` a ResBlock,
  ``out_w_hv`` a V1 output projection.
  """
  fused_w_hm: Any = None
  fused_b_m: Any = None
  block_w_hh: Any = None
  block_b_h: Any = None
  out_w_hv: Any = None


def _param(value: Array, sharding) -> nnx.Param:
  if sharding is None:
    return nnx.Param(value)
  return nnx.Param(value, out_sharding=sharding)


def _dense(x: Array, w: Array) -> Array:
  """x [..., K] @ w [K, M] with f32 accumulation -> [..., M] float32."""
  return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _add_bias(y: Array, b: Array) -> Array:
  """y [..., M] float32 + b [M], broadcast explicitly (rank promotion may be off)."""
  return y + b.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + b.shape)


def resblock_math(x: Array, w: Array, b: Array) -> Array:
  """``x + silu(x @ w + b)`` in f32, cast back to ``x.dtype``.

  Args:
    x: [..., H].
    w: [H, H] ([in, out]).
    b: [H].
  """
  y = _add_bias(_dense(x, w), b)
  return (x.astype(jnp.float32) + jax.nn.silu(y)).astype(x.dtype)


class ResBlock(nnx.Module):
  """``x + silu(x @ W + b)``: the Medusa residual block.

  W is zero-initialised (the block starts as the identity, as in Medusa);
  the bias starts at zero too.
  """

  def __init__(self, hidden: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               kernel_init=nnx.initializers.zeros_init(),
               shd: HeadsSharding = HeadsSharding()):
    self.kernel = _param(kernel_init(rngs.params(), (hidden, hidden), param_dtype),
                         shd.block_w_hh)
    self.bias = _param(jnp.zeros((hidden,), param_dtype), shd.block_b_h)

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> [..., H]."""
    return resblock_math(x, self.kernel[...], self.bias[...])


class MedusaHead(nnx.Module):
  """One V1 head: L ResBlocks, then an output projection ``[H, V]`` without bias."""

  def __init__(self, hidden: int, vocab: int, num_layers: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, shd: HeadsSharding = HeadsSharding()):
    self.blocks = nnx.List([
        ResBlock(hidden, rngs=rngs, param_dtype=param_dtype, shd=shd)
        for _ in range(num_layers)
    ])
    init = nnx.initializers.lecun_normal()
    self.out = _param(init(rngs.params(), (hidden, vocab), param_dtype), shd.out_w_hv)

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> logits [..., V] (float32)."""
    for block in self.blocks:
      x = block(x)
    return _dense(x, self.out[...])


class MedusaV1(nnx.Module):
  """n independent heads, each with its own output projection.

  Like LoRAX, V1 ignores ``segments`` and has no max-batch guard.
  """

  def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32,
               shd: HeadsSharding = HeadsSharding()):
    self.hidden = hidden
    self.vocab = vocab
    self.num_heads = num_heads
    self.num_layers = num_layers
    self.heads = nnx.List([
        MedusaHead(hidden, vocab, num_layers, rngs=rngs, param_dtype=param_dtype, shd=shd)
        for _ in range(num_heads)
    ])

  def __call__(self, x: Array, lm_head: LMHead, segments: HeadSegments | None = None
               ) -> tuple[Array, Array]:
    """Base and draft logits.

    Args:
      x: [N, H] hidden states after the final norm.
      lm_head: the base LM head, [..., H] -> [..., V].
      segments: ignored (V1 heads are the same for every row).

    Returns:
      logits [N, V] = lm_head(x); speculative_logits [N, n, V].
    """
    del segments
    logits = lm_head(x)
    spec = jnp.stack([head(x).astype(logits.dtype) for head in self.heads], axis=1)
    return logits, spec


class MedusaV2(nnx.Module):
  """All heads fused in one ``[H, n*H]`` linear, sharing the base LM head.

  ``h_k = x + silu(x @ W[:, kH:(k+1)H] + b[kH:(k+1)H])`` and
  ``[logits, spec_0..spec_{n-1}] = lm_head([x, h_0, ..., h_{n-1}])`` in one call.
  When N exceeds ``max_batch_size`` the heads are skipped and the result is
  ``(lm_head(x), None)``, as LoRAX does.
  """

  def __init__(self, hidden: int, num_heads: int, num_layers: int = 1, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32, max_batch_size: int | None = None,
               kernel_init=nnx.initializers.zeros_init(),
               shd: HeadsSharding = HeadsSharding()):
    if num_layers != 1:
      raise ArchitectureError(
          f"medusa_num_layers={num_layers}: MedusaV2 (fused heads sharing the base lm_head)"
          " supports exactly 1 ResBlock per head; use MedusaV1 for deeper heads")
    self.hidden = hidden
    self.num_heads = num_heads
    self.max_batch_size = speculation_max_batch_size(max_batch_size)
    self.kernel = _param(kernel_init(rngs.params(), (hidden, num_heads * hidden), param_dtype),
                         shd.fused_w_hm)
    self.bias = _param(jnp.zeros((num_heads * hidden,), param_dtype), shd.fused_b_m)

  def heads_hidden(self, x: Array, segments: HeadSegments | None = None) -> Array:
    """The n heads' hidden states, before the LM head.

    Args:
      x: [N, H].
      segments: per-row adapter routing; None uses this module's own weights.

    Returns:
      [N, n, H] in ``x.dtype``.
    """
    n_rows, hidden = x.shape
    if segments is None:
      y_NxM = _add_bias(_dense(x, self.kernel[...]), self.bias[...])
      x_NxnxH = x.astype(jnp.float32)[:, None, :]
      h_NxnxH = x_NxnxH + jax.nn.silu(y_NxM.reshape(n_rows, self.num_heads, hidden))
      return h_NxnxH.astype(x.dtype)
    from medusa_jax.pallas import segmented_matmul  # kernels import nothing from heads
    h_NxM = segmented_matmul(x, segments.w, segments.b, segments.s_start, segments.s_end,
                             segments.seg_weight, backend=segments.backend,
                             epilogue="resblock")
    return h_NxM.reshape(n_rows, self.num_heads, hidden).astype(x.dtype)

  def __call__(self, x: Array, lm_head: LMHead, segments: HeadSegments | None = None
               ) -> tuple[Array, Array | None]:
    """Base and draft logits through one LM-head call.

    Args:
      x: [N, H] hidden states after the final norm.
      lm_head: the base LM head, [..., H] -> [..., V].
      segments: per-row adapter routing (BatchMedusaWeights); None = own weights.

    Returns:
      logits [N, V]; speculative_logits [N, n, V], or None when N > max_batch_size.
    """
    if x.shape[0] > self.max_batch_size:
      return lm_head(x), None
    h_NxnxH = self.heads_hidden(x, segments)
    stacked_Nx1nxH = jnp.concatenate([x[:, None, :], h_NxnxH], axis=1)
    logits3 = lm_head(stacked_Nx1nxH)
    return logits3[:, 0], logits3[:, 1:]


class MedusaModel(nnx.Module):
  """Picks MedusaV1 or MedusaV2 the way LoRAX does and delegates to it.

  V1 when ``medusa_num_layers > 1`` or head 0 has its own output projection
  (``per_head_lm_head``, i.e. the tensor ``0.{L}.weight`` exists); else V2.
  """

  def __init__(self, config: MedusaConfig, hidden: int, vocab: int | None = None, *,
               per_head_lm_head: bool = False, rngs: nnx.Rngs, param_dtype=jnp.float32,
               max_batch_size: int | None = None, shd: HeadsSharding = HeadsSharding()):
    self.config = config
    n, num_layers = config.medusa_num_heads, config.medusa_num_layers
    if num_layers > 1 or per_head_lm_head:
      if vocab is None:
        raise ArchitectureError("vocab: MedusaV1 heads need the vocabulary size for their"
                                " output projections")
      self.medusa = MedusaV1(hidden, vocab, n, num_layers, rngs=rngs,
                             param_dtype=param_dtype, shd=shd)
    else:
      self.medusa = MedusaV2(hidden, n, num_layers, rngs=rngs, param_dtype=param_dtype,
                             max_batch_size=max_batch_size, shd=shd)

  @property
  def is_v2(self) -> bool:
    return isinstance(self.medusa, MedusaV2)

  @property
  def num_heads(self) -> int:
    return self.config.medusa_num_heads

  @property
  def hidden_size(self) -> int:
    return self.medusa.hidden

  @property
  def vocab_size(self) -> int | None:
    """V of the per-head output projections (V1); None for V2, which uses the base lm_head."""
    return self.medusa.vocab if isinstance(self.medusa, MedusaV1) else None

  def __call__(self, x: Array, lm_head: LMHead, segments: HeadSegments | None = None
               ) -> tuple[Array, Array | None]:
    """x: [N, H] -> (logits [N, V], speculative_logits [N, n, V] | None)."""
    return self.medusa(x, lm_head, segments)
