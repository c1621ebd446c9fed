"""Sharded heads and lm_head on 8 fake CPU devices == the unsharded math."""

from __future__ import annotations

import contextlib
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medusa_jax.config import MedusaConfig
from medusa_jax.heads.sharded import (MEDUSA_RULES, HeadsSharding, sharded_segmented_matmul,
                                      v2_heads_hidden_segmented, vocab_parallel_lm_head)
from medusa_jax.models.llama_sharding import (LLAMA_RULES, cache_spec, llama_rules,
                                              load_llama_sharded, shard_cache, shard_llama)
from medusa_jax.parallel.mesh import make_mesh, partition_specs, place, shard_batch
from medusa_jax.errors import MissingTensorError, SegmentError, ShardingError, TensorShapeError
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.pallas import segmented_matmul

MESHES = [(1, 8), (2, 4), (8, 1)]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations inside the block."""
  seen = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == COMPILE_EVENT:
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _cfg(n, layers=1):
  return MedusaConfig(base_model_name_or_path="test", medusa_num_heads=n,
                      medusa_num_layers=layers, version=2.0)


def _silu(v):
  return v / (1.0 + np.exp(-v))


def _v2_model(rng, hidden, n, dtype=jnp.float32, max_batch_size=None):
  model = MedusaModel(_cfg(n), hidden, rngs=nnx.Rngs(0), param_dtype=dtype,
                      max_batch_size=max_batch_size)
  model.medusa.kernel[...] = jnp.asarray(rng.standard_normal((hidden, n, hidden)) * 0.3, dtype)
  model.medusa.bias[...] = jnp.asarray(rng.standard_normal((n, hidden)), dtype)
  return model


def _v1_model(rng, hidden, vocab, n, layers):
  model = MedusaModel(_cfg(n, layers), hidden, vocab, per_head_lm_head=True, rngs=nnx.Rngs(0))
  for head in model.medusa.heads:
    for block in head.blocks:
      block.kernel[...] = jnp.asarray(rng.standard_normal((hidden, hidden)) * 0.3, jnp.float32)
      block.bias[...] = jnp.asarray(rng.standard_normal((hidden,)), jnp.float32)
    head.out[...] = jnp.asarray(rng.standard_normal((hidden, vocab)), jnp.float32)
  return model


def _v2_reference(x, kernel, bias, lm, n):
  """float64: (logits [N, V], spec [N, n, V]) of LoRAX's MedusaV2."""
  x, kernel, bias, lm = (np.asarray(a, np.float64) for a in (x, kernel, bias, lm))
  hidden = x.shape[1]
  kernel, bias = kernel.reshape(hidden, -1), bias.reshape(-1)  # LoRAX's fused [H, n*H]
  y = (x @ kernel + bias).reshape(x.shape[0], n, hidden)
  h = x[:, None, :] + _silu(y)
  stacked = np.concatenate([x[:, None, :], h], axis=1)
  logits3 = stacked @ lm
  return logits3[:, 0], logits3[:, 1:]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _forward(model, lm_weight, x, mesh, *, transposed=False):
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, w, x):
    return nnx.merge(graphdef, state)(x, vocab_parallel_lm_head(w, transposed=transposed))

  return fwd, state, fwd(state, lm_weight, x)


def _collectives(compiled_text):
  return re.findall(r"= [^=]*? (all-gather|all-reduce|all-to-all|collective-permute|"
                    r"reduce-scatter)\(", compiled_text)


# ------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize("data,model", MESHES)
def test_make_mesh_shapes(data, model):
  mesh = make_mesh(data, model)
  assert dict(mesh.shape) == {"data": data, "model": model}
  assert mesh.axis_names == ("data", "model")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_model_defaults_to_remaining_devices():
  assert dict(make_mesh(2).shape) == {"data": 2, "model": 4}
  assert dict(make_mesh(1, 2, devices=jax.devices()[:2]).shape) == {"data": 1, "model": 2}


@pytest.mark.parametrize("data,model,match", [
    (3, None, "axis 'data' of size 3 does not divide the 8 devices"),
    (3, 3, r"\(data=3, model=3\) needs 9 devices, got 8"),
    (0, 8, "expected positive sizes"),
])
def test_make_mesh_errors(data, model, match):
  with pytest.raises(ShardingError, match=match):
    make_mesh(data, model)


# --------------------------------------------------------------------------- rules


