"""Configs: MedusaConfig (a Medusa adapter's ``config.json``) and EngineConfig (every engine knob).

This module also holds the platform policy: the one test of which accelerator
runs (:meth:`Platform.current`), the one table of per-platform defaults
(:data:`TREE_ROWS`), and the one read of LoRAX's speculation guard variable
(:func:`speculation_max_batch_size`). It imports no JAX at module level, so a
command line can build an :class:`EngineConfig` from its flags before JAX loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

from medusa_jax import _atomic
from medusa_jax.errors import ConfigError
from medusa_jax.options import Option

CONFIG_NAME = "config.json"

MAX_BATCH_ENV = "LORAX_SPECULATION_MAX_BATCH_SIZE"
DEFAULT_MAX_BATCH = 32


def speculation_max_batch_size(limit: int | None = None) -> int:
  """LoRAX's speculation max-batch guard: ``limit``, else the environment, else 32.

  V2 heads skip drafting when the rows entering the LM head exceed it. This is
  the one place the environment variable is read: loaders and the engine
  config resolve the limit here and hand heads a plain integer.

  Raises:
    ConfigError: the limit (or the variable) is not a non-negative integer.
  """
  if limit is None:
    raw = os.environ.get(MAX_BATCH_ENV)
    if raw is None or raw.strip() == "":
      return DEFAULT_MAX_BATCH
    try:
      limit = int(raw)
    except ValueError:
      limit = -1
    if limit < 0:
      raise ConfigError(f"{MAX_BATCH_ENV}={raw!r}: expected a non-negative integer")
    return limit
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise ConfigError(f"max_batch_size: expected a non-negative integer, got {limit!r}")
  return limit


class Platform(Option):
  """The kind of device JAX runs on (``jax.default_backend()``), parsed once."""
  __error__ = ConfigError
  CPU = "cpu"
  GPU = "gpu"
  TPU = "tpu"

  @classmethod
  def current(cls) -> "Platform":
    """The default backend's platform. The one place the backend is asked.

    A backend other than cpu, gpu or tpu (a plugin) counts as a GPU: an
    accelerator on which extra verified rows are nearly free.
    """
    import jax  # here, not at the top: building configs needs no JAX
    backend = jax.default_backend()
    return cls.CPU if backend == "cpu" else cls.TPU if backend == "tpu" else cls.GPU

  @property
  def is_gpu(self) -> bool:
    return self is Platform.GPU


TREE_ROWS: Mapping[Platform, int] = {Platform.CPU: 3, Platform.GPU: 64, Platform.TPU: 64}
"""Default B * T budget of the adaptive tree, per platform.

