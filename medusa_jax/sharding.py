"""Device meshes, partition rules and tensor-parallel Medusa heads.

The mesh has two axes: ``data`` splits batches (rows), ``model`` splits
weights. The layout follows LoRAX's tensor-parallel Medusa:

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
* **Base model** (Megatron): q/k/v/gate/up column-parallel, o/down
  row-parallel, embeddings and lm_head over the vocabulary, norms replicated,
  the KV cache over batch (``data``) and kv heads (``model``).

Weight sizes that do not divide their mesh axis are refused with
:class:`~medusa_jax.errors.ShardingError`, naming the size and the axis. Two
documented cases replicate instead: batch rows that do not divide ``data``
(every data group computes them) and fewer kv heads than ``model`` devices
(Megatron's kv-head replication).

Opaque kernels (Pallas ``segmented_matmul``) are never partitioned by XLA:
they run under :func:`jax.shard_map` with ``check_vma=False``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import MissingTensorError, ShardingError, WeightsNotFoundError
from medusa_jax.heads import (HeadsSharding, MedusaModel, MedusaV2,
                              speculation_max_batch_size)

Array = jax.Array
LMHead = Callable[[Array], Array]

DATA = "data"
MODEL = "model"


# --------------------------------------------------------------------------- mesh


def make_mesh(data: int = 1, model: int | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, model)`` mesh over ``devices`` (default: every device of every host).

  Both axes are ``AxisType.Auto``: the base model, heads and engine are written
  without per-op sharding annotations, and Auto lets GSPMD propagate from the
  parameter and batch shardings alone. ``Explicit`` axes would make every
  ambiguous op (a matmul contracting a sharded dim, a gather from a
  vocabulary-split table) demand an ``out_sharding=``, i.e. sharding-aware model
  code. The places where the collective pattern matters (the V2 heads, opaque
  kernels) are pinned by :func:`jax.shard_map` instead.

  Args:
    data: size of the ``data`` axis.
    model: size of the ``model`` axis; None takes every remaining device.
    devices: the devices to use, in mesh order; None = ``jax.devices()``.

  Raises:
    ShardingError: ``data * model`` differs from the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if data < 1 or (model is not None and model < 1):
    raise ShardingError(f"mesh shape (data={data}, model={model}): expected positive sizes")
  if model is None:
    if len(devices) % data:
      raise ShardingError(f"mesh axis 'data' of size {data} does not divide the"
                          f" {len(devices)} devices")
    model = len(devices) // data
  if data * model != len(devices):
    raise ShardingError(f"mesh shape (data={data}, model={model}) needs {data * model}"
                        f" devices, got {len(devices)}")
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def axis_size(mesh: Mesh, axis: str) -> int:
  return int(mesh.shape[axis])


def check_divisible(shape: Sequence[int], spec: P, mesh: Mesh, what: str) -> None:
  """Raises ShardingError when a dim of ``shape`` does not divide its mesh axes.

  Args:
    shape: the global array shape.
    spec: its partition spec.
    mesh: the mesh.
    what: the array's name, for the message.
  """
  if len(spec) > len(shape):
    raise ShardingError(f"{what}: spec {spec} has {len(spec)} entries for a rank-{len(shape)}"
                        f" array of shape {tuple(shape)}")
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([axis_size(mesh, a) for a in names]))
    if shape[dim] % size:
      raise ShardingError(f"{what}: dim {dim} of size {shape[dim]} is not divisible by mesh"
                          f" axis {'x'.join(names)!r} of size {size}")


# ------------------------------------------------------------------- partition rules


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PartitionRules:
  """Partition specs as data: ordered ``(regex, spec)`` pairs.

  A parameter's path in an NNX state, joined with ``/`` (e.g.
  ``medusa/heads/0/out`` or ``layers/3/self_attn/q_proj/kernel``), takes the spec
  of the first pattern that ``re.search``-matches it; unmatched paths are
  replicated.
  """
  rules: tuple[tuple[str, P], ...]

  def spec(self, path: str) -> P:
    for pattern, spec in self.rules:
      if re.search(pattern, path):
        return spec
    return P()


# The sharded V2 module below holds kernel [H, n, H] and bias [n, H].
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

# Megatron-style rules for the base Llama ([in, out] kernels). The embedding
# [V, H] and a separate lm_head [H, V] split over the vocabulary.
LLAMA_RULES = PartitionRules(rules=(
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|wq|wk|wv|w1|w3)(/kernel)?$", P(None, MODEL)),
    (r"(q_proj|k_proj|v_proj)/bias$", P(MODEL)),
    (r"(o_proj|down_proj|wo|w2)(/kernel)?$", P(MODEL, None)),
    (r"(embed_tokens|embedding|embed|wte)(/embedding|/weight)?$", P(MODEL, None)),
    (r"lm_head(_kernel|/kernel)?$", P(None, MODEL)),
))


def path_str(path: Sequence[Any]) -> str:
  """An NNX state path (tuple of keys) as ``a/b/0/c``."""
  parts = []
  for key in path:
    key = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    parts.append(str(key))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def partition_specs(state: Any, rules: PartitionRules, mesh: Mesh) -> Any:
  """The spec of every leaf of ``state`` (a pytree, e.g. an ``nnx.State``).

  Raises:
    ShardingError: a leaf's size does not divide the mesh axis of its spec.
  """
  def one(path, leaf):
    name = path_str(path)
    spec = rules.spec(name)
    check_divisible(np.shape(leaf), spec, mesh, name)
    return spec
  return jax.tree_util.tree_map_with_path(one, state)


def shard_state(state: Any, rules: PartitionRules, mesh: Mesh) -> Any:
  """``state`` placed on ``mesh`` by ``rules`` (arrays move device to device)."""
  specs = partition_specs(state, rules, mesh)
  shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                     is_leaf=lambda x: isinstance(x, P))
  return jax.device_put(state, shardings)


def batch_spec(rank: int) -> P:
  """Spec of a batch-major array of the given rank: batch over ``data``."""
  return P(DATA, *([None] * (rank - 1)))


def shard_batch(x: Array | np.ndarray, mesh: Mesh) -> Array:
  """Places a batch-major array with its batch split over ``data``.

  Raises:
    ShardingError: the batch does not divide the ``data`` axis.
  """
  spec = batch_spec(np.ndim(x))
  check_divisible(np.shape(x), spec, mesh, "batch")
  return place(np.asarray(x), spec, mesh)


# --------------------------------------------------------------------------- placing


def place(source: np.ndarray | Callable[[tuple[slice, ...]], np.ndarray], spec: P,
          mesh: Mesh, *, shape: Sequence[int] | None = None, dtype=None,
          what: str = "array") -> Array:
  """A global array built shard by shard, never whole on one device.

  Args:
    source: a host array (each device copies only its slice) or a callable
      ``index -> np.ndarray`` returning the block at ``index`` (a tuple of
      slices into the global shape), e.g. a safetensors ``get_slice`` read.
    spec: the partition spec over ``mesh``.
    mesh: the mesh.
    shape: the global shape (required for a callable source).
    dtype: the array dtype; None keeps the source's.
    what: the array's name, for error messages.

  Raises:
    ShardingError: a dim does not divide its mesh axis.
  """
  if callable(source):
    if shape is None or dtype is None:
      raise ShardingError(f"{what}: a callable source needs shape= and dtype=")
    read = source
  else:
    arr = np.asarray(source)
    shape = arr.shape if shape is None else shape
    dtype = arr.dtype if dtype is None else dtype
    read = arr.__getitem__
  shape = tuple(int(s) for s in shape)
  check_divisible(shape, spec, mesh, what)
  np_dtype = np.dtype(dtype)

  @functools.lru_cache(maxsize=None)
  def block(key):
    return np.ascontiguousarray(np.asarray(read(_index(key))).astype(np_dtype, copy=False))

  return jax.make_array_from_callback(
      shape, NamedSharding(mesh, spec), lambda index: block(_key(index, shape)))


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  # Devices that replicate a block ask for the same index; read it once.
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _index(key: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
  return tuple(slice(a, b) for a, b in key)


# ------------------------------------------------------------------- sharded kernels


def _rows_spec(n_rows: int, mesh: Mesh) -> Any:
  """Rows split over ``data`` when they divide it; else replicated over ``data``.

  Decode batches are bucketed to multiples of the data axis; a prefill that
  keeps one row per prompt may not be, and then every data group computes
  all rows (same result, no refusal).
  """
  return DATA if n_rows % axis_size(mesh, DATA) == 0 else None


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
  rows = _rows_spec(x.shape[0], mesh)
  has_bias = b is not None

  def local(x_nxK, w_AxKxm, *rest):
    b_Axm = rest[0] if has_bias else None
    s0, s1, sw = rest[-3:]
    n_local = x_nxK.shape[0]
    offset = lax.axis_index(DATA) * n_local if rows else 0
    s0 = jnp.clip(s0 - offset, 0, n_local)
    s1 = jnp.clip(s1 - offset, 0, n_local)
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
  rows = _rows_spec(x.shape[0], mesh)

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
  rows = _rows_spec(n_rows, mesh)
  width = hidden // axis_size(mesh, MODEL)

  def local(x_nxH, w_AxHxnxw, b_Axnxw, s0, s1, sw):
    n_local = x_nxH.shape[0]
    offset = lax.axis_index(DATA) * n_local if rows else 0
    s0 = jnp.clip(s0 - offset, 0, n_local)
    s1 = jnp.clip(s1 - offset, 0, n_local)
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


# ------------------------------------------------------------------ sharding heads


def shard_medusa_model(model: MedusaModel, mesh: Mesh, *,
                       rules: PartitionRules = MEDUSA_RULES) -> nnx.Module:
  """Places an (unsharded) ``MedusaModel`` on ``mesh``.

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
    k = np.asarray(jax.device_get(inner.kernel[...])).reshape(hidden, n, hidden)
    b = np.asarray(jax.device_get(inner.bias[...])).reshape(n, hidden)
    return _medusa_model(model.config, ShardedMedusaV2(
        place(k, rules.spec("kernel_hnh"), mesh, what="V2 kernel [H, n, H]"),
        place(b, rules.spec("bias_nh"), mesh, what="V2 bias [n, H]"),
        mesh=mesh, max_batch_size=inner.max_batch_size))
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, shard_state(state, rules, mesh))


