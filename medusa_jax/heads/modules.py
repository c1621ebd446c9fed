"""Medusa heads in Flax NNX, with LoRAX's exact math.

Shapes: N rows entering the LM head, H hidden, V vocab, n heads, L ResBlocks
per head. Arrays in memory are ``[in, out]`` so that ``y = x @ w``.

* ``ResBlock``: ``x + silu(x @ W + b)``.
* ``MedusaHead``: L ResBlocks, then an output projection ``[H, V]`` (no bias).
* ``MedusaV1``: n independent heads; ``spec[:, k] = head_k(x)``.
* ``MedusaV2``: all heads' first (and only) ResBlock fused in one linear,
  held as ``kernel [H, n, H]`` (``[in, head, out]``; its free reshape
  ``[H, n*H]`` is LoRAX's head-major fused weight) and ``bias [n, H]``; the n
  hidden states and ``x`` itself go through the base ``lm_head`` in **one**
  call over ``[N, n+1, H]``; row 0 gives the base logits. Placed on a mesh by
  a :class:`~medusa_jax.heads.sharded.HeadsSharding`, the same class runs
  LoRAX's tensor-parallel layout.
* ``MedusaModel``: V1 when L > 1 or head 0 has its own output projection,
  else V2 (LoRAX's rule: the architecture follows the tensors, not ``version``).

All of them implement :class:`~medusa_jax.heads.protocol.Heads`. Matmuls take
bf16 (or f32) operands and accumulate in f32; the activation and residual are
computed in f32 and cast back to the input dtype once.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medusa_jax.config import DEFAULT_MAX_BATCH, MedusaConfig, speculation_max_batch_size
from medusa_jax.errors import ArchitectureError
from medusa_jax.heads.protocol import LMHead, exceeds_guard, shared_lm_head
from medusa_jax.heads.sharded import (MEDUSA_RULES, HeadsSharding, LMHeadCollective,
                                      ring_applies, v2_heads_hidden, v2_heads_logits)
from medusa_jax.parallel.mesh import check_divisible, shard_state

Array = jax.Array


# ------------------------------------------------------- the fused <-> per-head layout


def fused_view(kernel_HxnxH: Any) -> Any:
  """[H, n, H] -> LoRAX's head-major fused weight [H, n*H] (a free reshape)."""
  return kernel_HxnxH.reshape(kernel_HxnxH.shape[0], -1)


def stack_heads(kernels: Sequence[Any], biases: Sequence[Any]) -> tuple[Any, Any]:
  """Per-head ResBlocks -> the V2 layout.

  Args:
    kernels: n arrays [H, H] (``[in, out]``), NumPy or JAX.
    biases: n arrays [H].

  Returns:
    (kernel [H, n, H], bias [n, H]), NumPy for NumPy inputs, else JAX.
  """
  xp = jnp if any(isinstance(a, jax.Array) for a in (*kernels, *biases)) else np
  return xp.stack(list(kernels), axis=1), xp.stack(list(biases), axis=0)


def unstack_heads(kernel_HxnxH: Any, bias_nxH: Any) -> list[tuple[Any, Any]]:
  """The V2 layout -> n pairs (kernel [H, H] ``[in, out]``, bias [H])."""
  return [(kernel_HxnxH[:, k, :], bias_nxH[k]) for k in range(kernel_HxnxH.shape[1])]


# ------------------------------------------------------------------------ modules


def _param(value: Array, spec: P | None, mesh: Mesh | None) -> nnx.Param:
  """A parameter placed by ``spec``: on ``mesh`` when given, else on the context mesh."""
  if spec is None:
    return nnx.Param(value)
  if mesh is not None:
    return nnx.Param(jax.device_put(value, NamedSharding(mesh, spec)))
  return nnx.Param(value, out_sharding=spec)  # needs ``with jax.set_mesh(mesh)``


