"""MedusaWeights: key layouts in and out, Orbax, init, and every loading error.

Weight files are written by the tests from NumPy (and torch for ``.pt``).
"""

from __future__ import annotations

import errno
import json
import os
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import (AmbiguousWeightsError, ArchitectureError, CheckpointExistsError,
                               ConfigError, CorruptWeightsError,
                               MissingTensorError, NonFiniteWeightsError, TensorDtypeError,
                               TensorShapeError, WeightsError, WeightsFormatError,
                               WeightsNotFoundError)
from medusa_jax.adapters.io import convert_to_safetensors
from medusa_jax.heads.modules import fused_view
from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
from medusa_files import head_tensors, ref_v1, ref_v2, rel_err

H, V, N = 16, 40, 5


def _cfg(n: int, layers: int = 1, version: float = 2.0) -> MedusaConfig:
  return MedusaConfig(base_model_name_or_path="base", medusa_num_heads=n,
                      medusa_num_layers=layers, version=version)


def _lm(rng) -> np.ndarray:
  return (rng.standard_normal((H, V)) / np.sqrt(H)).astype(np.float32)


def _lm_head(lm_w):
  w = jnp.asarray(lm_w)
  return lambda h: jnp.einsum("...h,hv->...v", h, w.astype(h.dtype),
                              preferred_element_type=jnp.float32)


def _run(w: MedusaWeights, x: np.ndarray, lm_w: np.ndarray):
  logits, spec = w.model(jnp.asarray(x).astype(w.dtype), _lm_head(lm_w))
  return np.asarray(logits, np.float64), np.asarray(spec, np.float64)


def _f64(t):
  return {k: np.asarray(v, np.float64) for k, v in t.items()}


# -- key layouts ---------------------------------------------------------------------------------


def test_lorax_v2_layout_extra_heads_ignored(tmp_path):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=5, hidden=H)
  save_file(t, str(tmp_path / "adapter_model.safetensors"))
  w = MedusaWeights.load(_cfg(3), tmp_path)
  assert w.is_v2 and w.speculative_tokens == 3 and w.hidden_size == H and w.vocab_size is None
  kernel = fused_view(np.asarray(w.model.medusa.kernel[...]))
  np.testing.assert_array_equal(
      kernel, np.concatenate([t[f"{i}.0.linear.weight"].T for i in range(3)], axis=1))
  np.testing.assert_array_equal(
      np.asarray(w.model.medusa.bias[...]).reshape(-1),
      np.concatenate([t[f"{i}.0.linear.bias"] for i in range(3)]))
  x, lm_w = rng.standard_normal((N, H)), _lm(rng)
  logits, spec = _run(w, x, lm_w)
  want_logits, want_spec = ref_v2(x, t, 3, lm_w)
  assert rel_err(logits, want_logits) < 1e-5 and rel_err(spec, want_spec) < 1e-5


@pytest.mark.parametrize("layers", [1, 2])
def test_medusa_v1_layout(tmp_path, layers):
  """Original Medusa heads: own output projections; the file holds 5 heads, config 2."""
  rng = np.random.default_rng()
  t = head_tensors(rng, n=5, hidden=H, layers=layers, vocab=V, dtype=np.float16)
  save_file(t, str(tmp_path / "medusa_lm_head.safetensors"))
  w = MedusaWeights.load(_cfg(2, layers, version=1.0), tmp_path / "medusa_lm_head.safetensors")
  assert not w.is_v2 and w.vocab_size == V and w.speculative_tokens == 2
  x, lm_w = rng.standard_normal((N, H)), _lm(rng)
  logits, spec = _run(w, x, lm_w)
  want_logits, want_spec = ref_v1(x, _f64(t), 2, layers, lm_w)
  assert spec.shape == (N, 2, V)
  assert rel_err(logits, want_logits) < 1e-5 and rel_err(spec, want_spec) < 1e-5