def _safetensors_files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  else:
    files = [path] if path.endswith(".safetensors") and os.path.exists(path) else []
  if not files:
    raise WeightsNotFoundError(f"{path}: no .safetensors file to load sharded (.pt and"
                               " orbax adapters load unsharded, then shard_medusa_model)")
  return files


class _TensorIndex:
  """Lazy access to tensors across safetensors files, by their head-relative name."""

  def __init__(self, files: list[str]):
    from safetensors import safe_open
    self._handles = {f: safe_open(f, framework="numpy") for f in files}
    self._where: dict[str, str] = {}
    for f, h in self._handles.items():
      for key in h.keys():
        self._where[key] = f
    pattern = re.compile(r"^(.*?)0\.0\.linear\.weight$")
    prefixes = [m.group(1) for m in map(pattern.match, self._where) if m]
    if not prefixes:
      raise MissingTensorError(f"{files[0]}: no tensor named [prefix]0.0.linear.weight")
    self.prefix = min(prefixes, key=len)
    self.files = files

  def has(self, name: str) -> bool:
    return self.prefix + name in self._where

  def slice(self, name: str):
    key = self.prefix + name
    if key not in self._where:
      raise MissingTensorError(f"{key}: missing from {', '.join(self.files)}")
    return self._handles[self._where[key]].get_slice(key)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.slice(name).get_shape())


