"""The model's Pallas GPU kernels lower to Triton IR for CUDA, checked on the CPU: JAX lowers
a program for a platform it does not run on (``jax.export`` with ``platforms=["cuda"]``), which
runs every Pallas-to-Triton lowering rule the kernels use. Triton's own compilation to PTX
needs a GPU and is not checked here.

SmolLM2-135M's layer shapes (bf16, two layers): the row kernels for one token (their
elementwise tiles) and for a tree's 4 nodes and a batch of 3 rows (tensor-core dots), in
both kernel layouts, the attention kernel in cache splits beside them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export

from medusa_jax.models.llama import KVCache, Llama, LlamaConfig
from medusa_jax.pallas import _compat

SMOLLM2_LAYERS = dict(vocab_size=512, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 4), (3, 1)])
def test_the_row_kernels_lower_for_cuda(monkeypatch, B, T, layout):
  monkeypatch.setattr(_compat, "default_interpret", lambda platform: False)
  cfg = LlamaConfig.tiny(**SMOLLM2_LAYERS)
  model = nnx.eval_shape(lambda: Llama(
      cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
      fused_projections=True, attention_scores="pallas", row_kernels=True,
      row_kernel_rows=64, kernel_layout=layout))
  graphdef, state = nnx.split(model)
  L = 256

  def forward(state, tokens, positions, cache, cache_index, mask):
    return nnx.merge(graphdef, state)(tokens, positions, cache, cache_index, mask)

  sds = jax.ShapeDtypeStruct
  cache = jax.eval_shape(lambda: KVCache.init(cfg, B, L, jnp.bfloat16))
  args = (state, sds((B, T), jnp.int32), sds((B, T), jnp.int32), cache, sds((B,), jnp.int32),
          sds((B, T, L), bool))
  exported = export.export(jax.jit(forward), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  text = exported.mlir_module()
  for kernel in ("row_qkv_projection", "decode_attention", "row_projection"):
    assert f'name = "{kernel}"' in text, kernel
