"""Medusa adapter weight files: discovery and lazy, checked reads.

:func:`weight_files` says which files a path stands for; :class:`TensorIndex`
reads their tensors by canonical key (see ``adapters/layout.py``), whole or
block by block, checking dtype and finiteness on every read.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Iterator, Mapping

import numpy as np
from safetensors import safe_open

from medusa_jax.adapters.layout import canonical_key, is_medusa_key
from medusa_jax.errors import (AmbiguousWeightsError, CorruptWeightsError, MissingTensorError,
                               NonFiniteWeightsError, TensorDtypeError, TensorShapeError,
                               WeightsFormatError, WeightsNotFoundError)

# Written beside an Orbax checkpoint; named here so that a directory holding
# one gets a hint instead of a bare "no weight files".
ORBAX_META_NAME = "medusa_jax.json"
_SAFETENSORS_EXT = (".safetensors",)
_TORCH_EXT = (".pt", ".pth", ".bin")
# LoRAX skips hub files whose names carry these words (training arguments).
_SKIP_WORDS = ("arguments", "args", "training")

_TORCH_HINT = (
    "install torch (pip install 'medusa-jax[torch]') or convert the file to safetensors where"
    " torch is available: python -c \"import torch; from safetensors.torch import save_file;"
    " sd = torch.load('{path}', map_location='cpu', weights_only=True);"
    " save_file({{k: v.contiguous() for k, v in sd.items()}}, '{dst}')\"")

Index = tuple[slice, ...]  # a block of a tensor, one slice per dim


def weight_files(path: str | os.PathLike) -> list[str]:
  """The weight files ``path`` stands for, in a stable order.

  A file stands for itself. A directory stands for its top-level
  ``*.safetensors`` files (as LoRAX), or, when it has none, its
  ``*.pt``/``*.pth``/``*.bin`` files; names with "args"/"training" are skipped.

  Raises:
    WeightsFormatError: a file with an unsupported extension.
    WeightsNotFoundError: no such path, or no weight file in the directory.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    if not path.endswith(_SAFETENSORS_EXT + _TORCH_EXT):
      raise WeightsFormatError(
          f"{path}: unsupported weight file; expected one of"
          f" {', '.join(_SAFETENSORS_EXT + _TORCH_EXT)}")
    return [path]
  if not os.path.isdir(path):
    raise WeightsNotFoundError(f"{path}: no such weight file or directory")
  names = sorted(n for n in os.listdir(path)
                 if os.path.isfile(os.path.join(path, n))
                 and not any(word in n for word in _SKIP_WORDS))
  orbax = os.path.exists(os.path.join(path, ORBAX_META_NAME))
  for exts in (_SAFETENSORS_EXT, _TORCH_EXT):
    found = [os.path.join(path, n) for n in names if n.endswith(exts)]
    if found and orbax:
      raise AmbiguousWeightsError(
          f"{path}: holds both an Orbax checkpoint ({ORBAX_META_NAME}) and weight files"
          f" ({', '.join(os.path.basename(f) for f in found)}); which one is the adapter is"
          " ambiguous: keep one format per directory")
    if found:
      return found
  listing = ", ".join(sorted(os.listdir(path))) or "nothing"
  hint = ("; this is an Orbax checkpoint: use MedusaWeights.load_orbax"
          if os.path.exists(os.path.join(path, ORBAX_META_NAME)) else "")
  raise WeightsNotFoundError(
      f"{path}: no weight files; expected *.safetensors (or *.pt, *.pth, *.bin), found"
      f" {listing}{hint}")


def _import_torch():
  try:
    return importlib.import_module("torch")
  except ImportError:
    return None


