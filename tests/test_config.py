"""MedusaConfig: LoRAX's four fields, and an error naming field and file for every bad input.
EngineConfig: per-platform defaults, the LoRAX guard variable, field checks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medusa_jax.config import (MAX_BATCH_ENV, TREE_ROWS, EngineConfig, MedusaConfig, Platform)
from medusa_jax.errors import ConfigError, MedusaError

GOOD = {"base_model_name_or_path": "org/base", "medusa_num_heads": 3, "medusa_num_layers": 1,
        "version": 2}


def _write(tmp_path, obj, name="config.json"):
  path = tmp_path / name
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return path


def test_load_stores_version_as_float_and_ignores_unknown_keys():
  cfg = MedusaConfig.load({**GOOD, "transformers_version": "4.31.0"})
  assert cfg == MedusaConfig(base_model_name_or_path="org/base", medusa_num_heads=3,
                             medusa_num_layers=1, version=2.0)
  assert isinstance(cfg.version, float) and cfg.version == 2.0


def test_version_defaults_to_one():
  cfg = MedusaConfig.load({k: v for k, v in GOOD.items() if k != "version"})
  assert cfg.version == 1.0 and isinstance(cfg.version, float)


def test_integral_floats_are_accepted_as_ints():
  cfg = MedusaConfig.load({**GOOD, "medusa_num_heads": 4.0})
  assert cfg.medusa_num_heads == 4 and isinstance(cfg.medusa_num_heads, int)


def test_constructor_normalises_types():
  cfg = MedusaConfig(base_model_name_or_path="b", medusa_num_heads=2.0, medusa_num_layers=1,
                     version=2)
  assert isinstance(cfg.medusa_num_heads, int) and isinstance(cfg.version, float)
  assert hash(cfg) == hash(dataclasses.replace(cfg))


@pytest.mark.parametrize("field", ["base_model_name_or_path", "medusa_num_heads",
                                   "medusa_num_layers"])
def test_missing_field_names_field_and_file(tmp_path, field):
  path = _write(tmp_path, {k: v for k, v in GOOD.items() if k != field})
  with pytest.raises(ConfigError) as e:
    MedusaConfig.from_pretrained(tmp_path)
  assert field in str(e.value) and str(path) in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("field", ["medusa_num_heads", "medusa_num_layers"])
@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3", None, [3]])
def test_bad_counts_name_field_file_and_value(tmp_path, field, bad):
  path = _write(tmp_path, {**GOOD, field: bad})
  with pytest.raises(ConfigError) as e:
    MedusaConfig.from_pretrained(path)
  msg = str(e.value)
  assert field in msg and str(path) in msg and "positive integer" in msg and repr(bad) in msg


@pytest.mark.parametrize("bad", [True, "two", None, float("nan"), float("inf")])
def test_bad_version(bad):
  with pytest.raises(ConfigError, match="version"):
    MedusaConfig.load({**GOOD, "version": bad}, source="x/config.json")


def test_version_as_numeric_string_is_accepted_like_lorax():
  assert MedusaConfig.load({**GOOD, "version": "2"}).version == 2.0


def test_bad_base_model():
  with pytest.raises(ConfigError, match="base_model_name_or_path.*in a.json"):
    MedusaConfig.load({**GOOD, "base_model_name_or_path": 7}, source="a.json")


def test_not_an_object(tmp_path):
  path = _write(tmp_path, [1, 2])
  with pytest.raises(ConfigError, match="expected a JSON object, got list"):
    MedusaConfig.from_pretrained(path)


def test_bad_json_names_file(tmp_path):
  path = _write(tmp_path, '{"medusa_num_heads": 3,')
  with pytest.raises(ConfigError) as e:
    MedusaConfig.from_pretrained(tmp_path)
  assert str(path) in str(e.value) and "not valid JSON" in str(e.value)


def test_missing_file(tmp_path):
  with pytest.raises(ConfigError, match="no Medusa config file"):
    MedusaConfig.from_pretrained(tmp_path)
  with pytest.raises(ConfigError, match="nope"):
    MedusaConfig.from_pretrained(tmp_path / "nope")


def test_constructor_validates():
  with pytest.raises(ConfigError, match="medusa_num_heads"):
    MedusaConfig(base_model_name_or_path="b", medusa_num_heads=0, medusa_num_layers=1)
  cfg = MedusaConfig.load(GOOD)
  with pytest.raises(ConfigError, match="medusa_num_layers"):
    dataclasses.replace(cfg, medusa_num_layers=-1)
  with pytest.raises(ConfigError, match="version"):
    dataclasses.replace(cfg, version="2")
  with pytest.raises(ConfigError, match="base_model_name_or_path"):
    dataclasses.replace(cfg, base_model_name_or_path=None)


def test_errors_are_value_errors():
  assert issubclass(ConfigError, MedusaError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("version", [1.0, 2.0, 2.5])
def test_save_round_trip(tmp_path, version):
  cfg = MedusaConfig(base_model_name_or_path="org/base", medusa_num_heads=5,
                     medusa_num_layers=2, version=version)
  path = cfg.save(tmp_path / "out")
  assert json.loads(open(path).read())["version"] == version
  assert MedusaConfig.from_pretrained(tmp_path / "out") == cfg
  assert MedusaConfig.from_pretrained(path) == cfg


# ----------------------------------------------------------------------------- EngineConfig


@pytest.mark.parametrize("platform, rows, transpose", [
    ("cpu", 3, True), ("gpu", 64, False), ("tpu", 64, False), (Platform.GPU, 64, False)])
def test_engine_config_platform_defaults(platform, rows, transpose):
  cfg = EngineConfig(platform=platform)
  assert cfg.platform is Platform.parse(platform)
  assert cfg.max_tree_rows == rows == TREE_ROWS[cfg.platform]
  assert cfg.transpose_lm_head is transpose
  # Explicit values win over the platform's.
  cfg = EngineConfig(platform=platform, max_tree_rows=17, transpose_lm_head=not transpose)
  assert cfg.max_tree_rows == 17 and cfg.transpose_lm_head is (not transpose)


def test_engine_config_defaults_follow_the_running_platform():
  assert Platform.current() is Platform.CPU  # the test machines (tests/conftest.py)
  cfg = EngineConfig()
  assert cfg.platform is Platform.CPU and cfg.max_tree_rows == TREE_ROWS[Platform.CPU]
  assert cfg == EngineConfig(platform="cpu")
  assert (cfg.max_cache_len, cfg.min_cache_len, cfg.cache_dtype, cfg.eos_ids) == (
      2048, 64, None, None)
  assert not Platform.CPU.is_gpu and Platform.GPU.is_gpu
  hash(cfg)  # frozen: usable as a static value


def test_engine_config_normalises_sequences():
  cfg = EngineConfig(eos_ids=[2, 5], tree_choices=[[0], [0, 1]])
  assert cfg.eos_ids == (2, 5) and cfg.tree_choices == ((0,), (0, 1))
  assert EngineConfig(tree_choices="chain_5").tree_choices == "chain_5"
  changed = dataclasses.replace(cfg, max_cache_len=128)
  assert changed.max_cache_len == 128 and changed.eos_ids == (2, 5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(platform="metal"), r"platform='metal'; expected one of cpu, gpu, tpu"),
    (dict(max_cache_len=0), r"max_cache_len: expected a positive integer, got 0"),
    (dict(min_cache_len=2.5), r"min_cache_len: expected a positive integer, got 2.5"),
    (dict(max_tree_rows=0), r"max_tree_rows: expected a positive integer, got 0"),
    (dict(max_batch_size=-1), r"max_batch_size: expected a non-negative integer, got -1"),
    (dict(transpose_lm_head="yes"), r"transpose_lm_head: expected a bool, got 'yes'"),
    (dict(eos_ids=[2, "x"]), r"eos_ids: expected a sequence of integers"),
    (dict(eos_ids=2), r"eos_ids: expected a sequence of integers, got 2"),
    (dict(tree_choices=[[0], ["a"]]), r"tree_choices\[1\]: expected a sequence of integers"),
    (dict(tree_choices=3), r"tree_choices: expected a list of paths or a tree name, got int"),
])
def test_engine_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    EngineConfig(**kwargs)


def test_speculation_limit_reads_the_lorax_variable_at_the_boundary(monkeypatch):
  monkeypatch.delenv(MAX_BATCH_ENV, raising=False)
  cfg = EngineConfig()
  assert cfg.speculation_limit() == 32
  monkeypatch.setenv(MAX_BATCH_ENV, "5")
  assert cfg.speculation_limit() == 5            # no limit anywhere: the variable
  assert cfg.speculation_limit(12) == 12         # the heads' own limit wins over it
  assert EngineConfig(max_batch_size=7).speculation_limit(12) == 7  # the config's wins
  assert EngineConfig(max_batch_size=0).speculation_limit(12) == 0
  monkeypatch.setenv(MAX_BATCH_ENV, "many")
  with pytest.raises(ConfigError, match=f"{MAX_BATCH_ENV}='many': expected a non-negative"):
    cfg.speculation_limit()


def test_tree_policy_defaults_to_measured_and_follows_the_environment(monkeypatch):
  from medusa_jax.config import TREE_POLICY_ENV
  monkeypatch.delenv(TREE_POLICY_ENV, raising=False)
  assert EngineConfig().tree_policy == "measured"
  monkeypatch.setenv(TREE_POLICY_ENV, "budget")
  assert EngineConfig().tree_policy == "budget"
  assert EngineConfig(tree_policy="measured").tree_policy == "measured"  # explicit wins
  monkeypatch.setenv(TREE_POLICY_ENV, "fastest")
  with pytest.raises(ConfigError, match=r"tree_policy='fastest' \(from \$MEDUSA_JAX_TREE_POLICY\)"):
    EngineConfig()
  with pytest.raises(ConfigError, match="tree_policy='auto': expected one of measured, budget"):
    EngineConfig(tree_policy="auto")