def test_medusa_rules_specs():
  r = MEDUSA_RULES
  assert r.spec("medusa/kernel") == P(None, None, "model")
  assert r.spec("medusa/bias") == P(None, "model")
  assert r.spec("medusa/heads/2/blocks/0/kernel") == P(None, "model")
  assert r.spec("medusa/heads/2/blocks/1/bias") == P("model")
  assert r.spec("medusa/heads/0/out") == P(None, "model")
  assert r.spec("something/else") == P()


def test_llama_rules_specs():
  r = LLAMA_RULES
  for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
    assert r.spec(f"layers/3/{name}/kernel") == P(None, "model")
  for name in ("o_proj", "down_proj"):
    assert r.spec(f"layers/0/{name}/kernel") == P("model", None)
  assert r.spec("embed_tokens/embedding") == P("model", None)
  assert r.spec("lm_head/kernel") == P(None, "model")
  assert r.spec("layers/0/input_norm/scale") == P()


def test_partition_specs_v1_state_and_error():
  rng = np.random.default_rng(1)
  model = _v1_model(rng, 16, 24, 2, 2)
  _, state = nnx.split(model)
  mesh = make_mesh(1, 8)
  specs = jax.tree_util.tree_leaves(partition_specs(state, MEDUSA_RULES, mesh),
                                    is_leaf=lambda s: isinstance(s, P))
  assert specs.count(P(None, "model")) == 2 * 2 + 2 and specs.count(P("model")) == 4
  with pytest.raises(ShardingError,
                     match=r"medusa/heads/0/out: dim 1 of size 20 is not divisible by mesh "
                           r"axis 'model' of size 8"):
    partition_specs(nnx.split(_v1_model(rng, 16, 20, 2, 1))[1], MEDUSA_RULES, mesh)


# -------------------------------------------------------------------------- placing


def test_place_reads_each_block_not_the_whole_array():
  rng = np.random.default_rng(2)
  full = rng.standard_normal((6, 16)).astype(np.float32)
  mesh = make_mesh(2, 4)
  reads = []

  def read(index):
    reads.append(tuple((s.start, s.stop) for s in index))
    return full[index]

  arr = place(read, P(None, "model"), mesh, shape=full.shape, dtype=jnp.bfloat16)
  assert arr.dtype == jnp.bfloat16 and arr.sharding.spec == P(None, "model")
  np.testing.assert_array_equal(np.asarray(arr, np.float32),
                                full.astype(jnp.bfloat16).astype(np.float32))
  # 4 distinct column blocks, each read once although 2 devices hold each.
  assert sorted(reads) == [((0, 6), (c, c + 4)) for c in range(0, 16, 4)]


def test_place_errors():
  mesh = make_mesh(1, 8)
  with pytest.raises(ShardingError, match="a callable source needs shape= and dtype="):
    place(lambda i: None, P(None, "model"), mesh)
  with pytest.raises(ShardingError, match=r"lm_head: dim 1 of size 12 is not divisible by mesh "
                                          r"axis 'model' of size 8"):
    place(np.random.default_rng(0).standard_normal((4, 12)), P(None, "model"), mesh,
             what="lm_head")
  with pytest.raises(ShardingError, match="spec .* has 3 entries for a rank-2 array"):
    place(np.random.default_rng(0).standard_normal((4, 8)), P(None, None, "model"), mesh)


def test_shard_batch_over_data():
  mesh = make_mesh(2, 4)
  ids = np.random.default_rng(3).integers(0, 100, (4, 5))
  arr = shard_batch(ids, mesh)
  assert arr.sharding.spec == P("data", None)
  np.testing.assert_array_equal(np.asarray(arr), ids)
  with pytest.raises(ShardingError, match="batch: dim 0 of size 3 is not divisible by mesh "
                                          "axis 'data' of size 2"):
    shard_batch(ids[:3], mesh)


# ------------------------------------------------------------------------- V2 heads


