"""Hugging Face Llama checkpoints: files, tensor names, checked reads, loading.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or
shards listed by ``model.safetensors.index.json``). Tensors are torch
``[out, in]``; the model's kernels are ``[in, out]``, so projections are
transposed on the way in. :func:`open_checkpoint` pairs every parameter of a
(shape-only) :class:`~medusa_jax.models.llama.Llama` with its tensor and checks
the shapes before any data is read; reads are whole (:func:`load_llama`) or
block by block (``medusa_jax.sharded_llama.load_llama_sharded``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax._validate import check_float_dtype, nonfinite_leaves
from medusa_jax.errors import (AmbiguousWeightsError, CorruptWeightsError, MissingTensorError,
                               NonFiniteWeightsError, TensorShapeError, UnsupportedModelError,
                               WeightsNotFoundError)
from medusa_jax.models.llama import Llama
from medusa_jax.models.llama_config import LlamaConfig

ParamPath = tuple[Any, ...]  # attribute names and layer indices, e.g. ("layers", 0, "mlp", ...)
Index = tuple[slice, ...]

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


def weight_files(model_dir: str | os.PathLike) -> list[str]:
  """The safetensors files of a checkpoint directory, in a stable order.

  The shards named by ``model.safetensors.index.json`` when it exists, else
  ``model.safetensors``, else every ``*.safetensors`` file.

  Raises:
    CorruptWeightsError: the index is not JSON with a ``weight_map``.
    WeightsNotFoundError: no safetensors file.
  """
  model_dir = os.fspath(model_dir)
  index = os.path.join(model_dir, INDEX_NAME)
  if os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CorruptWeightsError(
          f"{index}: expected a JSON object with 'weight_map' ({e})") from None
    return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
  single = os.path.join(model_dir, WEIGHTS_NAME)
  if os.path.exists(single):
    return [single]
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise WeightsNotFoundError(f"{model_dir}: expected {WEIGHTS_NAME} or {INDEX_NAME}, found"
                               " no .safetensors file")
  return [os.path.join(model_dir, f) for f in files]


# (module, projection, the LlamaConfig flag that gives it a bias)
_PROJECTIONS = (("self_attn", "q_proj", "qkv_bias"), ("self_attn", "k_proj", "qkv_bias"),
                ("self_attn", "v_proj", "qkv_bias"), ("self_attn", "o_proj", "o_bias"),
                ("mlp", "gate_proj", "mlp_bias"), ("mlp", "up_proj", "mlp_bias"),
                ("mlp", "down_proj", "mlp_bias"))
_BIAS_NAME = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.bias")


def hf_param_names(cfg: LlamaConfig, kernel_layout: str = "in_out"
                   ) -> dict[str, tuple[ParamPath, bool]]:
  """Hugging Face tensor name -> (path of the ``nnx.Param`` in :class:`Llama`, transposed?).

  A transposed tensor is a torch ``[out, in]`` weight of an ``[in, out]`` kernel: the LM
  head's, and the projections' in the ``in_out`` layout (``out_in`` holds them as stored).
  """
  projection_t = kernel_layout == "in_out"
  names: dict[str, tuple[ParamPath, bool]] = {
      "model.embed_tokens.weight": (("embed_tokens",), False),
      "model.norm.weight": (("norm", "weight"), False),
  }
  if not cfg.tie_word_embeddings:
    names["lm_head.weight"] = (("lm_head_kernel",), True)
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    for mod, proj, bias in _PROJECTIONS:
      names[f"{p}{mod}.{proj}.weight"] = (("layers", i, mod, proj, "kernel"), projection_t)
      if getattr(cfg, bias):
        names[f"{p}{mod}.{proj}.bias"] = (("layers", i, mod, proj, "bias"), False)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      names[f"{p}{norm}.weight"] = (("layers", i, norm, "weight"), False)
  return names


def param_at(module: nnx.Module, path: ParamPath) -> nnx.Param:
  """The parameter at ``path`` (from :func:`hf_param_names`) of ``module``."""
  obj = module
  for key in path:
    obj = obj[key] if isinstance(key, int) else getattr(obj, key)
  return obj


def abstract_llama(cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=None,
                   kernel_layout: str = "in_out") -> Llama:
  """A :class:`Llama` with shape-only parameters, to be filled with ``set_value``."""
  param_dtype = dtype if param_dtype is None else param_dtype
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                      param_dtype=param_dtype, kernel_layout=kernel_layout))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointTensor:
  """One checkpoint tensor matched to its parameter; valid inside :func:`open_checkpoint`.

  Attributes:
    name: the Hugging Face tensor name.
    file: the safetensors file holding it.
    path: the parameter's path in the model (see :func:`hf_param_names`).
    param: the parameter it fills.
    shape: the parameter's shape (``[in, out]`` for a transposed kernel).
    transpose: the file holds the parameter's transpose (a projection of an ``in_out``
      model: the file is ``[out, in]``; an ``out_in`` model reads it as is).
  """
  name: str
  file: str
  path: ParamPath
  param: nnx.Param
  shape: tuple[int, ...]
  transpose: bool
  _handle: Any

  def read(self, index: Index | None = None) -> np.ndarray:
    """The block ``index`` of the parameter (all of it for None), in its layout."""
    try:
      if index is None:
        array = self._handle.get_tensor(self.name)
        return array.T if self.transpose else array
      block = self._handle.get_slice(self.name)
      return block[tuple(reversed(index))].T if self.transpose else block[index]
    except Exception as e:  # safetensors raises its own error types
      raise CorruptWeightsError(f"{self.file}: tensor {self.name} cannot be read ({e})") from None


@contextlib.contextmanager
def open_checkpoint(model_dir: str | os.PathLike, model: Llama) -> Iterator[list[CheckpointTensor]]:
  """Every parameter of ``model`` paired with its checkpoint tensor, shapes checked.

  The files stay open (and the tensors readable) inside the ``with`` block.

  Raises:
    AmbiguousWeightsError: a tensor the model reads is in two files (named).
    WeightsNotFoundError: no safetensors file.
    CorruptWeightsError: a file cannot be opened.
    MissingTensorError: a tensor the model needs is absent (named).
    TensorShapeError: a tensor has the wrong shape (named, with both shapes).
    UnsupportedModelError: the checkpoint holds a projection bias the config
      does not ask for.
  """
  from safetensors import safe_open

  model_dir = os.fspath(model_dir)
  wanted = hf_param_names(model.cfg, getattr(model, "kernel_layout", "in_out"))
  found: dict[str, CheckpointTensor] = {}
  with contextlib.ExitStack() as stack:
    for path in weight_files(model_dir):
      try:
        handle = stack.enter_context(safe_open(path, framework="numpy"))
        names = list(handle.keys())
      except Exception as e:  # safetensors raises its own error types
        raise CorruptWeightsError(f"{path}: cannot read safetensors ({e})") from None
      for name in names:
        if name in found:
          raise AmbiguousWeightsError(f"Key {name} was found in multiple files:"
                                      f" {found[name].file} and {path}")
        if name not in wanted and _BIAS_NAME.fullmatch(name):
          # transformers would drop it with a warning: the model would then compute
          # something else than the checkpoint was trained to.
          raise UnsupportedModelError(
              f"{path}: tensor {name} is in the checkpoint but config.json asks for no such"
              " bias (attention_bias / mlp_bias); refusing to run without it")
        if name not in wanted:
          continue
        param_path, transpose = wanted[name]
        param = param_at(model, param_path)
        shape = tuple(param.get_value().shape)
        got = tuple(handle.get_slice(name).get_shape())
        want = tuple(reversed(shape)) if transpose else shape
        if got != want:
          raise TensorShapeError(f"{path}: {name}: expected shape {want}, got {got}")
        found[name] = CheckpointTensor(name=name, file=path, path=param_path, param=param,
                                       shape=shape, transpose=transpose, _handle=handle)
    missing = sorted(set(wanted) - set(found), key=lambda n: (len(n), n))
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise MissingTensorError(f"{model_dir}: missing tensor {missing[0]}{more}")
    yield list(found.values())


def load_llama(model_dir: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
               kernel_layout: str = "in_out") -> Llama:
  """Loads a Hugging Face Llama checkpoint (``config.json`` + safetensors).

  Sharded checkpoints (``model.safetensors.index.json``) are supported. Torch
  ``[out, in]`` weights are transposed to ``[in, out]`` kernels. To load onto a
  device mesh, see ``medusa_jax.sharding.load_llama_sharded``.

  Args:
    model_dir: directory holding ``config.json`` and the safetensors file(s).
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters (default: ``dtype``).
    kernel_layout: the projections' layout (``llama.KERNEL_LAYOUTS``; ``out_in`` reads
      the files' ``[out, in]`` as they are).

  Raises:
    ConfigError: bad or unsupported ``config.json``, or an unknown ``kernel_layout``.
    WeightsNotFoundError: no safetensors file.
    MissingTensorError: a tensor the model needs is absent (named).
    TensorShapeError: a tensor has the wrong shape (named, with both shapes).
    CorruptWeightsError: a file cannot be read.
    NonFiniteWeightsError: a tensor holds NaN or inf (after the cast to ``param_dtype``).
    TensorDtypeError: ``dtype`` or ``param_dtype`` is not floating point.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  check_float_dtype(dtype, "dtype")
  check_float_dtype(param_dtype, "param_dtype")
  model = abstract_llama(LlamaConfig.from_hf(model_dir), dtype=dtype, param_dtype=param_dtype,
                         kernel_layout=kernel_layout)
  np_dtype = np.dtype(jnp.dtype(param_dtype))
  with open_checkpoint(model_dir, model) as tensors:
    for t in tensors:
      t.param.set_value(jnp.asarray(np.ascontiguousarray(t.read(), dtype=np_dtype)))
    check_finite(model, tensors, param_dtype)
  return model


def check_finite(model: Llama, tensors: list[CheckpointTensor], param_dtype) -> None:
  """Raises NonFiniteWeightsError when a loaded parameter holds NaN or inf.

  Runs on device (one jitted reduction over every parameter, one host read),
  after the cast to ``param_dtype``: finite float32 weights beyond float16's
  range become inf there. A NaN base model would otherwise decode token 0
  again and again.
  """
  bad = set(nonfinite_leaves(nnx.state(model, nnx.Param)))
  if not bad:
    return
  names = [t for t in tensors if "/".join(str(k) for k in t.path) in bad]
  first = names[0] if names else None
  what = f"{first.name} in {first.file}" if first else sorted(bad)[0]
  more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
  raise NonFiniteWeightsError(f"{what}{more}: holds NaN or infinite values as"
                              f" {jnp.dtype(param_dtype).name}")