def test_medusa2_full_model_prefix_and_other_tensors(tmp_path):
  """``medusa_head.``-prefixed heads inside a sharded full-model checkpoint."""
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H, prefix="medusa_head.")
  base = {"model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32),
          "lm_head.weight": rng.standard_normal((V, H)).astype(np.float32)}
  save_file(base, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file(t, str(tmp_path / "model-00002-of-00002.safetensors"))
  w = MedusaWeights.load(_cfg(2), tmp_path)
  x, lm_w = rng.standard_normal((N, H)), _lm(rng)
  _, spec = _run(w, x, lm_w)
  bare = {k[len("medusa_head."):]: v for k, v in t.items()}
  assert rel_err(spec, ref_v2(x, bare, 2, lm_w)[1]) < 1e-5


def test_bare_key_wins_over_prefixed_in_one_file_and_files_are_unioned(tmp_path):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H)
  decoy = head_tensors(rng, n=2, hidden=H, prefix="base_model.medusa_head.")
  save_file({k: v for k, v in t.items() if k.startswith("0.")}, str(tmp_path / "a.safetensors"))
  # b holds head 1 bare and both heads prefixed: inside one file the bare key wins.
  save_file({**{k: v for k, v in decoy.items() if k.startswith("base_model.medusa_head.1.")},
             **{k: v for k, v in t.items() if k.startswith("1.")}},
            str(tmp_path / "b.safetensors"))
  save_file({"0.0.linear.weight": np.zeros((3, 3), np.float32)},
            str(tmp_path / "training_args.safetensors"))  # skipped, as LoRAX does
  w = MedusaWeights.load(_cfg(2), tmp_path)
  np.testing.assert_array_equal(
      fused_view(np.asarray(w.model.medusa.kernel[...])),
      np.concatenate([t["0.0.linear.weight"].T, t["1.0.linear.weight"].T], axis=1))


@pytest.mark.parametrize("prefix", ["", "base_model.medusa_head."])
def test_a_tensor_in_two_files_is_refused_naming_both(tmp_path, prefix):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H)
  save_file(t, str(tmp_path / "adapter_model.safetensors"))
  save_file(head_tensors(rng, n=2, hidden=H, prefix=prefix), str(tmp_path / "model.safetensors"))
  with pytest.raises(AmbiguousWeightsError, match=r"Key 0\.0\.linear\.\w+ was found in multiple"
                     r" files: .*adapter_model\.safetensors.* and .*/model\.safetensors"):
    MedusaWeights.load(_cfg(2), tmp_path)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_file(tmp_path, dtype):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H, dtype=ml_dtypes.bfloat16)
  save_file(t, str(tmp_path / "m.safetensors"))
  w = MedusaWeights.load(_cfg(2), tmp_path, dtype=dtype)
  assert w.dtype == dtype
  want = np.concatenate([t[f"{i}.0.linear.weight"].astype(np.float32).T for i in range(2)], 1)
  np.testing.assert_array_equal(fused_view(np.asarray(w.model.medusa.kernel[...], np.float32)), want)


