"""Base-model loading refuses what would decode silently wrong: NaN, overflow, int, duplicates."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_model import make_tiny_llama_dir

from medusa_jax.errors import AmbiguousWeightsError, NonFiniteWeightsError, TensorDtypeError
from medusa_jax.models.llama_weights import load_llama


def _rewrite(model_dir, edit):
  path = model_dir / "model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_base_weight_is_refused_naming_it(tmp_path, bad):
  make_tiny_llama_dir(tmp_path, seed=int(np.random.default_rng().integers(1 << 30)))
  rng = np.random.default_rng()

  def poison(t):
    w = t["model.layers.1.mlp.up_proj.weight"]
    w[tuple(rng.integers(s) for s in w.shape)] = bad
  _rewrite(tmp_path, poison)
  with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight in"
                     r" .*model\.safetensors: holds NaN or infinite values as float32"):
    load_llama(tmp_path)


def test_a_cast_that_overflows_is_refused(tmp_path):
  make_tiny_llama_dir(tmp_path)
  _rewrite(tmp_path, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))  # finite in float32
  assert np.isfinite(np.asarray(load_llama(tmp_path).norm.weight[...])).all()
  with pytest.raises(NonFiniteWeightsError, match=r"model\.norm\.weight in .*: holds NaN or"
                     r" infinite values as float16"):
    load_llama(tmp_path, dtype=jnp.float16)


@pytest.mark.parametrize("dtype", ["int8", jnp.int32])
def test_integer_compute_dtypes_are_refused(tmp_path, dtype):
  make_tiny_llama_dir(tmp_path)
  with pytest.raises(TensorDtypeError, match="expected a floating-point dtype"):
    load_llama(tmp_path, dtype=dtype)


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path):
  make_tiny_llama_dir(tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  (tmp_path / "model.safetensors").unlink()
  names = sorted(tensors)
  save_file({k: tensors[k] for k in names[: len(names) // 2 + 1]},
            str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({k: tensors[k] for k in names[len(names) // 2:]},
            str(tmp_path / "model-00002-of-00002.safetensors"))
  with pytest.raises(AmbiguousWeightsError, match=rf"Key {names[len(names) // 2]} was found in"
                     r" multiple files: .*00001-of-00002\.safetensors and .*00002-of-00002"):
    load_llama(tmp_path)
