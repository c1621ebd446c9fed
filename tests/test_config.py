"""MedusaConfig: LoRAX's four fields, and an error naming field and file for every bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medusa_jax.config import MedusaConfig
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
