"""Sharding on a ``(data, model)`` device mesh: one import for all of it.

``data`` splits batches (rows), ``model`` splits weights. The pieces live in
three modules, re-exported here:

* :mod:`medusa_jax.partitioning`: the mesh, partition rules as data, and
  :func:`place` (a global array built shard by shard, never whole on one
  device).
* :mod:`medusa_jax.sharded_heads`: LoRAX's tensor-parallel Medusa heads (V2
  fused weight split per head on its output dim, one all-gather; lm_head over
  the vocabulary; V1 heads split by rules); :mod:`medusa_jax.adapter_loading`
  loads heads straight onto a mesh.
* :mod:`medusa_jax.sharded_llama`: the base Llama, Megatron style, its KV
  cache, and loading a checkpoint straight onto a mesh.

Weight sizes that do not divide their mesh axis are refused with
:class:`~medusa_jax.errors.ShardingError`, naming the size and the axis. Two
documented cases replicate instead: batch rows that do not divide ``data``
(every data group computes them) and fewer kv heads than ``model`` devices
(Megatron's kv-head replication).
"""

from __future__ import annotations

from medusa_jax.adapter_loading import load_medusa_sharded
from medusa_jax.partitioning import (DATA, MODEL, PartitionRules, axis_size, batch_spec,
                                     check_divisible, make_mesh, partition_specs, path_str,
                                     place, rows_axis, shard_batch, shard_state)
from medusa_jax.sharded_heads import (MEDUSA_RULES, V1_HEADS_SHARDING, ShardedMedusaV2,
                                      shard_medusa_model,
                                      sharded_segmented_matmul, sharded_v2_model,
                                      v2_heads_hidden, v2_heads_hidden_segmented,
                                      vocab_parallel_lm_head)
from medusa_jax.sharded_llama import (LLAMA_RULES, cache_spec, llama_rules, load_llama_sharded,
                                      shard_cache, shard_llama)

__all__ = [
    "DATA", "MODEL", "PartitionRules", "axis_size", "batch_spec", "check_divisible",
    "make_mesh", "partition_specs", "path_str", "place", "rows_axis", "shard_batch",
    "shard_state",
    "MEDUSA_RULES", "V1_HEADS_SHARDING", "ShardedMedusaV2", "load_medusa_sharded",
    "shard_medusa_model", "sharded_segmented_matmul", "sharded_v2_model", "v2_heads_hidden",
    "v2_heads_hidden_segmented", "vocab_parallel_lm_head",
    "LLAMA_RULES", "cache_spec", "llama_rules", "load_llama_sharded", "shard_cache",
    "shard_llama",
]

