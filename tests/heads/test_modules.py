"""Medusa heads against float64 NumPy references (LoRAX semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medusa_jax.adapters.weights import MedusaWeights
from medusa_jax.config import MAX_BATCH_ENV, MedusaConfig, speculation_max_batch_size
from medusa_jax.errors import ArchitectureError, ConfigError
from medusa_jax.heads.modules import (MedusaHead, MedusaModel, MedusaV1, MedusaV2, ResBlock,
                                      fused_view, stack_heads, unstack_heads)
from medusa_jax.heads.protocol import Heads
from medusa_jax.heads.routed import BatchMedusaWeights
from medusa_jax.heads.sharded import HeadsSharding
from medusa_files import ref_resblock, ref_v1, ref_v2, rel_err

H, V = 16, 40
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _cfg(n: int, layers: int = 1) -> MedusaConfig:
  return MedusaConfig(base_model_name_or_path="base", medusa_num_heads=n,
                      medusa_num_layers=layers, version=2.0)


def _randomize(module: nnx.Module, rng: np.random.Generator) -> nnx.Module:
  """Replaces every parameter with fresh random values (scaled like a trained head)."""
  graphdef, state = nnx.split(module)

  def fill(a):
    scale = 1.0 / np.sqrt(a.shape[0]) if a.ndim >= 2 else 0.5
    return jnp.asarray(rng.standard_normal(a.shape) * scale).astype(a.dtype)

  return nnx.merge(graphdef, jax.tree.map(fill, state))


def _file_tensors(model: MedusaModel) -> dict[str, np.ndarray]:
  """The model's parameters in file layout ([out, in]) as float64, for the references."""
  medusa, out = model.medusa, {}
  if isinstance(medusa, MedusaV2):
    kernel = fused_view(np.asarray(medusa.kernel[...], np.float64))  # LoRAX's [H, n*H]
    bias = np.asarray(medusa.bias[...], np.float64).reshape(-1)
    for i in range(medusa.num_heads):
      out[f"{i}.0.linear.weight"] = kernel[:, i * H:(i + 1) * H].T
      out[f"{i}.0.linear.bias"] = bias[i * H:(i + 1) * H]
  else:
    for i, head in enumerate(medusa.heads):
      for j, block in enumerate(head.blocks):
        out[f"{i}.{j}.linear.weight"] = np.asarray(block.kernel[...], np.float64).T
        out[f"{i}.{j}.linear.bias"] = np.asarray(block.bias[...], np.float64)
      out[f"{i}.{len(head.blocks)}.weight"] = np.asarray(head.out[...], np.float64).T
  return out


class CountingHead:
  """A base lm_head [..., H] -> [..., V] that counts its calls and the rows it saw."""

  def __init__(self, w_hv: np.ndarray, dtype):
    self.w = jnp.asarray(w_hv).astype(dtype)
    self.calls: list[tuple[int, ...]] = []

  def __call__(self, h):
    self.calls.append(tuple(h.shape))
    return jnp.einsum("...h,hv->...v", h, self.w.astype(h.dtype),
                      preferred_element_type=jnp.float32)


def _x(rng, n_rows: int, dtype) -> jax.Array:
  return jnp.asarray(rng.standard_normal((n_rows, H))).astype(dtype)


def _as64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resblock_matches_reference(dtype):
  rng = np.random.default_rng()
  block = _randomize(ResBlock(H, rngs=nnx.Rngs(params=0), param_dtype=dtype), rng)
  x = _x(rng, 7, dtype)
  got = block(x)
  assert got.shape == (7, H) and got.dtype == dtype
  want = ref_resblock(_as64(x), _as64(block.kernel[...]).T, _as64(block.bias[...]))
  assert rel_err(_as64(got), want) < TOL[dtype]
  # Leading dims are free: [B, T, H] works too.
  x3 = jnp.reshape(x[:6], (2, 3, H))
  np.testing.assert_allclose(_as64(block(x3)).reshape(6, H), _as64(got[:6]), rtol=1e-6)