def test_torch_pt_file_and_bf16(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng()
  t = head_tensors(rng, n=3, hidden=H, vocab=V)
  sd = {k: torch.from_numpy(v) for k, v in t.items()}
  sd["0.0.linear.weight"] = sd["0.0.linear.weight"].to(torch.bfloat16)
  torch.save(sd, tmp_path / "medusa_lm_head.pt")
  torch.save({"lr": 1.0}, tmp_path / "training_args.bin")  # not a weight file
  w = MedusaWeights.load(_cfg(3, version=1.0), tmp_path)
  assert not w.is_v2
  t["0.0.linear.weight"] = sd["0.0.linear.weight"].float().numpy()
  x, lm_w = rng.standard_normal((N, H)), _lm(rng)
  _, spec = _run(w, x, lm_w)
  assert rel_err(spec, ref_v1(x, t, 3, 1, lm_w)[1]) < 1e-5
  # Conversion to safetensors keeps every head and dtype.
  dst = convert_to_safetensors(tmp_path / "medusa_lm_head.pt", tmp_path / "c.safetensors")
  converted = load_file(dst)
  assert sorted(converted) == sorted(t) and converted["0.0.linear.weight"].dtype.name == "bfloat16"
  w2 = MedusaWeights.load(_cfg(3), dst)
  np.testing.assert_array_equal(_run(w2, x, lm_w)[1], spec)


def test_torch_missing_says_how_to_convert(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  torch.save({"0.0.linear.weight": torch.randn(H, H)}, tmp_path / "medusa_lm_head.pt")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(WeightsFormatError) as e:
    MedusaWeights.load(_cfg(1), tmp_path)
  msg = str(e.value)
  assert "medusa_lm_head.pt" in msg and "torch" in msg and "save_file" in msg
  assert "medusa_lm_head.safetensors" in msg


# -- save / orbax / init -------------------------------------------------------------------------


@pytest.mark.parametrize("layers,vocab", [(1, None), (2, V)])
def test_save_load_identical_and_readable_by_torch(tmp_path, layers, vocab):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=3, hidden=H, layers=layers, vocab=vocab)
  save_file(t, str(tmp_path / "in.safetensors"))
  cfg = _cfg(3, layers, version=1.0)
  w = MedusaWeights.load(cfg, tmp_path / "in.safetensors")
  path = w.save(tmp_path / "out")
  saved = load_file(path)
  assert sorted(saved) == sorted(t)
  for k, v in t.items():  # torch [out, in] layout, keys verbatim
    np.testing.assert_array_equal(saved[k], v)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["version"] == 1.0
  w2 = load_medusa_adapter(tmp_path / "out")
  assert w2.config == cfg
  x, lm_w = rng.standard_normal((N, H)), _lm(rng)
  for a, b in zip(_run(w, x, lm_w), _run(w2, x, lm_w)):
    np.testing.assert_array_equal(a, b)
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file as torch_load
  tt = torch_load(path)
  assert tt["0.0.linear.weight"].shape == torch.Size([H, H]) and tt["0.0.linear.weight"].dtype \
      == torch.float32


def test_save_bf16(tmp_path):
  rng = np.random.default_rng()
  save_file(head_tensors(rng, n=2, hidden=H), str(tmp_path / "in.safetensors"))
  w = MedusaWeights.load(_cfg(2), tmp_path / "in.safetensors", dtype=jnp.bfloat16)
  saved = load_file(w.save(tmp_path / "out"))
  assert {v.dtype.name for v in saved.values()} == {"bfloat16"}
  w2 = load_medusa_adapter(tmp_path / "out", dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(w2.model.medusa.kernel[...], np.float32),
                                np.asarray(w.model.medusa.kernel[...], np.float32))


@pytest.mark.parametrize("layers,vocab,dtype", [(1, None, jnp.bfloat16), (2, V, jnp.float32)])
def test_orbax_round_trip_bit_exact(tmp_path, layers, vocab, dtype):
  rng = np.random.default_rng()
  save_file(head_tensors(rng, n=2, hidden=H, layers=layers, vocab=vocab),
            str(tmp_path / "in.safetensors"))
  w = MedusaWeights.load(_cfg(2, layers), tmp_path / "in.safetensors", dtype=dtype)
  w.save_orbax(tmp_path / "ckpt")
  w2 = MedusaWeights.load_orbax(tmp_path / "ckpt")
  assert w2.config == w.config and w2.is_v2 == w.is_v2 and w2.dtype == dtype
  a, b = w.lorax_tensors(), w2.lorax_tensors()
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype
    np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8))
  with pytest.raises(CheckpointExistsError, match="overwrite=True"):
    w.save_orbax(tmp_path / "ckpt")
  w.save_orbax(tmp_path / "ckpt", overwrite=True)
  with pytest.raises(WeightsNotFoundError, match="use MedusaWeights.load_orbax"):
    MedusaWeights.load(w.config, tmp_path / "ckpt")


def test_orbax_errors(tmp_path):
  with pytest.raises(WeightsNotFoundError, match="save_orbax"):
    MedusaWeights.load_orbax(tmp_path / "none")
  rng = np.random.default_rng()
  save_file(head_tensors(rng, n=1, hidden=H), str(tmp_path / "in.safetensors"))
  MedusaWeights.load(_cfg(1), tmp_path / "in.safetensors").save_orbax(tmp_path / "ckpt")
  (tmp_path / "ckpt" / "medusa_jax.json").write_text("{")
  with pytest.raises(CorruptWeightsError, match="medusa_jax.json"):
    MedusaWeights.load_orbax(tmp_path / "ckpt")
  (tmp_path / "ckpt" / "medusa_jax.json").write_text(json.dumps(
      {"format": 1, "hidden_size": H + 1, "vocab_size": None, "per_head_lm_head": False,
       "dtype": "float32"}))
  with pytest.raises(CorruptWeightsError, match="state"):
    MedusaWeights.load_orbax(tmp_path / "ckpt")


