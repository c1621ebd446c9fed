"""Pallas kernels: the segmented (per-row-adapter) matmul (reference, ragged_dot, Pallas GPU and
TPU; ``segmented_matmul``) and the decode attention of the base model
(:mod:`medusa_jax.pallas.decode_attention`, GPU)."""

from medusa_jax.pallas.ops import Backend, Epilogue, segmented_matmul

__all__ = ["Backend", "Epilogue", "segmented_matmul"]