def test_resblock_starts_as_identity():
  rng = np.random.default_rng()
  x = _x(rng, 3, jnp.float32)
  # Zero kernel and bias: silu(0) = 0, so the block returns x exactly.
  np.testing.assert_array_equal(ResBlock(H, rngs=nnx.Rngs(params=1))(x), x)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_medusa_head_matches_reference(layers):
  rng = np.random.default_rng()
  head = _randomize(MedusaHead(H, V, layers, rngs=nnx.Rngs(params=0)), rng)
  x = _x(rng, 5, jnp.float32)
  h = _as64(x)
  for block in head.blocks:
    h = ref_resblock(h, _as64(block.kernel[...]).T, _as64(block.bias[...]))
  got = head(x)
  assert got.shape == (5, V) and got.dtype == jnp.float32
  assert rel_err(got, h @ _as64(head.out[...])) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_v2_matches_reference_with_one_lm_head_call(n, dtype):
  rng = np.random.default_rng()
  model = _randomize(MedusaModel(_cfg(n), H, rngs=nnx.Rngs(params=0), param_dtype=dtype), rng)
  assert model.is_v2 and model.hidden_size == H and model.vocab_size is None
  assert model.medusa.kernel[...].shape == (H, n, H) and model.medusa.bias[...].shape == (n, H)
  assert fused_view(model.medusa.kernel[...]).shape == (H, n * H)
  assert isinstance(model, Heads) and isinstance(model.medusa, Heads)
  lm_w = rng.standard_normal((H, V)) / np.sqrt(H)
  head = CountingHead(lm_w, dtype)
  x = _x(rng, 6, dtype)
  logits, spec = model(x, head)
  assert head.calls == [(6, n + 1, H)]  # one lm_head call over [x, h_0, ..., h_{n-1}]
  assert logits.shape == (6, V) and spec.shape == (6, n, V)
  want_logits, want_spec = ref_v2(_as64(x), _file_tensors(model), n, _as64(head.w))
  assert rel_err(logits, want_logits) < TOL[dtype]
  assert rel_err(spec, want_spec) < TOL[dtype]


def test_v2_heads_are_head_major_columns():
  """Head k uses columns k*H:(k+1)*H of the fused kernel: perturbing them moves only head k."""
  rng = np.random.default_rng()
  model = _randomize(MedusaModel(_cfg(3), H, rngs=nnx.Rngs(params=0)), rng)
  x = _x(rng, 4, jnp.float32)
  before = np.asarray(model.medusa.heads_hidden(x))
  kernel = fused_view(model.medusa.kernel[...])
  model.medusa.kernel.set_value(kernel.at[:, H:2 * H].add(1.0).reshape(H, 3, H))
  after = np.asarray(model.medusa.heads_hidden(x))
  np.testing.assert_array_equal(after[:, 0], before[:, 0])
  np.testing.assert_array_equal(after[:, 2], before[:, 2])
  assert np.abs(after[:, 1] - before[:, 1]).max() > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,layers,per_head", [(1, 1, True), (3, 2, False), (2, 3, False)])
def test_v1_matches_reference(n, layers, per_head, dtype):
  rng = np.random.default_rng()
  model = _randomize(MedusaModel(_cfg(n, layers), H, V, per_head_lm_head=per_head,
                                 rngs=nnx.Rngs(params=0), param_dtype=dtype), rng)
  assert not model.is_v2 and isinstance(model.medusa, MedusaV1) and model.vocab_size == V
  lm_w = rng.standard_normal((H, V)) / np.sqrt(H)
  head = CountingHead(lm_w, dtype)
  x = _x(rng, 5, dtype)
  logits, spec = model(x, head)
  assert head.calls == [(5, H)]
  assert spec.shape == (5, n, V)
  want_logits, want_spec = ref_v1(_as64(x), _file_tensors(model), n, layers, _as64(head.w))
  assert rel_err(logits, want_logits) < TOL[dtype]
  assert rel_err(spec, want_spec) < TOL[dtype]


