"""Tensor-parallel Medusa kernels: LoRAX's layout on a ``(data, model)`` mesh.

* **V2 fused heads.** The fused kernel is held as ``[H, n, H]``
  (``[in, head, out]``, the free reshape of the head-major ``[H, n*H]``) and
  split on the last axis, ``P(None, None, "model")``: device ``d`` of ``W``
  holds columns ``d*H/W:(d+1)*H/W`` of *every* head (LoRAX's per-rank
  ``[n*H/W, H]`` block, transposed). Each device computes ``x + silu(x @ W_d +
  b_d)`` for its slice, taking the residual from its own slice of ``x``, and
  one ``all_gather`` over ``model`` rebuilds ``[N, n, H]``.
* **LM head** ``[H, V]`` is split over the vocabulary, ``P(None, "model")``;
  logits come out vocabulary-sharded and stay so (an argmax over them needs
  only a small reduction, not LoRAX's all-gather of ``[N, n+1, V]``).
* **Heads + LM head, fused** (:func:`v2_heads_logits`, :class:`LMHeadCollective`).
  LoRAX's order (heads, all-gather, LM head) leaves the all-gather exposed:
  the LM head cannot start before the last slice arrives. The ``RING``
  collective matmul instead contracts the LM head over H block by block
  while the heads' slices travel a ring of ``ppermute``s, so each transfer
  (``[N, n, H/W]``, kilobytes) hides behind the product of one block of the
  LM-head weight (``[H/W, V/W]``, megabytes).
* **V1 heads** (not sharded by LoRAX) split their ResBlocks on the output
  dim and their output projections over the vocabulary (:data:`MEDUSA_RULES`);
  GSPMD inserts the gathers.

Opaque kernels (Pallas ``segmented_matmul``) are never partitioned by XLA:
they run under :func:`jax.shard_map` with ``check_vma=False``. Every entry
point accepts inputs of any sharding, on Auto and Explicit mesh axes: inputs
are laid out for ``shard_map`` first (:func:`~medusa_jax.parallel.mesh.constrain`)
and, on Explicit axes, outputs keep the rows' layout of the input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from medusa_jax.errors import ShardingError
from medusa_jax.heads.protocol import LinearLMHead
from medusa_jax.options import Option
from medusa_jax.pallas import Epilogue, segmented_matmul
from medusa_jax.parallel.mesh import (DATA, MODEL, PartitionRules, check_divisible, constrain,
                                      has_explicit_axes, row_spec_of, rows_axis)

Array = jax.Array


class LMHeadCollective(Option):
  """How tensor-parallel V2 heads meet a vocabulary-split LM head.

  * ``ALL_GATHER``: LoRAX's order, the reference: one ``all_gather`` of the
    heads' hidden ``[N, n, H]``, then the LM head over ``[N, n+1, H]``.
  * ``RING``: a collective matmul (:func:`v2_heads_logits`): W ``[N, n+1, H/W]
    x [H/W, V/W]`` block products, W-1 ``ppermute``s of ``[N, n, H/W]``
    between them, no all-gather; the same sums in another order (f32).
  """
  __option__ = "lm_head_collective"
  __error__ = ShardingError
  ALL_GATHER = "all_gather"
  RING = "ring"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HeadsSharding:
  """Partition specs of the head parameters; all None = unsharded.

  Names end with the axes they cover: ``fused_w_hnh`` is the V2 ``[H, n, H]``
  kernel, ``fused_b_nh`` its bias, ``block_w_hh``/``block_b_h`` a V1 ResBlock,
  ``out_w_hv`` a V1 output projection. ``lm_head_collective`` chooses how
  sharded V2 heads reach a :class:`~medusa_jax.heads.protocol.LinearLMHead`
  (any other LM-head callable takes ``ALL_GATHER``).
  """
  fused_w_hnh: P | None = None
  fused_b_nh: P | None = None
  block_w_hh: P | None = None
  block_b_h: P | None = None
  out_w_hv: P | None = None
  lm_head_collective: LMHeadCollective = LMHeadCollective.RING

  def __post_init__(self):
    object.__setattr__(self, "lm_head_collective",
                       LMHeadCollective.parse(self.lm_head_collective))

  @staticmethod
  def no_sharding() -> "HeadsSharding":
    return HeadsSharding()

  @staticmethod
  def tensor_parallel(lm_head_collective: LMHeadCollective | str = LMHeadCollective.RING
                      ) -> "HeadsSharding":
    """LoRAX's layout over ``model`` (V2), and the V1 rules of :data:`MEDUSA_RULES`.

    ``RING`` by default: on GPUs it takes the heads' all-gather off the
    critical path (docs/perf_sharded.md); ``ALL_GATHER`` is LoRAX's order.
    """
    return HeadsSharding(fused_w_hnh=P(None, None, MODEL), fused_b_nh=P(None, MODEL),
                         block_w_hh=P(None, MODEL), block_b_h=P(MODEL),
                         out_w_hv=P(None, MODEL), lm_head_collective=lm_head_collective)

  @property
  def is_sharded(self) -> bool:
    return any(getattr(self, f.name) is not None for f in dataclasses.fields(self)
               if f.name != "lm_head_collective")


# Paths of MedusaModel's parameters -> specs, for placing a whole state by rules.
MEDUSA_RULES = PartitionRules(rules=(
    (r"(^|/)medusa/kernel$", HeadsSharding.tensor_parallel().fused_w_hnh),
    (r"(^|/)medusa/bias$", HeadsSharding.tensor_parallel().fused_b_nh),
    (r"heads/\d+/blocks/\d+/kernel$", P(None, MODEL)),  # V1 ResBlock [H, H]: out split
    (r"heads/\d+/blocks/\d+/bias$", P(MODEL)),
    (r"heads/\d+/out$", P(None, MODEL)),                 # V1 output projection [H, V]
))


def _rows(x: Array, mesh: Mesh) -> str | None:
  """The axis the rows run split over inside shard_map: the input's own on
  Explicit axes (so outputs concatenate with it), else ``data`` when it divides."""
  if has_explicit_axes(mesh):
    spec = row_spec_of(x, mesh)
    return spec if spec == DATA else None
  return rows_axis(x.shape[0], mesh)


def _local_bounds(s_start: Array, s_end: Array, n_local: int, rows: str | None
                  ) -> tuple[Array, Array]:
  """Inside shard_map: global segment bounds [S] as row numbers of this device's rows.

  With rows split over ``data`` (``rows`` set) device group g holds rows
  ``g*n_local:(g+1)*n_local``; bounds are shifted and clipped to them.
  """
  offset = lax.axis_index(DATA) * n_local if rows else 0
  return jnp.clip(s_start - offset, 0, n_local), jnp.clip(s_end - offset, 0, n_local)


def _replicated(mesh: Mesh, *arrays: Array) -> list[Array]:
  return [constrain(a, P(), mesh) for a in arrays]


def sharded_segmented_matmul(x: Array, w: Array, b: Array | None, s_start: Array,
                             s_end: Array, seg_weight: Array, *, mesh: Mesh,
                             backend: Any = "auto", epilogue: Any = "none") -> Array:
  """``segmented_matmul`` with its output dim split over ``model``.

  Each device multiplies its rows by its ``M/W`` output columns. Rows split
  over ``data`` when they divide it; segment bounds are global row numbers and
  are shifted per device.

  Args:
    x: [N, K], any sharding.
    w: [A, K, M], split over ``model`` on M (resharded if it is not).
    b: [A, M] or None.
    s_start, s_end: [S] int32 global row bounds; seg_weight: [S] int32.
    mesh: the mesh.
    backend, epilogue: as ``segmented_matmul``; the ``resblock`` epilogue
      needs the whole row and is refused (see :func:`v2_heads_hidden_segmented`).

  Returns:
    [N, M] split over ``model`` on M (rows over ``data`` when they divide).

  Raises:
    ShardingError: M does not divide ``model``, or ``epilogue="resblock"``.
  """
  if Epilogue.parse(epilogue) is not Epilogue.NONE:
    raise ShardingError(f"epilogue={epilogue!r}: a fused epilogue needs whole rows; under a"
                        " 'model' split only epilogue='none' is supported")
  check_divisible(w.shape, P(None, None, MODEL), mesh, "segmented_matmul w [A, K, M]")
  rows = _rows(x, mesh)
  has_bias = b is not None

  def local(x_nxK, w_AxKxm, *rest):
    b_Axm = rest[0] if has_bias else None
    s0, s1, sw = rest[-3:]
    s0, s1 = _local_bounds(s0, s1, x_nxK.shape[0], rows)
    return segmented_matmul(x_nxK, w_AxKxm, b_Axm, s0, s1, sw, backend=backend)

  specs = [P(rows, None), P(None, None, MODEL)] + ([P(None, MODEL)] if has_bias else [])
  specs += [P(), P(), P()]
  args = [x, w] + ([b] if has_bias else []) + _replicated(mesh, s_start, s_end, seg_weight)
  args = [constrain(a, s, mesh) for a, s in zip(args, specs)]
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(rows, MODEL),
                       check_vma=False)(*args)


def _own_residual_gathered(x_nxH: Array, y_nxnxw: Array) -> Array:
  """Inside shard_map: ``x[:, own slice] + silu(y)``, then all-gathered over ``model``.

  Args:
    x_nxH: [n_rows, H] the device's rows, whole hidden dim.
    y_nxnxw: [n_rows, n, H/W] f32 pre-activations of the device's columns.

  Returns:
    [n_rows, n, H] in ``x``'s dtype.
  """
  width = y_nxnxw.shape[-1]
  d = lax.axis_index(MODEL)
  x_own = lax.dynamic_slice_in_dim(x_nxH, d * width, width, axis=1).astype(jnp.float32)
  h = x_own[:, None, :] + jax.nn.silu(y_nxnxw.astype(jnp.float32))
  return lax.all_gather(h.astype(x_nxH.dtype), MODEL, axis=2, tiled=True)


def v2_heads_hidden(x: Array, kernel_hnh: Array, bias_nh: Array, *, mesh: Mesh) -> Array:
  """The n V2 heads' hidden states, tensor-parallel as LoRAX.

  Per device ``d`` (columns ``j = d*H/W:(d+1)*H/W``): ``h[:, k, j] = x[:, j] +
  silu(x @ W[:, k, j] + b[k, j])``, then one ``all_gather`` over ``model``.

  Args:
    x: [N, H] hidden states, any sharding.
    kernel_hnh: [H, n, H] (``[in, head, out]``), split over ``model`` on out.
    bias_nh: [n, H], split on H.
    mesh: the mesh.

  Returns:
    [N, n, H] in ``x.dtype``, replicated over ``model`` (rows as the input's
    on Explicit axes, else over ``data`` when they divide it).

  Raises:
    ShardingError: H does not divide the ``model`` axis.
  """
  check_divisible(kernel_hnh.shape, P(None, None, MODEL), mesh, "V2 kernel [H, n, H]")
  rows = _rows(x, mesh)

  def local(x_nxH, w_Hxnxw, b_nxw):
    y = jnp.einsum("rh,hkm->rkm", x_nxH, w_Hxnxw.astype(x_nxH.dtype),
                   preferred_element_type=jnp.float32)
    return _own_residual_gathered(x_nxH, y + b_nxw.astype(jnp.float32)[None])

  specs = (P(rows, None), P(None, None, MODEL), P(None, MODEL))
  args = [constrain(a, s, mesh) for a, s in zip((x, kernel_hnh, bias_nh), specs)]
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(rows, None, None),
                       check_vma=False)(*args)


def v2_heads_hidden_segmented(x: Array, w: Array, b: Array, s_start: Array, s_end: Array,
                              seg_weight: Array, *, mesh: Mesh, backend: Any = "auto") -> Array:
  """:func:`v2_heads_hidden` with per-row adapters (the segmented matmul).

  Each device runs ``segmented_matmul`` (no epilogue) on its ``n*H/W``
  columns of every adapter, then the residual from its own slice of x and
  one all-gather. Rows in no segment give 0, as unsharded.

  Args:
    x: [N, H], any sharding.
    w: [A, H, n, H] stacked kernels, split (or resharded) on the last axis.
    b: [A, n, H] stacked biases.
    s_start, s_end, seg_weight: [S] int32 segment layout (global rows).
    mesh: the mesh.
    backend: the segmented-matmul backend.

  Returns:
    [N, n, H] in ``x.dtype``.

  Raises:
    ShardingError: H does not divide the ``model`` axis.
  """
  n_rows, hidden = x.shape
  n_adapters, _, num_heads, _ = w.shape
  check_divisible(w.shape, P(None, None, None, MODEL), mesh, "V2 kernels [A, H, n, H]")
  rows = _rows(x, mesh)
  width = hidden // int(mesh.shape[MODEL])

  def local(x_nxH, w_AxHxnxw, b_Axnxw, s0, s1, sw):
    n_local = x_nxH.shape[0]
    s0, s1 = _local_bounds(s0, s1, n_local, rows)
    y = segmented_matmul(x_nxH, w_AxHxnxw.reshape(n_adapters, hidden, num_heads * width),
                         b_Axnxw.reshape(n_adapters, num_heads * width), s0, s1, sw,
                         backend=backend)
    h = _own_residual_gathered(x_nxH, y.reshape(n_local, num_heads, width))
    r = jnp.arange(n_local)
    covered = ((r[None, :] >= s0[:, None]) & (r[None, :] < s1[:, None])).any(axis=0)
    return jnp.where(covered[:, None, None], h, jnp.zeros_like(h))

  specs = (P(rows, None), P(None, None, None, MODEL), P(None, None, MODEL), P(), P(), P())
  args = [constrain(a, s, mesh)
          for a, s in zip((x, w, b, s_start, s_end, seg_weight), specs)]
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(rows, None, None),
                       check_vma=False)(*args)


def ring_applies(lm_head: Any, hidden: int, mesh: Mesh) -> bool:
  """Whether :func:`v2_heads_logits` can run the ring for ``lm_head`` on ``mesh``.

  It needs the weight (a :class:`LinearLMHead`), a ``model`` axis of two or
  more, and H and V that divide it; otherwise callers take the all-gather path.
  """
  width = int(mesh.shape[MODEL])
  return (isinstance(lm_head, LinearLMHead) and width > 1 and hidden % width == 0
          and lm_head.vocab_size % width == 0)


def v2_heads_logits(x: Array, kernel_hnh: Array, bias_nh: Array, lm_head: LinearLMHead, *,
                    mesh: Mesh, num_drafts: int | None = None) -> tuple[Array, Array]:
  """V2 heads and a vocabulary-split LM head as one collective matmul (``RING``).

  Device ``d`` of the ``model`` axis (size W, block ``j`` = columns
  ``j*H/W:(j+1)*H/W``, ``u = V/W``) holds head columns ``d`` of the kernel
  and vocabulary slice ``d`` of the LM head ``W_lm [H, u]``. The logits of
  the stacked rows ``s = [x, h_0..h_{D-1}]`` ``[N, 1+D, H]`` on that slice are

      logits[:, :, d*u:(d+1)*u] = sum_j s[:, :, block j] @ W_lm[block j, :]

  1. ``h[:, :, block d] = x[:, block d] + silu(x @ kernel[:, :, block d] + b)``
     (local, as :func:`v2_heads_hidden`), the first D heads kept;
  2. for ``k = 0..W-1``: the device holds the heads' block ``j = (d - k) mod W``
     (its own at ``k = 0``, then what its ring neighbour ``d - 1`` sent),
     stacks it under ``x[:, block j]`` (x is whole on every device: no
     transfer) and adds ``s_j @ W_lm[block j]`` to an f32 accumulator, while
     ``ppermute`` passes the block on to ``d + 1``.

  Invariant: after step k the accumulator holds the blocks ``d, d-1, ..,
  d-k``; after W steps every block, i.e. the full contraction. No all-gather:
  W-1 transfers of ``[N, D, H/W]`` each, and product k depends only on the
  first k transfers, so the GPU backend's latency-hiding scheduler can run
  transfer k+1 under product k (the first product needs no transfer).
  CPU collectives are synchronous: tests check the pattern in the HLO, the
  overlap itself is measured by ``scripts/bench_sharded.py`` on GPUs.

  Args:
    x: [N, H] hidden states after the final norm, any sharding.
    kernel_hnh: [H, n, H] (``[in, head, out]``), split over ``model`` on out.
    bias_nh: [n, H], split on H.
    lm_head: the LM head; its weight ``[H, V]`` (or tied ``[V, H]``) is read
      vocabulary-split (resharded if it is not).
    mesh: the mesh; its ``model`` axis must divide H and V.
    num_drafts: D <= n heads through the LM head (None: all).

  Returns:
    logits [N, V] float32 and drafts [N, D, V] float32, split over ``model``
    on V (rows as :func:`v2_heads_hidden`).

  Raises:
    ShardingError: H or V does not divide the ``model`` axis.
  """
  width = int(mesh.shape[MODEL])
  hidden, num_heads = kernel_hnh.shape[0], kernel_hnh.shape[1]
  drafts = num_heads if num_drafts is None else num_drafts
  check_divisible(kernel_hnh.shape, P(None, None, MODEL), mesh, "V2 kernel [H, n, H]")
  w_spec = P(MODEL, None) if lm_head.transposed else P(None, MODEL)
  check_divisible(lm_head.weight.shape, w_spec, mesh,
                  "LM head [V, H]" if lm_head.transposed else "LM head [H, V]")
  rows = _rows(x, mesh)
  block = hidden // width
  dtype = x.dtype if lm_head.dtype is None else lm_head.dtype
  # The ring: device j sends to j + 1, so at step k device d holds block d - k.
  ring = [(j, (j + 1) % width) for j in range(width)]

  def local(x_nxH, w_Hxnxb, b_nxb, w_lm):
    d = lax.axis_index(MODEL)
    y_nxnxb = jnp.einsum("rh,hkm->rkm", x_nxH, w_Hxnxb.astype(x_nxH.dtype),
                         preferred_element_type=jnp.float32)
    y_nxnxb = y_nxnxb + b_nxb.astype(jnp.float32)[None]
    x_own = lax.dynamic_slice_in_dim(x_nxH, d * block, block, axis=1)
    h_nxDxb = (x_own.astype(jnp.float32)[:, None, :] + jax.nn.silu(y_nxnxb[:, :drafts])
               ).astype(x_nxH.dtype)
    # Blocks of the contraction dim as their own axis (a free reshape): for
    # [H, u] the leading one, so block j is a contiguous offset into the
    # weight (the scan-over-layers pattern); a tied [u, H] is sliced in place.
    if lm_head.transposed:
      w_blocks, block_axis, eq = w_lm.reshape(w_lm.shape[0], width, block), 1, "rkh,vh->rkv"
    else:
      w_blocks, block_axis, eq = w_lm.reshape(width, block, w_lm.shape[1]), 0, "rkh,hv->rkv"
    acc = None
    for k in range(width):  # static: W products, W - 1 transfers
      if k:
        h_nxDxb = lax.ppermute(h_nxDxb, MODEL, ring)
      j = (d - k) % width
      x_nxb = lax.dynamic_slice_in_dim(x_nxH, j * block, block, axis=1)
      s_nx1Dxb = jnp.concatenate([x_nxb[:, None, :], h_nxDxb], axis=1).astype(dtype)
      w_j = lax.dynamic_index_in_dim(w_blocks, j, axis=block_axis, keepdims=False)
      part = jnp.einsum(eq, s_nx1Dxb, w_j.astype(dtype), preferred_element_type=jnp.float32)
      acc = part if acc is None else acc + part
    return acc

  specs = (P(rows, None), P(None, None, MODEL), P(None, MODEL), w_spec)
  args = [constrain(a, s, mesh)
          for a, s in zip((x, kernel_hnh, bias_nh, lm_head.weight), specs)]
  logits_Nx1DxV = jax.shard_map(local, mesh=mesh, in_specs=specs,
                                out_specs=P(rows, None, MODEL), check_vma=False)(*args)
  return logits_Nx1DxV[:, 0], logits_Nx1DxV[:, 1:]


def vocab_parallel_lm_head(weight: Array, *, transposed: bool = False) -> LinearLMHead:
  """The base LM head over a vocabulary-split weight.

  Args:
    weight: ``[H, V]`` split ``P(None, "model")``, or with ``transposed`` a tied
      embedding ``[V, H]`` split ``P("model", None)``.
    transposed: the weight is ``[V, H]``.

  Returns:
    A :class:`LinearLMHead`: ``h [..., H] -> logits [..., V]`` float32. Under
    ``jax.jit`` the product runs per device on its vocabulary slice; logits
    stay split over V; tensor-parallel V2 heads run it as a ring
    (:func:`v2_heads_logits`).
  """
  return LinearLMHead(weight=weight, transposed=transposed)
