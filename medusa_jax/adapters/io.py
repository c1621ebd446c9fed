"""Reading and writing Medusa adapters: one reader, one writer per format.

* **Reader** (:func:`read_heads`): every parameter has a *source*, ``index ->
  block`` in its in-memory layout, read from the file tensors (torch
  ``[out, in]``) by :class:`~medusa_jax.adapters.files.TensorIndex`. Without
  a mesh each source is read whole; with one,
  :func:`~medusa_jax.parallel.mesh.place` asks each device for its own block
  only (a safetensors ``get_slice`` read), so no weight is ever whole on one
  device. V2 kernels are read as ``[H, n, H]``: both what a mesh splits and the
  in-memory layout.
* **LoRAX safetensors** (:func:`save_safetensors`): ``config.json`` and
  ``model.safetensors`` with LoRAX's keys.
* **Orbax** (:func:`save_orbax`, :func:`load_orbax`): the NNX parameter state
  with ``config.json`` and ``medusa_jax.json`` (sizes, dtype) beside it.
* **Tree choices** (:func:`read_choices`, :func:`write_choices`): an adapter's
  best-first tree paths, ``medusa_choices.json``.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from medusa_jax.adapters.files import (ORBAX_META_NAME, Index, TensorIndex,
                                       open_adapter_files)
from medusa_jax.adapters.layout import (AdapterLayout, block_bias_key, block_weight_key,
                                        file_tensors)
from medusa_jax.config import CONFIG_NAME, MedusaConfig, speculation_max_batch_size
from medusa_jax.errors import (CheckpointExistsError, ConfigError, CorruptWeightsError,
                               MissingTensorError, WeightsNotFoundError)
from medusa_jax.heads.modules import MedusaModel, abstract_heads
from medusa_jax.heads.sharded import MEDUSA_RULES, HeadsSharding
from medusa_jax.parallel.mesh import PartitionRules, path_str, place

Source = Callable[[Index], np.ndarray]  # block index -> block, in-memory layout

WEIGHTS_NAME = "model.safetensors"
ORBAX_STATE_DIR = "state"
CHOICES_NAME = "medusa_choices.json"
_ORBAX_FORMAT = 2  # 1: V2 kernel stored as its fused view [H, n*H]


# ----------------------------------------------------------------------------- reader


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
    A ``MedusaModel``; with a mesh, its parameters placed by ``rules`` and V2
    heads running LoRAX's tensor-parallel kernel.

  Raises:
    MissingTensorError, TensorShapeError, TensorDtypeError, CorruptWeightsError,
    NonFiniteWeightsError: a tensor is absent or bad (named).
    ShardingError: H or V does not divide the ``model`` axis.
  """
  layout = AdapterLayout.infer(config, index)
  layout.check_shapes(index)
  model = abstract_heads(config, layout.hidden, layout.vocab, dtype,
                         max_batch_size=max_batch_size)

  def source(key: str, transposed: bool) -> Source:
    def read(block: Index) -> np.ndarray:
      if transposed:
        return index.read_block(key, tuple(reversed(block)), check_finite=check_finite).T
      return index.read_block(key, block, check_finite=check_finite)
    return read

  def make(read: Source, shape: tuple[int, ...], name: str) -> jax.Array:
    if mesh is None:
      whole = read(tuple(slice(None) for _ in shape))
      return jnp.asarray(np.ascontiguousarray(whole)).astype(dtype)
    return place(read, rules.spec(name), mesh, shape=shape, dtype=dtype, what=name)

  n, hidden = layout.num_heads, layout.hidden
  if layout.per_head:
    sources = {name: source(*key) for name, key in layout.v1_param_keys().items()}
  else:
    def kernel_hnh(block: Index) -> np.ndarray:
      i_in, i_head, i_out = block
      return np.stack([source(block_weight_key(k, 0), True)((i_in, i_out))
                       for k in range(n)[i_head]], axis=1)

    def bias_nh(block: Index) -> np.ndarray:
      i_head, i_out = block
      return np.stack([source(block_bias_key(k, 0), False)((i_out,))
                       for k in range(n)[i_head]])

    sources = {"medusa/kernel": kernel_hnh, "medusa/bias": bias_nh}
  graphdef, state = nnx.split(model)
  shapes = {path_str(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  # Kernels first: a size that does not divide the mesh is reported on the kernel.
  arrays = {name: make(sources[name], shapes[name], name)
            for name in sorted(sources, key=lambda k: (not k.endswith("kernel"), k))}
  loaded = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(
      lambda p, _: arrays[path_str(p)], state))
  if mesh is not None:
    loaded.medusa.mesh = mesh
    if loaded.is_v2:
      loaded.medusa.shd = HeadsSharding.tensor_parallel()
  return loaded


def read_adapter(config: MedusaConfig, path: str | os.PathLike, **kwargs) -> MedusaModel:
  """:func:`read_heads` over the weight files ``path`` stands for (a file or a directory)."""
  with open_adapter_files(path) as index:
    return read_heads(config, index, **kwargs)


# ---------------------------------------------------------------- LoRAX safetensors


def save_safetensors(config: MedusaConfig, model: MedusaModel, out_dir: str | os.PathLike, *,
                     dtype=None) -> str:
  """Writes ``config.json`` and ``model.safetensors`` (LoRAX layout) to ``out_dir``.

  Returns:
    The path of the safetensors file.
  """
  out_dir = os.fspath(out_dir)
  config.save(out_dir)
  path = os.path.join(out_dir, WEIGHTS_NAME)
  save_file(file_tensors(model, dtype), path, metadata={"format": "pt"})
  return path


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> str:
  """Copies the Medusa-head tensors of ``src`` (any supported file or dir) to safetensors.

  Keys lose any ``medusa_head.`` prefix; dtypes are kept (torch bf16 becomes
  bf16). All heads in the source are kept. Needs torch for ``.pt`` sources.

  Returns:
    ``dst``.

  Raises:
    MissingTensorError: ``src`` holds no Medusa-head tensor.
  """
  with open_adapter_files(src) as index:
    tensors = {k: index.read(k, check_finite=False) for k in index.medusa_keys()}
  if not tensors:
    raise MissingTensorError(f"{os.fspath(src)}: holds no Medusa-head tensors"
                             f" ({block_weight_key(0, 0)}, ...)")
  dst = os.fspath(dst)
  save_file(tensors, dst, metadata={"format": "pt"})
  return dst


# ---------------------------------------------------------------------------- Orbax


def save_orbax(config: MedusaConfig, model: MedusaModel, path: str | os.PathLike, *,
               overwrite: bool = False) -> str:
  """Saves the NNX parameter state with Orbax, with the config beside it.

  Layout: ``path/config.json``, ``path/medusa_jax.json`` (H, V, V1 flag,
  dtype) and ``path/state/`` (an Orbax StandardCheckpointer checkpoint). The
  state holds the in-memory layout whatever the mesh; :func:`load_orbax`
  restores it on one device (or onto a mesh of any shape).

  Returns:
    The absolute checkpoint directory.

  Raises:
    CheckpointExistsError: ``path/state`` exists and ``overwrite`` is False.
  """
  import orbax.checkpoint as ocp  # heavy optional dependency

  path = os.path.abspath(os.fspath(path))
  state_path = os.path.join(path, ORBAX_STATE_DIR)
  if os.path.exists(state_path) and not overwrite:
    raise CheckpointExistsError(f"{state_path}: a checkpoint exists; pass overwrite=True to"
                                " replace it")
  os.makedirs(path, exist_ok=True)
  config.save(path)
  state = nnx.state(model, nnx.Param)
  meta = {
      "format": _ORBAX_FORMAT,
      "hidden_size": model.hidden_size,
      "vocab_size": model.vocab_size,
      "per_head_lm_head": not model.is_v2,
      "dtype": jnp.dtype(jax.tree.leaves(state)[0].dtype).name,
  }
  with open(os.path.join(path, ORBAX_META_NAME), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(state_path, state, force=overwrite)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  return path


def load_orbax(path: str | os.PathLike, *, max_batch_size: int | None = None
               ) -> tuple[MedusaConfig, MedusaModel]:
  """Restores heads written by :func:`save_orbax`, bit for bit, on one device.

  Raises:
    WeightsNotFoundError: ``path`` lacks the config, metadata or state.
    CorruptWeightsError: the metadata or the Orbax state cannot be read.
  """
  import orbax.checkpoint as ocp  # heavy optional dependency

  path = os.path.abspath(os.fspath(path))
  meta_path = os.path.join(path, ORBAX_META_NAME)
  state_path = os.path.join(path, ORBAX_STATE_DIR)
  for needed in (os.path.join(path, CONFIG_NAME), meta_path, state_path):
    if not os.path.exists(needed):
      raise WeightsNotFoundError(f"{needed}: missing; expected an Orbax checkpoint written by"
                                 " MedusaWeights.save_orbax")
  config = MedusaConfig.from_pretrained(path)
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    hidden, vocab = int(meta["hidden_size"]), meta["vocab_size"]
    per_head, dtype = bool(meta["per_head_lm_head"]), jnp.dtype(meta["dtype"])
    fmt = int(meta.get("format", 1))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CorruptWeightsError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
  graphdef, abstract = nnx.split(abstract_heads(
      config, hidden, vocab if per_head else None, dtype,
      max_batch_size=speculation_max_batch_size(max_batch_size)))
  # Restore onto one device whatever the saving process's devices were.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  fused = fmt == 1 and not per_head  # written before the [H, n, H] layout

  def stored(path, a):
    shape = a.shape
    if fused:
      size = int(np.prod(shape))
      shape = (shape[0], size // shape[0]) if path_str(path).endswith("kernel") else (size,)
    return jax.ShapeDtypeStruct(shape, a.dtype, sharding=device)

  abstract = jax.tree_util.tree_map_with_path(stored, abstract)
  checkpointer = ocp.StandardCheckpointer()
  try:
    state = checkpointer.restore(state_path, abstract)
  except Exception as e:  # Orbax raises many types (ValueError, FileNotFoundError, ...)
    raise CorruptWeightsError(f"{state_path}: cannot restore the Orbax state ({e})") from e
  finally:
    checkpointer.close()
  model = nnx.merge(graphdef, state)
  if fused:
    model.medusa.kernel.set_value(model.medusa.kernel[...].reshape(hidden, -1, hidden))
    model.medusa.bias.set_value(model.medusa.bias[...].reshape(-1, hidden))
  return config, model


# ------------------------------------------------------------------------ tree choices


def read_choices(path: str | os.PathLike) -> tuple[tuple[int, ...], ...]:
  """A best-first list of tree paths (a JSON list of lists of ranks).

  Raises:
    ConfigError: the file is unreadable or not a list of lists of integers.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    return tuple(tuple(int(r) for r in p) for p in raw)
  except (OSError, ValueError, TypeError) as e:
    raise ConfigError(f"{path}: expected a JSON list of paths (lists of ranks): {e}") from None


def adapter_choices(adapter_dir: str | os.PathLike) -> tuple[tuple[int, ...], ...] | None:
  """The adapter directory's ``medusa_choices.json``, or None when it has none."""
  path = os.path.join(os.fspath(adapter_dir), CHOICES_NAME)
  return read_choices(path) if os.path.isfile(path) else None


def write_choices(out_dir: str | os.PathLike, choices: Sequence[Sequence[int]]) -> str:
  """Writes ``out_dir/medusa_choices.json`` and returns its path."""
  path = os.path.join(os.fspath(out_dir), CHOICES_NAME)
  with open(path, "w", encoding="utf-8") as f:
    json.dump([list(p) for p in choices], f)
    f.write("\n")
  return path
