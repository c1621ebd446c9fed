"""The one interface between Medusa heads and whoever calls them.

Every kind of heads -- ``MedusaV1``, ``MedusaV2`` (sharded or not),
``MedusaModel`` and the routed multi-adapter ``BatchMedusaWeights`` --
implements :class:`Heads`, and the decode steps talk to heads through it alone.

Shapes: N rows entering the LM head, H hidden, V vocab, n heads, D <= n
drafts used. ``row_slot`` [N] int32 is the weight slot of each row for routed
heads; single-adapter heads ignore it (every row uses their one adapter).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Array = jax.Array
LMHead = Callable[[Array], Array]  # [..., H] -> [..., V] float32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight"],
                   meta_fields=["transposed", "dtype"])
@dataclasses.dataclass(frozen=True, eq=False)
class LinearLMHead:
  """An LM head that is one matmul, with its weight in sight.

  Any :data:`LMHead` callable works with every kind of heads; this one also
  lets tensor-parallel V2 heads fuse their all-gather into the LM-head
  product (:func:`~medusa_jax.heads.sharded.v2_heads_logits`), which needs
  the weight itself, not a closure over it. A pytree (the weight is its one
  leaf), so it passes through ``jax.jit``.

  Attributes:
    weight: ``[H, V]``, or with ``transposed`` a tied embedding ``[V, H]``;
      on a mesh, split over the vocabulary.
    transposed: the weight is ``[V, H]``.
    dtype: the compute dtype: ``h`` and the weight are cast to it (None:
      ``h``'s dtype); products accumulate in f32.
  """
  weight: Array
  transposed: bool = False
  dtype: Any = None

  @property
  def vocab_size(self) -> int:
    return self.weight.shape[0 if self.transposed else 1]

  def __call__(self, h: Array) -> Array:
    """h: [..., H] -> logits [..., V] float32."""
    dtype = h.dtype if self.dtype is None else self.dtype
    eq = "...h,vh->...v" if self.transposed else "...h,hv->...v"
    return jnp.einsum(eq, h.astype(dtype), self.weight.astype(dtype),
                      preferred_element_type=jnp.float32)


@runtime_checkable
class Heads(Protocol):
  """Medusa heads, as the decode step and LoRAX's callers see them.

  Attributes:
    num_heads: n, draft tokens per step.
    is_v2: True when the heads end in hidden states that share the base LM
      head (LoRAX's MedusaV2); False when each head has its own output
      projection (MedusaV1). The one place this question is answered.
    max_batch_size: LoRAX's speculation guard for :meth:`__call__` (V2: no
      drafts above it); None when the heads have none (V1).
  """

  @property
  def num_heads(self) -> int: ...

  @property
  def is_v2(self) -> bool: ...

  @property
  def max_batch_size(self) -> int | None: ...

  def __call__(self, x: Array, lm_head: LMHead, *, row_slot: Array | None = None
               ) -> tuple[Array, Array | None]:
    """LoRAX's call: x [N, H] -> (logits [N, V], speculative_logits [N, n, V] | None).

    The guard applies: V2 heads return None drafts when N > max_batch_size.
    """
    ...

  def logits_and_drafts(self, x: Array, lm_head: LMHead, num_drafts: int | None = None, *,
                        row_slot: Array | None = None) -> tuple[Array, Array]:
    """Always drafts (no guard): (logits [N, V], drafts [N, D, V]) float32.

    The speculative engine applies its own batch policy; heads beyond
    ``num_drafts`` are not sent through the LM head.
    """
    ...


def exceeds_guard(n_rows: int, max_batch_size: int | None) -> bool:
  """LoRAX's test: drafting is skipped when more rows than the limit enter the LM head."""
  return max_batch_size is not None and n_rows > max_batch_size


def shared_lm_head(x: Array, h_NxDxH: Array, lm_head: LMHead) -> tuple[Array, Array]:
  """Base and draft logits through **one** LM-head call over ``[x, h_0..h_{D-1}]``.

  Args:
    x: [N, H] hidden states after the final norm.
    h_NxDxH: [N, D, H] the heads' hidden states.
    lm_head: the base LM head.

  Returns:
    logits [N, V] (row 0 of the stack, numerically ``lm_head(x)``) and drafts
    [N, D, V].
  """
  stacked_Nx1DxH = jnp.concatenate([x[:, None, :], h_NxDxH.astype(x.dtype)], axis=1)
  logits_Nx1DxV = lm_head(stacked_Nx1DxH)
  return logits_Nx1DxV[:, 0], logits_Nx1DxV[:, 1:]
