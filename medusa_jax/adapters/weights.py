"""MedusaWeights: a Medusa adapter's config and heads.

Files are read and written by ``adapters/io.py``; this container holds what
they describe and gives LoRAX's API (``speculative_tokens``, ``model(x,
lm_head)``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.adapters import io
from medusa_jax._validate import check_float_dtype
from medusa_jax.adapters.layout import file_tensors
from medusa_jax.config import MedusaConfig, speculation_max_batch_size
from medusa_jax.errors import ArchitectureError, TensorShapeError
from medusa_jax.heads.modules import MedusaModel


class MedusaWeights:
  """A Medusa adapter: its config and its heads (a :class:`MedusaModel`).

  Attributes:
    config: the adapter's MedusaConfig.
    model: the heads; ``model(x, lm_head)`` gives ``(logits [N, V],
      speculative_logits [N, n, V] | None)``. For V2 the fused weight is
      ``model.medusa.kernel[...]`` [H, n, H] (its reshape [H, n*H] is LoRAX's
      layout) and ``model.medusa.bias[...]`` [n, H], sharded or not.
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
           max_batch_size: int | None = None) -> MedusaWeights:
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
    dtype = check_float_dtype(dtype)
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
                        rngs=rngs, param_dtype=dtype,
                        max_batch_size=speculation_max_batch_size(max_batch_size))
    if lm_head_weight is not None:
      out = jnp.asarray(lm_head_weight).astype(dtype)
      for head in model.medusa.heads:
        head.out.set_value(out)
    return cls(config, model)

  @classmethod
  def load(cls, config: MedusaConfig, path: str | os.PathLike, *, dtype=jnp.float32,
           max_batch_size: int | None = None, check_finite: bool = True,
           mesh: Mesh | None = None) -> MedusaWeights:
    """Loads heads from a weight file or a directory of them.

    A directory contributes the union of its top-level ``*.safetensors``
    files (as LoRAX does), or, when it has none, its ``*.pt``/``*.pth``/
    ``*.bin`` files (read through torch). Hidden size H (and V for V1) come from
    the tensors; V1 is chosen when ``medusa_num_layers > 1`` or ``0.{L}.weight``
    exists, else V2.

    Args:
      config: the adapter config (n, L).
      path: a weight file or a directory.
      dtype: parameter dtype (float32, bfloat16, ...; integer dtypes are refused).
      max_batch_size: the V2 speculation guard (None: env, else 32).
      check_finite: reject tensors holding NaN or inf.
      mesh: place the heads on this ``(data, model)`` mesh as they are read
        (each device reads only its block: no weight is whole on one device).
        None: one device.

    Raises:
      WeightsNotFoundError: no such path, or no weight file in the directory.
      WeightsFormatError: unsupported extension, or a torch file without torch.
      CorruptWeightsError: a file is truncated or unreadable.
      MissingTensorError: a needed tensor is absent (the message names it).
      TensorShapeError / TensorDtypeError: a tensor has the wrong shape / dtype,
        or ``dtype`` is not floating point.
      NonFiniteWeightsError: a tensor holds NaN or inf (``check_finite``), also
        after the cast to ``dtype``.
      AmbiguousWeightsError: two files hold the same tensor.
      ConfigError: the config disagrees with the files.
      ShardingError: with a mesh, H or V does not divide its ``model`` axis.
    """
    model = io.read_adapter(config, path, dtype=dtype, max_batch_size=max_batch_size,
                            check_finite=check_finite, mesh=mesh)
    return cls(config, model, source=os.fspath(path))

  def shard(self, mesh: Mesh) -> MedusaWeights:
    """These heads placed on ``mesh`` (see :meth:`MedusaModel.shard`).

    Raises:
      ShardingError: H or V does not divide the ``model`` axis.
    """
    return MedusaWeights(self.config, self.model.shard(mesh), source=self.source)

  # -- out --------------------------------------------------------------------------------------

  def lorax_tensors(self, dtype=None) -> dict[str, np.ndarray]:
    """The heads as file tensors (LoRAX keys, torch ``[out, in]``): see ``layout.file_tensors``."""
    return file_tensors(self.model, dtype)

  def save(self, out_dir: str | os.PathLike, *, dtype=None, overwrite: bool = False,
           choices=None) -> str:
    """Writes ``config.json`` and ``model.safetensors`` (LoRAX layout) to ``out_dir``.

    The result loads back with :meth:`load` / :func:`load_medusa_adapter` and
    with LoRAX (keys verbatim, torch layout, ``version`` preserved). The write
    is atomic (see :func:`~medusa_jax.adapters.io.save_safetensors`): a crash
    leaves the old adapter or the new one, and an overwritten adapter keeps no
    old file.

    Args:
      out_dir: the adapter directory (created if missing).
      dtype: tensor dtype in the file (floating point); None keeps the parameter dtype.
      overwrite: replace an existing adapter directory.
      choices: best-first tree paths to write as ``medusa_choices.json``.

    Returns:
      The path of the safetensors file.

    Raises:
      CheckpointExistsError: ``out_dir`` holds files and ``overwrite`` is False.
      TensorDtypeError / NonFiniteWeightsError: a non-float ``dtype``, or a
        cast that overflows.
      WriteError: the disk is full or the directory is not writable.
    """
    return io.save_safetensors(self.config, self.model, out_dir, dtype=dtype,
                               overwrite=overwrite, choices=choices)

  def save_orbax(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Saves the heads as an Orbax checkpoint (see :func:`~medusa_jax.adapters.io.save_orbax`).

    Raises:
      CheckpointExistsError: ``path`` holds files and ``overwrite`` is False.
      WriteError: the disk is full or the directory is not writable.
    """
    return io.save_orbax(self.config, self.model, path, overwrite=overwrite)

  @classmethod
  def load_orbax(cls, path: str | os.PathLike, *, max_batch_size: int | None = None,
                 mesh: Mesh | None = None) -> MedusaWeights:
    """Restores weights written by :meth:`save_orbax`, bit for bit.

    Args:
      path: the checkpoint directory.
      max_batch_size: the V2 speculation guard (None: env, else 32).
      mesh: restore, then place the heads on this mesh (:meth:`shard`).

    Raises:
      WeightsNotFoundError: ``path`` lacks the config, metadata or state.
      CorruptWeightsError: the metadata or the Orbax state cannot be read.
      ShardingError: with a mesh, H or V does not divide its ``model`` axis.
    """
    config, model = io.load_orbax(path, max_batch_size=max_batch_size)
    weights = cls(config, model, source=os.path.abspath(os.fspath(path)))
    return weights if mesh is None else weights.shard(mesh)


def load_medusa_adapter(adapter_dir: str | os.PathLike, *, dtype=jnp.float32,
                        max_batch_size: int | None = None,
                        mesh: Mesh | None = None) -> MedusaWeights:
  """Loads an adapter directory: ``config.json`` plus its weight files.

  Args:
    adapter_dir: the adapter directory.
    dtype: parameter dtype.
    max_batch_size: the V2 speculation guard (None: env, else 32).
    mesh: place the heads on this mesh as they are read (see :meth:`MedusaWeights.load`).

  Raises:
    ConfigError: ``config.json`` is missing or invalid.
    WeightsError: see :meth:`MedusaWeights.load`.
    ShardingError: with a mesh, H or V does not divide its ``model`` axis.
  """
  config = MedusaConfig.from_pretrained(adapter_dir)
  return MedusaWeights.load(config, adapter_dir, dtype=dtype, max_batch_size=max_batch_size,
                            mesh=mesh)
