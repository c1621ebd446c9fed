"""Converts Medusa adapters between formats (``medusa-jax convert``).

Sources, recognised by their contents:

* an **Orbax checkpoint** written by :meth:`MedusaWeights.save_orbax`
  (``medusa_jax.json`` + ``state/``);
* anything :meth:`MedusaWeights.load` reads: a LoRAX/TGI adapter directory
  (``config.json`` + ``*.safetensors``), an original Medusa
  ``medusa_lm_head.pt`` / ``.safetensors`` file or the directory holding it,
  or a full Medusa-2 model file with ``medusa_head.``-prefixed tensors.

Targets:

* ``lorax``: ``config.json`` + ``model.safetensors`` in the LoRAX key layout;
* ``orbax``: an Orbax checkpoint of the NNX state;
* ``safetensors``: one ``.safetensors`` file holding every head tensor of the
  source, unprefixed (e.g. to turn a torch ``.pt`` into a torch-free file).

Released Medusa configs understate their heads (``medusa_num_heads: 2`` beside
a file with 5), so the number of heads comes from the file, not the config:
all of them by default, or the first ``num_heads``. Tensor dtypes are kept
(fp16 stays fp16), so every direction round-trips bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import jax.numpy as jnp
from safetensors import safe_open

from medusa_jax._atomic import write_file, writing
from medusa_jax.adapters.files import ORBAX_META_NAME
from medusa_jax.adapters.io import convert_to_safetensors
from medusa_jax.adapters.layout import block_weight_key, out_weight_key
from medusa_jax.adapters.weights import MedusaWeights
from medusa_jax.config import CONFIG_NAME, MedusaConfig
from medusa_jax.errors import (ConfigError, MissingTensorError, TensorDtypeError,
                               WeightsNotFoundError, WriteError)
from medusa_jax.options import Option


class Target(Option):
  """What ``convert`` writes."""
  __option__ = "--to"
  __error__ = ConfigError
  LORAX = "lorax"
  ORBAX = "orbax"
  SAFETENSORS = "safetensors"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HeadsInFile:
  """What a normalised weight file holds (counted from its keys).

  Attributes:
    num_heads: heads 0..n-1 with a ``{i}.0.linear.weight`` tensor.
    num_layers: ResBlocks of head 0.
    per_head_lm_head: True when head 0 has its own output projection (V1).
    dtype: the dtype of ``0.0.linear.weight`` (kept on conversion).
  """
  num_heads: int
  num_layers: int
  per_head_lm_head: bool
  dtype: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConvertResult:
  """What :func:`convert` did.

  Attributes:
    src: the source path.
    dst: the written path.
    to: the target format.
    config: the config written beside the weights (None for ``safetensors``).
    heads_in_source: heads found in the source.
    notes: human-readable remarks (e.g. a config that understated its heads).
  """
  src: str
  dst: str
  to: Target
  config: MedusaConfig | None
  heads_in_source: int
  notes: tuple[str, ...] = ()

  def to_json(self) -> dict:
    return {"src": self.src, "dst": self.dst, "to": self.to.value,
            "config": None if self.config is None else self.config.to_dict(),
            "heads_in_source": self.heads_in_source, "notes": list(self.notes)}


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  """True for a directory written by :meth:`MedusaWeights.save_orbax`."""
  return os.path.isfile(os.path.join(os.fspath(path), ORBAX_META_NAME))


def inspect_heads(safetensors_path: str | os.PathLike) -> HeadsInFile:
  """Counts the heads and layers of an unprefixed Medusa safetensors file.

  Raises:
    MissingTensorError: the file has no ``0.0.linear.weight``.
  """
  with safe_open(os.fspath(safetensors_path), framework="numpy") as f:
    keys = set(f.keys())
    first = block_weight_key(0, 0)
    if first not in keys:
      raise MissingTensorError(f"{first}: missing; the source holds no Medusa heads")
    dtype = f.get_slice(first).get_dtype()
  heads = 0
  while block_weight_key(heads, 0) in keys:
    heads += 1
  layers = 0
  while block_weight_key(0, layers) in keys:
    layers += 1
  return HeadsInFile(num_heads=heads, num_layers=layers, dtype=_numpy_dtype_name(dtype),
                     per_head_lm_head=out_weight_key(0, layers) in keys)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | Target = Target.LORAX,
            num_heads: int | None = None, base_model: str | None = None,
            overwrite: bool = False) -> ConvertResult:
  """Converts a Medusa adapter (see the module docstring for formats).

  Args:
    src: an Orbax checkpoint, an adapter directory, or a weight file.
    dst: the output directory (``lorax``, ``orbax``) or file (``safetensors``).
    to: the target format.
    num_heads: keep the first ``num_heads`` heads (default: all in the source).
    base_model: ``base_model_name_or_path`` to write (default: the source
      config's; required when the source has no ``config.json``).
    overwrite: replace an existing destination.

  Returns:
    A :class:`ConvertResult`.

  Raises:
    ConfigError: bad ``to`` / ``num_heads``, a missing base model name, or an
      existing destination without ``overwrite``.
    WeightsError: the source cannot be read (see :meth:`MedusaWeights.load`).
  """
  target = Target.parse(to)
  src, dst = os.fspath(src), os.fspath(dst)
  if not os.path.exists(src):
    raise WeightsNotFoundError(f"{src}: no such file or directory")
  if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int)
                                or num_heads < 1):
    raise ConfigError(f"--num-heads={num_heads!r}; expected a positive integer")
  _check_destination(src, dst, target, overwrite)
  try:
    if is_orbax_checkpoint(src):
      return _from_orbax(src, dst, target, num_heads, base_model, overwrite)
    return _from_weight_files(src, dst, target, num_heads, base_model, overwrite)
  except WriteError as e:
    if os.path.abspath(dst) in str(e):
      raise
    # The intermediate files live in the system's temporary directory: name the
    # user's destination, and where the space ran out.
    reason = str(e).split(": cannot write ", 1)[-1]
    raise WriteError(f"{dst}: cannot write {reason} (while writing the conversion's"
                     f" temporary files in {tempfile.gettempdir()})") from None


# ----------------------------------------------------------------------------- sources


def _from_orbax(src, dst, target, num_heads, base_model, overwrite) -> ConvertResult:
  weights = MedusaWeights.load_orbax(src)
  found = weights.speculative_tokens
  if num_heads is None and base_model is None:
    return _write(weights, src, dst, target, found, (), overwrite)
  # Trimming heads goes through the file layout, the one place heads are addressed by index.
  with tempfile.TemporaryDirectory() as tmp:
    weights.save(tmp)
    return _from_weight_files(tmp, dst, target, num_heads, base_model, overwrite,
                              shown_src=src)


def _from_weight_files(src, dst, target, num_heads, base_model, overwrite,
                       shown_src: str | None = None) -> ConvertResult:
  shown_src = shown_src or src
  with tempfile.TemporaryDirectory() as tmp:
    # One unprefixed safetensors file with every head of the source, dtypes kept:
    # the reading (torch pickles, prefixes, several files) stays in weights.py.
    flat = convert_to_safetensors(src, os.path.join(tmp, "heads.safetensors"))
    found = inspect_heads(flat)
    if target is Target.SAFETENSORS:
      if num_heads is not None and num_heads != found.num_heads:
        raise ConfigError("--num-heads applies to lorax and orbax targets; a safetensors"
                          " target keeps every tensor of the source")
      with writing(dst):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
      write_file(dst, lambda tmp: shutil.copyfile(flat, tmp), overwrite=overwrite)
      return ConvertResult(src=shown_src, dst=dst, to=target, config=None,
                           heads_in_source=found.num_heads)
    config, notes = _target_config(src, found, num_heads, base_model)
    weights = MedusaWeights.load(config, flat, dtype=jnp.dtype(found.dtype))
    return _write(weights, shown_src, dst, target, found.num_heads, notes, overwrite)


def _target_config(src: str, found: HeadsInFile, num_heads: int | None,
                   base_model: str | None) -> tuple[MedusaConfig, tuple[str, ...]]:
  """The config to write: heads and layers from the file, the rest from the source's config."""
  notes = []
  config_path = _source_config_path(src)
  raw = {}
  if config_path is not None:
    try:
      with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
      raise ConfigError(f"{config_path}: expected a JSON object")
  base = base_model if base_model is not None else raw.get("base_model_name_or_path")
  if not isinstance(base, str):
    where = config_path or f"{src} (no {CONFIG_NAME} found)"
    raise ConfigError(f"base_model_name_or_path: missing from {where}; pass --base-model NAME")
  claimed = raw.get("medusa_num_heads")
  if isinstance(claimed, int) and claimed != found.num_heads:
    notes.append(f"{config_path} says medusa_num_heads={claimed} but the weights hold"
                 f" {found.num_heads} heads")
  n = found.num_heads if num_heads is None else num_heads
  if n > found.num_heads:
    raise ConfigError(f"--num-heads={n}: the source holds only {found.num_heads} heads")
  if n != found.num_heads:
    notes.append(f"kept heads 0..{n - 1} of {found.num_heads}")
  # LoRAX reads a missing version as 1; a bare file without any config gets the
  # version its layout implies (Medusa's legacy trainer marks shared-lm_head heads "2").
  version = raw.get("version", 1.0) if config_path else (1.0 if found.per_head_lm_head else 2.0)
  try:
    version = float(version)
  except (TypeError, ValueError):
    raise ConfigError(f"version in {config_path}: expected a number, got {version!r}") from None
  config = MedusaConfig(base_model_name_or_path=base, medusa_num_heads=n,
                        medusa_num_layers=found.num_layers, version=version)
  return config, tuple(notes)


def _source_config_path(src: str) -> str | None:
  folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  path = os.path.join(folder, CONFIG_NAME)
  return path if os.path.isfile(path) else None


# ----------------------------------------------------------------------------- targets


def _write(weights, src, dst, target, found, notes, overwrite) -> ConvertResult:
  if target is Target.LORAX:
    weights.save(dst, overwrite=overwrite)  # atomic; an old adapter is replaced whole
  elif target is Target.ORBAX:
    weights.save_orbax(dst, overwrite=overwrite)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      weights.save(tmp)
      return _from_weight_files(tmp, dst, target, None, None, overwrite, shown_src=src)
  return ConvertResult(src=src, dst=dst, to=target, config=weights.config,
                       heads_in_source=found, notes=tuple(notes))


def _check_destination(src: str, dst: str, target: Target, overwrite: bool) -> None:
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ConfigError(f"{dst}: the destination is the source; choose another path")
  if not os.path.exists(dst) or overwrite:
    return
  if target is Target.SAFETENSORS or (os.path.isdir(dst) and os.listdir(dst)):
    raise ConfigError(f"{dst}: already exists; pass --overwrite to replace it")


def _numpy_dtype_name(safetensors_dtype: str) -> str:
  names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
  if safetensors_dtype not in names:
    raise TensorDtypeError(f"0.0.linear.weight: expected a floating-point tensor, got"
                           f" {safetensors_dtype}")
  return names[safetensors_dtype]


# ----------------------------------------------------------------------------- command
