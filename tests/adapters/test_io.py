"""Medusa heads read straight onto a mesh (8 fake CPU devices) equal the unsharded load.

Covers ``MedusaWeights.load(mesh=)``,
``load_medusa_adapter(mesh=)``, ``load_orbax(mesh=)`` and saving heads that
live on a mesh.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import (MissingTensorError, NonFiniteWeightsError, ShardingError,
                               WeightsNotFoundError)
from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
from medusa_jax.heads.modules import MedusaModel, MedusaV2
from medusa_jax.heads.sharded import vocab_parallel_lm_head
from medusa_jax.parallel.mesh import make_mesh, place
from medusa_files import head_tensors, ref_v1, ref_v2, rel_err

H, V = 16, 32


def _cfg(n: int, layers: int = 1) -> MedusaConfig:
  return MedusaConfig(base_model_name_or_path="base", medusa_num_heads=n,
                      medusa_num_layers=layers, version=2.0)


def _heads_out(weights: MedusaWeights, x: np.ndarray, lm_hv: np.ndarray, mesh=None):
  """(logits [N, V], spec [N, n, V]) float64, with the lm_head split over V on a mesh."""
  lm_hv = lm_hv.astype(np.float32)
  w = jnp.asarray(lm_hv) if mesh is None else place(lm_hv, P(None, "model"), mesh)
  x = jnp.asarray(x, weights.dtype)
  logits, spec = weights.model(x, vocab_parallel_lm_head(w))
  return np.asarray(logits, np.float64), np.asarray(spec, np.float64)


def test_v2_sharded_load_equals_unsharded_and_reference(tmp_path):
  """medusa_head.-prefixed safetensors, more heads in the file than the config uses."""
  rng = np.random.default_rng()
  t = head_tensors(rng, n=4, hidden=H)
  save_file({f"medusa_head.{k}": v for k, v in t.items()}, str(tmp_path / "model.safetensors"))
  _cfg(3).save(str(tmp_path))
  mesh = make_mesh(2, 4)
  plain = load_medusa_adapter(tmp_path)
  sharded = load_medusa_adapter(tmp_path, mesh=mesh)
  inner = sharded.model.medusa
  assert isinstance(sharded.model, MedusaModel) and isinstance(inner, MedusaV2)
  assert inner.tensor_parallel  # one V2 class, sharded or not
  assert inner.kernel[...].sharding.spec == P(None, None, "model")
  assert inner.bias[...].sharding.spec == P(None, "model")
  kernel, bias = np.asarray(inner.kernel[...]), np.asarray(inner.bias[...])
  np.testing.assert_array_equal(kernel, np.asarray(plain.model.medusa.kernel[...]))
  np.testing.assert_array_equal(bias, np.asarray(plain.model.medusa.bias[...]))
  x, lm = rng.standard_normal((4, H)), rng.standard_normal((H, V)) / np.sqrt(H)
  got, want = _heads_out(sharded, x, lm, mesh), _heads_out(plain, x, lm)
  ref = ref_v2(x, t, 3, lm)
  for g, w, r in zip(got, want, ref):
    assert rel_err(g, w) < 1e-6 and rel_err(g, r) < 1e-5


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_v1_sharded_load_equals_unsharded(tmp_path, fmt):
  """V1 heads (own [V, H] projections), bf16 parameters; a torch file is sliced on the host."""
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H, layers=2, vocab=V)
  if fmt == "pt":
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in t.items()},
               tmp_path / "medusa_lm_head.pt")
  else:
    save_file(t, str(tmp_path / "medusa_lm_head.safetensors"))
  mesh = make_mesh(1, 8)
  plain = MedusaWeights.load(_cfg(2, 2), tmp_path, dtype=jnp.bfloat16)
  sharded = MedusaWeights.load(_cfg(2, 2), tmp_path, dtype=jnp.bfloat16, mesh=mesh)
  assert not sharded.is_v2 and sharded.dtype == jnp.bfloat16 and sharded.vocab_size == V
  out = sharded.model.medusa.heads[1].out[...]
  assert out.sharding.spec == P(None, "model")
  assert sharded.model.medusa.heads[0].blocks[1].bias[...].sharding.spec == P("model")
  a, b = plain.lorax_tensors(), sharded.lorax_tensors()
  assert sorted(a) == sorted(b) == sorted(t)
  for key in a:
    np.testing.assert_array_equal(a[key].view(np.uint16), b[key].view(np.uint16), err_msg=key)
  x, lm = rng.standard_normal((8, H)), rng.standard_normal((H, V)) / np.sqrt(H)
  got = _heads_out(sharded, x, lm, mesh)
  ref_t = {k: v.astype(jnp.bfloat16).astype(np.float64) for k, v in t.items()}
  x16 = x.astype(jnp.bfloat16).astype(np.float64)
  for g, r in zip(got, ref_v1(x16, ref_t, 2, 2, lm)):
    assert rel_err(g, r) < 3e-2


@pytest.mark.parametrize("layers,vocab", [(1, None), (2, V)])
def test_save_of_sharded_heads_round_trips(tmp_path, layers, vocab):
  """safetensors (LoRAX layout) and Orbax written from a mesh load back bit for bit."""
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H, layers=layers, vocab=vocab)
  save_file(t, str(tmp_path / "in.safetensors"))
  mesh = make_mesh(2, 4)
  sharded = MedusaWeights.load(_cfg(2, layers), tmp_path / "in.safetensors", mesh=mesh)
  path = sharded.save(tmp_path / "out")
  saved = load_file(path)
  assert sorted(saved) == sorted(t)
  for key, value in t.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  sharded.save_orbax(tmp_path / "ckpt")
  restored = MedusaWeights.load_orbax(tmp_path / "ckpt")
  assert restored.is_v2 == (vocab is None)
  if restored.is_v2:  # restored on one device, whatever the saving mesh was
    assert len(restored.model.medusa.kernel[...].devices()) == 1
  on_mesh = MedusaWeights.load_orbax(tmp_path / "ckpt", mesh=make_mesh(1, 8))
  for w in (restored, on_mesh):
    got = w.lorax_tensors()
    for key, value in t.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  if vocab is None:
    assert on_mesh.model.medusa.tensor_parallel
    again = on_mesh.shard(make_mesh(4, 2))  # from one mesh to another
    assert again.model.medusa.mesh.shape["model"] == 2
    np.testing.assert_array_equal(np.asarray(again.model.medusa.kernel[...]),
                                  np.asarray(on_mesh.model.medusa.kernel[...]))


def test_sharded_load_errors(tmp_path):
  rng = np.random.default_rng()
  mesh = make_mesh(1, 8)
  with pytest.raises(WeightsNotFoundError, match="no weight files"):
    MedusaWeights.load(_cfg(2), tmp_path, mesh=mesh)
  t = head_tensors(rng, n=2, hidden=H)
  save_file(t, str(tmp_path / "model.safetensors"))
  with pytest.raises(MissingTensorError, match=r"^2\.0\.linear\.weight: missing from"):
    MedusaWeights.load(_cfg(3), tmp_path, mesh=mesh)
  with pytest.raises(MissingTensorError, match=r"0\.1\.linear\.weight: missing .* has 1"):
    MedusaWeights.load(_cfg(2, 2), tmp_path, mesh=mesh)
  bad = dict(t)
  bad["1.0.linear.bias"] = bad["1.0.linear.bias"].copy()
  bad["1.0.linear.bias"][H - 1] = np.inf  # in the last device's block only
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(NonFiniteWeightsError, match="1.0.linear.bias"):
    MedusaWeights.load(_cfg(2), tmp_path, mesh=mesh)
  sharded = MedusaWeights.load(_cfg(2), tmp_path, mesh=mesh, check_finite=False)
  assert np.isinf(np.asarray(sharded.model.medusa.bias[...])).sum() == 1
  odd = tmp_path / "odd"
  odd.mkdir()
  save_file(head_tensors(rng, n=2, hidden=12), str(odd / "model.safetensors"))
  with pytest.raises(ShardingError, match=r"dim 2 of size 12 is not divisible by mesh axis "
                                          r"'model' of size 8"):
    MedusaWeights.load(_cfg(2), odd, mesh=mesh)
