"""Segmented (per-row-adapter) matmul kernels: reference, ragged_dot, Pallas GPU and TPU."""

from medusa_jax.pallas.ops import Backend, Epilogue, segmented_matmul

__all__ = ["Backend", "Epilogue", "segmented_matmul"]