def load_medusa_sharded(config: MedusaConfig, path: str, mesh: Mesh, *, dtype=jnp.float32,
                        max_batch_size: int | None = None,
                        rules: PartitionRules = MEDUSA_RULES) -> nnx.Module:
  """Loads Medusa heads straight onto ``mesh`` from safetensors.

  Each device reads only its block of each tensor (``safe_open(...).get_slice``
  through :func:`place`); no tensor is ever whole on one device. Accepts the
  LoRAX/TGI (``{k}.{j}.linear.weight``) and Medusa (``medusa_head.{k}...``)
  key layouts; files hold torch ``[out, in]`` layout.

  Args:
    config: the adapter's config.
    path: an adapter directory (every ``*.safetensors`` in it) or one file.
    mesh: the mesh.
    dtype: parameter dtype.
    max_batch_size: the V2 speculation guard (None: env or 32).
    rules: partition rules.

  Returns:
    A ``MedusaModel`` (``.medusa`` a :class:`ShardedMedusaV2` for V2, or V1
    heads with sharded parameters).

  Raises:
    WeightsNotFoundError, MissingTensorError: no file / a tensor is absent.
    ShardingError: H or V does not divide the ``model`` axis.
  """
  t = _TensorIndex(_safetensors_files(path))
  n, num_layers = config.medusa_num_heads, config.medusa_num_layers
  hidden = t.shape("0.0.linear.weight")[1]
  per_head_lm_head = t.has(f"0.{num_layers}.weight")
  if num_layers == 1 and not per_head_lm_head:
    def kernel_block(index):
      i_in, i_head, i_out = index
      return np.stack([t.slice(f"{k}.0.linear.weight")[i_out, i_in].T
                       for k in range(n)[i_head]], axis=1)

    def bias_block(index):
      i_head, i_out = index
      return np.stack([t.slice(f"{k}.0.linear.bias")[i_out] for k in range(n)[i_head]])

    kernel = place(kernel_block, rules.spec("kernel_hnh"), mesh, shape=(hidden, n, hidden),
                   dtype=dtype, what="V2 kernel [H, n, H]")
    bias = place(bias_block, rules.spec("bias_nh"), mesh, shape=(n, hidden), dtype=dtype,
                 what="V2 bias [n, H]")
    return _medusa_model(config, ShardedMedusaV2(kernel, bias, mesh=mesh,
                                                 max_batch_size=max_batch_size))

  vocab = t.shape(f"0.{num_layers}.weight")[0]
  abstract = nnx.eval_shape(lambda: MedusaModel(
      config, hidden, vocab, per_head_lm_head=True, rngs=nnx.Rngs(0), param_dtype=dtype))
  graphdef, state = nnx.split(abstract)

  def tensor_for(path, leaf):
    name = path_str(path)
    m = re.search(r"heads/(\d+)/(?:blocks/(\d+)/(kernel|bias)|out)$", name)
    k, j, kind = m.groups()
    if kind == "bias":
      read = lambda index, key=f"{k}.{j}.linear.bias": t.slice(key)[index[0]]
    else:
      key = f"{k}.{j}.linear.weight" if kind == "kernel" else f"{k}.{num_layers}.weight"
      read = lambda index, key=key: t.slice(key)[index[1], index[0]].T
    return place(read, rules.spec(name), mesh, shape=leaf.shape, dtype=dtype, what=name)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(tensor_for, state))