def test_v1_has_no_batch_guard():
  rng = np.random.default_rng()
  model = _randomize(MedusaModel(_cfg(2, 2), H, V, rngs=nnx.Rngs(params=0),
                                 max_batch_size=2), rng)
  _, spec = model(_x(rng, 5, jnp.float32), CountingHead(rng.standard_normal((H, V)), jnp.float32))
  assert spec is not None and spec.shape == (5, 2, V)


@pytest.mark.parametrize("v2", [True, False])
def test_jitted_over_split_state_matches_eager(v2):
  rng = np.random.default_rng()
  if v2:
    model = MedusaModel(_cfg(3), H, rngs=nnx.Rngs(params=0))
  else:
    model = MedusaModel(_cfg(2, 2), H, V, rngs=nnx.Rngs(params=0))
  model = _randomize(model, rng)
  head = CountingHead(rng.standard_normal((H, V)) / np.sqrt(H), jnp.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, x):
    return nnx.merge(graphdef, state)(x, head)

  x = _x(rng, 4, jnp.float32)
  logits_j, spec_j = step(state, x)
  logits_e, spec_e = model(x, head)
  np.testing.assert_allclose(logits_j, logits_e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(spec_j, spec_e, rtol=1e-5, atol=1e-6)


def test_v2_routed_rows_use_their_adapters():
  """With per-row routing the fused projection comes from each row's adapter."""
  rng = np.random.default_rng()
  n, n_rows = 2, 6
  models = [_randomize(MedusaModel(_cfg(n), H, rngs=nnx.Rngs(params=0)), rng) for _ in range(2)]
  batch = BatchMedusaWeights.load({0: MedusaWeights(_cfg(n), models[0]),
                                   1: MedusaWeights(_cfg(n), models[1])},
                                  [1, 1, 0, 0, 0, 0], backend="reference")
  assert isinstance(batch, Heads)
  head = CountingHead(rng.standard_normal((H, V)) / np.sqrt(H), jnp.float32)
  x = _x(rng, n_rows, jnp.float32)
  logits, spec = batch(x, head)
  assert len(head.calls) == 1
  x64 = _as64(x)
  _, spec_a1 = ref_v2(x64[:2], _file_tensors(models[1]), n, _as64(head.w))
  _, spec_a0 = ref_v2(x64[2:], _file_tensors(models[0]), n, _as64(head.w))
  assert rel_err(spec, np.concatenate([spec_a1, spec_a0])) < 1e-5
  assert rel_err(logits, x64 @ _as64(head.w)) < 1e-5


def test_stack_and_unstack_heads_round_trip():
  """The one fused <-> per-head conversion: head k is column block k of the fused view."""
  rng = np.random.default_rng()
  n = 3
  ws = [rng.standard_normal((H, H)) for _ in range(n)]
  bs = [rng.standard_normal((H,)) for _ in range(n)]
  kernel, bias = stack_heads(ws, bs)
  assert kernel.shape == (H, n, H) and bias.shape == (n, H)
  for k in range(n):
    np.testing.assert_array_equal(fused_view(kernel)[:, k * H:(k + 1) * H], ws[k])
  for (w, b), w0, b0 in zip(unstack_heads(kernel, bias), ws, bs):
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)
  kj, bj = stack_heads([jnp.asarray(w) for w in ws], bs)
  assert isinstance(kj, jax.Array) and isinstance(bj, jax.Array)


def test_logits_and_drafts_ignores_the_guard_and_cuts_heads():
  """Always drafts (the engine's policy), and heads past D skip the LM head."""
  rng = np.random.default_rng()
  for model in (MedusaModel(_cfg(3), H, rngs=nnx.Rngs(params=0), max_batch_size=1),
                MedusaModel(_cfg(3, 2), H, V, rngs=nnx.Rngs(params=0))):
    model = _randomize(model, rng)
    head = CountingHead(rng.standard_normal((H, V)) / np.sqrt(H), jnp.float32)
    x = _x(rng, 4, jnp.float32)
    logits, drafts = model.logits_and_drafts(x, head, 2)
    assert drafts.shape == (4, 2, V)
    want_logits, want_spec = model.logits_and_drafts(x, head)
    np.testing.assert_allclose(drafts, want_spec[:, :2], rtol=1e-6)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-6)
    if model.is_v2:
      assert head.calls[0] == (4, 3, H)  # x and two heads, not three