@pytest.mark.parametrize("data,model", MESHES)
def test_v2_sharded_matches_unsharded(data, model):
  rng = np.random.default_rng(10 + model)
  hidden, vocab, n, rows = 16, 64, 3, 4
  mesh = make_mesh(data, model)
  ref_model = _v2_model(rng, hidden, n)
  lm = rng.standard_normal((hidden, vocab)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)

  sharded = ref_model.shard(mesh)
  # Device d holds columns d*H/W:(d+1)*H/W of every head (LoRAX's layout).
  kernel_hnh = np.asarray(ref_model.medusa.kernel[...]).reshape(hidden, n, hidden)
  width = hidden // model
  for shard in sharded.medusa.kernel[...].addressable_shards:
    d = mesh.devices.flatten().tolist().index(shard.device) % model
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  kernel_hnh[:, :, d * width:(d + 1) * width])

  fwd, state, (logits, spec) = _forward(sharded, place(lm, P(None, "model"), mesh), x, mesh)
  want_logits, want_spec = _v2_reference(x, ref_model.medusa.kernel[...],
                                         ref_model.medusa.bias[...], lm, n)
  assert logits.shape == (rows, vocab) and spec.shape == (rows, n, vocab)
  assert _rel(logits, want_logits) < 1e-5 and _rel(spec, want_spec) < 1e-5
  base_logits, base_spec = ref_model(x, lambda h: jnp.einsum("...h,hv->...v", h, lm))
  np.testing.assert_allclose(spec, base_spec, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(logits, base_logits, rtol=1e-5, atol=1e-4)
  # Logits stay split over the vocabulary.
  assert model == 1 or spec.sharding.spec[-1] == "model"


def test_v2_collective_pattern_is_one_all_gather():
  """LoRAX's order (the ALL_GATHER option); the default RING: test_lm_head_ring.py."""
  rng = np.random.default_rng(11)
  mesh = make_mesh(1, 8)
  model = _v2_model(rng, 16, 4).shard(mesh, lm_head_collective="all_gather")
  lm = place(rng.standard_normal((16, 64)).astype(np.float32), P(None, "model"), mesh)
  x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
  fwd, state, _ = _forward(model, lm, x, mesh)
  text = fwd.lower(state, lm, x).compile().as_text()
  assert _collectives(text) == ["all-gather"]
  gather = [l for l in text.splitlines() if " all-gather(" in l][0]
  assert "f32[8,4,16]" in gather  # [N, n, H]: the heads' hidden, not the logits


def test_v2_bf16_and_tied_embedding_lm_head():
  rng = np.random.default_rng(12)
  hidden, vocab, n = 32, 64, 4
  mesh = make_mesh(2, 4)
  ref_model = _v2_model(rng, hidden, n, dtype=jnp.bfloat16)
  emb = rng.standard_normal((vocab, hidden)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((6, hidden)), jnp.bfloat16)
  sharded = ref_model.shard(mesh)
  assert sharded.medusa.kernel[...].dtype == jnp.bfloat16
  emb_sharded = place(emb, P("model", None), mesh, dtype=jnp.bfloat16)
  _, _, (logits, spec) = _forward(sharded, emb_sharded, x, mesh, transposed=True)
  want_logits, want_spec = _v2_reference(
      np.asarray(x, np.float32), np.asarray(ref_model.medusa.kernel[...], np.float32),
      np.asarray(ref_model.medusa.bias[...], np.float32),
      emb.astype(jnp.bfloat16).astype(np.float32).T, n)
  assert _rel(logits, want_logits) < 1e-2 and _rel(spec, want_spec) < 1e-2


def test_v2_max_batch_guard_skips_heads():
  rng = np.random.default_rng(13)
  mesh = make_mesh(1, 8)
  ref_model = _v2_model(rng, 16, 2, max_batch_size=4)
  sharded = ref_model.shard(mesh)
  assert sharded.medusa.max_batch_size == 4 and sharded.is_v2 and sharded.num_heads == 2
  assert sharded.hidden_size == 16
  lm = rng.standard_normal((16, 8)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
  _, _, (logits, spec) = _forward(sharded, place(lm, P(None, "model"), mesh), x, mesh)
  assert spec is None
  np.testing.assert_allclose(logits, np.asarray(x, np.float64) @ lm, rtol=1e-5, atol=1e-5)


def test_v2_sharded_arrays_round_trip():
  rng = np.random.default_rng(14)
  ref_model = _v2_model(rng, 16, 3)
  placed = ref_model.shard(make_mesh(1, 8)).medusa
  assert type(placed) is type(ref_model.medusa) and placed.tensor_parallel
  kernel, bias = jax.device_get((placed.kernel[...], placed.bias[...]))
  np.testing.assert_array_equal(kernel, np.asarray(ref_model.medusa.kernel[...]))
  np.testing.assert_array_equal(bias, np.asarray(ref_model.medusa.bias[...]))


def test_v2_hidden_not_divisible_is_refused():
  rng = np.random.default_rng(15)
  with pytest.raises(ShardingError, match=r"V2 kernel \[H, n, H\]: dim 2 of size 12 is not "
                                          r"divisible by mesh axis 'model' of size 8"):
    _v2_model(rng, 12, 2).shard(make_mesh(1, 8))


# ------------------------------------------------------------------------- V1 heads


@pytest.mark.parametrize("data,model", MESHES)
def test_v1_sharded_matches_unsharded(data, model):
  rng = np.random.default_rng(20 + model)
  hidden, vocab, n, layers = 16, 32, 2, 2
  mesh = make_mesh(data, model)
  ref_model = _v1_model(rng, hidden, vocab, n, layers)
  x = jnp.asarray(rng.standard_normal((4, hidden)), jnp.float32)
  lm = rng.standard_normal((hidden, vocab)).astype(np.float32)
  want_logits, want_spec = ref_model(x, lambda h: jnp.einsum("...h,hv->...v", h, lm))
  sharded = ref_model.shard(mesh)
  assert sharded.medusa.heads[0].out[...].sharding.spec == P(None, "model")
  _, _, (logits, spec) = _forward(sharded, place(lm, P(None, "model"), mesh), x, mesh)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(spec, want_spec, rtol=1e-5, atol=1e-4)
  # float64 check of one head.
  h = np.asarray(x, np.float64)
  for block in ref_model.medusa.heads[1].blocks:
    h = h + _silu(h @ np.asarray(block.kernel[...], np.float64) + np.asarray(block.bias[...]))
  assert _rel(spec[:, 1], h @ np.asarray(ref_model.medusa.heads[1].out[...], np.float64)) < 1e-5


def test_v1_heads_built_sharded_under_set_mesh():
  mesh = make_mesh(2, 4)
  with jax.set_mesh(mesh):
    model = MedusaModel(_cfg(2, 2), 16, 32, rngs=nnx.Rngs(0), shd=HeadsSharding.tensor_parallel())
  head = model.medusa.heads[1]
  assert head.out[...].sharding.spec == P(None, "model")
  assert head.blocks[0].kernel[...].sharding.spec == P(None, "model")
  assert head.blocks[0].bias[...].sharding.spec == P("model")


# ------------------------------------------------------------------------- compiles


def test_one_compilation_per_shape():
  rng = np.random.default_rng(30)
  mesh = make_mesh(2, 4)
  sharded = _v2_model(rng, 16, 3).shard(mesh)
  lm = place(rng.standard_normal((16, 32)).astype(np.float32), P(None, "model"), mesh)
  graphdef, state = nnx.split(sharded)
  fwd = jax.jit(lambda s, w, x: nnx.merge(graphdef, s)(x, vocab_parallel_lm_head(w)))
  inputs = [shard_batch(rng.standard_normal((rows, 16)).astype(np.float32), mesh)
            for rows in (4, 4, 4, 8, 8)]
  with count_compiles() as compiles:
    for x in inputs:
      jax.block_until_ready(fwd(state, lm, x))
  assert len(compiles) == 2  # one per row count


# ---------------------------------------------------------------- segmented matmul


def _segments(rng, rows, adapters):
  """Segments covering [0, rows) with an empty and a single-row one; last row uncovered."""
  cuts = sorted(rng.choice(np.arange(1, rows - 2), size=2, replace=False).tolist())
  starts = [0, cuts[0], cuts[0], cuts[1], cuts[1] + 1]
  ends = [cuts[0], cuts[0], cuts[1], cuts[1] + 1, rows - 1]
  weights = rng.integers(0, adapters, size=len(starts))
  return (jnp.asarray(starts, jnp.int32), jnp.asarray(ends, jnp.int32),
          jnp.asarray(weights, jnp.int32))


def _segmented_case(rng, rows, k, m, adapters):
  """x [rows, K], w [A, K, M], b [A, M], segments and the float64 segmented product."""
  x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
  w = rng.standard_normal((adapters, k, m)).astype(np.float32)
  b = rng.standard_normal((adapters, m)).astype(np.float32)
  segments = _segments(rng, rows, adapters)
  want = np.zeros((rows, m))
  for a, z, i in zip(*map(np.asarray, segments)):
    want[a:z] = np.asarray(x, np.float64)[a:z] @ w[i] + b[i]
  return x, w, b, segments, want


@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_segmented_matmul(data, model):
  rng = np.random.default_rng(40 + data)
  mesh = make_mesh(data, model)
  x, w, b, (s0, s1, sw), want = _segmented_case(rng, rows=8, k=12, m=16, adapters=3)
  w_s = place(w, P(None, None, "model"), mesh)
  b_s = place(b, P(None, "model"), mesh)
  fn = jax.jit(lambda *a: sharded_segmented_matmul(*a, mesh=mesh, backend="reference"))
  got = fn(x, w_s, b_s, s0, s1, sw)
  assert _rel(got, want) < 1e-5
  assert model == 1 or got.sharding.spec[1] == "model"
  nobias = jax.jit(lambda *a: sharded_segmented_matmul(a[0], a[1], None, *a[2:], mesh=mesh))
  want_nobias = jax.jit(lambda *a: segmented_matmul(a[0], a[1], None, *a[2:]))
  np.testing.assert_allclose(nobias(x, w_s, s0, s1, sw), want_nobias(x, w, s0, s1, sw),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["ragged_dot", "pallas_gpu", "pallas_tpu"])
def test_sharded_segmented_matmul_backends(backend):
  """Opaque kernels (interpret mode here) under shard_map, rows over data, M over model."""
  rng = np.random.default_rng(42)
  mesh = make_mesh(2, 4)
  x, w, b, (s0, s1, sw), want = _segmented_case(rng, rows=8, k=16, m=32, adapters=3)
  got = jax.jit(lambda *a: sharded_segmented_matmul(*a, mesh=mesh, backend=backend))(
      x, place(w, P(None, None, "model"), mesh), place(b, P(None, "model"), mesh),
      s0, s1, sw)
  assert _rel(got, want) < 1e-5


def test_sharded_segmented_matmul_refuses_epilogue_and_bad_width():
  mesh = make_mesh(1, 8)
  rng = np.random.default_rng(41)
  x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
  s = jnp.asarray([0], jnp.int32), jnp.asarray([4], jnp.int32), jnp.asarray([0], jnp.int32)
  w = jnp.asarray(rng.standard_normal((1, 8, 16)), jnp.float32)
  with pytest.raises(ShardingError, match="epilogue='resblock': a fused epilogue needs whole rows"):
    sharded_segmented_matmul(x, w, None, *s, mesh=mesh, epilogue="resblock")
  with pytest.raises(SegmentError, match="epilogue='bogus'"):
    sharded_segmented_matmul(x, w, None, *s, mesh=mesh, epilogue="bogus")
  with pytest.raises(ShardingError, match="dim 2 of size 12 is not divisible by mesh axis "
                                          "'model' of size 8"):
    sharded_segmented_matmul(x, w[:, :, :12], None, *s, mesh=mesh)


def test_v2_segments_with_empty_and_uncovered_rows():
  """Custom layouts: an empty and a single-row segment, an uncovered last row, rows over data."""
  rng = np.random.default_rng(50)
  hidden, n, rows, adapters = 16, 2, 8, 3
  mesh = make_mesh(2, 4)
  models = [_v2_model(rng, hidden, n) for _ in range(adapters)]
  w = jnp.stack([m.medusa.kernel[...] for m in models])      # [A, H, n, H]
  b = jnp.stack([m.medusa.bias[...] for m in models])        # [A, n, H]
  s0, s1, sw = _segments(rng, rows, adapters)
  x = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)
  w_s = place(np.asarray(w), P(None, None, None, "model"), mesh)
  b_s = place(np.asarray(b), P(None, None, "model"), mesh)
  got = jax.jit(lambda *a: v2_heads_hidden_segmented(*a, mesh=mesh, backend="reference"))(
      x, w_s, b_s, s0, s1, sw)
  want = np.zeros((rows, n, hidden))
  for a, z, i in zip(np.asarray(s0), np.asarray(s1), np.asarray(sw)):
    for r in range(a, z):
      xr = np.asarray(x[r], np.float64)
      y = np.einsum("h,hkm->km", xr, np.asarray(w[i], np.float64)) + np.asarray(b[i])
      want[r] = xr[None, :] + _silu(y)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got[rows - 1]), np.zeros((n, hidden)))


