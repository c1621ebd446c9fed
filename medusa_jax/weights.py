"""MedusaWeights: Medusa heads in and out of safetensors, torch pickles and Orbax.

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
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.config import CONFIG_NAME, MedusaConfig
from medusa_jax.errors import (ArchitectureError, CheckpointExistsError, CorruptWeightsError,
                               MissingTensorError, NonFiniteWeightsError, TensorDtypeError,
                               TensorShapeError, WeightsFormatError, WeightsNotFoundError)
from medusa_jax.heads import MedusaModel, MedusaV2

WEIGHTS_NAME = "model.safetensors"
ORBAX_STATE_DIR = "state"
ORBAX_META_NAME = "medusa_jax.json"
_ORBAX_FORMAT = 1
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


def block_weight_key(head: int, block: int) -> str:
  """File key of ResBlock ``block`` of head ``head``: torch [out, in] = [H, H]."""
  return f"{head}.{block}.linear.weight"


def block_bias_key(head: int, block: int) -> str:
  """File key of the ResBlock bias: [H]."""
  return f"{head}.{block}.linear.bias"


def out_weight_key(head: int, num_layers: int) -> str:
  """File key of a V1 head's output projection: torch [out, in] = [V, H]."""
  return f"{head}.{num_layers}.weight"


class MedusaWeights:
  """A Medusa adapter: its config and its heads (a :class:`MedusaModel`).

  Attributes:
    config: the adapter's MedusaConfig.
    model: the heads; ``model(x, lm_head, segments=None)`` gives
      ``(logits [N, V], speculative_logits [N, n, V] | None)``. For V2 the fused
      weight is ``model.medusa.kernel[...]`` [H, n*H] and ``model.medusa.bias[...]``
      [n*H].
    source: where the weights came from (a path), for messages; may be None.
  """

  def __init__(self, config: MedusaConfig, model: MedusaModel, *, source: str | None = None):
    self.config = config
    self.model = model
    self.source = source

  # -- properties -------------------------------------------------------------------------------

  @property
  def speculative_tokens(self) -> int:
    """n, the number of draft tokens per step (== ``config.medusa_num_heads``)."""
    return self.config.medusa_num_heads

  @property
  def hidden_size(self) -> int:
    return self.model.hidden_size

  @property
  def vocab_size(self) -> int | None:
    """V of the per-head output projections (V1), None for V2."""
    return self.model.vocab_size

  @property
  def is_v2(self) -> bool:
    """True for fused heads sharing the base lm_head (LoRAX MedusaV2)."""
    return self.model.is_v2

  @property
  def dtype(self) -> jnp.dtype:
    return jax.tree.leaves(nnx.state(self.model, nnx.Param))[0].dtype

  def __repr__(self) -> str:
    kind = "V2" if self.is_v2 else f"V1(V={self.vocab_size})"
    return (f"MedusaWeights({kind}, n={self.speculative_tokens},"
            f" L={self.config.medusa_num_layers}, H={self.hidden_size}, dtype={self.dtype},"
            f" source={self.source!r})")

  # -- construction -----------------------------------------------------------------------------

  @classmethod
  def init(cls, config: MedusaConfig, hidden_size: int, vocab_size: int | None = None, *,
           rngs: nnx.Rngs | None = None, seed: int = 0, dtype=jnp.float32,
           per_head_lm_head: bool = False, lm_head_weight: Any = None,
           max_batch_size: int | None = None) -> "MedusaWeights":
    """Fresh heads for training.

    ResBlocks start as the identity (zero weight and bias), as in Medusa. V1
    heads (``medusa_num_layers > 1`` or ``per_head_lm_head``) get their own
    output projection, copied from ``lm_head_weight`` when given (the Medusa
    recipe), else randomly initialised.

    Args:
      config: the adapter config.
      hidden_size: H.
      vocab_size: V; needed for V1 heads unless ``lm_head_weight`` is given.
      rngs: parameter RNGs; default ``nnx.Rngs(params=seed)``.
      seed: used when ``rngs`` is None.
      dtype: parameter dtype.
      per_head_lm_head: build V1 heads even when ``medusa_num_layers == 1``.
      lm_head_weight: [H, V] ([in, out]) base lm_head weight to copy into every
        V1 output projection.
      max_batch_size: the V2 speculation guard (None: env, else 32).

    Raises:
      ArchitectureError: ``lm_head_weight`` given for V2 heads, or V1 without V.
      TensorShapeError: ``lm_head_weight`` is not [H, V].
    """
    v1 = config.medusa_num_layers > 1 or per_head_lm_head
    if lm_head_weight is not None:
      if not v1:
        raise ArchitectureError(
            "lm_head_weight: V2 heads (medusa_num_layers=1, per_head_lm_head=False) share the"
            " base lm_head and have no output projection to copy it into; pass"
            " per_head_lm_head=True for V1 heads")
      lm_head_weight = np.asarray(lm_head_weight)
      expected_v = vocab_size if vocab_size is not None else "V"
      if (lm_head_weight.ndim != 2 or lm_head_weight.shape[0] != hidden_size
          or (vocab_size is not None and lm_head_weight.shape[1] != vocab_size)):
        raise TensorShapeError(
            f"lm_head_weight: expected [{hidden_size}, {expected_v}] ([in, out]), got"
            f" {list(lm_head_weight.shape)}")
      vocab_size = lm_head_weight.shape[1]
    if rngs is None:
      rngs = nnx.Rngs(params=seed)
    model = MedusaModel(config, hidden_size, vocab_size, per_head_lm_head=per_head_lm_head,
                        rngs=rngs, param_dtype=dtype, max_batch_size=max_batch_size)
    if lm_head_weight is not None:
      out = jnp.asarray(lm_head_weight).astype(dtype)
      for head in model.medusa.heads:
        head.out.set_value(out)
    return cls(config, model)

  @classmethod
  def load(cls, config: MedusaConfig, path: str | os.PathLike, *, dtype=jnp.float32,
           max_batch_size: int | None = None, check_finite: bool = True) -> "MedusaWeights":
    """Loads heads from a weight file or a directory of them.

    A directory contributes the union of its top-level ``*.safetensors``
    files (as LoRAX does), or, when it has none, its ``*.pt``/``*.pth``/
    ``*.bin`` files (read through torch). Hidden size H (and V for V1) come from
    the tensors; V1 is chosen when ``medusa_num_layers > 1`` or ``0.{L}.weight``
    exists, else V2.

    Args:
      config: the adapter config (n, L).
      path: a weight file or a directory.
      dtype: parameter dtype (float32, bfloat16, ...).
      max_batch_size: the V2 speculation guard (None: env, else 32).
      check_finite: reject tensors holding NaN or inf.

    Raises:
      WeightsNotFoundError: no such path, or no weight file in the directory.
      WeightsFormatError: unsupported extension, or a torch file without torch.
      CorruptWeightsError: a file is truncated or unreadable.
      MissingTensorError: a needed tensor is absent (the message names it).
      TensorShapeError / TensorDtypeError: a tensor has the wrong shape / dtype.
      NonFiniteWeightsError: a tensor holds NaN or inf (``check_finite``).
    """
    with _TensorIndex(_weight_files(path)) as index:
      layout = _Layout.infer(config, index)
      model = _abstract_model(config, layout.hidden, layout.vocab, layout.per_head, dtype,
                              max_batch_size)

      def read(key: str) -> np.ndarray:
        return index.read(key, layout.expected(key), check_finite=check_finite)

      if layout.per_head:
        for i, head in enumerate(model.medusa.heads):
          for j, block in enumerate(head.blocks):
            block.kernel.set_value(_to_jax(read(block_weight_key(i, j)).T, dtype))
            block.bias.set_value(_to_jax(read(block_bias_key(i, j)), dtype))
          head.out.set_value(_to_jax(read(out_weight_key(i, layout.num_layers)).T, dtype))
      else:
        heads = range(layout.num_heads)
        kernel_HxnH = np.concatenate([read(block_weight_key(i, 0)).T for i in heads], axis=1)
        bias_nH = np.concatenate([read(block_bias_key(i, 0)) for i in heads])
        model.medusa.kernel.set_value(_to_jax(kernel_HxnH, dtype))
        model.medusa.bias.set_value(_to_jax(bias_nH, dtype))
    return cls(config, model, source=os.fspath(path))

  # -- safetensors out --------------------------------------------------------------------------

  def lorax_tensors(self, dtype=None) -> dict[str, np.ndarray]:
    """The heads as file tensors: LoRAX keys, torch ``[out, in]`` layout.

    Args:
      dtype: cast to this dtype; None keeps the parameter dtype.

    Returns:
      ``{key: array}``, e.g. ``"0.0.linear.weight"`` [H, H], ``"0.0.linear.bias"`` [H],
      and for V1 ``"0.{L}.weight"`` [V, H].
    """
    def host(a) -> np.ndarray:
      a = jnp.asarray(a)
      if dtype is not None:
        a = a.astype(dtype)
      return np.ascontiguousarray(np.asarray(jax.device_get(a)))

    out: dict[str, np.ndarray] = {}
    medusa = self.model.medusa
    if isinstance(medusa, MedusaV2):
      hidden, n = medusa.hidden, medusa.num_heads
      kernel, bias = host(medusa.kernel[...]), host(medusa.bias[...])
      for i in range(n):
        cols = slice(i * hidden, (i + 1) * hidden)
        out[block_weight_key(i, 0)] = np.ascontiguousarray(kernel[:, cols].T)
        out[block_bias_key(i, 0)] = np.ascontiguousarray(bias[cols])
    else:
      for i, head in enumerate(medusa.heads):
        for j, block in enumerate(head.blocks):
          out[block_weight_key(i, j)] = np.ascontiguousarray(host(block.kernel[...]).T)
          out[block_bias_key(i, j)] = host(block.bias[...])
        out[out_weight_key(i, len(head.blocks))] = np.ascontiguousarray(host(head.out[...]).T)
    return out

  def save(self, out_dir: str | os.PathLike, *, dtype=None) -> str:
    """Writes ``config.json`` and ``model.safetensors`` (LoRAX layout) to ``out_dir``.

    The result loads back with :meth:`load` / :func:`load_medusa_adapter` and
    with LoRAX (keys verbatim, torch layout, ``version`` preserved).

    Args:
      out_dir: the adapter directory (created if missing).
      dtype: tensor dtype in the file; None keeps the parameter dtype.

    Returns:
      The path of the safetensors file.
    """
    from safetensors.numpy import save_file  # heavy import, only when saving

    out_dir = os.fspath(out_dir)
    self.config.save(out_dir)
    path = os.path.join(out_dir, WEIGHTS_NAME)
    save_file(self.lorax_tensors(dtype), path, metadata={"format": "pt"})
    return path

  # -- orbax ------------------------------------------------------------------------------------

  def save_orbax(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Saves the NNX parameter state with Orbax, with the config beside it.

    Layout: ``path/config.json``, ``path/medusa_jax.json`` (H, V, V1 flag,
    dtype) and ``path/state/`` (an Orbax StandardCheckpointer checkpoint).

    Args:
      path: the checkpoint directory.
      overwrite: replace an existing ``path/state``.

    Returns:
      The absolute checkpoint directory.

    Raises:
      CheckpointExistsError: ``path/state`` exists and ``overwrite`` is False.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    state_path = os.path.join(path, ORBAX_STATE_DIR)
    if os.path.exists(state_path) and not overwrite:
      raise CheckpointExistsError(f"{state_path}: a checkpoint exists; pass overwrite=True to"
                                  " replace it")
    os.makedirs(path, exist_ok=True)
    self.config.save(path)
    meta = {
        "format": _ORBAX_FORMAT,
        "hidden_size": self.hidden_size,
        "vocab_size": self.vocab_size,
        "per_head_lm_head": not self.is_v2,
        "dtype": jnp.dtype(self.dtype).name,
    }
    with open(os.path.join(path, ORBAX_META_NAME), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(state_path, nnx.state(self.model, nnx.Param), force=overwrite)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    return path

  @classmethod
  def load_orbax(cls, path: str | os.PathLike, *, max_batch_size: int | None = None
                 ) -> "MedusaWeights":
    """Restores weights written by :meth:`save_orbax`, bit for bit.

    Raises:
      WeightsNotFoundError: ``path`` lacks the config, metadata or state.
      CorruptWeightsError: the metadata or the Orbax state cannot be read.
    """
    import orbax.checkpoint as ocp

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
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CorruptWeightsError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    model = _abstract_model(config, hidden, vocab, per_head, dtype, max_batch_size)
    graphdef, abstract = nnx.split(model)
    checkpointer = ocp.StandardCheckpointer()
    try:
      state = checkpointer.restore(state_path, abstract)
    except Exception as e:  # Orbax raises many types (ValueError, FileNotFoundError, ...)
      raise CorruptWeightsError(f"{state_path}: cannot restore the Orbax state ({e})") from e
    finally:
      checkpointer.close()
    return cls(config, nnx.merge(graphdef, state), source=path)


def load_medusa_adapter(adapter_dir: str | os.PathLike, *, dtype=jnp.float32,
                        max_batch_size: int | None = None) -> MedusaWeights:
  """Loads an adapter directory: ``config.json`` plus its weight files.

  Raises:
    ConfigError: ``config.json`` is missing or invalid.
    WeightsError: see :meth:`MedusaWeights.load`.
  """
  config = MedusaConfig.from_pretrained(adapter_dir)
  return MedusaWeights.load(config, adapter_dir, dtype=dtype, max_batch_size=max_batch_size)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> str:
  """Copies the Medusa-head tensors of ``src`` (any supported file or dir) to safetensors.

  Keys lose any ``medusa_head.`` prefix; dtypes are kept (torch bf16 becomes
  bf16). All heads in the source are kept. Needs torch for ``.pt`` sources.

  Returns:
    ``dst``.
  """
  from safetensors.numpy import save_file

  with _TensorIndex(_weight_files(src)) as index:
    tensors = {k: index.read(k, None, check_finite=False) for k in index.medusa_keys()}
  if not tensors:
    raise MissingTensorError(f"{os.fspath(src)}: holds no Medusa-head tensors"
                             f" ({block_weight_key(0, 0)}, ...)")
  dst = os.fspath(dst)
  save_file(tensors, dst, metadata={"format": "pt"})
  return dst


# -- helpers ------------------------------------------------------------------------------------


def _abstract_model(config: MedusaConfig, hidden: int, vocab: int | None, per_head: bool,
                    dtype, max_batch_size: int | None) -> MedusaModel:
  """The model with shape-only parameters, to be filled with ``set_value``.

  Avoids materialising a random init of V1's [H, V] projections only to
  overwrite it.
  """
  return nnx.eval_shape(lambda: MedusaModel(
      config, hidden, vocab, per_head_lm_head=per_head, rngs=nnx.Rngs(params=0),
      param_dtype=dtype, max_batch_size=max_batch_size))


def _to_jax(a: np.ndarray, dtype) -> jax.Array:
  return jnp.asarray(np.ascontiguousarray(a)).astype(dtype)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Layout:
  """What the files must hold for a config: sizes inferred from head 0's tensors."""
  num_heads: int
  num_layers: int
  hidden: int
  vocab: int | None  # set iff per-head output projections (V1)

  @property
  def per_head(self) -> bool:
    return self.vocab is not None

  @classmethod
  def infer(cls, config: MedusaConfig, index: "_TensorIndex") -> "_Layout":
    """H from ``0.0.linear.weight``; V1 iff L > 1 or ``0.{L}.weight`` exists (LoRAX's rule)."""
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

  def expected(self, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, how it was derived) of the file tensor ``key``."""
    origin = f"H={self.hidden} from {block_weight_key(0, 0)}"
    if key.endswith(".linear.weight"):
      return (self.hidden, self.hidden), f"[H, H] with {origin}"
    if key.endswith(".linear.bias"):
      return (self.hidden,), f"[H] with {origin}"
    return ((self.vocab, self.hidden),
            f"[V, H] with V={self.vocab} from {out_weight_key(0, self.num_layers)}, {origin}")


def _skipped(name: str) -> bool:
  return any(word in name for word in _SKIP_WORDS)


def _weight_files(path: str | os.PathLike) -> list[str]:
  """The weight files ``path`` stands for, in a stable order."""
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
                 if os.path.isfile(os.path.join(path, n)) and not _skipped(n))
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


class _TensorIndex:
  """Canonical key -> tensor, over the union of several weight files.

  Safetensors files are opened once and read lazily (only the head tensors of
  a full-model file are touched); torch files are loaded whole. On duplicate
  keys a bare key beats a prefixed one, then the earlier file wins.
  """

  def __init__(self, files: list[str]):
    self.files = files
    self._stack = contextlib.ExitStack()
    self._entries: dict[str, tuple[int, str, str]] = {}  # key -> (priority, file, raw key)
    self._handles: dict[str, Any] = {}
    self._torch: dict[str, Mapping[str, Any]] = {}

  def __enter__(self) -> "_TensorIndex":
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

  def read(self, key: str, expected: tuple[tuple[int, ...], str] | None, *,
           check_finite: bool) -> np.ndarray:
    """The tensor ``key`` as a host array, checked against ``expected`` = (shape, why)."""
    _, path, raw = self._entry(key)
    if expected is not None:
      got = self.shape(key)
      if got != expected[0]:
        raise TensorShapeError(
            f"{raw} in {path}: expected {list(expected[0])} ({expected[1]}), got {list(got)}")
    if path in self._torch:
      array = _torch_to_numpy(self._torch[path][raw])
    else:
      try:
        array = self._handles[path].get_tensor(raw)
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
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
    import ml_dtypes  # a JAX dependency
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()
