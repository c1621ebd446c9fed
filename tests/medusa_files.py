"""Test helpers: random Medusa head tensors in file layout, and float64 NumPy references.

File layout is torch ``[out, in]``: ``{i}.{j}.linear.weight`` [H, H],
``{i}.{j}.linear.bias`` [H], V1 ``{i}.{L}.weight`` [V, H].
"""

from __future__ import annotations

import numpy as np


def silu64(y: np.ndarray) -> np.ndarray:
  y = y.astype(np.float64)
  return y / (1.0 + np.exp(-y))


def head_tensors(rng: np.random.Generator, *, n: int, hidden: int, layers: int = 1,
                 vocab: int | None = None, dtype=np.float32, prefix: str = ""
                 ) -> dict[str, np.ndarray]:
  """Random tensors for n heads; V1 output projections when ``vocab`` is given."""
  scale = 1.0 / np.sqrt(hidden)
  out: dict[str, np.ndarray] = {}
  for i in range(n):
    for j in range(layers):
      out[f"{prefix}{i}.{j}.linear.weight"] = (
          rng.standard_normal((hidden, hidden)) * scale).astype(dtype)
      out[f"{prefix}{i}.{j}.linear.bias"] = (rng.standard_normal(hidden) * 0.5).astype(dtype)
    if vocab is not None:
      out[f"{prefix}{i}.{layers}.weight"] = (
          rng.standard_normal((vocab, hidden)) * scale).astype(dtype)
  return out


def ref_resblock(x: np.ndarray, w_out_in: np.ndarray, b: np.ndarray) -> np.ndarray:
  """x [N, H] + silu(x @ W^T + b) in float64; W in torch [out, in] layout."""
  x = x.astype(np.float64)
  return x + silu64(x @ w_out_in.astype(np.float64).T + b.astype(np.float64))


def ref_heads_hidden(x: np.ndarray, tensors: dict[str, np.ndarray], n: int, layers: int = 1
                     ) -> np.ndarray:
  """[N, n, H]: every head's ResBlocks applied to x, float64."""
  outs = []
  for i in range(n):
    h = x.astype(np.float64)
    for j in range(layers):
      h = ref_resblock(h, tensors[f"{i}.{j}.linear.weight"], tensors[f"{i}.{j}.linear.bias"])
    outs.append(h)
  return np.stack(outs, axis=1)


def ref_v2(x: np.ndarray, tensors: dict[str, np.ndarray], n: int, lm_w_hv: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
  """LoRAX MedusaV2: (lm(x) [N, V], lm(h_k) [N, n, V]) with lm(h) = h @ lm_w [H, V]."""
  lm = lm_w_hv.astype(np.float64)
  return x.astype(np.float64) @ lm, ref_heads_hidden(x, tensors, n) @ lm


def ref_v1(x: np.ndarray, tensors: dict[str, np.ndarray], n: int, layers: int,
           lm_w_hv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """LoRAX MedusaV1: (lm(x), per-head own output projections) in float64."""
  hidden = ref_heads_hidden(x, tensors, n, layers)
  spec = np.stack([hidden[:, i] @ tensors[f"{i}.{layers}.weight"].astype(np.float64).T
                   for i in range(n)], axis=1)
  return x.astype(np.float64) @ lm_w_hv.astype(np.float64), spec


def rel_err(got, want) -> float:
  """||got - want|| / ||want|| in float64; NaN never passes."""
  got = np.asarray(got, dtype=np.float64)
  want = np.asarray(want, dtype=np.float64)
  if not np.isfinite(got).all():
    return float("inf")
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def random_v2_heads(cfg, n: int, seed: int, max_batch_size: int | None = None):
  """V2 ``MedusaModel`` heads for a Llama config ``cfg``, with random (not identity) weights."""
  import jax
  from flax import nnx

  from medusa_jax.config import MedusaConfig
  from medusa_jax.heads.modules import MedusaModel
  mc = MedusaConfig(base_model_name_or_path="tiny", medusa_num_heads=n, medusa_num_layers=1,
                    version=2.0)
  heads = MedusaModel(mc, cfg.hidden_size, rngs=nnx.Rngs(seed), max_batch_size=max_batch_size)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 100))
  heads.medusa.kernel[...] = 0.3 * jax.random.normal(k1, heads.medusa.kernel[...].shape)
  heads.medusa.bias[...] = 0.1 * jax.random.normal(k2, heads.medusa.bias[...].shape)
  return heads
