"""MedusaConfig: the four fields of a Medusa adapter's ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from medusa_jax.errors import ConfigError

CONFIG_NAME = "config.json"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MedusaConfig:
  """Configuration of a Medusa adapter, as LoRAX reads it.

  Attributes:
    base_model_name_or_path: the base model the heads were trained on.
    medusa_num_heads: n, the number of draft heads (head k predicts token
      t + k + 2 from the hidden state at t).
    medusa_num_layers: L, ResBlocks per head. V2 (fused) heads need L == 1.
    version: adapter format version, stored as float; only gates dynamic
      (per-request) loading, which needs version >= 2.
  """

  base_model_name_or_path: str
  medusa_num_heads: int
  medusa_num_layers: int
  version: float = 1.0

  def __post_init__(self):
    # Normalise in place (3.0 -> 3, version 2 -> 2.0) so fields have one type.
    for name in ("medusa_num_heads", "medusa_num_layers"):
      object.__setattr__(self, name, _check_positive_int(name, getattr(self, name), None))
    if not isinstance(self.base_model_name_or_path, str):
      raise ConfigError(
          f"base_model_name_or_path: expected a string, got"
          f" {type(self.base_model_name_or_path).__name__}")
    if (isinstance(self.version, bool) or not isinstance(self.version, (int, float))
        or not math.isfinite(self.version)):
      raise ConfigError(f"version: expected a finite number, got {self.version!r}")
    object.__setattr__(self, "version", float(self.version))

  @classmethod
  def load(cls, config: Mapping[str, Any], *, source: str | None = None) -> "MedusaConfig":
    """Builds a config from a parsed ``config.json`` dict.

    Unknown keys are ignored (as LoRAX does). ``version`` defaults to 1 and is
    stored as a float.

    Args:
      config: the parsed JSON object.
      source: the file it came from, named in error messages.

    Raises:
      ConfigError: a field is missing or has a bad type or value.
    """
    where = f" in {source}" if source else ""
    if not isinstance(config, Mapping):
      raise ConfigError(
          f"Medusa config{where}: expected a JSON object, got {type(config).__name__}")
    for key in ("base_model_name_or_path", "medusa_num_heads", "medusa_num_layers"):
      if key not in config:
        raise ConfigError(f"{key}: missing from the Medusa config{where}")
    base = config["base_model_name_or_path"]
    if not isinstance(base, str):
      raise ConfigError(f"base_model_name_or_path{where}: expected a string, got {base!r}")
    heads = _check_positive_int("medusa_num_heads", config["medusa_num_heads"], where)
    layers = _check_positive_int("medusa_num_layers", config["medusa_num_layers"], where)
    raw_version = config.get("version", 1)
    try:
      if isinstance(raw_version, bool):
        raise TypeError
      version = float(raw_version)
    except (TypeError, ValueError):
      raise ConfigError(f"version{where}: expected a number, got {raw_version!r}") from None
    if not math.isfinite(version):
      raise ConfigError(f"version{where}: expected a finite number, got {raw_version!r}")
    return cls(base_model_name_or_path=base, medusa_num_heads=heads,
               medusa_num_layers=layers, version=version)

  @classmethod
  def from_pretrained(cls, adapter_dir: str | os.PathLike) -> "MedusaConfig":
    """Reads ``adapter_dir/config.json`` (or the file itself if a path to it is given)."""
    path = os.fspath(adapter_dir)
    if os.path.isdir(path):
      path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(path):
      raise ConfigError(f"{path}: no Medusa config file found")
    try:
      with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.load(raw, source=path)

  def to_dict(self) -> dict[str, Any]:
    """The ``config.json`` LoRAX reads (``version`` written as given)."""
    return {
        "base_model_name_or_path": self.base_model_name_or_path,
        "medusa_num_heads": self.medusa_num_heads,
        "medusa_num_layers": self.medusa_num_layers,
        "version": self.version,
    }

  def save(self, out_dir: str | os.PathLike) -> str:
    """Writes ``out_dir/config.json`` and returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(self.to_dict(), f, indent=2)
      f.write("\n")
    return path


def _check_positive_int(name: str, value: Any, where: str | None) -> int:
  where = where or ""
  # JSON has one number type: accept 3.0 but not 3.5, True or "3".
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"{name}{where}: expected a positive integer, got {value!r}")
  if isinstance(value, float):
    if not value.is_integer():
      raise ConfigError(f"{name}{where}: expected a positive integer, got {value!r}")
    value = int(value)
  if value < 1:
    raise ConfigError(f"{name}{where}: expected a positive integer, got {value!r}")
  return value
