"""Architecture of a Llama-family decoder, read from a Hugging Face ``config.json``.

Shape letters as in :mod:`medusa_jax.models.llama`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Any, Mapping

import numpy as np

from medusa_jax.errors import ConfigError, UnsupportedModelError
from medusa_jax._validate import read_json_object, require_ints
from medusa_jax.models.families import (FAMILY_DEFAULTS, Family, LayerType, check_fields,
                                        check_rope, family_of)


class RopeType(enum.Enum):
  """How RoPE frequencies are derived from ``theta`` (Hugging Face ``rope_type``)."""
  DEFAULT = "default"
  LINEAR = "linear"
  """Positions divided by ``factor`` (all frequencies scaled down)."""
  LLAMA3 = "llama3"
  """Llama 3.1's band-wise scaling: low frequencies / ``factor``, high kept, middle blended."""
  DYNAMIC = "dynamic"
  """Dynamic NTK: transformers rescales ``theta`` for a call longer than
  ``max_position_embeddings`` and uses the default frequencies up to it. Only
  the exact part is implemented: default frequencies, with the positions
  limited to ``max_position_embeddings`` (``LlamaConfig.position_limit``)."""

  @classmethod
  def parse(cls, value: str, where: str) -> RopeType:
    try:
      return cls(value)
    except ValueError:
      raise UnsupportedModelError(f"{where}: rope_type={value!r} is not supported; expected one"
                                  f" of {', '.join(t.value for t in cls)}") from None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` in HF configs)."""
  rope_type: RopeType = RopeType.DEFAULT
  factor: float = 1.0
  low_freq_factor: float = 1.0
  """llama3 only."""
  high_freq_factor: float = 4.0
  """llama3 only."""
  original_max_position_embeddings: int = 8192
  """llama3 only: the context length the model was pre-trained with."""

  def __post_init__(self):
    if not isinstance(self.rope_type, RopeType):
      raise ConfigError(f"RopeScaling.rope_type: expected a RopeType, got {self.rope_type!r}")
    if not self.factor > 0:
      raise ConfigError(f"RopeScaling.factor={self.factor!r}: expected > 0")
    if self.rope_type is RopeType.LLAMA3 and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ConfigError(f"RopeScaling: expected high_freq_factor > low_freq_factor > 0, got "
                        f"{self.high_freq_factor!r} and {self.low_freq_factor!r}")

  @classmethod
  def from_hf(cls, spec: Mapping[str, Any] | None, where: str) -> RopeScaling:
    if not spec:
      return cls()
    check_rope(spec, where)
    kind = RopeType.parse(spec.get("rope_type", spec.get("type", "default")), where)
    if kind is RopeType.DEFAULT:
      return cls()
    if kind is RopeType.DYNAMIC:
      return cls(rope_type=kind, factor=_require(dict(spec), "factor", float, where))
    num = lambda k, default: _require({k: spec.get(k, default)}, k, float, where)  # noqa: E731
    return cls(rope_type=kind, factor=num("factor", None),
               low_freq_factor=num("low_freq_factor", 1.0),
               high_freq_factor=num("high_freq_factor", 4.0),
               original_max_position_embeddings=int(num("original_max_position_embeddings", 8192)))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> np.ndarray:
  """RoPE inverse frequencies [D/2] float32, as transformers computes them."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  inv = inv.astype(np.float64)
  if scaling.rope_type is RopeType.LINEAR:
    inv = inv / scaling.factor
  elif scaling.rope_type is RopeType.LLAMA3:
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, blended, scaled)
  return inv.astype(np.float32)


def _require(d: Mapping, key: str, kind: type, where: str):
  if key not in d or d[key] is None:
    raise ConfigError(f"{where}: missing field {key!r}")
  value = d[key]
  if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
  if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
    raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
  return kind(value)


def _optional_id(d: Mapping, key: str, where: str) -> int | None:
  value = d.get(key)
  if value is None:
    return None
  if isinstance(value, list) and value:  # some configs list several ids
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f"{where}: {key}: expected an integer token id, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (Llama, Mistral, Qwen2).

  Load with :meth:`from_hf` (a Hugging Face ``config.json``, checked field by
  field against :mod:`medusa_jax.models.families`) or make a small
  random-test config with :meth:`tiny`; change with ``dataclasses.replace``.
  """
  vocab_size: int
  """V: rows of the embedding (and columns of the logits)."""
  hidden_size: int
  """H: width of the residual stream."""
  intermediate_size: int
  """F: width of the gated MLP."""
  num_hidden_layers: int
  num_attention_heads: int
  """Q: query heads."""
  num_key_value_heads: int
  """G: key/value heads; divides Q (Q == G is plain multi-head attention)."""
  head_dim: int
  """D: per-head width (even, for RoPE)."""
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  """When True the LM head is the transposed input embedding."""
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  """Every id that ends a generation."""
  pad_token_id: int | None = None
  rope_scaling: RopeScaling = RopeScaling()
  """RoPE frequency scaling (none by default)."""
  family: Family = Family.LLAMA
  """The Hugging Face ``model_type``."""
  qkv_bias: bool = False
  """q_proj, k_proj and v_proj have biases (Qwen2; Llama's ``attention_bias``)."""
  o_bias: bool = False
  """o_proj has a bias (Llama's ``attention_bias``)."""
  mlp_bias: bool = False
  """gate_proj, up_proj and down_proj have biases (Llama's ``mlp_bias``)."""
  sliding_window: int | None = None
  """W: a sliding layer's query at position p sees keys at positions ``> p - W``."""
  layer_types: tuple[LayerType, ...] = ()
  """Per layer, full or sliding attention; () = every layer sliding when
  ``sliding_window`` is set (Mistral), else every layer full."""

  def __post_init__(self):
    require_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim",
                        "max_position_embeddings"), minimum=1, prefix="LlamaConfig.")
    require_ints(self, ("sliding_window",), minimum=1, allow_none=True, prefix="LlamaConfig.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"LlamaConfig.num_key_value_heads={self.num_key_value_heads}: expected a divisor of "
          f"num_attention_heads={self.num_attention_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"LlamaConfig.head_dim={self.head_dim}: expected an even number (RoPE)")
    if not self.rms_norm_eps > 0:
      raise ConfigError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps!r}: expected > 0")
    if not self.rope_theta > 0:
      raise ConfigError(f"LlamaConfig.rope_theta={self.rope_theta!r}: expected > 0")
    if not isinstance(self.rope_scaling, RopeScaling):
      raise ConfigError(f"LlamaConfig.rope_scaling: expected a RopeScaling, got "
                        f"{self.rope_scaling!r}")
    if not isinstance(self.eos_token_ids, tuple) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in self.eos_token_ids):
      raise ConfigError(
          f"LlamaConfig.eos_token_ids: expected a tuple of ints, got {self.eos_token_ids!r}")
    if not isinstance(self.family, Family):
      raise ConfigError(f"LlamaConfig.family: expected a Family, got {self.family!r}")
    for name in ("qkv_bias", "o_bias", "mlp_bias"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"LlamaConfig.{name}: expected a bool, got {getattr(self, name)!r}")
    types = self.layer_types
    if not isinstance(types, tuple) or any(not isinstance(t, LayerType) for t in types) or (
        types and len(types) != self.num_hidden_layers):
      raise ConfigError(f"LlamaConfig.layer_types: expected () or {self.num_hidden_layers}"
                        f" LayerType values, got {types!r}")
    if LayerType.SLIDING in types and self.sliding_window is None:
      raise ConfigError("LlamaConfig.layer_types: sliding layers need a sliding_window")

  @property
  def num_groups(self) -> int:
    """Query heads per kv head (Q // G)."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies [D/2] float32."""
    return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

  @property
  def position_limit(self) -> int | None:
    """The longest sequence computed exactly, or None for no limit.

    Dynamic-NTK RoPE changes its frequencies past ``max_position_embeddings``
    (per call, in transformers), so the positions stay below it.
    """
    if self.rope_scaling.rope_type is RopeType.DYNAMIC:
      return self.max_position_embeddings
    return None

  def layer_window(self, layer: int) -> int | None:
    """The sliding window W of layer ``layer``, or None for full attention."""
    if self.sliding_window is None:
      return None
    if self.layer_types and self.layer_types[layer] is LayerType.FULL:
      return None
    return self.sliding_window

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> LlamaConfig:
    """Reads a Hugging Face Llama, Mistral or Qwen2 ``config.json``.

    Every field is checked against the allow-list of
    :mod:`medusa_jax.models.families`; missing fields take transformers'
    defaults for the family.

    Args:
      config: the parsed dict, the ``config.json`` file, or its directory.

    Raises:
      UnsupportedModelError: an unknown ``model_type``, or a field (or value)
        this model does not implement, named with its value.
      ConfigError: a required field is missing or has a bad value.
    """
    where = "config"
    if not isinstance(config, Mapping):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      where = path
      config = read_json_object(path)
    family = family_of(config, where)
    check_fields(config, family, where)
    d = {**FAMILY_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None}}
    for key in ("sliding_window", "rope_scaling", "bos_token_id", "eos_token_id"):
      if key in config and config[key] is None:
        d[key] = None  # an explicit null overrides the family default
    hidden = _require(d, "hidden_size", int, where)
    heads = _require(d, "num_attention_heads", int, where)
    kv = d.get("num_key_value_heads")
    kv = heads if kv is None else _require(d, "num_key_value_heads", int, where)
    head_dim = d.get("head_dim")
    if head_dim is None:
      if hidden % heads:
        raise ConfigError(f"{where}: hidden_size={hidden} is not a multiple of "
                          f"num_attention_heads={heads} and head_dim is not given")
      head_dim = hidden // heads
    else:
      head_dim = _require(d, "head_dim", int, where)

    theta = config.get("rope_theta")
    rope_params = d.get("rope_parameters") or {}
    if theta is None and isinstance(rope_params, Mapping):
      theta = rope_params.get("rope_theta")
    theta = d["rope_theta"] if theta is None else theta
    theta = _require({"rope_theta": theta}, "rope_theta", float, where)
    scaling = RopeScaling()
    for key, spec in (("rope_scaling", d.get("rope_scaling")), ("rope_parameters", rope_params)):
      if spec and not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: {key}: expected an object, got {spec!r}")
      if spec and scaling.rope_type is RopeType.DEFAULT:
        scaling = RopeScaling.from_hf(spec, f"{where}: {key}")
    act = d["hidden_act"]
    if act not in ("silu", "swish"):
      raise UnsupportedModelError(f"{where}: hidden_act={act!r} is not supported; expected"
                                  " 'silu'")
    qkv_bias = o_bias = mlp_bias = False
    if family is Family.LLAMA:
      for key in ("attention_bias", "mlp_bias"):
        if not isinstance(d[key], bool):
          raise ConfigError(f"{where}: {key}: expected a bool, got {d[key]!r}")
      qkv_bias = o_bias = d["attention_bias"]
      mlp_bias = d["mlp_bias"]
    elif family is Family.QWEN2:
      qkv_bias = True  # Qwen2's q/k/v projections always carry biases
    layers = _require(d, "num_hidden_layers", int, where)
    window, layer_types = _sliding(d, family, layers, where)

    eos = d.get("eos_token_id")
    if eos is None:
      eos_ids: tuple[int, ...] = ()
    else:
      eos_list = eos if isinstance(eos, list) else [eos]
      if any(isinstance(i, bool) or not isinstance(i, int) for i in eos_list):
        raise ConfigError(f"{where}: eos_token_id: expected an int or a list of ints, got {eos!r}")
      eos_ids = tuple(eos_list)
    tie = d["tie_word_embeddings"]
    if not isinstance(tie, bool):
      raise ConfigError(f"{where}: tie_word_embeddings: expected a bool, got {tie!r}")
    return cls(
        vocab_size=_require(d, "vocab_size", int, where),
        hidden_size=hidden,
        intermediate_size=_require(d, "intermediate_size", int, where),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=_require(d, "rms_norm_eps", float, where),
        rope_theta=theta,
        tie_word_embeddings=tie,
        max_position_embeddings=_require(d, "max_position_embeddings", int, where),
        bos_token_id=_optional_id(d, "bos_token_id", where),
        eos_token_ids=eos_ids,
        pad_token_id=_optional_id(d, "pad_token_id", where),
        rope_scaling=scaling,
        family=family, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
        sliding_window=window, layer_types=layer_types,
    )

  @classmethod
  def tiny(cls, **overrides) -> LlamaConfig:
    """A small config for random-weight tests (GQA with 2 query heads per kv head)."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=256,
                bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    base.update(overrides)
    return cls(**base)


def _sliding(d: Mapping[str, Any], family: Family, layers: int, where: str
             ) -> tuple[int | None, tuple[LayerType, ...]]:
  """(sliding_window, layer_types) as transformers reads them for ``family``."""
  window = d.get("sliding_window")
  if family is Family.LLAMA:
    return None, ()
  if window is not None:
    window = _require(d, "sliding_window", int, where)
    if window < 1:
      raise ConfigError(f"{where}: sliding_window={window}: expected a positive integer")
  if family is Family.MISTRAL:
    return window, ()
  # Qwen2: the window applies only with use_sliding_window, to the layers from
  # max_window_layers on, unless layer_types lists the layers explicitly.
  use = d.get("use_sliding_window", False)
  if not isinstance(use, bool):
    raise ConfigError(f"{where}: use_sliding_window: expected a bool, got {use!r}")
  window = window if use else None
  given = d.get("layer_types")
  if given is not None:
    if not isinstance(given, list) or len(given) != layers:
      raise ConfigError(f"{where}: layer_types: expected a list of {layers} entries, got"
                        f" {given!r:.80}")
    types = []
    for i, t in enumerate(given):
      try:
        types.append(LayerType(t))
      except ValueError:
        raise UnsupportedModelError(
            f"{where}: layer_types[{i}]={t!r} is not supported; expected one of"
            f" {', '.join(x.value for x in LayerType)}") from None
    if LayerType.SLIDING in types and window is None:
      raise UnsupportedModelError(f"{where}: layer_types has sliding_attention layers but no"
                                  " sliding_window (use_sliding_window is false)")
    return window, tuple(types)
  if window is None:
    return None, ()
  first = _require(d, "max_window_layers", int, where)
  return window, tuple(LayerType.SLIDING if i >= first else LayerType.FULL
                       for i in range(layers))