class TensorIndex:
  """Canonical key -> tensor, over the union of several weight files.

  Use as a context manager. Safetensors files are opened once and read lazily,
  whole or block by block (only the head tensors of a full-model file are
  touched); torch files are loaded whole on the host. Inside one file a bare
  key beats a ``medusa_head.``-prefixed one; a key found in two files raises
  :class:`AmbiguousWeightsError` naming both. Every read checks the dtype
  (floating point) and, on request, that the values are finite.
  """

  def __init__(self, files: list[str]):
    self.files = files
    self._stack = contextlib.ExitStack()
    self._entries: dict[str, tuple[int, str, str]] = {}  # key -> (priority, file, raw key)
    self._handles: dict[str, Any] = {}
    self._torch: dict[str, Mapping[str, Any]] = {}

  def __enter__(self) -> TensorIndex:
    try:
      for path in self.files:
        raw_keys = (self._open_safetensors(path) if path.endswith(_SAFETENSORS_EXT)
                    else self._open_torch(path))
        # Inside one file a bare key beats a prefixed one (a full Medusa-2 model
        # file may carry both); across files a key must be unique, as in LoRAX.
        local: dict[str, tuple[int, str]] = {}
        for raw in raw_keys:
          key, priority = canonical_key(raw)
          if key not in local or priority < local[key][0]:
            local[key] = (priority, raw)
        for key, (priority, raw) in local.items():
          if key in self._entries:
            _, other, other_raw = self._entries[key]
            raise AmbiguousWeightsError(
                f"Key {key} was found in multiple files: {other} ({other_raw}) and {path}"
                f" ({raw}); keep one weight file per tensor")
          self._entries[key] = (priority, path, raw)
    except BaseException:
      self._stack.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def _open_safetensors(self, path: str) -> list[str]:
    try:
      handle = self._stack.enter_context(safe_open(path, framework="numpy"))
      keys = list(handle.keys())
    except Exception as e:  # SafetensorError (not an OSError subclass), OSError, ...
      raise CorruptWeightsError(f"{path}: not a readable safetensors file ({e})") from None
    self._handles[path] = handle
    return keys

  def _open_torch(self, path: str) -> list[str]:
    torch = _import_torch()
    if torch is None:
      dst = os.path.splitext(path)[0] + ".safetensors"
      raise WeightsFormatError(f"{path}: reading a torch checkpoint needs torch, which is not"
                               " installed; " + _TORCH_HINT.format(path=path, dst=dst))
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError (zip), UnpicklingError, EOFError, ...
      raise CorruptWeightsError(
          f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})"
      ) from None
    if not isinstance(obj, Mapping):
      raise CorruptWeightsError(
          f"{path}: expected a state dict (tensor name -> tensor), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    self._torch[path] = tensors
    return list(tensors)

  # -- queries ----------------------------------------------------------------------------------

  def has(self, key: str) -> bool:
    return key in self._entries

  def medusa_keys(self) -> list[str]:
    """Every Medusa-head key in the files (canonical, sorted)."""
    return sorted(k for k in self._entries if is_medusa_key(k))

  def file_of(self, key: str) -> str:
    return self._entry(key)[1]

  def _entry(self, key: str) -> tuple[int, str, str]:
    entry = self._entries.get(key)
    if entry is None:
      heads = sorted({int(k.split(".")[0]) for k in self.medusa_keys()})
      found = (f"the files hold Medusa heads {heads}" if heads else
               "the files hold no Medusa-head tensors; some keys: "
               + ", ".join(sorted(self._entries)[:5]))
      raise MissingTensorError(f"{key}: missing from {', '.join(self.files)} ({found})")
    return entry

  def shape(self, key: str) -> tuple[int, ...]:
    _, path, raw = self._entry(key)
    if path in self._torch:
      return tuple(self._torch[path][raw].shape)
    try:
      return tuple(self._handles[path].get_slice(raw).get_shape())
    except Exception as e:
      raise CorruptWeightsError(f"{path}: cannot read the shape of {raw} ({e})") from None

  def check_shape(self, key: str, expected: tuple[tuple[int, ...], str]) -> None:
    """Raises TensorShapeError unless ``key`` has ``expected`` = (shape, why)."""
    got = self.shape(key)
    if got != expected[0]:
      _, path, raw = self._entry(key)
      raise TensorShapeError(
          f"{raw} in {path}: expected {list(expected[0])} ({expected[1]}), got {list(got)}")

  def read(self, key: str, expected: tuple[tuple[int, ...], str] | None = None, *,
           check_finite: bool) -> np.ndarray:
    """The whole tensor ``key`` as a host array, checked against ``expected`` = (shape, why)."""
    if expected is not None:
      self.check_shape(key, expected)
    return self.read_block(key, None, check_finite=check_finite)

  def read_block(self, key: str, index: Index | None, *, check_finite: bool) -> np.ndarray:
    """The block ``index`` of tensor ``key`` (file layout), or all of it for None.

    A safetensors block is read alone from disk (``get_slice``).

    Raises:
      CorruptWeightsError: the data cannot be read.
      TensorDtypeError: the tensor is not floating point.
      NonFiniteWeightsError: the block holds NaN or inf (``check_finite``).
    """
    _, path, raw = self._entry(key)
    if path in self._torch:
      tensor = self._torch[path][raw]
      array = _torch_to_numpy(tensor if index is None else tensor[index])
    else:
      try:
        handle = self._handles[path]
        array = handle.get_tensor(raw) if index is None else handle.get_slice(raw)[index]
      except Exception as e:
        raise CorruptWeightsError(f"{path}: cannot read tensor {raw} ({e})") from None
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
      raise TensorDtypeError(f"{raw} in {path}: expected a floating-point tensor, got"
                             f" {array.dtype}")
    if check_finite and not np.isfinite(array).all():
      raise NonFiniteWeightsError(f"{raw} in {path}: holds NaN or infinite values")
    return array


def _torch_to_numpy(tensor) -> np.ndarray:
  torch = importlib.import_module("torch")
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
    import ml_dtypes  # a JAX dependency
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


@contextlib.contextmanager
def open_adapter_files(path: str | os.PathLike) -> Iterator[TensorIndex]:
  """A :class:`TensorIndex` over the weight files ``path`` stands for (see :func:`weight_files`)."""
  with TensorIndex(weight_files(path)) as index:
    yield index


