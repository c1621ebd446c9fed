"""Device meshes, partition rules and shard-by-shard placement.

The mesh has two axes: ``data`` splits batches (rows), ``model`` splits
weights. Partition specs are data (:class:`PartitionRules`: a parameter's path
picks its spec), and :func:`place` builds a global array block by block, so a
weight read from disk is never whole on one device. Sizes that do not divide
their mesh axis are refused with :class:`~medusa_jax.errors.ShardingError`,
naming the size and the axis.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medusa_jax.errors import ShardingError

Array = jax.Array
Index = tuple[slice, ...]  # a block of a global array, one slice per dim

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


def has_explicit_axes(mesh: Mesh) -> bool:
  """Whether any axis of ``mesh`` is ``AxisType.Explicit`` (``jax.make_mesh``'s default)."""
  return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def row_spec_of(x: Array, mesh: Mesh) -> Any:
  """The mesh axes ``x``'s first dim is split over, as its sharding type says.

  Known only on Explicit axes (the type carries the sharding); None elsewhere
  (replicated, or an Auto axis whose layout GSPMD still chooses).
  """
  if not has_explicit_axes(mesh):
    return None
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec[0] if spec else None


def constrain(x: Array, spec: P, mesh: Mesh) -> Array:
  """``x`` laid out as ``NamedSharding(mesh, spec)``, whatever its sharding was.

  Works eagerly (a device-to-device copy) and under ``jit``, on Auto axes (a
  sharding constraint GSPMD honours) and on Explicit axes (a ``reshard``, since
  there the sharding is part of the type and ``shard_map`` checks it).
  """
  sharding = NamedSharding(mesh, spec)
  if not isinstance(x, jax.core.Tracer):
    return jax.device_put(x, sharding)
  if has_explicit_axes(mesh):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


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


def rows_axis(n_rows: int, mesh: Mesh) -> str | None:
  """``data`` when ``n_rows`` divides it, else None (rows replicated over ``data``).

  Decode batches are bucketed to multiples of the data axis; a prefill that
  keeps one row per prompt may not be, and then every data group computes
  all rows (same result, no refusal).
  """
  return DATA if n_rows % axis_size(mesh, DATA) == 0 else None


# --------------------------------------------------------------------------- placing


def place(source: np.ndarray | Callable[[Index], np.ndarray], spec: P,
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


def _key(index: Index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  # Devices that replicate a block ask for the same index; read it once.
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _index(key: tuple[tuple[int, int], ...]) -> Index:
  return tuple(slice(a, b) for a, b in key)