@pytest.mark.parametrize("data,model,backend,layers", [
    (1, 8, "pallas_gpu", 1), (2, 4, "pallas_tpu", 1), (8, 1, "reference", 1),
    (2, 4, "reference", 2)])  # V1 runs four kernels per head: one mesh keeps CI short
def test_mixed_adapter_batch_over_mesh_loaded_adapters(data, model, backend, layers):
  """BatchMedusaWeights over adapters placed on a mesh (V2 and V1), Pallas kernels in
  interpret mode under shard_map, equals the unsharded batch row for row."""
  from medusa_jax.adapters.weights import MedusaWeights
  from medusa_jax.heads.routed import BatchMedusaWeights
  rng = np.random.default_rng(55 + model + layers)
  hidden, vocab, n, rows = 16, 32, 2, 8
  mesh = make_mesh(data, model)
  make = ((lambda: _v2_model(rng, hidden, n)) if layers == 1
          else (lambda: _v1_model(rng, hidden, vocab, n, layers)))
  adapters = {i: MedusaWeights(_cfg(n, layers), make()) for i in (0, 2, 5)}
  ids = rng.choice([0, 1, 2, 5], size=rows)  # id 1 has no heads: the default's
  lm = rng.standard_normal((hidden, vocab)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)
  batch = BatchMedusaWeights.load(adapters, ids, backend="reference")
  want_logits, want_spec = jax.jit(
      lambda bt, x: bt(x, lambda h: jnp.einsum("...h,hv->...v", h, lm)))(batch, x)
  on_mesh = BatchMedusaWeights.load({i: w.shard(mesh) for i, w in adapters.items()}, ids,
                                    backend=backend)
  assert on_mesh.mesh is mesh
  logits, spec = jax.jit(lambda bt, wl, x: bt(x, vocab_parallel_lm_head(wl)))(
      on_mesh, place(lm, P(None, "model"), mesh), x)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(spec, want_spec, rtol=1e-5, atol=1e-4)
  for r, adapter in enumerate(ids):
    m = adapters.get(int(adapter), adapters[0]).model
    _, want_row = m(x[r:r + 1], lambda h: jnp.einsum("...h,hv->...v", h, lm))
    assert _rel(spec[r:r + 1], want_row) < 1e-5
  # The first issue case: one mesh-loaded adapter, routed.
  single = BatchMedusaWeights.load({0: adapters[0].shard(mesh)}, [0])
  _, spec0 = single(x[:1], vocab_parallel_lm_head(place(lm, P(None, "model"), mesh)))
  np.testing.assert_allclose(spec0, adapters[0].model(
      x[:1], lambda h: jnp.einsum("...h,hv->...v", h, lm))[1], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------ Auto and Explicit meshes


@pytest.mark.parametrize("shape,axis_type,layers", [
    ((1, 8), "auto", 1), ((2, 4), "auto", 1), ((1, 8), "explicit", 1), ((2, 4), "explicit", 1),
    ((2, 4), "explicit", 2), ((1, 8), "auto", 2)])
def test_heads_on_meshes_made_by_jax_make_mesh(tmp_path, shape, axis_type, layers):
  """``load_medusa_adapter(dir, mesh=jax.make_mesh(...))`` then ``w.model(x, lm_head)``
  with an unsharded ``x``, eager and jitted, on Auto and Explicit axes, equals the
  unsharded heads."""
  from medusa_jax.adapters.weights import load_medusa_adapter
  from safetensors.numpy import save_file
  from medusa_files import head_tensors
  kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
  mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(kind[axis_type],) * 2)
  rng = np.random.default_rng(60 + shape[0] + layers)
  hidden, vocab = 16, 32
  save_file(head_tensors(rng, n=3, hidden=hidden, layers=layers,
                         vocab=None if layers == 1 else vocab),
            str(tmp_path / "model.safetensors"))
  _cfg(3, layers).save(str(tmp_path))
  plain = load_medusa_adapter(tmp_path)
  sharded = load_medusa_adapter(tmp_path, mesh=mesh)
  lm = rng.standard_normal((hidden, vocab)).astype(np.float32)

  def lm_head(h):
    return jnp.einsum("...h,hv->...v", h, jnp.asarray(lm))

  for rows in (4, 3):  # 3 rows do not divide the data axis of a 2 x 4 mesh
    x = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)
    want_logits, want_spec = plain.model(x, lm_head)
    logits, spec = sharded.model(x, lm_head)  # eager
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spec, want_spec, rtol=1e-5, atol=1e-5)
    # Jitted: on Explicit axes JAX wants the mesh in context (jax.set_mesh) to lay out
    # the outputs; on Auto axes it is optional.
    with jax.set_mesh(mesh) if axis_type == "explicit" else contextlib.nullcontext():
      spec = jax.jit(lambda x: sharded.model(x, lm_head)[1])(x)
    np.testing.assert_allclose(spec, want_spec, rtol=1e-5, atol=1e-5)
  # Inputs already split over data are accepted too.
  if shape[0] > 1:
    x = jax.device_put(jnp.asarray(rng.standard_normal((4, hidden)), jnp.float32),
                       jax.sharding.NamedSharding(mesh, P("data", None)))
    np.testing.assert_allclose(sharded.model(x, lm_head)[1], plain.model(x, lm_head)[1],
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ base model and engine


def _tiny_cfg(**overrides):
  from medusa_jax.models.llama import LlamaConfig
  # 8 query heads (one per device on model=8), 2 kv heads (replicated there).
  base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=8,
              num_key_value_heads=2, head_dim=4, eos_token_ids=())
  return LlamaConfig.tiny(**{**base, **overrides})