def test_init_v2_identity_and_v1_from_lm_head():
  rng = np.random.default_rng()
  lm_w = _lm(rng)
  x = rng.standard_normal((N, H))
  w = MedusaWeights.init(_cfg(2), H, seed=1)
  logits, spec = _run(w, x, lm_w)
  for k in range(2):  # zero-initialised ResBlocks: every head starts as the base head
    np.testing.assert_allclose(spec[:, k], logits, rtol=1e-5, atol=1e-6)
  w1 = MedusaWeights.init(_cfg(3), H, per_head_lm_head=True, lm_head_weight=lm_w,
                          dtype=jnp.float32)
  assert not w1.is_v2 and w1.vocab_size == V
  logits, spec = _run(w1, x, lm_w)
  for k in range(3):
    np.testing.assert_allclose(spec[:, k], logits, rtol=1e-5, atol=1e-6)
  assert not MedusaWeights.init(_cfg(2, 2), H, V).is_v2


def test_init_errors():
  rng = np.random.default_rng()
  with pytest.raises(ArchitectureError, match="lm_head_weight"):
    MedusaWeights.init(_cfg(2), H, lm_head_weight=_lm(rng))
  with pytest.raises(TensorShapeError, match=r"expected \[16, V\].*got \[40, 16\]"):
    MedusaWeights.init(_cfg(2), H, per_head_lm_head=True, lm_head_weight=_lm(rng).T)
  with pytest.raises(TensorShapeError, match=r"expected \[16, 7\]"):
    MedusaWeights.init(_cfg(2), H, 7, per_head_lm_head=True, lm_head_weight=_lm(rng))
  with pytest.raises(ArchitectureError, match="vocab"):
    MedusaWeights.init(_cfg(2, 2), H)


# -- errors --------------------------------------------------------------------------------------


def test_no_files(tmp_path):
  with pytest.raises(WeightsNotFoundError, match="no such"):
    MedusaWeights.load(_cfg(1), tmp_path / "missing")
  with pytest.raises(WeightsNotFoundError, match="found nothing"):
    MedusaWeights.load(_cfg(1), tmp_path)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(WeightsNotFoundError, match=r"\*\.safetensors.*found config\.json"):
    MedusaWeights.load(_cfg(1), tmp_path)
  with pytest.raises(WeightsFormatError, match="unsupported"):
    MedusaWeights.load(_cfg(1), tmp_path / "config.json")
  with pytest.raises(ConfigError):
    load_medusa_adapter(tmp_path / "missing")


def test_missing_tensor_named(tmp_path):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H)
  save_file(t, str(tmp_path / "m.safetensors"))
  with pytest.raises(MissingTensorError) as e:
    MedusaWeights.load(_cfg(3), tmp_path)
  assert "2.0.linear.weight" in str(e.value) and "m.safetensors" in str(e.value)
  assert "heads [0, 1]" in str(e.value)
  # L = 2 in the config but the file is V2: the second block is missing.
  with pytest.raises(MissingTensorError, match=r"0\.1\.linear\.weight"):
    MedusaWeights.load(_cfg(2, 2), tmp_path)
  del t["1.0.linear.bias"]
  save_file(t, str(tmp_path / "m.safetensors"))
  with pytest.raises(MissingTensorError, match=r"1\.0\.linear\.bias"):
    MedusaWeights.load(_cfg(2), tmp_path)
  save_file({"base_model.model.q_proj.lora_A.weight": np.ones((2, 2), np.float32)},
            str(tmp_path / "m.safetensors"))
  with pytest.raises(MissingTensorError, match="no Medusa-head tensors.*lora_A"):
    MedusaWeights.load(_cfg(2), tmp_path)


@pytest.mark.parametrize("key,shape,expected", [
    ("0.0.linear.weight", (H, H + 1), "square"),
    ("1.0.linear.weight", (H + 2, H + 2), r"expected \[16, 16\].*got \[18, 18\]"),
    ("1.0.linear.bias", (H + 1,), r"expected \[16\].*got \[17\]"),
    ("0.0.linear.bias", (H, 1), r"expected \[16\].*got \[16, 1\]"),
    ("1.1.weight", (V + 1, H), r"expected \[40, 16\].*got \[41, 16\]"),
    ("0.1.weight", (V, H + 1), r"expected \[V, 16\].*got \[40, 17\]"),
])
def test_wrong_shape(tmp_path, key, shape, expected):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H, vocab=V)
  t[key] = rng.standard_normal(shape).astype(np.float32)
  save_file(t, str(tmp_path / "m.safetensors"))
  with pytest.raises(TensorShapeError, match=expected) as e:
    MedusaWeights.load(_cfg(2), tmp_path)
  assert key in str(e.value) and "m.safetensors" in str(e.value)


