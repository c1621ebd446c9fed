"""Tensor-parallel Medusa heads: LoRAX's layout on a ``(data, model)`` mesh.

* **V2 fused heads.** The fused ``[H, n*H]`` weight (head-major columns) is
  held as its free reshape ``[H, n, H]`` (``[in, head, out]``) and split on
  the last axis, ``P(None, None, "model")``: device ``d`` of ``W`` holds
  columns ``d*H/W:(d+1)*H/W`` of *every* head (LoRAX's per-rank
  ``[n*H/W, H]`` block, transposed). A plain ``P(None, "model")`` on
  ``[H, n*H]`` would give device 0 whole heads instead. No column is
  permuted: ``kernel.reshape(H, n*H)`` is the file layout again. Each device
  computes ``x + silu(x @ W_d + b_d)`` for its slice, taking the residual
  from its own slice of ``x``, and one ``all_gather`` over ``model`` rebuilds
  ``[N, n, H]``.
* **LM head** ``[H, V]`` is split over the vocabulary, ``P(None, "model")``;
  logits come out vocabulary-sharded and stay so (an argmax over them needs
  only a small reduction, not LoRAX's all-gather of ``[N, n+1, V]``).
* **V1 heads** (not sharded by LoRAX) split their ResBlocks on the output
  dim and their output projections over the vocabulary; GSPMD inserts the
  gathers.

Opaque kernels (Pallas ``segmented_matmul``) are never partitioned by XLA:
they run under :func:`jax.shard_map` with ``check_vma=False``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import ShardingError
from medusa_jax.heads import (HeadsSharding, MedusaModel, MedusaV2,
                              speculation_max_batch_size)
from medusa_jax.partitioning import (DATA, MODEL, PartitionRules, axis_size, check_divisible,
                                     place, rows_axis, shard_state)

Array = jax.Array
LMHead = Callable[[Array], Array]

# ShardedMedusaV2 holds kernel [H, n, H] and bias [n, H].
# kernel_hnh: [in, head, out] split on out; bias_nh: [head, out] split on out.
MEDUSA_RULES = PartitionRules(rules=(
    (r"(^|/)kernel_hnh$", P(None, None, MODEL)),
    (r"(^|/)bias_nh$", P(None, MODEL)),
    (r"heads/\d+/blocks/\d+/kernel$", P(None, MODEL)),  # V1 ResBlock [H, H]: out split
    (r"heads/\d+/blocks/\d+/bias$", P(MODEL)),
    (r"heads/\d+/out$", P(None, MODEL)),                 # V1 output projection [H, V]
))

# The same V1 layout as a HeadsSharding, for building V1 heads already sharded
# (``MedusaModel(..., shd=V1_HEADS_SHARDING)`` inside ``jax.set_mesh(mesh)``).
# V2's fused weight has no such spec: its layout needs the [H, n, H] view
# (ShardedMedusaV2).
V1_HEADS_SHARDING = HeadsSharding(block_w_hh=P(None, MODEL), block_b_h=P(MODEL),
                                  out_w_hv=P(None, MODEL))


# ------------------------------------------------------------------- sharded kernels


def _local_bounds(s_start: Array, s_end: Array, n_local: int, rows: str | None
                  ) -> tuple[Array, Array]:
  """Inside shard_map: global segment bounds [S] as row numbers of this device's rows.

  With rows split over ``data`` (``rows`` set) device group g holds rows
  ``g*n_local:(g+1)*n_local``; bounds are shifted and clipped to them.
  """
  offset = lax.axis_index(DATA) * n_local if rows else 0
  return jnp.clip(s_start - offset, 0, n_local), jnp.clip(s_end - offset, 0, n_local)


def sharded_segmented_matmul(x: Array, w: Array, b: Array | None, s_start: Array,
                             s_end: Array, seg_weight: Array, *, mesh: Mesh,
                             backend: Any = "auto", epilogue: Any = "none") -> Array:
  """``segmented_matmul`` with its output dim split over ``model``.

  The kernel is opaque to XLA, so it runs per device under ``shard_map``: each
  device multiplies its rows by its ``M/W`` output columns. Rows split over
  ``data`` when they divide it; segment bounds are global row numbers and are
  shifted per device. ``check_vma=False``: a Pallas output carries no
  varying-axes type, so the checked mode rejects it.

  Args:
    x: [N, K], replicated over ``model``.
    w: [A, K, M], split over ``model`` on M.
    b: [A, M] split on M, or None.
    s_start, s_end: [S] int32 global row bounds; seg_weight: [S] int32.
    mesh: the mesh.
    backend, epilogue: as ``segmented_matmul``; the ``resblock`` epilogue
      needs the whole row and is refused (see :func:`v2_heads_hidden`).

  Returns:
    [N, M] split over ``model`` on M (rows over ``data`` when they divide).

  Raises:
    ShardingError: M does not divide ``model``, or ``epilogue="resblock"``.
  """
  from medusa_jax.pallas import Epilogue, segmented_matmul  # kernels import nothing from here
  if Epilogue.parse(epilogue) is not Epilogue.NONE:
    raise ShardingError(f"epilogue={epilogue!r}: a fused epilogue needs whole rows; under a"
                        " 'model' split only epilogue='none' is supported")
  check_divisible(w.shape, P(None, None, MODEL), mesh, "segmented_matmul w [A, K, M]")
  rows = rows_axis(x.shape[0], mesh)
  has_bias = b is not None

  def local(x_nxK, w_AxKxm, *rest):
    b_Axm = rest[0] if has_bias else None
    s0, s1, sw = rest[-3:]
    s0, s1 = _local_bounds(s0, s1, x_nxK.shape[0], rows)
    return segmented_matmul(x_nxK, w_AxKxm, b_Axm, s0, s1, sw, backend=backend)

  specs = [P(rows, None), P(None, None, MODEL)] + ([P(None, MODEL)] if has_bias else [])
  specs += [P(), P(), P()]
  args = [x, w] + ([b] if has_bias else []) + [s_start, s_end, seg_weight]
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
  Rows split over ``data`` when they divide it.

  Args:
    x: [N, H] hidden states.
    kernel_hnh: [H, n, H] (``[in, head, out]``), split over ``model`` on out.
    bias_nh: [n, H], split on H.
    mesh: the mesh.

  Returns:
    [N, n, H] in ``x.dtype``, replicated over ``model``.

  Raises:
    ShardingError: H does not divide the ``model`` axis.
  """
  check_divisible(kernel_hnh.shape, P(None, None, MODEL), mesh, "V2 kernel [H, n, H]")
  rows = rows_axis(x.shape[0], mesh)

  def local(x_nxH, w_Hxnxw, b_nxw):
    y = jnp.einsum("rh,hkm->rkm", x_nxH, w_Hxnxw.astype(x_nxH.dtype),
                   preferred_element_type=jnp.float32)
    return _own_residual_gathered(x_nxH, y + b_nxw.astype(jnp.float32)[None])

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(P(rows, None), P(None, None, MODEL), P(None, MODEL)),
                       out_specs=P(rows, None, None), check_vma=False)(x, kernel_hnh, bias_nh)