CPU: every verified row costs compute; with SmolLM2 a step over the 3-node
best-first tree (the root and the heads' top-2 first drafts) costs about 1.5
plain steps, larger trees more than their extra accepted tokens
(docs/perf_decode.md). GPU: on an H100, 64 gives the 64-node tree at batch 1,
16 nodes at batch 4 and 4 at 16, the best measured end-to-end speed-ups
(1.55x / 1.73x / 1.99x); 256 made a 64-node tree at batch 4 cost 2.2x a plain
step. TPU: not measured; the GPU value.
"""

# Decode steps per jitted call (one device loop): the host pays once per K
# steps. Chosen by measurement (docs/perf.md, H200, SmolLM2 plain step at
# batch 1): 3.44 / 1.95 / 1.48 / 1.38 ms per step at K = 1 / 4 / 8 / 16 with a
# host read after every call, against 1.20 ms in-graph; K = 16 was the fastest
# at batch 1, 4 and 64. On the CPU a step (~20 ms) dwarfs the host's share,
# and K = 4 keeps streamed text smooth.
STEPS_PER_CALL: Mapping[Platform, int] = {Platform.CPU: 4, Platform.GPU: 16, Platform.TPU: 16}

# Whether the K-step loop leaves early once every row is done. XLA:GPU reads a
# while loop's predicate back to the host every iteration; a loop of known trip
# count does not (H200, SmolLM2, batch 1, K = 16: plain step 1.177 ms against
# 1.208 with the early exit, 64-node tree equal), so there the loop runs its K
# iterations (finished rows emit nothing); on a CPU the test is free and a
# wasted step costs ~25 ms; a TPU runs the loop on the device.
STOP_WHEN_DONE: Mapping[Platform, bool] = {Platform.CPU: True, Platform.GPU: False,
                                           Platform.TPU: True}


TREE_POLICY_ENV = "MEDUSA_JAX_TREE_POLICY"
"""Environment variable naming the default tree policy ("measured" or "budget")."""

TREE_POLICIES = ("measured", "budget")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
  """Every knob of the generation engine; per-platform defaults resolved once.

  Fields left None take the platform's default in ``__post_init__`` (so a
  built config holds plain values); change one with ``dataclasses.replace``.
  The defaults are resolved when the config is built: for another platform's
  defaults build a new ``EngineConfig(platform=...)`` rather than replacing
  ``platform`` in a built one.

  Attributes:
    max_cache_len: the largest KV cache (prompt + new tokens + tree nodes).
    min_cache_len: the smallest cache bucket (a larger one means fewer
      distinct shapes, hence fewer compilations, across calls).
    cache_dtype: KV cache dtype; None: the model's compute dtype.
    tree_policy: how ``speculate="tree"`` picks its tree when none is given:
      "measured" (time the candidate trees on this device at the batch size
      in use, once, cached under ``$MEDUSA_JAX_HOME/policy``, and take the
      most expected tokens per second, plain decoding included:
      ``decoding.policy``) or "budget" (the row budget ``max_tree_rows``);
      None: ``$MEDUSA_JAX_TREE_POLICY``, else "measured".
    max_tree_rows: B * T budget of the "budget" tree policy; None: the
      platform's :data:`TREE_ROWS`.
    tree_choices: the best-first path list the adaptive policy cuts trees
      from, or a name of ``tree.NAMED_TREES``; None: Medusa's ``mc_sim_7b_63``
      (``Engine.load`` reads an adapter's ``medusa_choices.json`` here).
    max_batch_size: LoRAX's speculation guard for ``speculate="chain"``;
      None: the heads' own limit, else ``LORAX_SPECULATION_MAX_BATCH_SIZE``,
      else 32 (:meth:`speculation_limit`).
    eos_ids: ids that end a request; None: the model config's.
    transpose_lm_head: keep a [H, V] copy of a tied embedding for the LM
      head; None: on a CPU only, where it makes a tree step markedly cheaper.
    steps_per_call: K decode steps per jitted call (a device loop; the host
      reads their tokens together); None: the platform's :data:`STEPS_PER_CALL`.
    platform: the platform whose defaults apply; None: the running one.
  """

  max_cache_len: int = 2048
  min_cache_len: int = 64
  cache_dtype: Any = None
  tree_policy: str | None = None
  max_tree_rows: int | None = None
  tree_choices: tuple[tuple[int, ...], ...] | str | None = None
  max_batch_size: int | None = None
  eos_ids: tuple[int, ...] | None = None
  transpose_lm_head: bool | None = None
  steps_per_call: int | None = None
  platform: Platform | None = None

  def __post_init__(self):
    platform = Platform.current() if self.platform is None else Platform.parse(self.platform)
    object.__setattr__(self, "platform", platform)
    for name in ("max_cache_len", "min_cache_len"):
      object.__setattr__(self, name, _check_positive_int(name, getattr(self, name), None))
    env = os.environ.get(TREE_POLICY_ENV) if self.tree_policy is None else None
    policy = self.tree_policy if self.tree_policy is not None else env or "measured"
    where = f" (from ${TREE_POLICY_ENV})" if env else ""
    if policy not in TREE_POLICIES:
      raise ConfigError(f"tree_policy={policy!r}{where}: expected one of"
                        f" {', '.join(TREE_POLICIES)}")
    object.__setattr__(self, "tree_policy", policy)
    rows = TREE_ROWS[platform] if self.max_tree_rows is None else self.max_tree_rows
    object.__setattr__(self, "max_tree_rows", _check_positive_int("max_tree_rows", rows, None))
    steps = STEPS_PER_CALL[platform] if self.steps_per_call is None else self.steps_per_call
    object.__setattr__(self, "steps_per_call",
                       _check_positive_int("steps_per_call", steps, None))
    if self.max_batch_size is not None:
      speculation_max_batch_size(self.max_batch_size)  # validates
    if self.transpose_lm_head is None:
      object.__setattr__(self, "transpose_lm_head", platform is Platform.CPU)
    elif not isinstance(self.transpose_lm_head, bool):
      raise ConfigError(f"transpose_lm_head: expected a bool, got {self.transpose_lm_head!r}")
    if self.eos_ids is not None:
      object.__setattr__(self, "eos_ids", _int_tuple("eos_ids", self.eos_ids))
    choices = self.tree_choices
    if choices is not None and not isinstance(choices, str):
      if not isinstance(choices, Sequence):
        raise ConfigError(f"tree_choices: expected a list of paths or a tree name, got"
                          f" {type(choices).__name__}")
      object.__setattr__(self, "tree_choices", tuple(
          _int_tuple(f"tree_choices[{i}]", p) for i, p in enumerate(choices)))

  def speculation_limit(self, heads_limit: int | None = None) -> int:
    """LoRAX's guard: this config's limit, else the heads' own, else the env / 32."""
    return speculation_max_batch_size(
        self.max_batch_size if self.max_batch_size is not None else heads_limit)


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    return cls.load(raw, source=path)

  def to_dict(self) -> dict[str, Any]:
    """The ``config.json`` LoRAX reads (``version`` written as given)."""
    return {
        "base_model_name_or_path": self.base_model_name_or_path,
        "medusa_num_heads": self.medusa_num_heads,
        "medusa_num_layers": self.medusa_num_layers,
        "version": self.version,
    }

  def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes ``out_dir/config.json`` atomically and returns its path.

    Raises:
      OutputExistsError: the file exists and ``overwrite`` is False.
      WriteError: the file cannot be written (disk full, ...).
    """
    path = os.path.join(os.fspath(out_dir), CONFIG_NAME)
    with _atomic.writing(out_dir):
      os.makedirs(out_dir, exist_ok=True)
    return _atomic.write_json(path, self.to_dict(), overwrite=overwrite)


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise ConfigError(f"{name}: expected a sequence of integers, got {values!r}")
  for v in values:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
      raise ConfigError(f"{name}: expected a sequence of integers, got {values!r}")
  return tuple(int(v) for v in values)


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
