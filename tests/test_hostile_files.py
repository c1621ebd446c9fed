"""Every loader, fed random bytes, truncations and bit flips of a valid file, either loads
correctly or raises a typed MedusaError: never a bare exception, never a hang.

Loaders: a LoRAX adapter (safetensors and its config.json), medusa_choices.json, a GGUF
header, an Orbax checkpoint's metadata (medusa_jax.json and Orbax's own _METADATA), the
asset manifest, and a training config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medusa_files import head_tensors
from safetensors.numpy import save_file

from medusa_jax.errors import MedusaError

H = 8
SETTINGS = settings(max_examples=int(os.environ.get("MEDUSA_JAX_HOSTILE_EXAMPLES", "12")), deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def damaged(draw, valid: bytes, focus: int | None = None):
  """Random bytes, a truncation, or 1-8 bit flips (in the first ``focus`` bytes) of ``valid``."""
  kind = draw(st.sampled_from(["random", "truncate", "flip"]))
  if kind == "random":
    return draw(st.binary(min_size=0, max_size=2 * len(valid) + 16))
  if kind == "truncate":
    return valid[:draw(st.integers(0, max(len(valid) - 1, 0)))]
  data = bytearray(valid)
  span = min(len(data), focus or len(data))
  for _ in range(draw(st.integers(1, 8))):
    i = draw(st.integers(0, span - 1))
    data[i] ^= 1 << draw(st.integers(0, 7))
  return bytes(data)


def _typed_or_loads(load, check=lambda result: None):
  try:
    result = load()
  except MedusaError:
    return
  check(result)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
  root = tmp_path_factory.mktemp("adapter")
  save_file(head_tensors(np.random.default_rng(), n=2, hidden=H), str(root / "model.safetensors"))
  (root / "config.json").write_text(json.dumps({"base_model_name_or_path": "b",
                                                "medusa_num_heads": 2, "medusa_num_layers": 1,
                                                "version": 2}))
  (root / "medusa_choices.json").write_text("[[0], [1], [0, 0]]")
  return root


def _copy_with(src: Path, name: str, data: bytes) -> Path:
  dst = Path(tempfile.mkdtemp())
  shutil.copytree(src, dst, dirs_exist_ok=True)
  (dst / name).write_bytes(data)
  return dst


def _finite_heads(w):
  assert w.speculative_tokens == 2 and w.hidden_size == H
  assert all(np.isfinite(v.astype(np.float32)).all() for v in w.lorax_tensors().values())


def test_adapter_weights(adapter):
  from medusa_jax.adapters.weights import load_medusa_adapter
  valid = (adapter / "model.safetensors").read_bytes()

  @SETTINGS
  @given(damaged(valid, focus=200))
  def check(data):
    d = _copy_with(adapter, "model.safetensors", data)
    try:
      _typed_or_loads(lambda: load_medusa_adapter(d), _finite_heads)
    finally:
      shutil.rmtree(d)
  check()


def test_adapter_config_and_choices(adapter):
  from medusa_jax.adapters.io import adapter_choices
  from medusa_jax.adapters.weights import load_medusa_adapter

  @SETTINGS
  @given(damaged((adapter / "config.json").read_bytes()),
         damaged((adapter / "medusa_choices.json").read_bytes()))
  def check(config, choices):
    d = _copy_with(adapter, "config.json", config)
    (d / "medusa_choices.json").write_bytes(choices)
    try:
      _typed_or_loads(lambda: load_medusa_adapter(d), _finite_heads)
      _typed_or_loads(lambda: adapter_choices(d), lambda c: all(
          isinstance(r, int) and r >= 0 for p in c for r in p))
    finally:
      shutil.rmtree(d)
  check()


def test_gguf_header(tmp_path):
  gguf = pytest.importorskip("gguf")
  from medusa_jax.models.gguf import gguf_config, open_gguf
  path = tmp_path / "t.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  for add, value in ((w.add_block_count, 1), (w.add_context_length, 64),
                     (w.add_embedding_length, 8), (w.add_feed_forward_length, 16),
                     (w.add_head_count, 2), (w.add_head_count_kv, 1),
                     (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, 4)):
    add(value)
  w.add_tensor("output_norm.weight", np.random.default_rng().standard_normal(8).astype(
      np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  valid = path.read_bytes()

  @SETTINGS
  @given(damaged(valid, focus=len(valid) - 64))
  def check(data):
    p = Path(tempfile.mkdtemp()) / "t.gguf"
    p.write_bytes(data)
    try:
      _typed_or_loads(lambda: gguf_config(open_gguf(p), str(p)),
                      lambda cfg: isinstance(cfg["hidden_size"], int))
    finally:
      shutil.rmtree(p.parent)
  check()


def test_orbax_metadata(adapter, tmp_path):
  pytest.importorskip("orbax.checkpoint")
  from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
  ckpt = tmp_path / "ckpt"
  load_medusa_adapter(adapter).save_orbax(ckpt)
  meta = (ckpt / "medusa_jax.json").read_bytes()
  orbax_meta = (ckpt / "state" / "_METADATA").read_bytes()

  @SETTINGS
  @given(st.one_of(st.tuples(st.just("medusa_jax.json"), damaged(meta)),
                   st.tuples(st.just(os.path.join("state", "_METADATA")), damaged(orbax_meta))))
  def check(case):
    name, data = case
    d = _copy_with(ckpt, name, data)
    try:
      _typed_or_loads(lambda: MedusaWeights.load_orbax(d), _finite_heads)
    finally:
      shutil.rmtree(d)
  check()


def test_asset_manifest(tmp_path):
  from medusa_jax.assets import cache as assets
  home = tmp_path / "home"
  (home / "fake").mkdir(parents=True)
  (home / "fake" / "a.bin").write_bytes(os.urandom(64))
  rec = assets._record(home / "fake" / "a.bin", assets.sha256_file(home / "fake" / "a.bin"),
                       fast=True)
  valid = json.dumps({"format": 1, "entries": {"package:x==1": {"sha256": "s", "files": {
      "fake/a.bin": rec}}}}).encode()

  @SETTINGS
  @given(damaged(valid))
  def check(data):
    (home / assets.MANIFEST).write_bytes(data)
    entries = assets._load_manifest(home)  # never raises: a bad manifest is rebuilt
    assert isinstance(entries, dict)
    for entry in entries.values():
      assets._is_valid(home, entry["files"], deep=False, need_fast=True)
  check()


def test_training_config():
  from medusa_jax.training.config import TrainConfig
  root = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
  valid = root.read_bytes()

  @SETTINGS
  @given(damaged(valid))
  def check(data):
    p = Path(tempfile.mkdtemp()) / "train.json"
    p.write_bytes(data)
    try:
      _typed_or_loads(lambda: TrainConfig.from_file(p),
                      lambda cfg: isinstance(cfg, TrainConfig))
    finally:
      shutil.rmtree(p.parent)
  check()
