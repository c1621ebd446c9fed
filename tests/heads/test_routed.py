"""BatchMedusaWeights: mixed V2 and V1 batches against per-row float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_jax.heads.routed import BatchMedusaWeights, row_segments, slots_of
from medusa_jax.config import MedusaConfig
from medusa_jax.errors import AdapterLoadError, ArchitectureError, SegmentError
from medusa_jax.heads.modules import MedusaModel, fused_view

H, V, N_HEADS = 8, 24, 3


class _Weights:
  """The two attributes BatchMedusaWeights reads from a MedusaWeights."""

  def __init__(self, config, model):
    self.config = config
    self.model = model


def _adapter(seed: int, *, n: int = N_HEADS, layers: int = 1, per_head: bool = False,
             max_batch_size: int | None = None) -> _Weights:
  cfg = MedusaConfig(base_model_name_or_path="base", medusa_num_heads=n,
                     medusa_num_layers=layers, version=2.0)
  model = MedusaModel(cfg, H, V, per_head_lm_head=per_head, rngs=nnx.Rngs(params=seed),
                      max_batch_size=max_batch_size)
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[0]), a.dtype), state)
  return _Weights(cfg, nnx.merge(graphdef, state))


def _silu(y):
  return y / (1.0 + np.exp(-y))


def _f64(a):
  return np.asarray(a, np.float64)


def _row_reference(weights: _Weights, x_H: np.ndarray, lm_HxV: np.ndarray):
  """(logits [V], spec [n, V]) of one row through one adapter, float64."""
  medusa = weights.model.medusa
  logits = x_H @ lm_HxV
  if medusa.is_v2:
    y = x_H @ fused_view(_f64(medusa.kernel[...])) + _f64(medusa.bias[...]).reshape(-1)
    h = np.tile(x_H, N_HEADS) + _silu(y)
    return logits, h.reshape(N_HEADS, H) @ lm_HxV
  spec = []
  for head in medusa.heads:
    h = x_H
    for block in head.blocks:
      h = h + _silu(h @ _f64(block.kernel[...]) + _f64(block.bias[...]))
    spec.append(h @ _f64(head.out[...]))
  return logits, np.stack(spec)


def _check_rows(adapters, ids, x, logits, spec, lm):
  for r, adapter_id in enumerate(ids):
    w = adapters.get(int(adapter_id))
    if not hasattr(w, "model"):
      w = adapters[0]  # no Medusa heads of its own: the default's
    want_logits, want_spec = _row_reference(w, _f64(x[r]), _f64(lm))
    np.testing.assert_allclose(_f64(logits[r]), want_logits, rtol=1e-5, atol=1e-5)
    err = np.linalg.norm(_f64(spec[r]) - want_spec) / np.linalg.norm(want_spec)
    assert err < 1e-5, (r, adapter_id, err)


@pytest.fixture(scope="module")
def lm():
  return np.random.default_rng(99).standard_normal((H, V)).astype(np.float32)


# Ids: 0 default, 2 and 5 Medusa, 3 a non-Medusa adapter (e.g. LoRA only), 7 unknown.
DECODE_IDS = [2, 0, 3, 5, 7, 2, 2, 5]
PREFILL_IDS = [0, 5, 0]  # one row per request: LoRAX mis-routes exactly this case


@pytest.mark.parametrize("backend,ids", [("reference", DECODE_IDS), ("pallas_gpu", DECODE_IDS),
                                         ("pallas_gpu", PREFILL_IDS),
                                         ("ragged_dot", [0, 0, 0, 0])])
def test_mixed_v2_batch_matches_per_row(backend, ids, lm):
  adapters = {0: _adapter(1), 2: _adapter(2), 5: _adapter(3), 3: object()}
  batch = BatchMedusaWeights.load(adapters, ids, backend=backend)
  assert batch.num_adapters == 3 and batch.is_v2
  x = jnp.asarray(np.random.default_rng(len(ids)).standard_normal((len(ids), H)), jnp.float32)
  lm_head = lambda h: jnp.matmul(h, lm)
  logits, spec = jax.jit(lambda b, x: b(x, lm_head))(batch, x)
  assert logits.shape == (len(ids), V) and spec.shape == (len(ids), N_HEADS, V)
  _check_rows(adapters, ids, x, logits, spec, lm)
  if backend == "pallas_gpu" and ids is PREFILL_IDS:  # once without jit as well
    eager_logits, eager_spec = batch(x, lm_head)
    np.testing.assert_allclose(eager_spec, spec, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eager_logits, logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers,per_head,backend", [(2, False, "reference"),
                                                     (1, True, "pallas_gpu"),
                                                     (2, False, "pallas_tpu")])
def test_mixed_v1_batch_matches_per_row(layers, per_head, backend, lm):
  adapters = {i: _adapter(10 + i, layers=layers, per_head=per_head) for i in (0, 1, 4)}
  ids = [4, 0, 9, 1, 1, 4, 0]
  batch = BatchMedusaWeights.load(adapters, np.asarray(ids), backend=backend)
  assert not batch.is_v2
  x = jnp.asarray(np.random.default_rng(7).standard_normal((len(ids), H)), jnp.float32)
  logits, spec = jax.jit(lambda b, x: b(x, lambda h: jnp.matmul(h, lm)))(batch, x)
  _check_rows(adapters, ids, x, logits, spec, lm)


def test_traced_adapter_indices_inside_jit(lm):
  adapters = {0: _adapter(1), 2: _adapter(2), 5: _adapter(3)}
  ids = jnp.array([5, 5, 0, 2, 1], jnp.int32)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, H)), jnp.float32)

  @jax.jit
  def step(ids, x):
    batch = BatchMedusaWeights.load(adapters, ids, backend="reference")
    return batch(x, lambda h: jnp.matmul(h, lm))

  logits, spec = step(ids, x)
  _check_rows(adapters, ids.tolist(), x, logits, spec, lm)


def test_v2_max_batch_guard(lm):
  adapters = {0: _adapter(1, max_batch_size=4), 2: _adapter(2)}
  x = jnp.asarray(np.random.default_rng(2).standard_normal((5, H)), jnp.float32)
  batch = BatchMedusaWeights.load(adapters, [0, 2, 2, 0, 2], backend="reference")
  logits, spec = batch(x, lambda h: jnp.matmul(h, lm))
  assert spec is None
  np.testing.assert_allclose(_f64(logits), _f64(x) @ _f64(lm), rtol=1e-5, atol=1e-5)
  logits, spec = BatchMedusaWeights.load(adapters, [0, 2, 2, 0], backend="reference")(
      x[:4], lambda h: jnp.matmul(h, lm))
  assert spec is not None


def test_no_medusa_adapters_gives_none():
  assert BatchMedusaWeights.load({0: object(), 1: None}, [0, 1]) is None


def test_load_errors():
  with pytest.raises(AdapterLoadError, match="adapter 0 \\(the default\\): expected Medusa"):
    BatchMedusaWeights.load({1: _adapter(1)}, [1])
  with pytest.raises(AdapterLoadError, match="adapter 2: medusa_num_heads=2; expected 3"):
    BatchMedusaWeights.load({0: _adapter(1), 2: _adapter(2, n=2)}, [0, 2])
  with pytest.raises(AdapterLoadError, match="adapter 2: V1 heads; expected V2"):
    BatchMedusaWeights.load({0: _adapter(1), 2: _adapter(2, per_head=True)}, [0, 2])
  with pytest.raises(AdapterLoadError, match="adapter 2: head shapes"):
    BatchMedusaWeights.load({0: _adapter(1, layers=2), 2: _adapter(2, layers=3)}, [0, 2])
  with pytest.raises(SegmentError, match="adapter_indices: expected \\[N\\] integers"):
    BatchMedusaWeights.load({0: _adapter(1)}, [[0, 1]])
  with pytest.raises(SegmentError, match="backend='cuda'"):
    BatchMedusaWeights.load({0: _adapter(1)}, [0], backend="cuda")


def test_call_checks_x_shape(lm):
  batch = BatchMedusaWeights.load({0: _adapter(1)}, [0, 0, 0], backend="reference")
  with pytest.raises(SegmentError, match=r"x: expected \[3, 8\].*got \(2, 8\)"):
    batch(jnp.ones((2, H), jnp.float32), lambda h: jnp.matmul(h, lm))


def test_heads_hidden_always_drafts_above_the_guard(lm):
  """heads_hidden is the guard-free V2 path the speculative engine uses."""
  adapters = {0: _adapter(1, max_batch_size=2), 2: _adapter(2)}
  ids = [2, 0, 2, 2, 0]
  x = jnp.asarray(np.random.default_rng(3).standard_normal((5, H)), jnp.float32)
  batch = BatchMedusaWeights.load(adapters, ids, backend="reference")
  h_NxnxH = jax.jit(lambda b, x: b.heads_hidden(x))(batch, x)
  assert h_NxnxH.shape == (5, N_HEADS, H)
  for r, a in enumerate(ids):
    _, want_spec = _row_reference(adapters[a], _f64(x[r]), _f64(lm))
    got_spec = _f64(h_NxnxH[r]) @ _f64(lm)
    assert np.linalg.norm(got_spec - want_spec) / np.linalg.norm(want_spec) < 1e-5
  v1 = BatchMedusaWeights.load({0: _adapter(4, layers=2)}, [0, 0], backend="reference")
  with pytest.raises(ArchitectureError, match="V1"):
    v1.heads_hidden(x[:2])
  with pytest.raises(SegmentError, match=r"x: expected \[5, 8\]"):
    batch.heads_hidden(x[:3])


def test_row_segments_and_slots():
  s0, s1, s2 = row_segments(jnp.array([3, 0, 2]))
  assert s0.tolist() == [0, 1, 2] and s1.tolist() == [1, 2, 3] and s2.tolist() == [3, 0, 2]
  # Loaded ids in slot order: 0 (the default), 3, 2; id 1 has no weights -> slot 0.
  assert slots_of(jnp.array([3, 1, 2, 9, -1, 0]), (0, 3, 2)).tolist() == [1, 0, 2, 0, 0, 0]


@settings(max_examples=10, deadline=None)
@given(ids=st.lists(st.sampled_from([0, 1, 2, 5, 7, 10**9, -3]), min_size=1, max_size=9),
       seed=st.integers(0, 2**31 - 1))
def test_routing_property_each_row_uses_its_adapter(ids, seed):
  """Any mix of ids (unknown, huge, negative ones included): each row's heads are its
  adapter's own, or the default's when the id has no Medusa weights."""
  rng = np.random.default_rng(seed)
  adapters = {0: _adapter(seed % 97), 2: _adapter(seed % 89 + 1), 10**9: _adapter(3)}
  x = jnp.asarray(rng.standard_normal((len(ids), H)), jnp.float32)
  lm = rng.standard_normal((H, V)) / np.sqrt(H)
  batch = BatchMedusaWeights.load(adapters, [0] * len(ids), backend="reference")
  slots = slots_of(jnp.asarray(np.asarray(ids, np.int64).clip(-2**31, 2**31 - 1)),
                   batch.adapter_ids)
  _, spec = batch.logits_and_drafts(x, lambda h: jnp.matmul(h, jnp.asarray(lm, jnp.float32)),
                                    row_slot=slots)
  for r, a in enumerate(ids):
    _, want = _row_reference(adapters.get(a, adapters[0]), _f64(x[r]), _f64(lm))
    assert np.linalg.norm(_f64(spec[r]) - want) / np.linalg.norm(want) < 1e-5


def test_has_adapter_and_key_as_lorax():
  """LoRAX: ``key()`` is "medusa"; with a default Medusa adapter every adapter drafts."""
  batch = BatchMedusaWeights.load({0: _adapter(1), 2: _adapter(2)}, [0, 2])
  assert BatchMedusaWeights.key() == batch.key() == "medusa"
  assert batch.has_adapter(0) and batch.has_adapter(2) and batch.has_adapter(7)
  assert batch.adapter_ids == (0, 2)


def test_sparse_ids_cost_no_dense_table():
  """An adapter id of 10**9 maps through the loaded ids, not a [10**9] lookup table."""
  batch = BatchMedusaWeights.load({0: _adapter(1), 10**9: _adapter(2)}, [10**9, 0, 5])
  assert batch.row_slot.tolist() == [1, 0, 0]
  for bad in (-1, 2**31, 2**40):  # 2**40 would alias 0 as int32
    with pytest.raises(AdapterLoadError, match=rf"adapter id {bad}: expected an integer in"
                       r" \[0, 2147483647\]"):
      BatchMedusaWeights.load({0: _adapter(1), bad: _adapter(2)}, [0])