def v2_heads_hidden_segmented(x: Array, w: Array, b: Array, s_start: Array, s_end: Array,
                              seg_weight: Array, *, mesh: Mesh, num_heads: int,
                              backend: Any = "auto") -> Array:
  """:func:`v2_heads_hidden` with per-row adapters (the segmented matmul).

  Each device runs ``segmented_matmul`` (no epilogue) on its ``n*H/W``
  columns of every adapter, then the residual from its own slice of x and
  one all-gather. Rows in no segment give 0, as unsharded.

  Args:
    x: [N, H].
    w: [A, H, n, H] split on the last axis; the flat ``[A, H, n*H]`` is
      accepted and resharded inside jit.
    b: [A, n, H] (or [A, n*H]).
    s_start, s_end, seg_weight: [S] int32 segment layout (global rows).
    mesh: the mesh.
    num_heads: n.
    backend: the segmented-matmul backend.

  Returns:
    [N, n, H] in ``x.dtype``.
  """
  from medusa_jax.pallas import segmented_matmul  # kernels import nothing from here
  n_rows, hidden = x.shape
  n_adapters = w.shape[0]
  w = w.reshape(n_adapters, hidden, num_heads, hidden)
  b = b.reshape(n_adapters, num_heads, hidden)
  check_divisible(w.shape, P(None, None, None, MODEL), mesh, "V2 kernels [A, H, n, H]")
  w = lax.with_sharding_constraint(w, NamedSharding(mesh, P(None, None, None, MODEL)))
  b = lax.with_sharding_constraint(b, NamedSharding(mesh, P(None, None, MODEL)))
  rows = rows_axis(n_rows, mesh)
  width = hidden // axis_size(mesh, MODEL)

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

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(rows, None), P(None, None, None, MODEL), P(None, None, MODEL), P(), P(), P()),
      out_specs=P(rows, None, None), check_vma=False,
  )(x, w, b, s_start, s_end, seg_weight)


def vocab_parallel_lm_head(weight: Array, *, transposed: bool = False) -> LMHead:
  """The base LM head as a callable over a vocabulary-split weight.

  Args:
    weight: ``[H, V]`` split ``P(None, "model")``, or with ``transposed`` a tied
      embedding ``[V, H]`` split ``P("model", None)``.
    transposed: the weight is ``[V, H]``.

  Returns:
    ``h [..., H] -> logits [..., V]`` float32. Under ``jax.jit`` the product
    runs per device on its vocabulary slice; logits stay split over V.
  """
  def lm_head(h):
    w = weight.astype(h.dtype)
    eq = "...h,vh->...v" if transposed else "...h,hv->...v"
    return jnp.einsum(eq, h, w, preferred_element_type=jnp.float32)
  return lm_head


