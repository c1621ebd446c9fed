"""The Llama family in Flax NNX, with a static-shape KV cache.

Shapes: B batch, T new tokens per call (prompt chunk, one decode token, or the
nodes of a candidate tree), L cache length, H hidden, V vocab, Q query heads,
G key/value heads (GQA: query head i reads kv head ``i // (Q // G)``), D head
dim, F MLP width.

One forward call takes explicit RoPE positions and an attention mask over the
whole cache, so a tree of candidates is verified in one call: the caller puts
node t at position ``prefix + depth(t)`` and lets it see the cached prefix,
itself and its ancestors only.

Covers SmolLM2, Llama-2/3, Vicuna and Mistral-style checkpoints (pre-norm,
RMSNorm with a plain ``w``, RoPE in Hugging Face's rotate-half layout, SiLU-gated
MLP, no biases, tied or untied embeddings). Sliding-window attention is not
implemented: full attention over the cache is exact while the cache is no
longer than the window.

Numerics: matmuls take ``dtype`` operands (f32 or bf16) and accumulate in f32;
RMSNorm, RoPE and the softmax run in f32; logits are f32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.errors import (ConfigError, CorruptWeightsError, MissingTensorError,
                               RequestError, TensorShapeError, WeightsNotFoundError)

Array = jax.Array

# Added to masked-out attention scores. Finite, so a fully masked query row
# gives a uniform (not NaN) softmax; large enough that exp() underflows to 0.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- config


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
  """Architecture of a Llama-family decoder.

  Load with :meth:`from_hf` (a Hugging Face ``config.json``) or make a small
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

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"LlamaConfig.{name}: expected a positive integer, got {value!r}")
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
    if not isinstance(self.eos_token_ids, tuple) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in self.eos_token_ids):
      raise ConfigError(
          f"LlamaConfig.eos_token_ids: expected a tuple of ints, got {self.eos_token_ids!r}")

  @property
  def num_groups(self) -> int:
    """Query heads per kv head (Q // G)."""
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> LlamaConfig:
    """Reads a Hugging Face Llama/Mistral ``config.json``.

    Args:
      config: the parsed dict, the ``config.json`` file, or its directory.

    Raises:
      ConfigError: a required field is missing or has a bad value, or the
        config asks for a feature this model does not implement (biases,
        RoPE scaling, a non-SiLU activation).
    """
    where = "config"
    if not isinstance(config, Mapping):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      where = path
      try:
        with open(path, encoding="utf-8") as f:
          config = json.load(f)
      except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
      if not isinstance(config, Mapping):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    d = config
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

    theta = d.get("rope_theta")
    rope_params = d.get("rope_parameters") or {}
    if theta is None and isinstance(rope_params, Mapping):
      theta = rope_params.get("rope_theta")
    theta = 10000.0 if theta is None else _require({"rope_theta": theta}, "rope_theta", float, where)
    for key, spec in (("rope_scaling", d.get("rope_scaling")), ("rope_parameters", rope_params)):
      kind = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, Mapping) else None
      if spec and kind not in (None, "default"):
        raise ConfigError(f"{where}: {key}: rope_type={kind!r} is not supported; expected 'default'")
    for key in ("attention_bias", "mlp_bias"):
      if d.get(key):
        raise ConfigError(f"{where}: {key}=True is not supported; expected no biases")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise ConfigError(f"{where}: hidden_act={act!r} is not supported; expected 'silu'")

    eos = d.get("eos_token_id")
    if eos is None:
      eos_ids: tuple[int, ...] = ()
    else:
      eos_list = eos if isinstance(eos, list) else [eos]
      if any(isinstance(i, bool) or not isinstance(i, int) for i in eos_list):
        raise ConfigError(f"{where}: eos_token_id: expected an int or a list of ints, got {eos!r}")
      eos_ids = tuple(eos_list)
    eps = d.get("rms_norm_eps")
    return cls(
        vocab_size=_require(d, "vocab_size", int, where),
        hidden_size=hidden,
        intermediate_size=_require(d, "intermediate_size", int, where),
        num_hidden_layers=_require(d, "num_hidden_layers", int, where),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=1e-5 if eps is None else _require(d, "rms_norm_eps", float, where),
        rope_theta=theta,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
        bos_token_id=_optional_id(d, "bos_token_id", where),
        eos_token_ids=eos_ids,
        pad_token_id=_optional_id(d, "pad_token_id", where),
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


# --------------------------------------------------------------------------- cache


@flax.struct.dataclass
class KVCache:
  """Per-layer key and value buffers of static shape.

  Attributes:
    k: one [B, L, G, D] array per layer (RoPE already applied).
    v: one [B, L, G, D] array per layer.
  """
  k: tuple[Array, ...]
  v: tuple[Array, ...]

  @classmethod
  def init(cls, cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """An all-zero cache of ``batch`` rows and ``length`` slots per layer."""
    if batch <= 0 or length <= 0:
      raise ConfigError(f"KVCache.init: expected batch > 0 and length > 0, got {batch=}, {length=}")
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    n = cfg.num_hidden_layers
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(n)))

  @property
  def batch(self) -> int:
    return self.k[0].shape[0]

  @property
  def length(self) -> int:
    return self.k[0].shape[1]


