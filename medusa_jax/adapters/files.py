"""Medusa adapter weight files: key layout, discovery, lazy checked reads.

File layout (LoRAX/TGI, and the original Medusa ``medusa_lm_head.*`` files),
torch ``[out, in]``, for head ``i < n`` and block ``j < L``:

  ``{i}.{j}.linear.weight``  [H, H]
  ``{i}.{j}.linear.bias``    [H]
  ``{i}.{L}.weight``         [V, H]  (V1 only: a per-head output projection)

Full Medusa-2 model files carry the same keys under a ``medusa_head.`` prefix;
other tensors in such files are never read. Heads beyond ``n`` are ignored
(released Medusa files hold 5 heads while their config says 2).

In memory the arrays are ``[in, out]``; V2 fuses the heads into one kernel
``[H, n*H]`` (columns ``k*H:(k+1)*H`` are head k) and a bias ``[n*H]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from typing import Any, Iterator, Mapping

import numpy as np
from flax import nnx

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import (CorruptWeightsError, MissingTensorError, NonFiniteWeightsError,
                               TensorDtypeError, TensorShapeError, WeightsFormatError,
                               WeightsNotFoundError)
from medusa_jax.heads import MedusaModel

# Written beside an Orbax checkpoint; named here so that a directory holding
# one gets a hint instead of a bare "no weight files".
ORBAX_META_NAME = "medusa_jax.json"
_PREFIX = "medusa_head."
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


def block_weight_key(head: int, block: int) -> str:
  """File key of ResBlock ``block`` of head ``head``: torch [out, in] = [H, H]."""
  return f"{head}.{block}.linear.weight"


def block_bias_key(head: int, block: int) -> str:
  """File key of the ResBlock bias: [H]."""
  return f"{head}.{block}.linear.bias"


def out_weight_key(head: int, num_layers: int) -> str:
  """File key of a V1 head's output projection: torch [out, in] = [V, H]."""
  return f"{head}.{num_layers}.weight"


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
  for exts in (_SAFETENSORS_EXT, _TORCH_EXT):
    found = [os.path.join(path, n) for n in names if n.endswith(exts)]
    if found:
      return found
  listing = ", ".join(sorted(os.listdir(path))) or "nothing"
  hint = ("; this is an Orbax checkpoint: use MedusaWeights.load_orbax"
          if os.path.exists(os.path.join(path, ORBAX_META_NAME)) else "")
  raise WeightsNotFoundError(
      f"{path}: no weight files; expected *.safetensors (or *.pt, *.pth, *.bin), found"
      f" {listing}{hint}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdapterLayout:
  """The heads' sizes, and the shape each file tensor must have.

  Attributes:
    num_heads: n.
    num_layers: L, ResBlocks per head.
    hidden: H.
    vocab: V of the per-head output projections; set iff V1.
  """
  num_heads: int
  num_layers: int
  hidden: int
  vocab: int | None

  @property
  def per_head(self) -> bool:
    """True for V1 heads (own output projections)."""
    return self.vocab is not None

  @classmethod
  def infer(cls, config: MedusaConfig, index: TensorIndex) -> AdapterLayout:
    """H from ``0.0.linear.weight``; V1 iff L > 1 or ``0.{L}.weight`` exists (LoRAX's rule).

    Raises:
      MissingTensorError: head 0 has fewer ResBlocks than the config says.
      TensorShapeError: ``0.0.linear.weight`` is not square, or ``0.{L}.weight``
        is not [V, H].
    """
    n, num_layers = config.medusa_num_heads, config.medusa_num_layers
    key = block_weight_key(0, 0)
    shape = index.shape(key)
    if len(shape) != 2 or shape[0] != shape[1]:
      raise TensorShapeError(f"{key} in {index.file_of(key)}: expected a square [H, H] matrix,"
                             f" got {list(shape)}")
    hidden = shape[0]
    found = 0
    while index.has(block_weight_key(0, found)):
      found += 1
    if found < num_layers:
      raise MissingTensorError(
          f"{block_weight_key(0, found)}: missing from {', '.join(index.files)}; the config"
          f" says medusa_num_layers={num_layers} but head 0 in the files has {found}"
          " ResBlock(s)")
    vocab = None
    key = out_weight_key(0, num_layers)
    if num_layers > 1 or index.has(key):
      shape = index.shape(key)
      if len(shape) != 2 or shape[1] != hidden:
        raise TensorShapeError(f"{key} in {index.file_of(key)}: expected [V, {hidden}], got"
                               f" {list(shape)}")
      vocab = shape[0]
    return cls(num_heads=n, num_layers=num_layers, hidden=hidden, vocab=vocab)

  def v1_param_keys(self) -> dict[str, tuple[str, bool]]:
    """V1 heads: parameter path in ``MedusaModel`` -> (file key, stored transposed?).

    Paths are ``/``-joined NNX state paths (``medusa/heads/0/blocks/1/kernel``);
    kernels are ``[in, out]`` in memory and ``[out, in]`` in files.
    """
    keys = {}
    for i in range(self.num_heads):
      for j in range(self.num_layers):
        block = f"medusa/heads/{i}/blocks/{j}"
        keys[f"{block}/kernel"] = (block_weight_key(i, j), True)
        keys[f"{block}/bias"] = (block_bias_key(i, j), False)
      keys[f"medusa/heads/{i}/out"] = (out_weight_key(i, self.num_layers), True)
    return keys

  def file_keys(self) -> list[str]:
    """Every file key the heads read, head by head."""
    if self.per_head:
      return [key for key, _ in self.v1_param_keys().values()]
    return [key for i in range(self.num_heads)
            for key in (block_weight_key(i, 0), block_bias_key(i, 0))]

  def expected(self, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, how it was derived) of the file tensor ``key``."""
    origin = f"H={self.hidden} from {block_weight_key(0, 0)}"
    if key.endswith(".linear.weight"):
      return (self.hidden, self.hidden), f"[H, H] with {origin}"
    if key.endswith(".linear.bias"):
      return (self.hidden,), f"[H] with {origin}"
    return ((self.vocab, self.hidden),
            f"[V, H] with V={self.vocab} from {out_weight_key(0, self.num_layers)}, {origin}")

  def check_shapes(self, index: TensorIndex) -> None:
    """Checks every needed tensor is present with its shape, reading no data.

    Raises:
      MissingTensorError / TensorShapeError: naming the first bad tensor.
    """
    for key in self.file_keys():
      index.check_shape(key, self.expected(key))

  def abstract_model(self, config: MedusaConfig, dtype, max_batch_size: int | None
                     ) -> MedusaModel:
    """The heads with shape-only parameters, to be filled with ``set_value``.

    Avoids materialising a random init of V1's [H, V] projections only to
    overwrite it.
    """
    return nnx.eval_shape(lambda: MedusaModel(
        config, self.hidden, self.vocab, per_head_lm_head=self.per_head,
        rngs=nnx.Rngs(params=0), param_dtype=dtype, max_batch_size=max_batch_size))


def _canonical(key: str) -> tuple[str, int]:
  """(key without any ``...medusa_head.`` prefix, priority: 0 = bare key, 1 = prefixed)."""
  at = key.rfind(_PREFIX)
  if at < 0:
    return key, 0
  return key[at + len(_PREFIX):], 1


def _is_medusa_key(key: str) -> bool:
  parts = key.split(".")
  return (len(parts) in (3, 4) and parts[0].isdigit() and parts[1].isdigit()
          and (parts[2:] in (["weight"], ["linear", "weight"], ["linear", "bias"])))


def _import_torch():
  try:
    return importlib.import_module("torch")
  except ImportError:
    return None


class TensorIndex:
  """Canonical key -> tensor, over the union of several weight files.

  Use as a context manager. Safetensors files are opened once and read lazily,
  whole or block by block (only the head tensors of a full-model file are
  touched); torch files are loaded whole on the host. On duplicate keys a bare
  key beats a prefixed one, then the earlier file wins. Every read checks the
  dtype (floating point) and, on request, that the values are finite.
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
        for raw in raw_keys:
          key, priority = _canonical(raw)
          if key not in self._entries or priority < self._entries[key][0]:
            self._entries[key] = (priority, path, raw)
    except BaseException:
      self._stack.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def _open_safetensors(self, path: str) -> list[str]:
    from safetensors import safe_open
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
    return sorted(k for k in self._entries if _is_medusa_key(k))

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


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> str:
  """Copies the Medusa-head tensors of ``src`` (any supported file or dir) to safetensors.

  Keys lose any ``medusa_head.`` prefix; dtypes are kept (torch bf16 becomes
  bf16). All heads in the source are kept. Needs torch for ``.pt`` sources.

  Returns:
    ``dst``.

  Raises:
    MissingTensorError: ``src`` holds no Medusa-head tensor.
  """
  from safetensors.numpy import save_file

  with open_adapter_files(src) as index:
    tensors = {k: index.read(k, check_finite=False) for k in index.medusa_keys()}
  if not tensors:
    raise MissingTensorError(f"{os.fspath(src)}: holds no Medusa-head tensors"
                             f" ({block_weight_key(0, 0)}, ...)")
  dst = os.fspath(dst)
  save_file(tensors, dst, metadata={"format": "pt"})
  return dst
