"""MedusaWeights: a Medusa adapter's config and heads, in and out of files.

Reading goes through :mod:`medusa_jax.adapter_files` (key layout, file
discovery, checked reads); this module builds the heads from it and writes
them back in the LoRAX layout (safetensors) or as Orbax checkpoints. The file
API is re-exported here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh

from medusa_jax.adapter_files import (ORBAX_META_NAME, AdapterLayout, block_bias_key,
                                      block_weight_key, convert_to_safetensors,
                                      open_adapter_files, out_weight_key, weight_files)
from medusa_jax.adapter_loading import read_heads
from medusa_jax.config import CONFIG_NAME, MedusaConfig
from medusa_jax.errors import (ArchitectureError, CheckpointExistsError, CorruptWeightsError,
                               TensorShapeError, WeightsNotFoundError)
from medusa_jax.heads import MedusaModel, MedusaV2
from medusa_jax.sharded_heads import ShardedMedusaV2, shard_medusa_model

__all__ = ["MedusaWeights", "load_medusa_adapter", "convert_to_safetensors", "block_weight_key",
           "block_bias_key", "out_weight_key", "weight_files", "WEIGHTS_NAME",
           "ORBAX_STATE_DIR", "ORBAX_META_NAME"]

WEIGHTS_NAME = "model.safetensors"
ORBAX_STATE_DIR = "state"
_ORBAX_FORMAT = 1


class MedusaWeights:
  """A Medusa adapter: its config and its heads (a :class:`MedusaModel`).

  Attributes:
    config: the adapter's MedusaConfig.
    model: the heads; ``model(x, lm_head, segments=None)`` gives
      ``(logits [N, V], speculative_logits [N, n, V] | None)``. For V2 the fused
      weight is ``model.medusa.kernel[...]`` [H, n*H] and ``model.medusa.bias[...]``
      [n*H]; heads loaded onto a mesh hold a ``ShardedMedusaV2`` there instead
      (``kernel_hnh`` [H, n, H], ``bias_nh`` [n, H]; ``unsharded_arrays()``
      gives the fused layout on the host).
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
      dtype: parameter dtype (float32, bfloat16, ...).
      max_batch_size: the V2 speculation guard (None: env, else 32).
      check_finite: reject tensors holding NaN or inf.
      mesh: place the heads on this ``(data, model)`` mesh as they are read
        (each device reads only its block: no weight is whole on one device);
        see :func:`medusa_jax.sharding.load_medusa_sharded`. None: one device.

    Raises:
      WeightsNotFoundError: no such path, or no weight file in the directory.
      WeightsFormatError: unsupported extension, or a torch file without torch.
      CorruptWeightsError: a file is truncated or unreadable.
      MissingTensorError: a needed tensor is absent (the message names it).
      TensorShapeError / TensorDtypeError: a tensor has the wrong shape / dtype.
      NonFiniteWeightsError: a tensor holds NaN or inf (``check_finite``).
      ShardingError: with a mesh, H or V does not divide its ``model`` axis.
    """
    with open_adapter_files(path) as index:
      model = read_heads(config, index, dtype=dtype, max_batch_size=max_batch_size,
                         check_finite=check_finite, mesh=mesh)
    return cls(config, model, source=os.fspath(path))

  def shard(self, mesh: Mesh) -> MedusaWeights:
    """These heads placed on ``mesh`` (see :func:`medusa_jax.sharding.shard_medusa_model`).

    Raises:
      ShardingError: H or V does not divide the ``model`` axis.
    """
    return MedusaWeights(self.config, shard_medusa_model(self.model, mesh), source=self.source)

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
      a = np.asarray(jax.device_get(a))  # a sharded array is gathered on the host
      if dtype is not None:
        a = a.astype(jnp.dtype(dtype))
      return np.ascontiguousarray(a)

    out: dict[str, np.ndarray] = {}
    medusa = self.model.medusa
    if isinstance(medusa, MedusaV2):
      hidden, n = medusa.hidden, medusa.num_heads
      kernel, bias = (medusa.unsharded_arrays() if isinstance(medusa, ShardedMedusaV2)
                      else (medusa.kernel[...], medusa.bias[...]))
      kernel, bias = host(kernel), host(bias)
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
    Heads on a mesh are saved in the unsharded layout; :meth:`load_orbax`
    restores them on one device (or onto a mesh of any shape).

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
      checkpointer.save(state_path, self._unsharded_state(), force=overwrite)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    return path

  def _unsharded_state(self) -> nnx.State:
    """The parameters in the unsharded layout (what Orbax stores); arrays may stay on a mesh."""
    medusa = self.model.medusa
    if not isinstance(medusa, ShardedMedusaV2):
      return nnx.state(self.model, nnx.Param)
    layout = AdapterLayout(num_heads=medusa.num_heads, num_layers=1, hidden=medusa.hidden,
                           vocab=None)
    model = layout.abstract_model(self.config, self.dtype, medusa.max_batch_size)
    hidden, n = medusa.hidden, medusa.num_heads
    model.medusa.kernel.set_value(medusa.kernel_hnh[...].reshape(hidden, n * hidden))
    model.medusa.bias.set_value(medusa.bias_nh[...].reshape(n * hidden))
    return nnx.state(model, nnx.Param)

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
    layout = AdapterLayout(num_heads=config.medusa_num_heads,
                           num_layers=config.medusa_num_layers, hidden=hidden,
                           vocab=vocab if per_head else None)
    graphdef, abstract = nnx.split(layout.abstract_model(config, dtype, max_batch_size))
    # Restore onto one device whatever the saving process's devices were.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract)
    checkpointer = ocp.StandardCheckpointer()
    try:
      state = checkpointer.restore(state_path, abstract)
    except Exception as e:  # Orbax raises many types (ValueError, FileNotFoundError, ...)
      raise CorruptWeightsError(f"{state_path}: cannot restore the Orbax state ({e})") from e
    finally:
      checkpointer.close()
    weights = cls(config, nnx.merge(graphdef, state), source=path)
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
