"""medusa_jax: Medusa speculative decoding in JAX for GPU and TPU.

The public API is re-exported here; heavier parts (weights, routing, the
engine) are imported on first use so that ``import medusa_jax`` stays cheap.
"""

from __future__ import annotations

import importlib

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import (AdapterLoadError, ArchitectureError, AssetError,
                               CheckpointExistsError, ConfigError, CorruptWeightsError,
                               MedusaError, MissingTensorError, NonFiniteWeightsError,
                               RequestError, SegmentError, ShardingError, TensorDtypeError,
                               TensorShapeError, WeightsError, WeightsFormatError,
                               WeightsNotFoundError)
from medusa_jax.heads import (HeadsSharding, MedusaHead, MedusaModel, MedusaV1, MedusaV2,
                              ResBlock, speculation_max_batch_size)

__version__ = "0.1.0"

# name -> module that defines it (imported lazily).
_LAZY = {
    "MedusaWeights": "medusa_jax.weights",
    "load_medusa_adapter": "medusa_jax.weights",
    "AdapterRegistry": "medusa_jax.adapters",
    "BatchMedusaWeights": "medusa_jax.batching",
    "find_segments": "medusa_jax.segments",
    "SegmentConcatBuilder": "medusa_jax.segments",
    "MedusaSegments": "medusa_jax.segments",
    "Engine": "medusa_jax.decoding.engine",
    "GenerationResult": "medusa_jax.decoding.engine",
    "Greedy": "medusa_jax.decoding.verify",
    "Typical": "medusa_jax.decoding.verify",
    "Sampling": "medusa_jax.decoding.verify",
    "build_tree": "medusa_jax.decoding.tree",
    "TreeBuffers": "medusa_jax.decoding.tree",
    "make_mesh": "medusa_jax.sharding",
    "PartitionRules": "medusa_jax.sharding",
    "ShardedMedusaV2": "medusa_jax.sharding",
    "shard_medusa_model": "medusa_jax.sharding",
    "load_medusa_sharded": "medusa_jax.sharding",
    "shard_llama": "medusa_jax.sharding",
    "load_llama_sharded": "medusa_jax.sharding",
    "Llama": "medusa_jax.models.llama",
    "LlamaConfig": "medusa_jax.models.llama",
    "KVCache": "medusa_jax.models.llama",
    "load_llama": "medusa_jax.models.llama_weights",
    "causal_mask": "medusa_jax.models.llama",
    "Tokenizer": "medusa_jax.models.tokenizer",
    "apply_chat_template": "medusa_jax.models.chat",
    "fetch": "medusa_jax.assets",
    "AssetPaths": "medusa_jax.assets",
}


def __getattr__(name: str):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'medusa_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
