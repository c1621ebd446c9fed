"""Sharded speculative decoding end to end: the engine and the serving core on fake-device meshes.

Token-for-token equality with the unsharded run in f32, through the RING
heads + LM head (the default of sharded V2 heads).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from medusa_jax.config import MedusaConfig
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.models.llama import Llama, LlamaConfig
from medusa_jax.models.llama_sharding import shard_llama
from medusa_jax.parallel.mesh import make_mesh


def _mesh(data, model):
  return make_mesh(data, model, devices=jax.devices()[:data * model])


def _model(seed, *, tied, heads=3):
  cfg = LlamaConfig.tiny(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, eos_token_ids=(), tie_word_embeddings=tied)
  llama = Llama(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 1)
  mcfg = MedusaConfig(base_model_name_or_path="test", medusa_num_heads=heads,
                      medusa_num_layers=1, version=2.0)
  medusa = MedusaModel(mcfg, 32, rngs=nnx.Rngs(0))
  medusa.medusa.kernel[...] = rng.standard_normal((32, heads, 32)).astype(np.float32) * 0.3
  medusa.medusa.bias[...] = rng.standard_normal((heads, 32)).astype(np.float32)
  return llama, medusa


@pytest.mark.parametrize("data,model,tied,transpose", [(1, 2, False, None), (2, 2, True, False)])
def test_tree_speculation_sharded_matches_unsharded(data, model, tied, transpose):
  """Tree speculation through Engine on a mesh: same tokens, same steps (f32).

  (2, 2) with a tied embedding read as ``[V, H]`` (``transpose_lm_head=False``):
  the ring over a transposed LM head.
  """
  from medusa_jax.decoding.engine import Engine
  llama, heads = _model(20 + data, tied=tied)
  rng = np.random.default_rng(30 + data)
  prompts = [rng.integers(3, 128, size).tolist() for size in (3, 6, 4)]
  kw = dict(max_cache_len=64, max_tree_rows=64, steps_per_call=2, transpose_lm_head=transpose)
  want = Engine(llama, None, heads, **kw).generate(prompts, max_new_tokens=6, speculate="tree")
  mesh = _mesh(data, model)
  eng = Engine(shard_llama(llama, mesh), None, heads.shard(mesh), mesh=mesh, **kw)
  got = eng.generate(prompts, max_new_tokens=6, speculate="tree")
  assert got.tree_nodes > 3
  assert got.tokens == want.tokens and all(len(t) == 6 for t in got.tokens)
  assert got.steps == want.steps


def test_slot_core_on_a_mesh_matches_unsharded():
  """SlotCore(mesh=): the slots' cache and rows placed on the mesh, the same tokens."""
  from medusa_jax.serving.slots import SlotCore, speculation_table
  llama, heads = _model(40, tied=False, heads=2)
  mesh = _mesh(2, 2)
  prompts = [[5, 9, 17], [33, 4, 8, 61, 2]]

  def run(core):
    state = core.init_state()
    firsts = []
    for slot, p in enumerate(prompts):
      prefix = core.prefill(p, max_new=6)
      firsts.append(jax.device_get(prefix.first.tokens))
      state = core.insert(prefix, state, slot)
    state, out = core.generate(state, greedy=True)
    return firsts, jax.device_get(out.tokens), jax.device_get(state.lengths)

  kw = dict(num_slots=2, cache_len=48, steps_per_call=2,
            table=speculation_table("tree", 2, heads.num_heads, max_tree_rows=8))
  want = run(SlotCore(llama, heads, **kw))
  core = SlotCore(shard_llama(llama, mesh), heads.shard(mesh), mesh=mesh, **kw)
  state = core.init_state()
  assert state.cache.k[0].sharding.spec[0] == "data"  # 2 slots over data = 2
  got = run(core)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


def test_the_pallas_attention_kernel_is_not_run_on_a_mesh():
  """XLA does not partition a Pallas call: on a mesh of several devices the engine and the
  serving core run FLAT attention (same parameters); on one device the kernel stays."""
  from medusa_jax.decoding.engine import Engine
  from medusa_jax.models.llama import AttentionScores
  from medusa_jax.models.llama_sharding import partitionable
  from medusa_jax.serving.slots import SlotCore, speculation_table
  llama, heads = _model(50, tied=False, heads=2)
  pallas = llama.with_attention_scores("pallas")
  mesh = _mesh(1, 2)
  assert partitionable(pallas, None) is pallas and partitionable(pallas, _mesh(1, 1)) is pallas
  assert partitionable(llama, mesh) is llama
  flat = partitionable(pallas, mesh)
  assert flat.attention_scores is AttentionScores.FLAT
  assert flat.layers[0].mlp.down_proj.kernel.get_value() is (
      pallas.layers[0].mlp.down_proj.kernel.get_value())
  rows = pallas.with_row_kernels(True)  # the row-projection kernels: off on the mesh too
  assert partitionable(rows, _mesh(1, 1)) is rows
  assert not partitionable(rows, mesh).row_kernels
  assert partitionable(rows, mesh).attention_scores is AttentionScores.FLAT
  sharded = shard_llama(pallas, mesh)
  eng = Engine(sharded, None, heads.shard(mesh), mesh=mesh, max_cache_len=32)
  assert eng.llama.attention_scores is AttentionScores.FLAT
  core = SlotCore(sharded, heads.shard(mesh), mesh=mesh, num_slots=2, cache_len=32,
                  steps_per_call=1, table=speculation_table("none", 2, 2, max_tree_rows=8))
  core_llama = nnx.merge(core.decoder.graphs.llama, core.decoder.params.llama)
  assert core_llama.attention_scores is AttentionScores.FLAT