def test_guard_at_limit_and_limit_plus_one():
  rng = np.random.default_rng()
  limit = 4
  model = _randomize(MedusaModel(_cfg(2), H, rngs=nnx.Rngs(params=0), max_batch_size=limit), rng)
  head = CountingHead(rng.standard_normal((H, V)) / np.sqrt(H), jnp.float32)
  logits, spec = model(_x(rng, limit, jnp.float32), head)
  assert spec is not None and spec.shape == (limit, 2, V)
  x = _x(rng, limit + 1, jnp.float32)
  logits, spec = model(x, head)
  assert spec is None
  assert head.calls[-1] == (limit + 1, H)  # plain lm_head over the rows, no draft rows
  assert rel_err(logits, _as64(x) @ _as64(head.w)) < 1e-5


def test_guard_from_env_and_default(monkeypatch):
  monkeypatch.delenv(MAX_BATCH_ENV, raising=False)
  assert speculation_max_batch_size() == 32
  assert MedusaV2(H, 2, rngs=nnx.Rngs(params=0)).max_batch_size == 32
  monkeypatch.setenv(MAX_BATCH_ENV, "3")
  assert speculation_max_batch_size() == 3
  assert speculation_max_batch_size(7) == 7  # the argument wins over the env
  # The variable is read at the loading boundary, never inside a head constructor.
  assert MedusaV2(H, 2, rngs=nnx.Rngs(params=0)).max_batch_size == 32
  rng = np.random.default_rng()
  model = _randomize(MedusaWeights.init(_cfg(2), H).model, rng)
  head = CountingHead(rng.standard_normal((H, V)), jnp.float32)
  assert model(_x(rng, 3, jnp.float32), head)[1] is not None
  assert model(_x(rng, 4, jnp.float32), head)[1] is None
  monkeypatch.setenv(MAX_BATCH_ENV, "")
  assert speculation_max_batch_size() == 32


@pytest.mark.parametrize("raw", ["abc", "-1", "2.5"])
def test_guard_env_errors(monkeypatch, raw):
  monkeypatch.setenv(MAX_BATCH_ENV, raw)
  with pytest.raises(ConfigError, match=f"{MAX_BATCH_ENV}='{raw}': expected a non-negative"):
    speculation_max_batch_size()


@pytest.mark.parametrize("bad", [-1, True, 2.0, "8"])
def test_guard_argument_errors(bad):
  with pytest.raises(ConfigError, match="max_batch_size"):
    speculation_max_batch_size(bad)


def test_selection_and_architecture_errors():
  rngs = nnx.Rngs(params=0)
  assert MedusaModel(_cfg(2), H, rngs=rngs).is_v2
  assert not MedusaModel(_cfg(2), H, V, per_head_lm_head=True, rngs=rngs).is_v2
  assert not MedusaModel(_cfg(2, 2), H, V, rngs=rngs).is_v2
  with pytest.raises(ArchitectureError, match="vocab"):
    MedusaModel(_cfg(2, 2), H, rngs=rngs)
  with pytest.raises(ArchitectureError, match="medusa_num_layers=2"):
    MedusaV2(H, 2, 2, rngs=rngs)


def test_sharding_specs_are_attached_under_a_mesh():
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((1, 2), ("data", "model"))
  shd = HeadsSharding(fused_w_hnh=P(None, None, "model"), fused_b_nh=P(None, "model"))
  with jax.set_mesh(mesh):
    model = MedusaModel(_cfg(2), H, rngs=nnx.Rngs(params=0), shd=shd)
  assert model.medusa.kernel[...].sharding.spec == P(None, None, "model")
  assert model.medusa.bias[...].sharding.spec == P(None, "model")
  placed = MedusaModel(_cfg(2), H, rngs=nnx.Rngs(params=0), shd=shd, mesh=mesh)
  assert placed.medusa.kernel[...].sharding.spec == P(None, None, "model")
  assert placed.medusa.tensor_parallel