def _check_limit(max_batch_size: int | None) -> int:
  """The guard as a plain integer; None is LoRAX's default, 32.

  The environment variable is read at the loading boundary
  (``config.speculation_max_batch_size``), never here.
  """
  return DEFAULT_MAX_BATCH if max_batch_size is None else speculation_max_batch_size(
      max_batch_size)


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
               shd: HeadsSharding = HeadsSharding(), mesh: Mesh | None = None):
    self.kernel = _param(kernel_init(rngs.params(), (hidden, hidden), param_dtype),
                         shd.block_w_hh, mesh)
    self.bias = _param(jnp.zeros((hidden,), param_dtype), shd.block_b_h, mesh)

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> [..., H]."""
    return resblock_math(x, self.kernel[...], self.bias[...])


class MedusaHead(nnx.Module):
  """One V1 head: L ResBlocks, then an output projection ``[H, V]`` without bias."""

  def __init__(self, hidden: int, vocab: int, num_layers: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, shd: HeadsSharding = HeadsSharding(),
               mesh: Mesh | None = None):
    self.blocks = nnx.List([
        ResBlock(hidden, rngs=rngs, param_dtype=param_dtype, shd=shd, mesh=mesh)
        for _ in range(num_layers)
    ])
    init = nnx.initializers.lecun_normal()
    self.out = _param(init(rngs.params(), (hidden, vocab), param_dtype), shd.out_w_hv, mesh)

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> logits [..., V] (float32)."""
    for block in self.blocks:
      x = block(x)
    return _dense(x, self.out[...])


class MedusaV1(nnx.Module):
  """n independent heads, each with its own output projection.

  Like LoRAX, V1 has no max-batch guard. On a mesh its parameters are placed
  by ``shd`` and GSPMD partitions the products; ``mesh`` is kept for routed
  batches, whose opaque kernels run under ``shard_map``.
  """

  def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32,
               shd: HeadsSharding = HeadsSharding(), mesh: Mesh | None = None):
    self.hidden = hidden
    self.vocab = vocab
    self._num_heads = num_heads
    self.num_layers = num_layers
    self.mesh = mesh
    self.heads = nnx.List([
        MedusaHead(hidden, vocab, num_layers, rngs=rngs, param_dtype=param_dtype, shd=shd,
                   mesh=mesh)
        for _ in range(num_heads)
    ])

  @property
  def num_heads(self) -> int:
    return self._num_heads

  @property
  def is_v2(self) -> bool:
    return False

  @property
  def max_batch_size(self) -> None:
    return None

  def __call__(self, x: Array, lm_head: LMHead, *, row_slot: Array | None = None
               ) -> tuple[Array, Array]:
    """Base and draft logits.

    Args:
      x: [N, H] hidden states after the final norm.
      lm_head: the base LM head, [..., H] -> [..., V].
      row_slot: ignored (every row uses these heads).

    Returns:
      logits [N, V] = lm_head(x); speculative_logits [N, n, V].
    """
    return self.logits_and_drafts(x, lm_head)

  def logits_and_drafts(self, x: Array, lm_head: LMHead, num_drafts: int | None = None, *,
                        row_slot: Array | None = None) -> tuple[Array, Array]:
    """(lm_head(x) [N, V], the first ``num_drafts`` heads' logits [N, D, V])."""
    del row_slot
    logits = lm_head(x)
    heads = list(self.heads)[:num_drafts]
    spec = jnp.stack([head(x).astype(logits.dtype) for head in heads], axis=1)
    return logits, spec