def causal_mask(cache_index: Array, T: int, L: int) -> Array:
  """Causal mask over the cache for T new tokens written at ``cache_index``.

  Args:
    cache_index: [B] int32, the slot of each row's first new token.
    T: new tokens per row.
    L: cache length.

  Returns:
    [B, T, L] bool: query t sees slot s iff ``s <= cache_index[b] + t``.
  """
  q_BxT = cache_index[:, None] + jnp.arange(T, dtype=cache_index.dtype)[None, :]
  return jnp.arange(L, dtype=cache_index.dtype)[None, None, :] <= q_BxT[:, :, None]


def _write(cache_BxLxGxD: Array, new_BxTxGxD: Array, cache_index_B: Array) -> Array:
  """Writes each row's T entries at its own offset (the caller keeps them in range)."""
  new_BxTxGxD = new_BxTxGxD.astype(cache_BxLxGxD.dtype)

  def one(c_LxGxD, u_TxGxD, i):
    return jax.lax.dynamic_update_slice(c_LxGxD, u_TxGxD, (i, 0, 0))

  return jax.vmap(one)(cache_BxLxGxD, new_BxTxGxD, cache_index_B.astype(jnp.int32))


# --------------------------------------------------------------------------- layers


def _dense(x: Array, w: Array) -> Array:
  """x [..., K] @ w [K, M] with f32 accumulation -> [..., M] float32."""
  return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def rope(x_BxTxNxD: Array, positions_BxT: Array, theta: float) -> Array:
  """Rotary embedding in Hugging Face's rotate-half layout, computed in f32.

  Args:
    x_BxTxNxD: queries or keys.
    positions_BxT: int positions.
    theta: the RoPE base.

  Returns:
    [B, T, N, D], same dtype as ``x``.
  """
  D = x_BxTxNxD.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)))
  f_BxTxD2 = positions_BxT.astype(jnp.float32)[:, :, None] * jnp.asarray(
      inv_freq, jnp.float32)[None, None, :]
  cos = jnp.cos(f_BxTxD2)[:, :, None, :]
  sin = jnp.sin(f_BxTxD2)[:, :, None, :]
  x = x_BxTxNxD.astype(jnp.float32)
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxD.dtype)


