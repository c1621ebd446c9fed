"""Pallas calls whose spelling differs between the JAX versions we support.

JAX 0.10.2 (CPU, tests) and 0.11.x (GPU) both ship the Triton backend
(``jax.experimental.pallas.triton``; deprecated in 0.11, selected by passing
its ``CompilerParams``) and the TPU ``PrefetchScalarGridSpec``. Everything
version-dependent that the kernels touch goes through this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


def triton_compiler_params(num_warps: int, num_stages: int):
  """Compiler params that select the Pallas Triton backend on GPU."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_load(ref_view, *, mask=None, other=None):
  """Masked load of a ref view (``ref.at[...]``)."""
  return pltriton.load(ref_view, mask=mask, other=other)


def triton_store(ref_view, value, *, mask=None):
  """Masked store into a ref view (``ref.at[...]``)."""
  pltriton.store(ref_view, value, mask=mask)


def triton_dot_precision(dtype):
  """Precision of a dot inside a Triton kernel: f32 operands multiply in f32 (Triton's
  IEEE dot), bf16 in the tensor cores."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def tpu_prefetch_grid_spec(*, num_scalar_prefetch, grid, in_specs, out_specs, scratch_shapes):
  return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=num_scalar_prefetch, grid=grid,
                                      in_specs=in_specs, out_specs=out_specs,
                                      scratch_shapes=scratch_shapes)


def tpu_vmem(shape, dtype):
  return pltpu.VMEM(shape, dtype)


def tpu_compiler_params(dimension_semantics):
  return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def cost_estimate(*, flops: int, bytes_accessed: int, transcendentals: int = 0):
  return pl.CostEstimate(flops=flops, bytes_accessed=bytes_accessed,
                         transcendentals=transcendentals)


def default_interpret(kernel_platform: str) -> bool:
  """Interpret a kernel written for ``kernel_platform`` ("gpu" or "tpu") unless
  the default backend is that platform (a Triton kernel cannot lower on TPU,
  nor a TPU kernel on GPU; both interpret on CPU)."""
  platform = jax.default_backend()
  if platform == "cuda":
    platform = "gpu"
  return platform != kernel_platform