# ------------------------------------------------------------------------ base model


def llama_rules(cfg: Any, mesh: Mesh) -> PartitionRules:
  """Megatron rules for a ``LlamaConfig`` on ``mesh``.

  Query heads split over ``model`` (whole heads per device). With fewer kv
  heads than devices the k/v projections and the KV cache are replicated
  over ``model`` (as Megatron does), else split like the query heads.

  Raises:
    ShardingError: the query heads do not divide the ``model`` axis.
  """
  width = axis_size(mesh, MODEL)
  if cfg.num_attention_heads % width:
    raise ShardingError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by"
                        f" mesh axis 'model' of size {width}")
  if cfg.num_key_value_heads % width == 0:
    return LLAMA_RULES
  return PartitionRules(rules=((r"(k_proj|v_proj)(/kernel|/bias)?$", P()),) + LLAMA_RULES.rules)


def cache_spec(cfg: Any, batch: int, mesh: Mesh) -> P:
  """Spec of one [B, L, G, D] KV-cache buffer: rows over ``data``, kv heads over ``model``."""
  heads = MODEL if cfg.num_key_value_heads % axis_size(mesh, MODEL) == 0 else None
  return P(_rows_spec(batch, mesh), None, heads, None)


def shard_cache(cache: Any, cfg: Any, mesh: Mesh) -> Any:
  """A ``KVCache`` placed by :func:`cache_spec` (every buffer, every layer)."""
  spec = cache_spec(cfg, cache.k[0].shape[0], mesh)
  return jax.device_put(cache, NamedSharding(mesh, spec))


def shard_llama(llama: nnx.Module, mesh: Mesh) -> nnx.Module:
  """The base ``Llama`` with its parameters placed by :func:`llama_rules`."""
  graphdef, state = nnx.split(llama)
  return nnx.merge(graphdef, shard_state(state, llama_rules(llama.cfg, mesh), mesh))


def load_llama_sharded(model_dir: str | os.PathLike, mesh: Mesh, *, dtype=jnp.float32,
                       param_dtype=None) -> nnx.Module:
  """Loads a Hugging Face Llama checkpoint straight onto ``mesh``.

  Like ``models.llama.load_llama``, but each device reads only its block of
  each tensor (``get_slice``), so no weight is ever whole on one device.

  Raises:
    MissingTensorError: a tensor the model needs is absent.
    ShardingError: a size does not divide its mesh axis.
  """
  from safetensors import safe_open
  from medusa_jax.models import llama as llama_mod

  model_dir = os.fspath(model_dir)
  param_dtype = dtype if param_dtype is None else param_dtype
  cfg = llama_mod.LlamaConfig.from_hf(model_dir)
  rules = llama_rules(cfg, mesh)
  abstract = nnx.eval_shape(lambda: llama_mod.Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                    param_dtype=param_dtype))
  handles = [safe_open(f, framework="numpy") for f in llama_mod._weight_files(model_dir)]
  where = {key: h for h in handles for key in h.keys()}
  by_path = {path: (name, transpose) for name, (path, transpose)
             in llama_mod._hf_names(cfg).items()}
  for path, (name, transpose) in by_path.items():
    if name not in where:
      raise MissingTensorError(f"{model_dir}: missing tensor {name}")
    param = llama_mod._get_path(abstract, path)
    shape = tuple(param.get_value().shape)
    tensor = where[name].get_slice(name)

    def read(index, tensor=tensor, transpose=transpose):
      return tensor[tuple(reversed(index))].T if transpose else tensor[index]

    spec = rules.spec(path_str(path))
    param.set_value(place(read, spec, mesh, shape=shape, dtype=param_dtype, what=name))
  return abstract