class RMSNorm(nnx.Module):
  """``x * rsqrt(mean(x^2) + eps) * w`` with the statistics in f32."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> [..., H] in the compute dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = self.weight[...].astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    return y.astype(self.dtype) * w


class Linear(nnx.Module):
  """A bias-free projection with an ``[in, out]`` kernel and f32 accumulation."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.dtype = dtype
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))

  def __call__(self, x: Array) -> Array:
    """x: [..., K] -> [..., M] in the compute dtype."""
    return _dense(x.astype(self.dtype), self.kernel[...]).astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query attention over a KV cache, with an explicit mask."""

  def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_theta: float, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_theta = rope_theta
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Linear(hidden, num_heads * head_dim, **kw)
    self.k_proj = Linear(hidden, num_kv_heads * head_dim, **kw)
    self.v_proj = Linear(hidden, num_kv_heads * head_dim, **kw)
    self.o_proj = Linear(num_heads * head_dim, hidden, **kw)

  def __call__(self, x_BxTxH: Array, positions_BxT: Array, k_BxLxGxD: Array, v_BxLxGxD: Array,
               cache_index_B: Array, mask_BxTxL: Array) -> tuple[Array, Array, Array]:
    """Attends the T new tokens to the cache after writing their K/V into it.

    Returns:
      out [B, T, H] (compute dtype) and the updated k, v caches [B, L, G, D].
    """
    B, T, _ = x_BxTxH.shape
    Q, G, D = self.num_heads, self.num_kv_heads, self.head_dim
    R = Q // G
    q_BxTxQxD = rope(self.q_proj(x_BxTxH).reshape(B, T, Q, D), positions_BxT, self.rope_theta)
    k_BxTxGxD = rope(self.k_proj(x_BxTxH).reshape(B, T, G, D), positions_BxT, self.rope_theta)
    v_BxTxGxD = self.v_proj(x_BxTxH).reshape(B, T, G, D)
    k_BxLxGxD = _write(k_BxLxGxD, k_BxTxGxD, cache_index_B)
    v_BxLxGxD = _write(v_BxLxGxD, v_BxTxGxD, cache_index_B)

    # Query head g*R + r reads kv head g (Hugging Face's repeat_kv order).
    q_BxTxGxRxD = q_BxTxQxD.reshape(B, T, G, R, D)
    s_BxGxRxTxL = jnp.einsum("btgrd,bsgd->bgrts", q_BxTxGxRxD,
                             k_BxLxGxD.astype(q_BxTxGxRxD.dtype),
                             preferred_element_type=jnp.float32) * (1.0 / math.sqrt(D))
    s_BxGxRxTxL = jnp.where(mask_BxTxL[:, None, None, :, :], s_BxGxRxTxL, _MASK_VALUE)
    p_BxGxRxTxL = jax.nn.softmax(s_BxGxRxTxL, axis=-1)  # f32
    o_BxTxGxRxD = jnp.einsum("bgrts,bsgd->btgrd", p_BxGxRxTxL.astype(self.dtype),
                             v_BxLxGxD.astype(self.dtype), preferred_element_type=jnp.float32)
    out_BxTxH = self.o_proj(o_BxTxGxRxD.astype(self.dtype).reshape(B, T, Q * D))
    return out_BxTxH, k_BxLxGxD, v_BxLxGxD


class MLP(nnx.Module):
  """``down(silu(gate(x)) * up(x))``."""

  def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = Linear(hidden, intermediate, **kw)
    self.up_proj = Linear(hidden, intermediate, **kw)
    self.down_proj = Linear(intermediate, hidden, **kw)

  def __call__(self, x: Array) -> Array:
    """x: [..., H] -> [..., H]."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder layer: attention then MLP, each with a residual."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads,
                               cfg.num_key_value_heads, cfg.head_dim,
                               rope_theta=cfg.rope_theta, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

  def __call__(self, x_BxTxH, positions_BxT, k, v, cache_index_B, mask_BxTxL):
    a_BxTxH, k, v = self.self_attn(self.input_layernorm(x_BxTxH), positions_BxT, k, v,
                                   cache_index_B, mask_BxTxL)
    x_BxTxH = x_BxTxH + a_BxTxH
    x_BxTxH = x_BxTxH + self.mlp(self.post_attention_layernorm(x_BxTxH))
    return x_BxTxH, k, v


# --------------------------------------------------------------------------- model


