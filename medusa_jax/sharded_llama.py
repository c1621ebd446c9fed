"""The base Llama on a ``(data, model)`` mesh, Megatron style.

q/k/v/gate/up are column-parallel, o/down row-parallel, the embedding and a
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

from medusa_jax.errors import MissingTensorError, ShardingError
from medusa_jax.partitioning import (MODEL, PartitionRules, axis_size, path_str, place,
                                     rows_axis, shard_state)

# Megatron-style rules for the base Llama ([in, out] kernels). The embedding
# [V, H] and a separate lm_head [H, V] split over the vocabulary.
LLAMA_RULES = PartitionRules(rules=(
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|wq|wk|wv|w1|w3)(/kernel)?$", P(None, MODEL)),
    (r"(q_proj|k_proj|v_proj)/bias$", P(MODEL)),
    (r"(o_proj|down_proj|wo|w2)(/kernel)?$", P(MODEL, None)),
    (r"(embed_tokens|embedding|embed|wte)(/embedding|/weight)?$", P(MODEL, None)),
    (r"lm_head(_kernel|/kernel)?$", P(None, MODEL)),
))


def llama_rules(cfg: Any, mesh: Mesh) -> PartitionRules:
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


def cache_spec(cfg: Any, batch: int, mesh: Mesh) -> P:
  """Spec of one [B, L, G, D] KV-cache buffer: rows over ``data``, kv heads over ``model``."""
  heads = MODEL if cfg.num_key_value_heads % axis_size(mesh, MODEL) == 0 else None
  return P(rows_axis(batch, mesh), None, heads, None)


def shard_cache(cache: Any, cfg: Any, mesh: Mesh) -> Any:
  """A ``KVCache`` placed by :func:`cache_spec` (every buffer, every layer)."""
  spec = cache_spec(cfg, cache.k[0].shape[0], mesh)
  return jax.device_put(cache, NamedSharding(mesh, spec))


def shard_llama(llama: nnx.Module, mesh: Mesh) -> nnx.Module:
  """The base ``Llama`` with its parameters placed by :func:`llama_rules`."""
  graphdef, state = nnx.split(llama)
  return nnx.merge(graphdef, shard_state(state, llama_rules(llama.cfg, mesh), mesh))


def load_llama_sharded(model_dir: str | os.PathLike, mesh: Mesh, *, dtype=jnp.float32,
                       param_dtype=None) -> nnx.Module:
  """Loads a Hugging Face Llama checkpoint straight onto ``mesh``.

  Like ``models.llama.load_llama``, but each device reads only its block of
  each tensor (``get_slice``), so no weight is ever whole on one device.

  Raises:
    MissingTensorError: a tensor the model needs is absent.
    ShardingError: a size does not divide its mesh axis.
  """
  from safetensors import safe_open
  from medusa_jax.models import llama as llama_mod

  model_dir = os.fspath(model_dir)
  param_dtype = dtype if param_dtype is None else param_dtype
  cfg = llama_mod.LlamaConfig.from_hf(model_dir)
  rules = llama_rules(cfg, mesh)
  abstract = nnx.eval_shape(lambda: llama_mod.Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                    param_dtype=param_dtype))
  handles = [safe_open(f, framework="numpy") for f in llama_mod._weight_files(model_dir)]
  where = {key: h for h in handles for key in h.keys()}
  by_path = {path: (name, transpose) for name, (path, transpose)
             in llama_mod._hf_names(cfg).items()}
  for path, (name, transpose) in by_path.items():
    if name not in where:
      raise MissingTensorError(f"{model_dir}: missing tensor {name}")
    param = llama_mod._get_path(abstract, path)
    shape = tuple(param.get_value().shape)
    tensor = where[name].get_slice(name)

    def read(index, tensor=tensor, transpose=transpose):
      return tensor[tuple(reversed(index))].T if transpose else tensor[index]

    spec = rules.spec(path_str(path))
    param.set_value(place(read, spec, mesh, shape=shape, dtype=param_dtype, what=name))
  return abstract