class MedusaV2(nnx.Module):
  """All heads fused in one linear ``kernel [H, n, H]``, sharing the base LM head.

  ``h_k = x + silu(x @ kernel[:, k] + bias[k])`` and
  ``[logits, spec_0..spec_{n-1}] = lm_head([x, h_0, ..., h_{n-1}])`` in one call.
  When N exceeds ``max_batch_size`` the heads are skipped and the result is
  ``(lm_head(x), None)``, as LoRAX does.

  With ``shd`` and ``mesh`` the parameters are placed on the mesh
  (``HeadsSharding.tensor_parallel()`` is LoRAX's layout) and
  :meth:`heads_hidden` runs tensor-parallel under ``shard_map``; the math and
  the results are those of the unsharded heads.
  """

  def __init__(self, hidden: int, num_heads: int, num_layers: int = 1, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32,
               max_batch_size: int = DEFAULT_MAX_BATCH,
               kernel_init=nnx.initializers.zeros_init(),
               shd: HeadsSharding = HeadsSharding(), mesh: Mesh | None = None):
    if num_layers != 1:
      raise ArchitectureError(
          f"medusa_num_layers={num_layers}: MedusaV2 (fused heads sharing the base lm_head)"
          " supports exactly 1 ResBlock per head; use MedusaV1 for deeper heads")
    self.hidden = hidden
    self._num_heads = num_heads
    self._max_batch_size = _check_limit(max_batch_size)
    self.mesh = mesh
    self.shd = shd
    self.kernel = _param(kernel_init(rngs.params(), (hidden, num_heads, hidden), param_dtype),
                         shd.fused_w_hnh, mesh)
    self.bias = _param(jnp.zeros((num_heads, hidden), param_dtype), shd.fused_b_nh, mesh)

  @property
  def num_heads(self) -> int:
    return self._num_heads

  @property
  def is_v2(self) -> bool:
    return True

  @property
  def max_batch_size(self) -> int:
    return self._max_batch_size

  @property
  def tensor_parallel(self) -> bool:
    """Whether :meth:`heads_hidden` runs LoRAX's sharded kernel (placed on a mesh)."""
    return self.mesh is not None and self.shd.fused_w_hnh is not None

  def heads_hidden(self, x: Array, *, row_slot: Array | None = None) -> Array:
    """The n heads' hidden states, before the LM head (always drafts).

    Args:
      x: [N, H], any sharding.
      row_slot: ignored (every row uses these heads).

    Returns:
      [N, n, H] in ``x.dtype``.
    """
    del row_slot
    if self.tensor_parallel:
      return v2_heads_hidden(x, self.kernel[...], self.bias[...], mesh=self.mesh)
    y_NxnxH = jnp.einsum("nh,hkm->nkm", x, self.kernel[...].astype(x.dtype),
                         preferred_element_type=jnp.float32)
    y_NxnxH = y_NxnxH + self.bias[...].astype(jnp.float32)[None]
    h_NxnxH = x.astype(jnp.float32)[:, None, :] + jax.nn.silu(y_NxnxH)
    return h_NxnxH.astype(x.dtype)

  def __call__(self, x: Array, lm_head: LMHead, *, row_slot: Array | None = None
               ) -> tuple[Array, Array | None]:
    """Base and draft logits through one LM-head call.

    Args:
      x: [N, H] hidden states after the final norm.
      lm_head: the base LM head, [..., H] -> [..., V].
      row_slot: ignored.

    Returns:
      logits [N, V]; speculative_logits [N, n, V], or None when N > max_batch_size.
    """
    if exceeds_guard(x.shape[0], self.max_batch_size):
      return lm_head(x), None
    return self.logits_and_drafts(x, lm_head)

  def logits_and_drafts(self, x: Array, lm_head: LMHead, num_drafts: int | None = None, *,
                        row_slot: Array | None = None) -> tuple[Array, Array]:
    """(logits [N, V], drafts [N, D, V]) with no guard: heads past D skip the LM head.

    Tensor-parallel heads with a :class:`~medusa_jax.heads.protocol.LinearLMHead`
    run heads and LM head as one collective matmul when
    ``shd.lm_head_collective`` is ``RING`` (:func:`v2_heads_logits`); the
    result is the same up to f32 summation order.
    """
    del row_slot
    if (self.tensor_parallel and self.shd.lm_head_collective is LMHeadCollective.RING
        and ring_applies(lm_head, self.hidden, self.mesh)):
      return v2_heads_logits(x, self.kernel[...], self.bias[...], lm_head, mesh=self.mesh,
                             num_drafts=num_drafts)
    return shared_lm_head(x, self.heads_hidden(x)[:, :num_drafts], lm_head)