def test_truncated_and_garbage_files(tmp_path):
  rng = np.random.default_rng()
  save_file(head_tensors(rng, n=2, hidden=H), str(tmp_path / "ok.safetensors"))
  data = (tmp_path / "ok.safetensors").read_bytes()
  cases = {"trunc.safetensors": data[: len(data) // 2], "short.safetensors": data[:6],
           "garbage.safetensors": rng.bytes(300), "empty.safetensors": b""}
  for name, blob in cases.items():
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(CorruptWeightsError, match=name):
      MedusaWeights.load(_cfg(2), tmp_path / name)


def test_corrupt_torch_files(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"0.0.linear.weight": torch.randn(H, H)}, tmp_path / "ok.pt")
  data = (tmp_path / "ok.pt").read_bytes()
  (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(CorruptWeightsError, match="trunc.pt"):
    MedusaWeights.load(_cfg(1), tmp_path / "trunc.pt")
  torch.save([torch.randn(2)], tmp_path / "list.pt")
  with pytest.raises(CorruptWeightsError, match="list.pt: expected a state dict"):
    MedusaWeights.load(_cfg(1), tmp_path / "list.pt")


def test_bad_values(tmp_path):
  rng = np.random.default_rng()
  t = head_tensors(rng, n=2, hidden=H)
  t["1.0.linear.bias"] = np.arange(H, dtype=np.int32)
  save_file(t, str(tmp_path / "m.safetensors"))
  with pytest.raises(TensorDtypeError, match=r"1\.0\.linear\.bias.*int32"):
    MedusaWeights.load(_cfg(2), tmp_path)
  t["1.0.linear.bias"] = rng.standard_normal(H).astype(np.float32)
  t["1.0.linear.weight"][3, 4] = np.nan
  save_file(t, str(tmp_path / "m.safetensors"))
  with pytest.raises(NonFiniteWeightsError, match=r"1\.0\.linear\.weight"):
    MedusaWeights.load(_cfg(2), tmp_path)
  w = MedusaWeights.load(_cfg(2), tmp_path, check_finite=False)
  assert np.isnan(fused_view(np.asarray(w.model.medusa.kernel[...]))).sum() == 1


def test_every_weights_error_is_a_value_error():
  for cls in (WeightsNotFoundError, MissingTensorError, TensorShapeError, TensorDtypeError,
              CorruptWeightsError, NonFiniteWeightsError, WeightsFormatError,
              CheckpointExistsError):
    assert issubclass(cls, WeightsError) and issubclass(cls, ValueError)


def test_public_api_names():
  import medusa_jax as mj
  from medusa_jax.adapters.registry import AdapterRegistry
  assert mj.MedusaWeights is MedusaWeights and mj.load_medusa_adapter is load_medusa_adapter
  assert mj.AdapterRegistry is AdapterRegistry


# ----------------------------------------------------------- issue 14: nothing lost, nothing silent


def _saved(tmp_path, n, name="in.safetensors", layers=1, vocab=None, scale=1.0):
  t = head_tensors(np.random.default_rng(), n=n, hidden=H, layers=layers, vocab=vocab)
  t = {k: (v * scale).astype(np.float32) for k, v in t.items()}
  save_file(t, str(tmp_path / name))
  return t, MedusaWeights.load(_cfg(n, layers), tmp_path / name)


def test_save_needs_overwrite_and_then_no_old_file_shadows_the_new(tmp_path):
  out = tmp_path / "adapter"
  old_t, _ = _saved(tmp_path, 5, "old.safetensors")
  out.mkdir()
  save_file(old_t, str(out / "adapter_model.safetensors"))  # a LoRAX/PEFT name
  _cfg(5).save(out)
  new_t, new = _saved(tmp_path, 3, "new.safetensors")
  with pytest.raises(CheckpointExistsError, match=r"adapter: already holds a Medusa adapter;"
                     r" pass overwrite=True"):
    new.save(out)
  assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "config.json"]
  new.save(out, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  back = load_medusa_adapter(out)
  assert back.speculative_tokens == 3
  for k, v in new_t.items():
    np.testing.assert_array_equal(back.lorax_tensors()[k], v)


def test_save_never_replaces_a_directory_of_other_work(tmp_path):
  _, w = _saved(tmp_path, 2)
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "thesis.tex").write_text("years")
  (tmp_path / "work" / "src").mkdir()
  for save in (lambda: w.save(tmp_path / "work", overwrite=True),
               lambda: w.save_orbax(tmp_path / "work", overwrite=True)):
    with pytest.raises(CheckpointExistsError, match=r"holds src/, thesis\.tex, which are not"
                       r" part of a Medusa adapter; refusing"):
      save()
  assert (tmp_path / "work" / "thesis.tex").read_text() == "years"


