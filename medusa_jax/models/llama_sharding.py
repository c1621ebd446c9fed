"""The base Llama on a ``(data, model)`` mesh, Megatron style.

q/k/v/gate/up are column-parallel (their biases split like their output
columns), o/down row-parallel (their biases replicated: added once, after the
reduction), the embedding and a
separate lm_head split over the vocabulary, norms replicated, and the KV cache
split over batch (``data``) and kv heads (``model``). With fewer kv heads than
``model`` devices the k/v projections and the cache are replicated over
``model`` instead (Megatron's kv-head replication).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medusa_jax._validate import check_float_dtype
from medusa_jax.errors import ShardingError
from medusa_jax.models.llama import AttentionScores
from medusa_jax.models.llama_config import LlamaConfig
from medusa_jax.models.llama_weights import abstract_llama, check_finite, open_checkpoint
from medusa_jax.parallel.mesh import (MODEL, PartitionRules, axis_size, path_str, place,
                                     rows_axis, shard_state)

# Megatron-style rules for the base Llama ([in, out] kernels). The embedding
# [V, H] and a separate lm_head [H, V] split over the vocabulary.
LLAMA_RULES = PartitionRules(rules=(
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|wq|wk|wv|w1|w3)(/kernel)?$", P(None, MODEL)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P(MODEL)),
    (r"(o_proj|down_proj)/bias$", P()),
    (r"(o_proj|down_proj|wo|w2)(/kernel)?$", P(MODEL, None)),
    (r"(embed_tokens|embedding|embed|wte)(/embedding|/weight)?$", P(MODEL, None)),
    (r"lm_head(_kernel|/kernel)?$", P(None, MODEL)),
))


def llama_rules(cfg: LlamaConfig, mesh: Mesh) -> PartitionRules:
  """Megatron rules for a ``LlamaConfig`` on ``mesh``.

  Query heads split over ``model`` (whole heads per device). With fewer kv
  heads than devices the k/v projections and the KV cache are replicated
  over ``model`` (as Megatron does), else split like the query heads.

  Raises:
    ShardingError: the query heads do not divide the ``model`` axis.
  """
  width = axis_size(mesh, MODEL)
  if cfg.num_attention_heads % width:
    raise ShardingError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by"
                        f" mesh axis 'model' of size {width}")
  if cfg.num_key_value_heads % width == 0:
    return LLAMA_RULES
  return PartitionRules(rules=((r"(k_proj|v_proj)(/kernel|/bias)?$", P()),) + LLAMA_RULES.rules)


def cache_spec(cfg: LlamaConfig, batch: int, mesh: Mesh) -> P:
  """Spec of one [B, L, G, D] KV-cache buffer: rows over ``data``, kv heads over ``model``."""
  heads = MODEL if cfg.num_key_value_heads % axis_size(mesh, MODEL) == 0 else None
  return P(rows_axis(batch, mesh), None, heads, None)


def shard_cache(cache: Any, cfg: LlamaConfig, mesh: Mesh) -> Any:
  """A ``KVCache`` placed by :func:`cache_spec` (every buffer, every layer)."""
  spec = cache_spec(cfg, cache.k[0].shape[0], mesh)
  return jax.device_put(cache, NamedSharding(mesh, spec))


def shard_llama(llama: nnx.Module, mesh: Mesh) -> nnx.Module:
  """The base ``Llama`` with its parameters placed by :func:`llama_rules` (which are
  written for ``[in, out]`` kernels: another layout is converted first)."""
  if getattr(llama, "kernel_layout", "in_out") != "in_out":
    llama = llama.with_kernel_layout("in_out")
  graphdef, state = nnx.split(llama)
  return nnx.merge(graphdef, shard_state(state, llama_rules(llama.cfg, mesh), mesh))


def load_llama_sharded(model_dir: str | os.PathLike, mesh: Mesh, *, dtype=jnp.float32,
                       param_dtype=None) -> nnx.Module:
  """Loads a Hugging Face Llama checkpoint straight onto ``mesh``.

  Like :func:`~medusa_jax.models.llama_weights.load_llama`, with the same
  checks, but each device reads only its block of each tensor (``get_slice``),
  so no weight is ever whole on one device.

  Raises:
    ConfigError, WeightsNotFoundError, MissingTensorError, TensorShapeError,
    CorruptWeightsError, NonFiniteWeightsError, TensorDtypeError: as ``load_llama``.
    ShardingError: a size does not divide its mesh axis.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  check_float_dtype(dtype, "dtype")
  check_float_dtype(param_dtype, "param_dtype")
  cfg = LlamaConfig.from_hf(model_dir)
  rules = llama_rules(cfg, mesh)
  model = abstract_llama(cfg, dtype=dtype, param_dtype=param_dtype)
  with open_checkpoint(model_dir, model) as tensors:
    for t in tensors:
      t.param.set_value(place(t.read, rules.spec(path_str(t.path)), mesh, shape=t.shape,
                              dtype=param_dtype, what=t.name))
    check_finite(model, tensors, param_dtype)
  return model


def partitionable(llama, mesh: Mesh | None):
  """``llama``, or on a mesh of several devices the same model without its Pallas kernels:
  attention with XLA's FLAT scores, projections without row kernels, the cache compacted
  by XLA's gathers and scatters. XLA does not partition a Pallas call (it would gather
  the sharded KV cache, or weights, onto every device in every layer). The parameter
  arrays, and their placement, are shared."""
  if mesh is None or mesh.devices.size == 1:
    return llama
  if llama.attention_scores in (AttentionScores.PALLAS, AttentionScores.PALLAS_FUSED):
    llama = llama.with_attention_scores(AttentionScores.FLAT)
  return llama.with_row_kernels(False).with_compact_kernel(False)
