"""BatchMedusaWeights: Medusa heads of several adapters applied to one batch.

Each row carries the id of its request's adapter. A row whose adapter has
Medusa weights uses them; any other row uses the default adapter (id 0), as
LoRAX does. Routing is per row, in prefill and decode alike.

* V2 (fused heads sharing the base LM head): the adapters' fused weights are
  stacked ``[A, H, n*H]``; one segmented matmul with the ResBlock epilogue
  gives every head's hidden state, then one ``lm_head`` call over
  ``[N, n+1, H]`` gives base and draft logits. When N exceeds the default
  adapter's speculation max batch size, drafting is skipped (``spec`` None).
* V1 (heads with their own output projections, L ResBlocks each): the first
  ResBlock of all n heads sees the same input, so it runs fused like V2;
  deeper ResBlocks and the output projections run per head, each as one
  segmented matmul routed per row. (LoRAX's batch path assumes V2 and fails
  on V1 adapters.)

``BatchMedusaWeights`` is a pytree (``flax.struct``): pass it to a jitted
function as an argument. The routing arrays are computed on device from the
per-row ids, with static shapes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.errors import AdapterLoadError, ArchitectureError, SegmentError
from medusa_jax.pallas import Backend, segmented_matmul
from medusa_jax.segments import row_segments, slot_of_rows

Array = jax.Array
LMHead = Callable[[Array], Array]
DEFAULT_ADAPTER = 0


@flax.struct.dataclass
class BatchMedusaWeights:
  """Stacked Medusa weights of the adapters in a batch and each row's slot.

  Slot 0 holds the default adapter (id 0); the others follow in id order.

  Attributes:
    row_slot: [N] int32 weight slot of each row.
    fused_w: [A, H, n*H] fused first ResBlock of every head (V2's fused weight).
    fused_b: [A, n*H].
    block_w: V1 only: [L-1, n, A, H, H] deeper ResBlocks; None for V2.
    block_b: V1 only: [L-1, n, A, H]; None for V2.
    out_w: V1 only: [n, A, H, V] output projections; None for V2.
    num_heads: n (static).
    is_v2: V2 heads (static).
    max_batch_size: V2 speculation guard: drafting is skipped above it (static).
    backend: segmented-matmul backend (static).
  """
  row_slot: Array
  fused_w: Array
  fused_b: Array
  block_w: Array | None
  block_b: Array | None
  out_w: Array | None
  num_heads: int = flax.struct.field(pytree_node=False)
  is_v2: bool = flax.struct.field(pytree_node=False)
  max_batch_size: int | None = flax.struct.field(pytree_node=False, default=None)
  backend: Any = flax.struct.field(pytree_node=False, default=Backend.AUTO)

  @classmethod
  def load(cls, adapter_weights: Mapping[int, Any], adapter_indices: Sequence[int] | Array, *,
           backend: Backend | str = "auto") -> "BatchMedusaWeights | None":
    """Stacks the Medusa adapters and routes each row.

    Args:
      adapter_weights: adapter id -> weights with ``.config`` (MedusaConfig)
        and ``.model`` (MedusaModel); entries without Medusa heads (e.g. other
        adapter types) are ignored.
      adapter_indices: [N] adapter id per row (host list/NumPy or jnp array,
        traced values allowed).
      backend: segmented-matmul backend.

    Returns:
      The batch weights, or None when no adapter has Medusa heads (nothing
      speculates, as in LoRAX).

    Raises:
      AdapterLoadError: no default (id 0) Medusa adapter while others exist;
        adapters disagree on n, on the architecture (V1/V2), on L or on
        hidden/vocab sizes.
      SegmentError: ``adapter_indices`` is not [N] integers; unknown backend.
    """
    backend = Backend.parse(backend)
    medusa = {int(k): v for k, v in adapter_weights.items() if _is_medusa(v)}
    if not medusa:
      return None
    if DEFAULT_ADAPTER not in medusa:
      raise AdapterLoadError(
          f"adapter {DEFAULT_ADAPTER} (the default): expected Medusa weights, since rows of"
          f" adapters without Medusa heads use it; got Medusa adapters {sorted(medusa)}")
    ids = sorted(medusa)
    _check_compatible(medusa, ids)
    table = np.zeros(max(ids) + 1, np.int32)
    for slot, adapter_id in enumerate(ids):
      table[adapter_id] = slot
    indices = jnp.asarray(adapter_indices)
    if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
      if not (indices.ndim == 1 and indices.size == 0):
        raise SegmentError(f"adapter_indices: expected [N] integers, got shape"
                           f" {indices.shape} dtype {indices.dtype}")
    row_slot = slot_of_rows(indices.astype(jnp.int32), jnp.asarray(table))
    models = [medusa[i].model for i in ids]
    default = models[0]
    n = medusa[DEFAULT_ADAPTER].config.medusa_num_heads
    if _is_v2(default):
      return cls(row_slot=row_slot,
                 fused_w=jnp.stack([m.medusa.kernel[...] for m in models]),
                 fused_b=jnp.stack([m.medusa.bias[...] for m in models]),
                 block_w=None, block_b=None, out_w=None, num_heads=n, is_v2=True,
                 max_batch_size=int(default.medusa.max_batch_size), backend=backend)
    num_layers = len(default.medusa.heads[0].blocks)

    def block(m, i, j):
      return m.medusa.heads[i].blocks[j]

    fused_w = jnp.stack([jnp.concatenate([block(m, i, 0).kernel[...] for i in range(n)], axis=1)
                         for m in models])
    fused_b = jnp.stack([jnp.concatenate([block(m, i, 0).bias[...] for i in range(n)])
                         for m in models])
    deeper = range(1, num_layers)
    block_w = jnp.stack([jnp.stack([jnp.stack([block(m, i, j).kernel[...] for m in models])
                                    for i in range(n)]) for j in deeper]) if num_layers > 1 \
        else None
    block_b = jnp.stack([jnp.stack([jnp.stack([block(m, i, j).bias[...] for m in models])
                                    for i in range(n)]) for j in deeper]) if num_layers > 1 \
        else None
    out_w = jnp.stack([jnp.stack([m.medusa.heads[i].out[...] for m in models])
                       for i in range(n)])
    return cls(row_slot=row_slot, fused_w=fused_w, fused_b=fused_b, block_w=block_w,
               block_b=block_b, out_w=out_w, num_heads=n, is_v2=False, max_batch_size=None,
               backend=backend)

  @property
  def num_adapters(self) -> int:
    return self.fused_w.shape[0]

  def __call__(self, x: Array, lm_head: LMHead) -> tuple[Array, Array | None]:
    """Base and draft logits for a mixed batch.

    Args:
      x: [N, H] hidden states after the final norm; N == len(adapter_indices).
      lm_head: the base LM head, [..., H] -> [..., V].

    Returns:
      logits [N, V]; speculative_logits [N, n, V], or None (V2) when N exceeds
      the speculation max batch size.

    Raises:
      SegmentError: x is not [N, H] for the N rows and H of the weights.
    """
    n_rows = self.row_slot.shape[0]
    self._check_rows(x)
    if self.is_v2 and self.max_batch_size is not None and n_rows > self.max_batch_size:
      return lm_head(x), None
    segs = row_segments(self.row_slot)
    h_NxnxH = self._first_blocks(x, segs)
    if self.is_v2:
      stacked_Nx1nxH = jnp.concatenate([x[:, None, :], h_NxnxH], axis=1)
      logits_Nx1nxV = lm_head(stacked_Nx1nxH)
      return logits_Nx1nxV[:, 0], logits_Nx1nxV[:, 1:]
    logits_NxV = lm_head(x)
    spec = []
    for i in range(self.num_heads):
      h_NxH = h_NxnxH[:, i]
      for j in range(0 if self.block_w is None else self.block_w.shape[0]):
        h_NxH = segmented_matmul(h_NxH, self.block_w[j, i], self.block_b[j, i], *segs,
                                 backend=self.backend, epilogue="resblock")
      # Output projections accumulate in f32 and stay f32, like MedusaHead.
      spec_NxV = segmented_matmul(h_NxH, self.out_w[i], None, *segs, backend=self.backend)
      spec.append(spec_NxV.astype(logits_NxV.dtype))
    return logits_NxV, jnp.stack(spec, axis=1)


  def heads_hidden(self, x: Array) -> Array:
    """V2: every row's heads' hidden states [N, n, H] through its own adapter.

    Always drafts (no max-batch guard): the speculative engine applies its own
    policy once per batch, like ``MedusaV2.heads_hidden``.

    Raises:
      ArchitectureError: the batch holds V1 adapters (their heads end in their
        own output projections, not in hidden states).
    """
    if not self.is_v2:
      raise ArchitectureError("heads_hidden: V1 adapters have no shared-lm_head hidden"
                              " states; call the batch with an lm_head instead")
    self._check_rows(x)
    return self._first_blocks(x, row_segments(self.row_slot))

  def _check_rows(self, x: Array) -> None:
    n_rows, hidden = self.row_slot.shape[0], self.fused_w.shape[1]
    if x.ndim != 2 or x.shape != (n_rows, hidden):
      raise SegmentError(f"x: expected [{n_rows}, {hidden}] (rows of adapter_indices, hidden"
                         f" of the heads), got {tuple(x.shape)}")

  def _first_blocks(self, x: Array, segs) -> Array:
    """Each row's first ResBlock of every head, fused: [N, n, H] in ``x.dtype``."""
    h_NxnH = segmented_matmul(x, self.fused_w, self.fused_b, *segs, backend=self.backend,
                              epilogue="resblock")
    return h_NxnH.reshape(x.shape[0], self.num_heads, x.shape[1])


def _is_medusa(weights: Any) -> bool:
  model = getattr(weights, "model", None)
  return getattr(weights, "config", None) is not None and hasattr(model, "medusa")


def _is_v2(model: Any) -> bool:
  return hasattr(model.medusa, "kernel")


def _check_compatible(medusa: Mapping[int, Any], ids: list[int]) -> None:
  default = medusa[DEFAULT_ADAPTER]
  n = default.config.medusa_num_heads
  v2 = _is_v2(default.model)
  shape = _shapes(default.model)
  for adapter_id in ids:
    w = medusa[adapter_id]
    if w.config.medusa_num_heads != n:
      raise AdapterLoadError(
          f"adapter {adapter_id}: medusa_num_heads={w.config.medusa_num_heads}; expected {n},"
          f" the default adapter's (one speculation length per batch)")
    if _is_v2(w.model) != v2:
      raise AdapterLoadError(
          f"adapter {adapter_id}: {'V2' if _is_v2(w.model) else 'V1'} heads; expected"
          f" {'V2' if v2 else 'V1'} like the default adapter (one architecture per batch)")
    if _shapes(w.model) != shape:
      raise AdapterLoadError(
          f"adapter {adapter_id}: head shapes {_shapes(w.model)}; expected {shape} like the"
          f" default adapter")


def _shapes(model: Any) -> tuple:
  """Static shapes that must agree across a batch: V2 (H, nH); V1 (L, H, V)."""
  if _is_v2(model):
    return tuple(model.medusa.kernel[...].shape)
  head = model.medusa.heads[0]
  return (len(head.blocks),) + tuple(head.out[...].shape)
