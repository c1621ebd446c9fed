"""medusa_jax: Medusa speculative decoding in JAX for GPU and TPU.

The public API is re-exported here, and only here. Everything but the config
and the errors is imported on first use, so ``import medusa_jax`` (and the
command line's ``--help``) never imports JAX.
"""

from __future__ import annotations

import importlib

from medusa_jax.config import EngineConfig, MedusaConfig, speculation_max_batch_size
from medusa_jax.errors import (AdapterLoadError, ArchitectureError, AssetError,
                               CheckpointExistsError, ConfigError, CorruptWeightsError,
                               MedusaError, MissingTensorError, NonFiniteWeightsError,
                               RequestError, SegmentError, ShardingError, TensorDtypeError,
                               TensorShapeError, WeightsError, WeightsFormatError,
                               WeightsNotFoundError)
from medusa_jax.errors import (AdapterMismatchError, AmbiguousWeightsError, ModelNotFoundError,
                               NonFiniteLogitsError, NonFiniteOutputError, OutputExistsError,
                               UnsupportedModelError, WriteError)

__version__ = "0.1.0"

# name -> module that defines it (imported lazily).
_LAZY = {
    # heads
    "Heads": "medusa_jax.heads.protocol",
    "ResBlock": "medusa_jax.heads.modules",
    "MedusaHead": "medusa_jax.heads.modules",
    "MedusaV1": "medusa_jax.heads.modules",
    "MedusaV2": "medusa_jax.heads.modules",
    "MedusaModel": "medusa_jax.heads.modules",
    "BatchMedusaWeights": "medusa_jax.heads.routed",
    "HeadsSharding": "medusa_jax.heads.sharded",
    "vocab_parallel_lm_head": "medusa_jax.heads.sharded",
    # adapters
    "MedusaWeights": "medusa_jax.adapters.weights",
    "load_medusa_adapter": "medusa_jax.adapters.weights",
    "AdapterRegistry": "medusa_jax.adapters.registry",
    "find_segments": "medusa_jax.adapters.segments",
    "SegmentConcatBuilder": "medusa_jax.adapters.segments",
    "convert": "medusa_jax.adapters.convert",
    # mesh
    "make_mesh": "medusa_jax.parallel.mesh",
    "PartitionRules": "medusa_jax.parallel.mesh",
    # base model
    "Llama": "medusa_jax.models.llama",
    "LlamaConfig": "medusa_jax.models.llama_config",
    "KVCache": "medusa_jax.models.llama",
    "causal_mask": "medusa_jax.models.llama",
    "load_llama": "medusa_jax.models.llama_weights",
    "shard_llama": "medusa_jax.models.llama_sharding",
    "load_llama_sharded": "medusa_jax.models.llama_sharding",
    "Tokenizer": "medusa_jax.models.tokenizer",
    "apply_chat_template": "medusa_jax.models.chat",
    # decoding
    "Engine": "medusa_jax.decoding.engine",
    "GenerationResult": "medusa_jax.decoding.results",
    "SamplingParams": "medusa_jax.decoding.requests",
    "Speculate": "medusa_jax.decoding.requests",
    "Greedy": "medusa_jax.decoding.strategies",
    "Typical": "medusa_jax.decoding.strategies",
    "Sampling": "medusa_jax.decoding.strategies",
    "build_tree": "medusa_jax.decoding.tree",
    "TreeBuffers": "medusa_jax.decoding.tree",
    # assets
    "fetch": "medusa_jax.assets.cache",
    "AssetPaths": "medusa_jax.assets.cache",
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