def _tiny_llama(seed=0, **overrides):
  from medusa_jax.models.llama import Llama
  return Llama(_tiny_cfg(**overrides), rngs=nnx.Rngs(seed))


def test_llama_rules_and_errors():
  llama = _tiny_llama()
  mesh = make_mesh(1, 8)
  rules = llama_rules(llama.cfg, mesh)
  assert rules.spec("layers/0/self_attn/k_proj/kernel") == P()  # 2 kv heads < 8 devices
  assert rules.spec("layers/0/self_attn/q_proj/kernel") == P(None, "model")
  assert llama_rules(llama.cfg, make_mesh(4, 2)).spec(
      "layers/0/self_attn/k_proj/kernel") == P(None, "model")
  assert cache_spec(llama.cfg, 4, make_mesh(2, 4)) == P("data", None, None, None)
  assert cache_spec(llama.cfg, 3, make_mesh(4, 2)) == P(None, None, "model", None)
  sharded = shard_llama(llama, mesh)
  assert sharded.layers[1].mlp.down_proj.kernel[...].sharding.spec == P("model", None)
  assert sharded.embed_tokens[...].sharding.spec == P("model", None)
  assert sharded.lm_head_kernel[...].sharding.spec == P(None, "model")
  # The rules are written for [in, out] kernels: an out_in model is converted first.
  back = shard_llama(llama.with_kernel_layout("out_in"), mesh)
  assert back.kernel_layout == "in_out"
  assert back.layers[1].mlp.down_proj.kernel[...].sharding.spec == P("model", None)
  np.testing.assert_array_equal(np.asarray(back.layers[1].mlp.down_proj.kernel[...]),
                                np.asarray(llama.layers[1].mlp.down_proj.kernel[...]))
  with pytest.raises(ShardingError, match="num_attention_heads=4 is not divisible by mesh axis "
                                          "'model' of size 8"):
    llama_rules(_tiny_cfg(num_attention_heads=4, num_key_value_heads=2, head_dim=8), mesh)
  with pytest.raises(ShardingError, match="embed_tokens: dim 0 of size 100 is not divisible"):
    shard_llama(_tiny_llama(vocab_size=100, num_hidden_layers=1), mesh)