class Llama(nnx.Module):
  """A Llama-family decoder with a static KV cache and an explicit attention mask.

  Example::

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    cache = KVCache.init(model.cfg, batch=2, length=64)
    idx = jnp.zeros((2,), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    h, cache = model(tokens, pos, cache, idx, causal_mask(idx, 5, 64))
    logits = model.lm_head(h[:, -1])
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    init = nnx.initializers.normal(0.02)
    self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                       param_dtype))
    self.layers = nnx.List([Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)
    if cfg.tie_word_embeddings:
      self.lm_head_kernel = None
    else:
      self.lm_head_kernel = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size),
                                           param_dtype))

  def embed(self, tokens: Array) -> Array:
    """tokens: [...] int32 -> [..., H] in the compute dtype."""
    return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

  def lm_head(self, h: Array) -> Array:
    """h: [..., H] -> logits [..., V] float32 (tied: ``h @ embed^T``)."""
    if self.lm_head_kernel is None:
      w_VxH = self.embed_tokens[...].astype(self.dtype)
      return jnp.einsum("...h,vh->...v", h.astype(self.dtype), w_VxH,
                        preferred_element_type=jnp.float32)
    return _dense(h.astype(self.dtype), self.lm_head_kernel[...])

  def __call__(self, tokens: Array, positions: Array, cache: KVCache, cache_index: Array,
               attn_mask: Array) -> tuple[Array, KVCache]:
    """Runs T new tokens per row through the decoder.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] int32 RoPE positions (``prefix + depth`` for tree nodes).
      cache: the KV cache, L slots per row.
      cache_index: [B] int32; row b's new K/V go to slots ``cache_index[b] + t``
        (the caller keeps ``cache_index[b] + T <= L``).
      attn_mask: [B, T, L] bool over the whole cache after the write: query t
        attends slot s iff ``attn_mask[b, t, s]``; it must include the new
        tokens' own slots (causal, or a tree mask). A row with no visible slot
        gives finite garbage, never NaN.

    Returns:
      hidden [B, T, H] after the final RMSNorm (compute dtype), and the new cache.
    """
    B, T = tokens.shape
    L = cache.length
    if positions.shape != (B, T):
      raise RequestError(f"positions: expected shape {(B, T)}, got {positions.shape}")
    if cache_index.shape != (B,):
      raise RequestError(f"cache_index: expected shape {(B,)}, got {cache_index.shape}")
    if attn_mask.shape != (B, T, L):
      raise RequestError(f"attn_mask: expected shape {(B, T, L)}, got {attn_mask.shape}")
    if cache.batch != B or len(cache.k) != len(self.layers):
      raise RequestError(f"cache: expected batch {B} and {len(self.layers)} layers, got batch "
                        f"{cache.batch} and {len(cache.k)} layers")
    x_BxTxH = self.embed(tokens)
    ks, vs = [], []
    for layer, k, v in zip(self.layers, cache.k, cache.v):
      x_BxTxH, k, v = layer(x_BxTxH, positions, k, v, cache_index, attn_mask)
      ks.append(k)
      vs.append(v)
    return self.norm(x_BxTxH), KVCache(k=tuple(ks), v=tuple(vs))


# --------------------------------------------------------------------------- loading


def _hf_names(cfg: LlamaConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
  """HF tensor name -> (path of the nnx.Param in Llama, transpose?)."""
  names: dict[str, tuple[tuple[Any, ...], bool]] = {
      "model.embed_tokens.weight": (("embed_tokens",), False),
      "model.norm.weight": (("norm", "weight"), False),
  }
  if not cfg.tie_word_embeddings:
    names["lm_head.weight"] = (("lm_head_kernel",), True)
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    for mod, proj in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                      ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                      ("mlp", "down_proj")):
      names[f"{p}{mod}.{proj}.weight"] = (("layers", i, mod, proj, "kernel"), True)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      names[f"{p}{norm}.weight"] = (("layers", i, norm, "weight"), False)
  return names


def _weight_files(model_dir: str) -> list[str]:
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CorruptWeightsError(f"{index}: expected a JSON object with 'weight_map' ({e})") from None
    return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
  single = os.path.join(model_dir, "model.safetensors")
  if os.path.exists(single):
    return [single]
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise WeightsNotFoundError(f"{model_dir}: expected model.safetensors or "
                               "model.safetensors.index.json, found no .safetensors file")
  return [os.path.join(model_dir, f) for f in files]


def _get_path(module: Any, path: tuple[Any, ...]) -> nnx.Param:
  obj = module
  for key in path:
    obj = obj[key] if isinstance(key, int) else getattr(obj, key)
  return obj


def load_llama(model_dir: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None) -> Llama:
  """Loads a Hugging Face Llama checkpoint (``config.json`` + safetensors).

  Sharded checkpoints (``model.safetensors.index.json``) are supported. Torch
  ``[out, in]`` weights are transposed to ``[in, out]`` kernels.

  Args:
    model_dir: directory holding ``config.json`` and the safetensors file(s).
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters (default: ``dtype``).

  Raises:
    ConfigError: bad or unsupported ``config.json``.
    WeightsNotFoundError: no safetensors file.
    MissingTensorError: a tensor the model needs is absent (named).
    TensorShapeError: a tensor has the wrong shape (named, with both shapes).
    CorruptWeightsError: a file cannot be read.
  """
  from safetensors import safe_open

  model_dir = os.fspath(model_dir)
  param_dtype = dtype if param_dtype is None else param_dtype
  cfg = LlamaConfig.from_hf(model_dir)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                       param_dtype=param_dtype))
  wanted = _hf_names(cfg)
  found: set[str] = set()
  np_dtype = np.dtype(jnp.dtype(param_dtype))
  for path in _weight_files(model_dir):
    try:
      handle = safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error types
      raise CorruptWeightsError(f"{path}: cannot read safetensors ({e})") from None
    with handle as f:
      for name in f.keys():
        if name not in wanted or name in found:
          continue
        target, transpose = wanted[name]
        param = _get_path(model, target)
        try:
          arr = f.get_tensor(name)
        except Exception as e:
          raise CorruptWeightsError(f"{path}: tensor {name} cannot be read ({e})") from None
        if transpose:
          arr = arr.T
        if arr.shape != tuple(param.get_value().shape):
          got = arr.T.shape if transpose else arr.shape
          want = tuple(reversed(param.get_value().shape)) if transpose else tuple(param.get_value().shape)
          raise TensorShapeError(f"{path}: {name}: expected shape {want}, got {got}")
        param.set_value(jnp.asarray(np.ascontiguousarray(arr, dtype=np_dtype)))
        found.add(name)
  missing = sorted(set(wanted) - found, key=lambda n: (len(n), n))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise MissingTensorError(f"{model_dir}: missing tensor {missing[0]}{more}")
  return model
