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
from medusa_jax._atomic import replace_dir, write_json, write_safetensors
from medusa_jax._validate import check_float_dtype, nonfinite_leaves
from medusa_jax.adapters.files import ORBAX_META_NAME, Index, TensorIndex, open_adapter_files
from medusa_jax.adapters.layout import (AdapterLayout, block_bias_key, block_weight_key,
                                        file_tensors)
from medusa_jax.config import CONFIG_NAME, MedusaConfig, speculation_max_batch_size
from medusa_jax.errors import (CheckpointExistsError, ConfigError, CorruptWeightsError,
                               MissingTensorError, NonFiniteWeightsError, WeightsNotFoundError, WriteError)
from medusa_jax.heads.modules import MedusaModel, abstract_heads
from medusa_jax.heads.sharded import MEDUSA_RULES, HeadsSharding
from medusa_jax.parallel.mesh import PartitionRules, path_str, place

Source = Callable[[Index], np.ndarray]  # block index -> block, in-memory layout

WEIGHTS_NAME = "model.safetensors"
ORBAX_STATE_DIR = "state"
CHOICES_NAME = "medusa_choices.json"
_ORBAX_FORMAT = 2  # 1: V2 kernel stored as its fused view [H, n*H]
_ADAPTER_FILE_EXT = (".safetensors", ".pt", ".pth", ".bin", ".json", ".md", ".txt")


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
    NonFiniteWeightsError: a tensor is absent or bad (named), ``dtype`` is not
      floating point, or a tensor overflows when cast to it.
    ConfigError: the config disagrees with the files (more ResBlocks than L).
    ShardingError: H or V does not divide the ``model`` axis.
  """
  dtype = check_float_dtype(dtype)
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

  n = layout.num_heads
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
  if check_finite:  # after the cast: finite float32 weights can overflow float16
    check_finite_state(loaded, f"{', '.join(index.files)} (as {jnp.dtype(dtype).name})")
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


def adapter_entry(name: str, is_dir: bool) -> bool:
  """Whether an entry of an existing directory is part of a Medusa adapter (any format).

  An adapter directory written over with ``overwrite=True`` is replaced whole;
  one holding anything else (a subdirectory other than the Orbax ``state``,
  files other than weights, JSON and text) is refused, so that saving into a
  directory of other work never deletes it.
  """
  if is_dir:
    return name == ORBAX_STATE_DIR or name.startswith(f"{ORBAX_STATE_DIR}.orbax-checkpoint")
  return name.endswith(_ADAPTER_FILE_EXT) or name in (".gitattributes", "README", "LICENSE")


def _adapter_dir(out_dir: str, overwrite: bool):
  return replace_dir(out_dir, overwrite=overwrite, what="a Medusa adapter",
                     belongs=adapter_entry, exists_error=CheckpointExistsError)


def checked_file_tensors(model: MedusaModel, dtype=None) -> dict[str, np.ndarray]:
  """``layout.file_tensors``, refusing a non-float dtype and a cast that overflows.

  Raises:
    TensorDtypeError: ``dtype`` is not a floating-point dtype.
    NonFiniteWeightsError: a tensor holds NaN or inf after the cast (e.g.
      float32 weights beyond float16's range), naming it.
  """
  if dtype is not None:
    check_float_dtype(dtype, "dtype")
  tensors = file_tensors(model, dtype)
  for key, array in tensors.items():
    if not np.isfinite(array.astype(np.float32)).all():
      cast = f" after the cast to {np.dtype(dtype).name}" if dtype is not None else ""
      raise NonFiniteWeightsError(f"{key}: holds NaN or infinite values{cast}")
  return tensors


def save_safetensors(config: MedusaConfig, model: MedusaModel, out_dir: str | os.PathLike, *,
                     dtype=None, overwrite: bool = False,
                     choices: Sequence[Sequence[int]] | None = None) -> str:
  """Writes ``config.json`` and ``model.safetensors`` (LoRAX layout) to ``out_dir``, atomically.

  The directory is built under a temporary name and swapped into place, so a
  crash leaves the old adapter or the new one; an existing adapter is replaced
  whole (no old weight file can shadow the new one).

  Args:
    config, model: the adapter.
    out_dir: the adapter directory.
    dtype: tensor dtype in the file (a float dtype); None keeps the parameter dtype.
    overwrite: replace an existing adapter directory.
    choices: also write them as ``medusa_choices.json``.

  Returns:
    The path of the safetensors file.

  Raises:
    CheckpointExistsError: ``out_dir`` holds files and ``overwrite`` is False,
      or it holds entries that are not part of an adapter.
    TensorDtypeError / NonFiniteWeightsError: see :func:`checked_file_tensors`.
    WriteError: the disk is full or the directory is not writable.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  tensors = checked_file_tensors(model, dtype)
  with _adapter_dir(out_dir, overwrite) as tmp:
    config.save(tmp)
    write_safetensors(os.path.join(tmp, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    if choices is not None:
      write_choices(tmp, choices)
  return os.path.join(out_dir, WEIGHTS_NAME)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *,
                           overwrite: bool = False) -> str:
  """Copies the Medusa-head tensors of ``src`` (any supported file or dir) to safetensors.

  Keys lose any ``medusa_head.`` prefix; dtypes are kept (torch bf16 becomes
  bf16). All heads in the source are kept. Needs torch for ``.pt`` sources.

  Returns:
    ``dst``.

  Raises:
    MissingTensorError: ``src`` holds no Medusa-head tensor.
    OutputExistsError: ``dst`` exists and ``overwrite`` is False.
    WriteError: ``dst`` cannot be written.
  """
  with open_adapter_files(src) as index:
    tensors = {k: index.read(k, check_finite=False) for k in index.medusa_keys()}
  if not tensors:
    raise MissingTensorError(f"{os.fspath(src)}: holds no Medusa-head tensors"
                             f" ({block_weight_key(0, 0)}, ...)")
  return write_safetensors(dst, tensors, metadata={"format": "pt"}, overwrite=overwrite)


# ---------------------------------------------------------------------------- Orbax


def save_orbax(config: MedusaConfig, model: MedusaModel, path: str | os.PathLike, *,
               overwrite: bool = False) -> str:
  """Saves the NNX parameter state with Orbax, with the config beside it, atomically.

  Layout: ``path/config.json``, ``path/medusa_jax.json`` (n, L, H, V, V1
  flag, dtype) and ``path/state/`` (an Orbax StandardCheckpointer
  checkpoint). The state holds the in-memory layout whatever the mesh;
  :func:`load_orbax` restores it on one device (or onto a mesh of any shape).
  The directory is built under a temporary name and swapped into place: a
  crash leaves the old checkpoint or the new one.

  Returns:
    The absolute checkpoint directory.

  Raises:
    CheckpointExistsError: ``path`` holds files (a checkpoint, an adapter) and
      ``overwrite`` is False, or entries that are not part of an adapter.
    WriteError: the disk is full or the directory is not writable.
  """
  import orbax.checkpoint as ocp  # heavy optional dependency

  path = os.path.abspath(os.fspath(path))
  state = nnx.state(model, nnx.Param)
  medusa = model.medusa
  meta = {
      "format": _ORBAX_FORMAT,
      "num_heads": model.num_heads,
      "num_layers": 1 if model.is_v2 else len(medusa.heads[0].blocks),
      "hidden_size": model.hidden_size,
      "vocab_size": model.vocab_size,
      "per_head_lm_head": not model.is_v2,
      "dtype": jnp.dtype(jax.tree.leaves(state)[0].dtype).name,
  }
  with _adapter_dir(path, overwrite) as tmp:
    config.save(tmp)
    write_json(os.path.join(tmp, ORBAX_META_NAME), meta)
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(os.path.join(tmp, ORBAX_STATE_DIR), state)
      checkpointer.wait_until_finished()
    except OSError:
      raise
    except Exception as e:  # Orbax wraps OS errors (ENOSPC) in its own types
      raise WriteError(f"{path}: cannot write the Orbax state ({type(e).__name__}: {e})"
                       ) from None
    finally:
      checkpointer.close()
  return path


def _read_orbax_meta(meta_path: str) -> dict:
  """The checked fields of ``medusa_jax.json``.

  Raises:
    CorruptWeightsError: not JSON, not an object, or a field of the wrong type.
    TensorDtypeError: a dtype that is not floating point (e.g. int8).
  """
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError, RecursionError) as e:
    raise CorruptWeightsError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
  if not isinstance(meta, dict):
    raise CorruptWeightsError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")

  def need(name, check, expected, default=_MISSING):
    value = meta.get(name, default)
    if value is _MISSING or not check(value):
      raise CorruptWeightsError(f"{meta_path}: {name}={value!r}; expected {expected}"
                                if value is not _MISSING else f"{meta_path}: {name} is missing")
    return value

  def positive(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1

  out = {
      "format": need("format", lambda v: v in (1, 2), "1 or 2", 1),
      "num_heads": need("num_heads", lambda v: v is None or positive(v), "a positive integer",
                        None),
      "num_layers": need("num_layers", lambda v: v is None or positive(v),
                         "a positive integer", None),
      "hidden_size": need("hidden_size", positive, "a positive integer"),
      "vocab_size": need("vocab_size", lambda v: v is None or positive(v),
                         "a positive integer or null"),
      "per_head_lm_head": need("per_head_lm_head", lambda v: isinstance(v, bool), "a bool"),
      "dtype": need("dtype", lambda v: isinstance(v, str), "a dtype name"),
  }
  out["dtype"] = check_float_dtype(out["dtype"], f"dtype in {meta_path}")
  if out["per_head_lm_head"] and out["vocab_size"] is None:
    raise CorruptWeightsError(f"{meta_path}: per_head_lm_head is true but vocab_size is null")
  return out


_MISSING = object()


def _stored_arrays(ocp, state_path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """{parameter path: (shape, dtype name)} of an Orbax state, from its metadata only.

  Raises:
    CorruptWeightsError: the metadata cannot be read.
  """
  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(state_path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree is None:
      tree = meta
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    out = {}
    for p, leaf in leaves:
      name = path_str(p)
      if name.endswith("/value"):
        name = name[:-len("/value")]
      out[name] = (tuple(int(d) for d in leaf.shape), jnp.dtype(leaf.dtype).name)
    return out
  except Exception as e:  # Orbax raises many types on a damaged checkpoint
    raise CorruptWeightsError(f"{state_path}: cannot read the Orbax metadata"
                              f" ({type(e).__name__}: {str(e)[:300]})") from None
  finally:
    checkpointer.close()


def _stored_heads(stored: dict[str, tuple[tuple[int, ...], str]], meta: dict, where: str
                  ) -> tuple[int, int]:
  """(n, L) of the heads an Orbax state holds, counted from its array shapes."""
  if not meta["per_head_lm_head"]:
    kernel = stored.get("medusa/kernel")
    if kernel is None:
      raise CorruptWeightsError(f"{where}: no medusa/kernel array; expected V2 heads"
                                f" (found {', '.join(sorted(stored)[:5]) or 'nothing'})")
    shape, hidden = kernel[0], meta["hidden_size"]
    if meta["format"] == 1:
      if len(shape) != 2 or shape[0] != hidden or shape[1] % hidden:
        raise CorruptWeightsError(f"{where}: medusa/kernel has shape {list(shape)}; expected"
                                  f" [{hidden}, n*{hidden}]")
      return shape[1] // hidden, 1
    if len(shape) != 3 or shape[0] != hidden or shape[2] != hidden:
      raise CorruptWeightsError(f"{where}: medusa/kernel has shape {list(shape)}; expected"
                                f" [{hidden}, n, {hidden}]")
    return shape[1], 1
  heads, layers = set(), set()
  for name in stored:
    parts = name.split("/")
    if len(parts) >= 3 and parts[:2] == ["medusa", "heads"] and parts[2].isdigit():
      heads.add(int(parts[2]))
      if len(parts) >= 5 and parts[3] == "blocks" and parts[4].isdigit():
        layers.add(int(parts[4]))
  if not heads or heads != set(range(len(heads))) or layers != set(range(len(layers))):
    raise CorruptWeightsError(f"{where}: expected per-head arrays medusa/heads/0.. with"
                              f" blocks 0..; found {', '.join(sorted(stored)[:5])}")
  return len(heads), len(layers)


def load_orbax(path: str | os.PathLike, *, max_batch_size: int | None = None
               ) -> tuple[MedusaConfig, MedusaModel]:
  """Restores heads written by :func:`save_orbax`, bit for bit, on one device.

  Every size is checked against the checkpoint's metadata before anything is
  built: ``config.json``, ``medusa_jax.json`` and the stored arrays must agree.

  Raises:
    WeightsNotFoundError: ``path`` lacks the config, metadata or state.
    ConfigError: ``config.json`` is invalid, or disagrees with the stored heads.
    CorruptWeightsError: the metadata or the Orbax state cannot be read, or
      they disagree.
    TensorDtypeError: the metadata names a non-float dtype.
    NonFiniteWeightsError: a restored parameter holds NaN or inf.
  """
  import orbax.checkpoint as ocp  # heavy optional dependency

  path = os.path.abspath(os.fspath(path))
  meta_path = os.path.join(path, ORBAX_META_NAME)
  state_path = os.path.join(path, ORBAX_STATE_DIR)
  config_path = os.path.join(path, CONFIG_NAME)
  for needed in (config_path, meta_path, state_path):
    if not os.path.exists(needed):
      raise WeightsNotFoundError(f"{needed}: missing; expected an Orbax checkpoint written by"
                                 " MedusaWeights.save_orbax")
  config = MedusaConfig.from_pretrained(path)
  meta = _read_orbax_meta(meta_path)
  hidden, vocab, per_head, dtype = (meta["hidden_size"], meta["vocab_size"],
                                    meta["per_head_lm_head"], meta["dtype"])
  stored = _stored_arrays(ocp, state_path)
  n, num_layers = _stored_heads(stored, meta, state_path)
  for name, want, got in (("medusa_num_heads", config.medusa_num_heads, n),
                          ("medusa_num_layers", config.medusa_num_layers, num_layers)):
    if want != got:
      raise ConfigError(f"{name}={want} in {config_path} disagrees with the checkpoint"
                        f" {state_path}, which holds {got}")
  for name, want in (("num_heads", n), ("num_layers", num_layers)):
    if meta[name] is not None and meta[name] != want:
      raise CorruptWeightsError(f"{meta_path}: {name}={meta[name]} disagrees with the"
                                f" checkpoint {state_path}, which holds {want}")
  graphdef, abstract = nnx.split(abstract_heads(
      config, hidden, vocab if per_head else None, dtype,
      max_batch_size=speculation_max_batch_size(max_batch_size)))
  # Restore onto one device whatever the saving process's devices were.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  fused = meta["format"] == 1 and not per_head  # written before the [H, n, H] layout

  def expected(p, a):
    shape = a.shape
    if fused:
      size = int(np.prod(shape))
      shape = (shape[0], size // shape[0]) if path_str(p).endswith("kernel") else (size,)
    name = path_str(p)
    got = stored.get(name)
    if got is None or got[0] != tuple(shape) or got[1] != jnp.dtype(a.dtype).name:
      found = "absent" if got is None else f"{got[1]} {list(got[0])}"
      raise CorruptWeightsError(f"{state_path}: array {name} is {found}; expected"
                                f" {jnp.dtype(a.dtype).name} {list(shape)} (from {meta_path})")
    return jax.ShapeDtypeStruct(shape, a.dtype, sharding=device)

  abstract = jax.tree_util.tree_map_with_path(expected, abstract)
  checkpointer = ocp.StandardCheckpointer()
  try:
    state = checkpointer.restore(state_path, abstract)
  except Exception as e:  # Orbax raises many types (ValueError, FileNotFoundError, ...)
    raise CorruptWeightsError(f"{state_path}: cannot restore the Orbax state"
                              f" ({type(e).__name__}: {str(e)[:300]})") from None
  finally:
    checkpointer.close()
  model = nnx.merge(graphdef, state)
  if fused:
    model.medusa.kernel.set_value(model.medusa.kernel[...].reshape(hidden, -1, hidden))
    model.medusa.bias.set_value(model.medusa.bias[...].reshape(-1, hidden))
  check_finite_state(model, state_path)
  return config, model


def check_finite_state(model, where: str) -> None:
  """Raises NonFiniteWeightsError naming the parameters of ``model`` that hold NaN or inf."""
  bad = nonfinite_leaves(nnx.state(model, nnx.Param))
  if bad:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise NonFiniteWeightsError(f"{where}: parameter {bad[0]}{more} holds NaN or infinite"
                                " values")


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
  except (OSError, ValueError, RecursionError) as e:
    raise ConfigError(f"{path}: expected a JSON list of paths (lists of ranks): {e}") from None
  if not isinstance(raw, list):
    raise ConfigError(f"{path}: expected a JSON list of paths (lists of ranks), got"
                      f" {type(raw).__name__}")
  for i, p in enumerate(raw):
    if not isinstance(p, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p):
      raise ConfigError(f"{path}: path {i} = {p!r}; expected a list of ranks (integers >= 0)")
  return tuple(tuple(p) for p in raw)


def adapter_choices(adapter_dir: str | os.PathLike) -> tuple[tuple[int, ...], ...] | None:
  """The adapter directory's ``medusa_choices.json``, or None when it has none."""
  path = os.path.join(os.fspath(adapter_dir), CHOICES_NAME)
  return read_choices(path) if os.path.isfile(path) else None


def write_choices(out_dir: str | os.PathLike, choices: Sequence[Sequence[int]], *,
                  overwrite: bool = False) -> str:
  """Writes ``out_dir/medusa_choices.json`` atomically and returns its path.

  Raises:
    ConfigError: ``choices`` is not a list of lists of integers >= 0.
    OutputExistsError: the file exists and ``overwrite`` is False.
    WriteError: the file cannot be written.
  """
  paths = []
  for i, p in enumerate(choices):
    if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or not all(
        isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 0 for r in p):
      raise ConfigError(f"choices[{i}] = {p!r}: expected a list of ranks (integers >= 0)")
    paths.append([int(r) for r in p])
  path = os.path.join(os.fspath(out_dir), CHOICES_NAME)
  return write_json(path, paths, overwrite=overwrite, indent=None)