def test_load_llama_sharded(tmp_path):
  import json
  from safetensors.numpy import save_file
  llama = _tiny_llama(seed=3, tie_word_embeddings=True)
  cfg = llama.cfg
  hf = dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=True, max_position_embeddings=256, eos_token_id=2)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  from medusa_jax.models.llama_weights import hf_param_names, param_at
  tensors = {}
  for name, (path, transpose) in hf_param_names(cfg).items():
    value = np.asarray(param_at(llama, path)[...])
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  mesh = make_mesh(2, 4)
  loaded = load_llama_sharded(tmp_path, mesh)
  assert loaded.layers[0].self_attn.o_proj.kernel[...].sharding.spec == P("model", None)
  for name, (path, _) in hf_param_names(cfg).items():
    np.testing.assert_array_equal(np.asarray(param_at(loaded, path)[...]),
                                  np.asarray(param_at(llama, path)[...]), err_msg=name)
  bad = dict(tensors)
  bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"][:, :8]
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(TensorShapeError, match=r"up_proj.weight: expected shape \(64, 32\), got "
                                             r"\(64, 8\)"):
    load_llama_sharded(tmp_path, mesh)
  del tensors["model.norm.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(MissingTensorError, match="missing tensor model.norm.weight"):
    load_llama_sharded(tmp_path, mesh)


def _random_heads(llama, n, seed):
  rng = np.random.default_rng(seed)
  return _v2_model(rng, llama.cfg.hidden_size, n)


@pytest.fixture(scope="module")
def decode_case():
  """A 1-layer model, random V2 heads, 8 prompts and the unsharded run's outputs."""
  from medusa_jax.decoding.decoder import Decoder
  from medusa_jax.decoding.state import StepConfig
  from medusa_jax.decoding.tree import build_tree, chain_choices
  from medusa_jax.decoding.strategies import Greedy
  rng = np.random.default_rng(70)
  llama = _tiny_llama(seed=1, num_hidden_layers=1)
  heads = _random_heads(llama, 3, 71)
  config = StepConfig(tree=build_tree(chain_choices(3)), strategy=Greedy())
  rows, width = 8, 8
  inputs = (rng.integers(3, 128, (rows, width)).astype(np.int32),
            rng.integers(2, width + 1, rows).astype(np.int32),
            np.full(rows, 16, np.int32), np.zeros(rows, bool))
  case = types.SimpleNamespace(llama=llama, heads=heads, config=config, inputs=inputs)
  case.run = functools.partial(_prefill_and_step, case)
  case.want = case.run(Decoder(llama, heads), lambda a, kind=None: a)
  return case


def _prefill_and_step(case, dec, put):
  from medusa_jax.models.llama import KVCache
  cache = put(KVCache.init(case.llama.cfg, 8, 64), "cache")
  state, out0 = dec.prefill(cache, *map(put, case.inputs), jax.random.PRNGKey(0),
                            config=case.config)
  state, out1 = dec.step(state, config=case.config)
  state, out2 = dec.step(state, config=case.config)
  return jax.device_get((out0.tokens, out1.tokens, out1.accept_len, out2.tokens, state.lengths,
                         state.tokens))


@pytest.mark.parametrize("data,model", MESHES)
def test_decode_step_sharded_matches_unsharded(decode_case, data, model):
  """Prefill + two speculative steps, batch over data, weights and cache sharded."""
  from medusa_jax.decoding.decoder import Decoder
  mesh = make_mesh(data, model)
  cfg = decode_case.llama.cfg
  put = (lambda a, kind=None: shard_cache(a, cfg, mesh) if kind == "cache"
         else shard_batch(a, mesh))
  dec = Decoder(shard_llama(decode_case.llama, mesh),
                decode_case.heads.shard(mesh))
  got = decode_case.run(dec, put)
  for g, w in zip(got, decode_case.want):
    np.testing.assert_array_equal(g, w)
  # Two speculative steps, one trace: every jitted step compiled once for this shape.
  assert dec.trace_counts["speculative"] == 1 and set(dec.trace_counts.values()) == {1}


def test_greedy_generation_sharded_matches_unsharded():
  from medusa_jax.decoding.engine import Engine
  rng = np.random.default_rng(80)
  llama = _tiny_llama(seed=2, num_hidden_layers=1)
  heads = _random_heads(llama, 2, 81)
  prompts = [rng.integers(3, 128, size).tolist() for size in (3, 6)]
  # Tree speculation: top-k over vocabulary-split draft logits builds the candidates.
  want = Engine(llama, None, heads, max_cache_len=64, max_tree_rows=64).generate(
      prompts, max_new_tokens=6, speculate="tree")
  mesh = make_mesh(1, 8)
  eng = Engine(shard_llama(llama, mesh), None, heads.shard(mesh),
               max_cache_len=64, max_tree_rows=64)
  got = eng.generate(prompts, max_new_tokens=6, speculate="tree")
  assert got.tree_nodes > 3
  assert got.tokens == want.tokens and all(len(t) == 6 for t in got.tokens)
  assert got.steps == want.steps


def test_engine_load_on_a_mesh_matches_unsharded(tmp_path):
  """Engine.load(mesh=) reads the model and adapter onto the mesh and splits batches over data."""
  import tiny_model
  from medusa_jax.decoding.engine import Engine
  model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
  tiny_model.make_tiny_llama_dir(model_dir, seed=3)
  tiny_model.make_tiny_adapter_dir(adapter_dir, num_heads=2)
  rng = np.random.default_rng(90)
  prompts = [rng.integers(3, 200, size).tolist() for size in (2, 5, 4)]
  want = Engine.load(model_dir, adapter_dir, max_cache_len=64).generate(
      prompts, max_new_tokens=5, speculate="tree")
  mesh = make_mesh(8, 1)
  eng = Engine.load(model_dir, adapter_dir, max_cache_len=64, mesh=mesh)
  embed = eng.llama.embed_tokens.get_value()
  assert embed.sharding.mesh.shape == mesh.shape
  got = eng.generate(prompts, max_new_tokens=5, speculate="tree")
  assert got.tokens == want.tokens and got.steps == want.steps
