"""Medusa heads built from adapter files, on one device or straight onto a mesh.

One reader serves both: every parameter has a *source*, ``index -> block`` in
its in-memory layout, read from the file tensors (torch ``[out, in]``) by
:class:`~medusa_jax.adapter_files.TensorIndex`. Without a mesh each source is
read whole; with one, :func:`~medusa_jax.partitioning.place` asks each device
for its own block only (a safetensors ``get_slice`` read), so no weight is ever
whole on one device. V2 heads are read as the ``[H, n, H]`` view of the fused
``[H, n*H]`` kernel, which is both what a mesh splits and a free reshape of the
unsharded layout.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.adapter_files import (AdapterLayout, Index, TensorIndex, block_bias_key,
                                      block_weight_key, open_adapter_files)
from medusa_jax.config import MedusaConfig
from medusa_jax.heads import MedusaModel
from medusa_jax.partitioning import PartitionRules, path_str, place
from medusa_jax.sharded_heads import MEDUSA_RULES, sharded_v2_model

Source = Callable[[Index], np.ndarray]  # block index -> block, in-memory layout


def read_heads(config: MedusaConfig, index: TensorIndex, *, dtype=jnp.float32,
               max_batch_size: int | None = None, check_finite: bool = True,
               mesh: Mesh | None = None, rules: PartitionRules = MEDUSA_RULES) -> MedusaModel:
  """The heads of an open adapter, whole on the default device or placed on ``mesh``.

  Hidden size H (and V for V1) come from the tensors; V1 is chosen when
  ``medusa_num_layers > 1`` or ``0.{L}.weight`` exists, else V2. Every tensor's
  shape is checked before any data is read.

  Args:
    config: the adapter config (n, L).
    index: the adapter's open files.
    dtype: parameter dtype.
    max_batch_size: the V2 speculation guard (None: env, else 32).
    check_finite: reject tensors (blocks, on a mesh) holding NaN or inf.
    mesh: None for unsharded heads; else the mesh to place them on.
    rules: partition rules (with a mesh).

  Returns:
    A ``MedusaModel``; with a mesh, V2's ``.medusa`` is a ``ShardedMedusaV2``
    and V1's parameters are split by ``rules``.

  Raises:
    MissingTensorError, TensorShapeError, TensorDtypeError, CorruptWeightsError,
    NonFiniteWeightsError: a tensor is absent or bad (named).
    ShardingError: H or V does not divide the ``model`` axis.
  """
  layout = AdapterLayout.infer(config, index)
  layout.check_shapes(index)

  def source(key: str, transposed: bool) -> Source:
    def read(block: Index) -> np.ndarray:
      if transposed:
        return index.read_block(key, tuple(reversed(block)), check_finite=check_finite).T
      return index.read_block(key, block, check_finite=check_finite)
    return read

  def make(read: Source, shape: tuple[int, ...], name: str, what: str) -> jax.Array:
    if mesh is None:
      whole = read(tuple(slice(None) for _ in shape))
      return jnp.asarray(np.ascontiguousarray(whole)).astype(dtype)
    return place(read, rules.spec(name), mesh, shape=shape, dtype=dtype, what=what)

  if layout.per_head:
    graphdef, state = nnx.split(layout.abstract_model(config, dtype, max_batch_size))
    keys = layout.v1_param_keys()

    def fill(path, leaf):
      name = path_str(path)
      return make(source(*keys[name]), tuple(leaf.shape), name, name)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))

  n, hidden = layout.num_heads, layout.hidden

  def kernel_hnh(block: Index) -> np.ndarray:
    i_in, i_head, i_out = block
    return np.stack([source(block_weight_key(k, 0), True)((i_in, i_out))
                     for k in range(n)[i_head]], axis=1)

  def bias_nh(block: Index) -> np.ndarray:
    i_head, i_out = block
    return np.stack([source(block_bias_key(k, 0), False)((i_out,)) for k in range(n)[i_head]])

  kernel = make(kernel_hnh, (hidden, n, hidden), "kernel_hnh", "V2 kernel [H, n, H]")
  bias = make(bias_nh, (n, hidden), "bias_nh", "V2 bias [n, H]")
  if mesh is not None:
    return sharded_v2_model(config, kernel, bias, mesh=mesh, max_batch_size=max_batch_size)
  model = layout.abstract_model(config, dtype, max_batch_size)
  model.medusa.kernel.set_value(kernel.reshape(hidden, n * hidden))
  model.medusa.bias.set_value(bias.reshape(n * hidden))
  return model


def load_medusa_sharded(config: MedusaConfig, path: str | os.PathLike, mesh: Mesh, *,
                        dtype=jnp.float32, max_batch_size: int | None = None,
                        check_finite: bool = True,
                        rules: PartitionRules = MEDUSA_RULES) -> MedusaModel:
  """Loads Medusa heads straight onto ``mesh`` from an adapter's weight files.

  Each device reads only its block of each tensor; no tensor is ever whole on
  one device (torch files are read whole into host memory first). Accepts
  every layout :meth:`MedusaWeights.load <medusa_jax.weights.MedusaWeights.load>`
  does, with the same checks.

  Args:
    config: the adapter's config.
    path: an adapter directory or one weight file.
    mesh: the mesh.
    dtype: parameter dtype.
    max_batch_size: the V2 speculation guard (None: env or 32).
    check_finite: reject blocks holding NaN or inf.
    rules: partition rules.

  Returns:
    A ``MedusaModel`` (``.medusa`` a ``ShardedMedusaV2`` for V2, or V1 heads
    with sharded parameters).

  Raises:
    WeightsError: see :func:`read_heads` and
      :func:`~medusa_jax.adapter_files.weight_files`.
    ShardingError: H or V does not divide the ``model`` axis.
  """
  with open_adapter_files(path) as index:
    return read_heads(config, index, dtype=dtype, max_batch_size=max_batch_size,
                      check_finite=check_finite, mesh=mesh, rules=rules)