class MedusaModel(nnx.Module):
  """Picks MedusaV1 or MedusaV2 the way LoRAX does and delegates to it.

  V1 when ``medusa_num_layers > 1`` or head 0 has its own output projection
  (``per_head_lm_head``, i.e. the tensor ``0.{L}.weight`` exists); else V2.
  """

  def __init__(self, config: MedusaConfig, hidden: int, vocab: int | None = None, *,
               per_head_lm_head: bool = False, rngs: nnx.Rngs, param_dtype=jnp.float32,
               max_batch_size: int = DEFAULT_MAX_BATCH, shd: HeadsSharding = HeadsSharding(),
               mesh: Mesh | None = None):
    self.config = config
    n, num_layers = config.medusa_num_heads, config.medusa_num_layers
    if num_layers > 1 or per_head_lm_head:
      if vocab is None:
        raise ArchitectureError("vocab: MedusaV1 heads need the vocabulary size for their"
                                " output projections")
      self.medusa = MedusaV1(hidden, vocab, n, num_layers, rngs=rngs,
                             param_dtype=param_dtype, shd=shd, mesh=mesh)
    else:
      self.medusa = MedusaV2(hidden, n, num_layers, rngs=rngs, param_dtype=param_dtype,
                             max_batch_size=max_batch_size, shd=shd, mesh=mesh)

  @property
  def is_v2(self) -> bool:
    return self.medusa.is_v2

  @property
  def num_heads(self) -> int:
    return self.medusa.num_heads

  @property
  def max_batch_size(self) -> int | None:
    return self.medusa.max_batch_size

  @property
  def mesh(self) -> Mesh | None:
    return self.medusa.mesh

  @property
  def hidden_size(self) -> int:
    return self.medusa.hidden

  @property
  def vocab_size(self) -> int | None:
    """V of the per-head output projections (V1); None for V2, which uses the base lm_head."""
    return None if self.is_v2 else self.medusa.vocab

  def __call__(self, x: Array, lm_head: LMHead, *, row_slot: Array | None = None
               ) -> tuple[Array, Array | None]:
    """x: [N, H] -> (logits [N, V], speculative_logits [N, n, V] | None)."""
    return self.medusa(x, lm_head, row_slot=row_slot)

  def logits_and_drafts(self, x: Array, lm_head: LMHead, num_drafts: int | None = None, *,
                        row_slot: Array | None = None) -> tuple[Array, Array]:
    """See :meth:`~medusa_jax.heads.protocol.Heads.logits_and_drafts`."""
    return self.medusa.logits_and_drafts(x, lm_head, num_drafts, row_slot=row_slot)

  def shard(self, mesh: Mesh, *,
            lm_head_collective: LMHeadCollective | str = LMHeadCollective.RING
            ) -> "MedusaModel":
    """These heads placed on ``mesh`` in LoRAX's layout (a copy; placed anew if on a mesh).

    V2: kernel ``P(None, None, "model")``, bias ``P(None, "model")``, sharded
    kernels from then on, meeting the LM head by ``lm_head_collective``
    (:class:`~medusa_jax.heads.sharded.LMHeadCollective`). V1: ResBlocks split
    on their output dim, output projections over V
    (:data:`~medusa_jax.heads.sharded.MEDUSA_RULES`).

    Raises:
      ShardingError: H (V2, V1) or V (V1) does not divide the ``model`` axis, or
        an unknown ``lm_head_collective``.
    """
    lm_head_collective = LMHeadCollective.parse(lm_head_collective)
    if self.is_v2:  # name the tensor as users know it
      check_divisible(self.medusa.kernel.shape, HeadsSharding.tensor_parallel().fused_w_hnh,
                      mesh, "V2 kernel [H, n, H]")
    graphdef, state = nnx.split(self)
    placed = nnx.merge(graphdef, shard_state(state, MEDUSA_RULES, mesh))
    placed.medusa.mesh = mesh
    if placed.is_v2:
      placed.medusa.shd = HeadsSharding.tensor_parallel(lm_head_collective)
    return placed


def abstract_heads(config: MedusaConfig, hidden: int, vocab: int | None, dtype, *,
                   max_batch_size: int | None = None) -> MedusaModel:
  """Heads with shape-only parameters, to be filled with ``set_value``.

  Avoids materialising a random init of V1's [H, V] projections only to
  overwrite it. ``max_batch_size`` None reads LoRAX's environment variable.
  """
  limit = speculation_max_batch_size(max_batch_size)
  return nnx.eval_shape(lambda: MedusaModel(
      config, hidden, vocab, per_head_lm_head=vocab is not None, rngs=nnx.Rngs(params=0),
      param_dtype=dtype, max_batch_size=limit))
