"""Pallas kernels: the segmented (per-row-adapter) matmul (reference, ragged_dot, Pallas GPU and
TPU; ``segmented_matmul``), and for the base model on one GPU the decode attention
(:mod:`medusa_jax.pallas.decode_attention`), the few-row projections with their neighbours
(:mod:`medusa_jax.pallas.row_projection`) and the KV-cache compaction
(:mod:`medusa_jax.pallas.compact_cache`)."""

from medusa_jax.pallas.ops import Backend, Epilogue, segmented_matmul

__all__ = ["Backend", "Epilogue", "segmented_matmul"]
