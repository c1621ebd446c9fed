"""BatchMedusaWeights: Medusa heads of several adapters applied to one batch.

Each row carries a weight slot: the slot of its request's adapter when that
adapter has Medusa weights, else slot 0, the default adapter (id 0), as LoRAX
does. Routing is per row, in prefill and decode alike.

* V2 (fused heads sharing the base LM head): the adapters' kernels are
  stacked ``[A, H, n, H]``; one segmented matmul with the ResBlock epilogue
  gives every head's hidden state, then one ``lm_head`` call over
  ``[N, n+1, H]`` gives base and draft logits. When N exceeds the default
  adapter's speculation max batch size, LoRAX's call skips drafting.
* V1 (heads with their own output projections, L ResBlocks each): the first
  ResBlock of all n heads sees the same input, so it runs fused like V2;
  deeper ResBlocks and the output projections run per head, each as one
  segmented matmul routed per row. (LoRAX's batch path assumes V2 and fails
  on V1 adapters.)
* On a mesh (adapters placed with ``MedusaWeights.shard`` or loaded with
  ``mesh=``) the same products run tensor-parallel under ``shard_map``.

``BatchMedusaWeights`` is an NNX module and so a pytree: pass it to a jitted
function as an argument. It implements :class:`~medusa_jax.heads.protocol.Heads`;
the decode step passes each row's slot as ``row_slot`` (a traced array, so any
mix of adapters shares one compilation).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.errors import AdapterLoadError, ArchitectureError, SegmentError
from medusa_jax.heads.modules import MedusaModel, stack_heads
from medusa_jax.heads.protocol import LMHead, exceeds_guard, shared_lm_head
from medusa_jax.heads.sharded import sharded_segmented_matmul, v2_heads_hidden_segmented
from medusa_jax.pallas import Backend, segmented_matmul

Array = jax.Array
DEFAULT_ADAPTER = 0
_MAX_ID = 2**31 - 1  # adapter ids are routed as int32


def row_segments(row_slot: Array) -> tuple[Array, Array, Array]:
  """One single-row segment per row, rows left in place.

  The segmented-matmul kernels route rows themselves, so no permutation of the
  activations is needed.

  Args:
    row_slot: [N] integer weight slot per row.

  Returns:
    ``(s_start, s_end, seg_weight)``, each [N] int32: row r is segment r.
  """
  row_slot = jnp.asarray(row_slot).astype(jnp.int32)
  rows_N = jnp.arange(row_slot.shape[0], dtype=jnp.int32)
  return rows_N, rows_N + 1, row_slot


def slots_of(adapter_indices: Array, ids: Sequence[int]) -> Array:
  """Weight slot of each row: ``ids.index(id)``, or 0 for ids without weights.

  A sparse lookup (a comparison against the A loaded ids), so the cost is
  bounded by the adapters, never by the size of an id.

  Args:
    adapter_indices: [N] integer adapter id per row.
    ids: the loaded adapter ids in slot order (slot 0 = the default).

  Returns:
    [N] int32 slots.
  """
  ids_A = jnp.asarray(np.asarray(ids, np.int64).astype(np.int32))
  match_NxA = jnp.asarray(adapter_indices).astype(jnp.int32)[:, None] == ids_A[None, :]
  slots_A = jnp.arange(len(ids), dtype=jnp.int32)
  return jnp.max(jnp.where(match_NxA, slots_A[None, :], 0), axis=1).astype(jnp.int32)


def medusa_of(weights: Any) -> MedusaModel | None:
  """The Medusa heads an adapter entry carries (``MedusaWeights.model``), or None."""
  model = getattr(weights, "model", weights)
  return model if isinstance(model, MedusaModel) else None


class BatchMedusaWeights(nnx.Module):
  """Stacked Medusa weights of the adapters in a batch, and each row's slot.

  Slot 0 holds the default adapter (id 0); the others follow in id order.

  Attributes:
    row_slot: [N] int32 weight slot of each row given to :meth:`load` (used
      when a call passes no ``row_slot``).
    fused_w: [A, H, n, H] first ResBlock of every head (V2's kernel).
    fused_b: [A, n, H].
    block_w: V1 only: [L-1, n, A, H, H] deeper ResBlocks; None for V2.
    block_b: V1 only: [L-1, n, A, H]; None for V2.
    out_w: V1 only: [n, A, H, V] output projections; None for V2.
    adapter_ids: the adapter id of each slot (static).
    mesh: the mesh the adapters live on, or None.
    backend: segmented-matmul backend (static).
  """

  def __init__(self, *, row_slot: Array, fused_w: Array, fused_b: Array,
               block_w: Array | None, block_b: Array | None, out_w: Array | None,
               adapter_ids: tuple[int, ...], is_v2: bool, max_batch_size: int | None,
               mesh: Mesh | None, backend: Backend):
    self.row_slot = row_slot
    self.fused_w = fused_w
    self.fused_b = fused_b
    self.block_w = block_w
    self.block_b = block_b
    self.out_w = out_w
    self.adapter_ids = adapter_ids
    self._is_v2 = is_v2
    self._max_batch_size = max_batch_size
    self.mesh = mesh
    self.backend = backend

  @classmethod
  def load(cls, adapter_weights: Mapping[int, Any], adapter_indices: Sequence[int] | Array, *,
           backend: Backend | str = "auto") -> "BatchMedusaWeights | None":
    """Stacks the Medusa adapters and routes each row.

    Args:
      adapter_weights: adapter id -> weights with ``.model`` (a ``MedusaModel``),
        or the ``MedusaModel`` itself; entries without Medusa heads (None,
        other adapter types) are ignored.
      adapter_indices: [N] adapter id per row (host list/NumPy or jnp array,
        traced values allowed).
      backend: segmented-matmul backend.

    Returns:
      The batch weights, or None when no adapter has Medusa heads (nothing
      speculates, as in LoRAX).

    Raises:
      AdapterLoadError: a negative or non-integer id; no default (id 0)
        Medusa adapter while others exist; adapters that disagree on n, on
        the architecture (V1/V2), on L, on sizes or on their mesh.
      SegmentError: ``adapter_indices`` is not [N] integers; unknown backend.
    """
    backend = Backend.parse(backend)
    medusa: dict[int, MedusaModel] = {}
    for key, weights in adapter_weights.items():
      if (isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0
          or key > _MAX_ID):
        # Ids are compared as int32 on device: a larger one would alias another.
        raise AdapterLoadError(f"adapter id {key!r}: expected an integer in [0, {_MAX_ID}]")
      model = medusa_of(weights)
      if model is not None:
        medusa[int(key)] = model
    if not medusa:
      return None
    if DEFAULT_ADAPTER not in medusa:
      raise AdapterLoadError(
          f"adapter {DEFAULT_ADAPTER} (the default): expected Medusa weights, since rows of"
          f" adapters without Medusa heads use it; got Medusa adapters {sorted(medusa)}")
    ids = tuple(sorted(medusa))
    _check_compatible(medusa, ids)
    indices = jnp.asarray(adapter_indices)
    if indices.ndim != 1 or not (jnp.issubdtype(indices.dtype, jnp.integer) or indices.size == 0):
      raise SegmentError(f"adapter_indices: expected [N] integers, got shape"
                         f" {indices.shape} dtype {indices.dtype}")
    row_slot = slots_of(indices, ids)
    models = [medusa[i] for i in ids]
    default = models[0]
    common = dict(row_slot=row_slot, adapter_ids=ids, mesh=default.mesh, backend=backend)
    if default.is_v2:
      return cls(fused_w=jnp.stack([m.medusa.kernel[...] for m in models]),
                 fused_b=jnp.stack([m.medusa.bias[...] for m in models]),
                 block_w=None, block_b=None, out_w=None, is_v2=True,
                 max_batch_size=default.max_batch_size, **common)
    num_layers = default.medusa.num_layers
    n = default.num_heads

    def block(m, i, j):
      return m.medusa.heads[i].blocks[j]

    firsts = [stack_heads([block(m, i, 0).kernel[...] for i in range(n)],
                          [block(m, i, 0).bias[...] for i in range(n)]) for m in models]
    deeper = range(1, num_layers)
    block_w = block_b = None
    if num_layers > 1:
      block_w = jnp.stack([jnp.stack([jnp.stack([block(m, i, j).kernel[...] for m in models])
                                      for i in range(n)]) for j in deeper])
      block_b = jnp.stack([jnp.stack([jnp.stack([block(m, i, j).bias[...] for m in models])
                                      for i in range(n)]) for j in deeper])
    out_w = jnp.stack([jnp.stack([m.medusa.heads[i].out[...] for m in models])
                       for i in range(n)])
    return cls(fused_w=jnp.stack([k for k, _ in firsts]), fused_b=jnp.stack([b for _, b in firsts]),
               block_w=block_w, block_b=block_b, out_w=out_w, is_v2=False,
               max_batch_size=None, **common)

  # -- the Heads interface ------------------------------------------------------------------

  @property
  def num_heads(self) -> int:
    return int(self.fused_w.shape[2])

  @property
  def is_v2(self) -> bool:
    return self._is_v2

  @property
  def max_batch_size(self) -> int | None:
    return self._max_batch_size

  @property
  def num_adapters(self) -> int:
    return int(self.fused_w.shape[0])

  def has_adapter(self, adapter_index: int) -> bool:
    """LoRAX's rule: a batch with a default Medusa adapter drafts for every adapter."""
    del adapter_index
    return DEFAULT_ADAPTER in self.adapter_ids

  @classmethod
  def key(cls) -> str:
    """The adapter-type key LoRAX files these batch weights under."""
    return "medusa"

  def __call__(self, x: Array, lm_head: LMHead, *, row_slot: Array | None = None
               ) -> tuple[Array, Array | None]:
    """Base and draft logits for a mixed batch (LoRAX's call, guard included).

    Args:
      x: [N, H] hidden states after the final norm.
      lm_head: the base LM head, [..., H] -> [..., V].
      row_slot: [N] int32 weight slot per row; None = the slots of ``load``.

    Returns:
      logits [N, V]; speculative_logits [N, n, V], or None (V2) when N exceeds
      the speculation max batch size.

    Raises:
      SegmentError: x is not [N, H] for the N rows and H of the weights.
    """
    row_slot = self._slots(x, row_slot)
    if exceeds_guard(x.shape[0], self.max_batch_size):
      return lm_head(x), None
    return self.logits_and_drafts(x, lm_head, row_slot=row_slot)

  def logits_and_drafts(self, x: Array, lm_head: LMHead, num_drafts: int | None = None, *,
                        row_slot: Array | None = None) -> tuple[Array, Array]:
    """(logits [N, V], drafts [N, D, V]), every row through its own adapter, no guard."""
    segs = row_segments(self._slots(x, row_slot))
    h_NxnxH = self._first_blocks(x, segs)
    if self.is_v2:
      return shared_lm_head(x, h_NxnxH[:, :num_drafts], lm_head)
    logits_NxV = lm_head(x)
    spec = []
    for i in range(self.num_heads)[:num_drafts]:
      h_NxH = h_NxnxH[:, i]
      for j in range(0 if self.block_w is None else self.block_w.shape[0]):
        h_NxH = self._resblock(h_NxH, self.block_w[j, i], self.block_b[j, i], segs)
      # Output projections accumulate in f32 and stay f32, like MedusaHead.
      spec.append(self._matmul(h_NxH, self.out_w[i], None, segs).astype(logits_NxV.dtype))
    return logits_NxV, jnp.stack(spec, axis=1)

  def heads_hidden(self, x: Array, *, row_slot: Array | None = None) -> Array:
    """V2: every row's heads' hidden states [N, n, H] through its own adapter (no guard).

    Raises:
      ArchitectureError: the batch holds V1 adapters (their heads end in their
        own output projections, not in hidden states).
    """
    if not self.is_v2:
      raise ArchitectureError("heads_hidden: V1 adapters have no shared-lm_head hidden"
                              " states; call the batch with an lm_head instead")
    return self._first_blocks(x, row_segments(self._slots(x, row_slot)))

  # -- internals ----------------------------------------------------------------------------

  def _slots(self, x: Array, row_slot: Array | None) -> Array:
    row_slot = self.row_slot if row_slot is None else jnp.asarray(row_slot, jnp.int32)
    hidden = self.fused_w.shape[1]
    if x.ndim != 2 or x.shape != (row_slot.shape[0], hidden):
      raise SegmentError(f"x: expected [{row_slot.shape[0]}, {hidden}] (one row per weight"
                         f" slot, hidden of the heads), got {tuple(x.shape)}")
    return row_slot

  def _first_blocks(self, x: Array, segs) -> Array:
    """Each row's first ResBlock of every head, fused: [N, n, H] in ``x.dtype``."""
    n_adapters, hidden, n, _ = self.fused_w.shape
    if self.mesh is not None:
      return v2_heads_hidden_segmented(x, self.fused_w, self.fused_b, *segs, mesh=self.mesh,
                                       backend=self.backend)
    h_NxnH = segmented_matmul(x, self.fused_w.reshape(n_adapters, hidden, n * hidden),
                              self.fused_b.reshape(n_adapters, n * hidden), *segs,
                              backend=self.backend, epilogue="resblock")
    return h_NxnH.reshape(x.shape[0], n, hidden)

  def _resblock(self, h_NxH: Array, w: Array, b: Array, segs) -> Array:
    """A deeper V1 ResBlock, routed per row: ``h + silu(h @ w[slot] + b[slot])``."""
    if self.mesh is None:
      return segmented_matmul(h_NxH, w, b, *segs, backend=self.backend, epilogue="resblock")
    y = sharded_segmented_matmul(h_NxH, w, b, *segs, mesh=self.mesh, backend=self.backend)
    return (h_NxH.astype(jnp.float32) + jax.nn.silu(y)).astype(h_NxH.dtype)

  def _matmul(self, h_NxK: Array, w: Array, b: Array | None, segs) -> Array:
    if self.mesh is None:
      return segmented_matmul(h_NxK, w, b, *segs, backend=self.backend)
    return sharded_segmented_matmul(h_NxK, w, b, *segs, mesh=self.mesh, backend=self.backend)


def _shapes(model: MedusaModel) -> tuple:
  """Static shapes that must agree across a batch: V2 (H, n, H); V1 (L, H, V)."""
  if model.is_v2:
    return tuple(model.medusa.kernel[...].shape)
  head = model.medusa.heads[0]
  return (len(head.blocks),) + tuple(head.out[...].shape)


def _check_compatible(medusa: Mapping[int, MedusaModel], ids: Sequence[int]) -> None:
  default = medusa[DEFAULT_ADAPTER]
  kind = "V2" if default.is_v2 else "V1"
  for adapter_id in ids:
    m = medusa[adapter_id]
    if m.num_heads != default.num_heads:
      raise AdapterLoadError(
          f"adapter {adapter_id}: medusa_num_heads={m.num_heads}; expected"
          f" {default.num_heads}, the default adapter's (one speculation length per batch)")
    if m.is_v2 != default.is_v2:
      raise AdapterLoadError(
          f"adapter {adapter_id}: {'V2' if m.is_v2 else 'V1'} heads; expected {kind} like the"
          " default adapter (one architecture per batch)")
    if _shapes(m) != _shapes(default):
      raise AdapterLoadError(
          f"adapter {adapter_id}: head shapes {_shapes(m)}; expected {_shapes(default)} like"
          " the default adapter")
    if m.mesh != default.mesh:
      raise AdapterLoadError(
          f"adapter {adapter_id}: placed on {m.mesh}; expected the default adapter's mesh"
          f" ({default.mesh})")