# ------------------------------------------------------------- the sharded V2 module


class ShardedMedusaV2(MedusaV2):
  """MedusaV2 heads on a mesh: the same math and ``__call__``, LoRAX's layout.

  Holds ``kernel_hnh`` [H, n, H] split ``P(None, None, "model")`` and
  ``bias_nh`` [n, H] split ``P(None, "model")``: the head-major fused weight's
  free reshape, so ``kernel_hnh.reshape(H, n*H)`` is the unsharded layout. It
  sits where ``MedusaV2`` sits (``MedusaModel.medusa``), so code that takes a
  ``MedusaModel`` runs it unchanged; only ``heads_hidden`` differs.
  """

  def __init__(self, kernel_hnh: Array, bias_nh: Array, *, mesh: Mesh,
               max_batch_size: int | None = None):
    # MedusaV2.__init__ would allocate the unsharded [H, n*H] weight; this
    # class takes its parameters already placed.
    self.hidden, self.num_heads = int(kernel_hnh.shape[0]), int(kernel_hnh.shape[1])
    self.mesh = mesh
    self.max_batch_size = speculation_max_batch_size(max_batch_size)
    self.kernel_hnh = nnx.Param(kernel_hnh)
    self.bias_nh = nnx.Param(bias_nh)

  def heads_hidden(self, x: Array, segments: Any = None) -> Array:
    """x: [N, H] -> [N, n, H] (``x.dtype``); see :func:`v2_heads_hidden`."""
    if segments is None:
      return v2_heads_hidden(x, self.kernel_hnh[...], self.bias_nh[...], mesh=self.mesh)
    return v2_heads_hidden_segmented(x, segments.w, segments.b, segments.s_start,
                                     segments.s_end, segments.seg_weight, mesh=self.mesh,
                                     num_heads=self.num_heads, backend=segments.backend)

  def unsharded_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [H, n*H], bias [n*H]) on the host, in the file layout."""
    k = np.asarray(jax.device_get(self.kernel_hnh[...]))
    b = np.asarray(jax.device_get(self.bias_nh[...]))
    return k.reshape(k.shape[0], -1), b.reshape(-1)


def _medusa_model(config: MedusaConfig, inner: nnx.Module) -> MedusaModel:
  """A ``MedusaModel`` around an already-built inner V1/V2 module (no allocation)."""
  model = nnx.eval_shape(lambda: MedusaModel(config, 2, 2, rngs=nnx.Rngs(0)))
  model.medusa = inner
  return model


def sharded_v2_model(config: MedusaConfig, kernel_hnh: Array, bias_nh: Array, *, mesh: Mesh,
                     max_batch_size: int | None = None) -> MedusaModel:
  """A ``MedusaModel`` whose ``.medusa`` is a :class:`ShardedMedusaV2` on these arrays.

  Args:
    config: the adapter config.
    kernel_hnh: [H, n, H], placed ``P(None, None, "model")``.
    bias_nh: [n, H], placed ``P(None, "model")``.
    mesh: the mesh they are placed on.
    max_batch_size: the speculation guard (None: env, else 32).
  """
  return _medusa_model(config, ShardedMedusaV2(kernel_hnh, bias_nh, mesh=mesh,
                                               max_batch_size=max_batch_size))


# ------------------------------------------------------------------ sharding heads


def shard_medusa_model(model: MedusaModel, mesh: Mesh, *,
                       rules: PartitionRules = MEDUSA_RULES) -> nnx.Module:
  """Places a ``MedusaModel`` on ``mesh`` (one already on a mesh is placed anew).

  Returns:
    A ``MedusaModel``: for V2 its ``.medusa`` is a :class:`ShardedMedusaV2`;
    for V1 its ResBlocks are split on their output dim and its output
    projections over V.

  Raises:
    ShardingError: H (V2, V1) or V (V1) does not divide the ``model`` axis.
  """
  if model.is_v2:
    inner = model.medusa
    hidden, n = inner.hidden, inner.num_heads
    k, b = (inner.unsharded_arrays() if isinstance(inner, ShardedMedusaV2)
            else jax.device_get((inner.kernel[...], inner.bias[...])))
    k = np.asarray(k).reshape(hidden, n, hidden)
    b = np.asarray(b).reshape(n, hidden)
    return sharded_v2_model(
        model.config, place(k, rules.spec("kernel_hnh"), mesh, what="V2 kernel [H, n, H]"),
        place(b, rules.spec("bias_nh"), mesh, what="V2 bias [n, H]"), mesh=mesh,
        max_batch_size=inner.max_batch_size)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, shard_state(state, rules, mesh))