def test_save_orbax_into_a_lorax_adapter_replaces_it_whole(tmp_path):
  _, w = _saved(tmp_path, 2)
  w.save(tmp_path / "a")
  with pytest.raises(CheckpointExistsError, match="overwrite=True"):
    w.save_orbax(tmp_path / "a")
  assert load_medusa_adapter(tmp_path / "a").speculative_tokens == 2  # untouched
  w.save_orbax(tmp_path / "a", overwrite=True)
  assert not (tmp_path / "a" / "model.safetensors").exists()
  assert MedusaWeights.load_orbax(tmp_path / "a").speculative_tokens == 2


def test_a_directory_of_two_formats_is_ambiguous(tmp_path):
  t, w = _saved(tmp_path, 2)
  w.save_orbax(tmp_path / "ckpt")
  save_file(t, str(tmp_path / "ckpt" / "model.safetensors"))
  with pytest.raises(AmbiguousWeightsError, match=r"holds both an Orbax checkpoint"
                     r" \(medusa_jax\.json\) and weight files \(model\.safetensors\)"):
    MedusaWeights.load(w.config, tmp_path / "ckpt")


def test_saved_files_follow_the_umask(tmp_path):
  _, w = _saved(tmp_path, 2)
  old = os.umask(0o022)
  try:
    w.save(tmp_path / "a")
  finally:
    os.umask(old)
  for p in (tmp_path / "a").iterdir():
    assert p.stat().st_mode & 0o777 == 0o644, p  # safetensors alone writes 0o600
  assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755


def test_a_full_disk_keeps_the_old_adapter_and_names_the_destination(tmp_path, monkeypatch):
  from medusa_jax import _atomic
  from medusa_jax.errors import WriteError
  old_t, old = _saved(tmp_path, 2, "old.safetensors")
  old.save(tmp_path / "a")
  _, new = _saved(tmp_path, 3, "new.safetensors")

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(_atomic, "_fsync", full)
  for save in (lambda: new.save(tmp_path / "a", overwrite=True),
               lambda: new.save_orbax(tmp_path / "a", overwrite=True)):
    with pytest.raises(WriteError, match=rf"^{tmp_path / 'a'}(/[\w.]+)?: cannot write \(No"
                       r" space left on device\)$"):
      save()
  monkeypatch.undo()
  back = load_medusa_adapter(tmp_path / "a")
  for k, v in old_t.items():
    np.testing.assert_array_equal(back.lorax_tensors()[k], v)
  assert sorted(os.listdir(tmp_path)) == ["a", "new.safetensors", "old.safetensors"]


@pytest.mark.parametrize("dtype", ["int8", jnp.int32, "nonsense"])
def test_only_float_dtypes_compute(tmp_path, dtype):
  _, w = _saved(tmp_path, 2)
  for call in (lambda: MedusaWeights.load(_cfg(2), tmp_path / "in.safetensors", dtype=dtype),
               lambda: MedusaWeights.init(_cfg(2), H, dtype=dtype),
               lambda: w.save(tmp_path / "o", dtype=dtype)):
    with pytest.raises(TensorDtypeError, match="expected a floating-point dtype"):
      call()


