"""medusa_jax.adapters.convert: Medusa / LoRAX / Orbax / safetensors conversions round-trip exactly."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from medusa_files import head_tensors
from medusa_jax.config import MedusaConfig
from medusa_jax.adapters.convert import Target, convert, inspect_heads, is_orbax_checkpoint
from medusa_jax.errors import (ConfigError, CorruptWeightsError, MissingTensorError,
                               WeightsNotFoundError)
from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter

H, V = 16, 40


def _write_config(folder, **fields):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(fields, f)


def _outputs(weights: MedusaWeights, x, lm_w):
  """(logits [N, V], spec [N, n, V]) as float64 NumPy."""
  logits, spec = weights.model(jnp.asarray(x), lambda h: h @ jnp.asarray(lm_w))
  return np.asarray(logits, np.float64), np.asarray(spec, np.float64)


def _assert_same_tensors(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8), err_msg=k)


def test_medusa_pt_v1_understated_config_to_lorax_keeps_every_head(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  t = head_tensors(rng, n=5, hidden=H, vocab=V, dtype=np.float16)
  src = tmp_path / "medusa-vicuna"
  _write_config(src, base_model_name_or_path="lmsys/vicuna-7b-v1.3", medusa_num_heads=2,
                medusa_num_layers=1, transformers_version="4.31.0")
  torch.save({k: torch.from_numpy(v) for k, v in t.items()}, src / "medusa_lm_head.pt")

  res = convert(src, tmp_path / "lorax")
  assert res.to is Target.LORAX and res.heads_in_source == 5
  assert any("medusa_num_heads=2" in n for n in res.notes)
  with open(tmp_path / "lorax" / "config.json") as f:
    assert json.load(f) == {"base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
                            "medusa_num_heads": 5, "medusa_num_layers": 1, "version": 1.0}
  _assert_same_tensors(load_file(tmp_path / "lorax" / "model.safetensors"), t)

  # The converted adapter computes what the .pt file computes.
  x = rng.standard_normal((3, H)).astype(np.float32)
  lm_w = rng.standard_normal((H, V)).astype(np.float32)
  direct = MedusaWeights.load(MedusaConfig(base_model_name_or_path="b", medusa_num_heads=5,
                                           medusa_num_layers=1), src / "medusa_lm_head.pt")
  conv = load_medusa_adapter(tmp_path / "lorax")
  assert not conv.is_v2
  for a, b in zip(_outputs(conv, x, lm_w), _outputs(direct, x, lm_w)):
    np.testing.assert_array_equal(a, b)

  # --num-heads keeps the first heads; their drafts are the first heads' drafts.
  res3 = convert(src / "medusa_lm_head.pt", tmp_path / "three", num_heads=3)
  assert res3.config.medusa_num_heads == 3 and any("0..2 of 5" in n for n in res3.notes)
  three = load_medusa_adapter(tmp_path / "three")
  _, spec5 = _outputs(direct, x, lm_w)
  _, spec3 = _outputs(three, x, lm_w)
  np.testing.assert_array_equal(spec3, spec5[:, :3])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_v2_safetensors_lorax_orbax_lorax_round_trip(tmp_path, dtype):
  rng = np.random.default_rng(1)
  t = head_tensors(rng, n=4, hidden=H, dtype=dtype)
  save_file(t, str(tmp_path / "medusa_lm_head.safetensors"))  # a bare file: no config beside it

  with pytest.raises(ConfigError, match="--base-model"):
    convert(tmp_path / "medusa_lm_head.safetensors", tmp_path / "nobase")
  convert(tmp_path / "medusa_lm_head.safetensors", tmp_path / "lorax", base_model="tiny")
  first = MedusaConfig.from_pretrained(tmp_path / "lorax")
  assert first == MedusaConfig(base_model_name_or_path="tiny", medusa_num_heads=4,
                               medusa_num_layers=1, version=2.0)

  res = convert(tmp_path / "lorax", tmp_path / "orbax", to="orbax")
  assert is_orbax_checkpoint(tmp_path / "orbax") and res.config == first
  restored = MedusaWeights.load_orbax(tmp_path / "orbax")
  assert restored.is_v2 and restored.dtype == jnp.dtype(dtype)
  convert(tmp_path / "orbax", tmp_path / "back", to=Target.LORAX)
  assert MedusaConfig.from_pretrained(tmp_path / "back") == first
  _assert_same_tensors(load_file(tmp_path / "back" / "model.safetensors"), t)

  x = rng.standard_normal((5, H)).astype(np.float32)
  lm_w = rng.standard_normal((H, V)).astype(np.float32)
  want = _outputs(load_medusa_adapter(tmp_path / "lorax", dtype=dtype), x, lm_w)
  for got in (_outputs(restored, x, lm_w),
              _outputs(load_medusa_adapter(tmp_path / "back", dtype=dtype), x, lm_w)):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)


def test_orbax_to_orbax_and_trimmed_heads(tmp_path):
  rng = np.random.default_rng(2)
  t = head_tensors(rng, n=3, hidden=H, layers=2, vocab=V)
  src = tmp_path / "v1"
  _write_config(src, base_model_name_or_path="m", medusa_num_heads=3, medusa_num_layers=2,
                version=2)
  save_file(t, str(src / "adapter.safetensors"))
  convert(src, tmp_path / "o1", to="orbax")
  convert(tmp_path / "o1", tmp_path / "o2", to="orbax", num_heads=2, base_model="other")
  two = MedusaWeights.load_orbax(tmp_path / "o2")
  assert two.config == MedusaConfig(base_model_name_or_path="other", medusa_num_heads=2,
                                    medusa_num_layers=2, version=2.0)
  full = MedusaWeights.load_orbax(tmp_path / "o1")
  x = rng.standard_normal((2, H)).astype(np.float32)
  lm_w = rng.standard_normal((H, V)).astype(np.float32)
  np.testing.assert_array_equal(_outputs(two, x, lm_w)[1], _outputs(full, x, lm_w)[1][:, :2])


def test_medusa2_full_model_file_and_safetensors_target(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  heads = head_tensors(rng, n=2, hidden=H, prefix="medusa_head.")
  other = {"model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32)}
  src = tmp_path / "full"
  _write_config(src, base_model_name_or_path="zephyr", medusa_num_heads=2, medusa_num_layers=1,
                hidden_size=H)
  torch.save({k: torch.from_numpy(v) for k, v in {**heads, **other}.items()}, src / "model.pt")
  res = convert(src, tmp_path / "flat.safetensors", to="safetensors")
  assert res.config is None and res.heads_in_source == 2
  flat = load_file(tmp_path / "flat.safetensors")
  _assert_same_tensors(flat, {k[len("medusa_head."):]: v for k, v in heads.items()})
  found = inspect_heads(tmp_path / "flat.safetensors")
  assert (found.num_heads, found.num_layers, found.per_head_lm_head, found.dtype) == (
      2, 1, False, "float32")
  convert(tmp_path / "flat.safetensors", tmp_path / "lorax", base_model="zephyr")
  _assert_same_tensors(load_file(tmp_path / "lorax" / "model.safetensors"), flat)


def test_overwrite_replaces_stale_weight_files(tmp_path):
  rng = np.random.default_rng(4)
  save_file(head_tensors(rng, n=2, hidden=H), str(tmp_path / "a.safetensors"))
  out = tmp_path / "out"
  out.mkdir()
  save_file(head_tensors(rng, n=5, hidden=H), str(out / "old_heads.safetensors"))
  with pytest.raises(ConfigError, match="--overwrite"):
    convert(tmp_path / "a.safetensors", out, base_model="b")
  convert(tmp_path / "a.safetensors", out, base_model="b", overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert load_medusa_adapter(out).speculative_tokens == 2


def test_errors(tmp_path):
  rng = np.random.default_rng(5)
  save_file(head_tensors(rng, n=2, hidden=H), str(tmp_path / "h.safetensors"))
  src = tmp_path / "h.safetensors"
  with pytest.raises(WeightsNotFoundError, match="no such file"):
    convert(tmp_path / "missing", tmp_path / "o")
  with pytest.raises(ConfigError, match="only 2 heads"):
    convert(src, tmp_path / "o", num_heads=3, base_model="b")
  for bad in (0, -1, True, 1.5):
    with pytest.raises(ConfigError, match="--num-heads"):
      convert(src, tmp_path / "o", num_heads=bad, base_model="b")
  with pytest.raises(ConfigError, match="expected one of lorax, orbax, safetensors"):
    convert(src, tmp_path / "o", to="gguf")
  with pytest.raises(ConfigError, match="is the source"):
    convert(src, src)
  with pytest.raises(ConfigError, match="safetensors target keeps every tensor"):
    convert(src, tmp_path / "x.safetensors", to="safetensors", num_heads=1)
  save_file({"lm_head.weight": rng.standard_normal((V, H)).astype(np.float32)},
            str(tmp_path / "nohead.safetensors"))
  with pytest.raises(MissingTensorError):
    convert(tmp_path / "nohead.safetensors", tmp_path / "o", base_model="b")
  (tmp_path / "junk.safetensors").write_bytes(rng.bytes(64))
  with pytest.raises(CorruptWeightsError):
    convert(tmp_path / "junk.safetensors", tmp_path / "o", base_model="b")
  bad_cfg = tmp_path / "badcfg"
  bad_cfg.mkdir()
  (bad_cfg / "config.json").write_text("{not json")
  save_file(head_tensors(rng, n=1, hidden=H), str(bad_cfg / "m.safetensors"))
  with pytest.raises(ConfigError, match="not valid JSON"):
    convert(bad_cfg, tmp_path / "o")
  assert not (tmp_path / "o").exists()