def test_a_cast_that_overflows_is_an_error(tmp_path):
  """Finite float32 weights beyond float16's range (65504) would turn to inf after the cast."""
  save_file({k: (v * 1e7).astype(np.float32) if k.endswith("weight") else v
             for k, v in head_tensors(np.random.default_rng(), n=2, hidden=H).items()},
            str(tmp_path / "big.safetensors"))
  with pytest.raises(NonFiniteWeightsError, match=r"big\.safetensors \(as float16\): parameter"
                     r" medusa/kernel holds NaN or infinite values"):
    MedusaWeights.load(_cfg(2), tmp_path / "big.safetensors", dtype=jnp.float16)
  w = MedusaWeights.load(_cfg(2), tmp_path / "big.safetensors")  # float32 holds them
  with pytest.raises(NonFiniteWeightsError, match=r"0\.0\.linear\.weight: holds NaN or"
                     r" infinite values after the cast to float16"):
    w.save(tmp_path / "o", dtype=np.float16)
  assert not (tmp_path / "o").exists()


def test_sizes_are_checked_against_the_files_before_anything_is_built(tmp_path):
  t, _ = _saved(tmp_path, 3)
  (tmp_path / "in.safetensors").rename(tmp_path / "model.safetensors")
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"base_model_name_or_path": "b", "medusa_num_heads": 1e12,
               "medusa_num_layers": 1}, f)
  with pytest.raises(MissingTensorError, match=r"3\.0\.linear\.weight: missing .* says"
                     r" medusa_num_heads=1000000000000 but the files hold Medusa heads \[0, 1, 2\]"):
    load_medusa_adapter(tmp_path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"base_model_name_or_path": "b", "medusa_num_heads": 3,
               "medusa_num_layers": 1e12}, f)
  with pytest.raises(MissingTensorError, match="medusa_num_layers=1000000000000 but head 0"):
    load_medusa_adapter(tmp_path)


def test_a_config_with_fewer_resblocks_than_the_file_is_refused(tmp_path):
  save_file(head_tensors(np.random.default_rng(), n=2, hidden=H, layers=2, vocab=V),
            str(tmp_path / "m.safetensors"))
  with pytest.raises(ConfigError, match=r"medusa_num_layers=1 in the config disagrees with"
                     r" .*m\.safetensors, whose head 0 has 2 ResBlocks"):
    MedusaWeights.load(_cfg(2, 1), tmp_path / "m.safetensors")


def _orbax(tmp_path, layers=1, vocab=None):
  _, w = _saved(tmp_path, 2, layers=layers, vocab=vocab)
  w.save_orbax(tmp_path / "ckpt")
  return tmp_path / "ckpt"


def _edit_json(path, **fields):
  raw = json.loads(path.read_text())
  raw.update(fields)
  path.write_text(json.dumps(raw))


@pytest.mark.parametrize("layers,vocab", [(1, None), (2, V)])
def test_orbax_sizes_and_dtype_are_checked_against_its_metadata(tmp_path, layers, vocab):
  ckpt = _orbax(tmp_path, layers, vocab)
  _edit_json(ckpt / "config.json", medusa_num_heads=10**12)
  with pytest.raises(ConfigError, match=r"medusa_num_heads=1000000000000 in .*config\.json"
                     r" disagrees with the checkpoint .*state, which holds 2"):
    MedusaWeights.load_orbax(ckpt)
  _edit_json(ckpt / "config.json", medusa_num_heads=2, medusa_num_layers=layers + 1)
  with pytest.raises(ConfigError, match=rf"medusa_num_layers={layers + 1} .* holds {layers}"):
    MedusaWeights.load_orbax(ckpt)
  _edit_json(ckpt / "config.json", medusa_num_layers=layers)
  _edit_json(ckpt / "medusa_jax.json", dtype="int8")
  with pytest.raises(TensorDtypeError, match=r"dtype in .*medusa_jax\.json='int8'"):
    MedusaWeights.load_orbax(ckpt)
  _edit_json(ckpt / "medusa_jax.json", dtype="float32", hidden_size=H + 1)
  with pytest.raises(CorruptWeightsError, match=r"medusa_jax\.json|state"):
    MedusaWeights.load_orbax(ckpt)
  for meta in ([], {"hidden_size": "16"}):
    (ckpt / "medusa_jax.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptWeightsError, match=r"medusa_jax\.json"):
      MedusaWeights.load_orbax(ckpt)
