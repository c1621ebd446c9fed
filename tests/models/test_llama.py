"""Tiny-config Llama against a float64 NumPy reference; cache, masks, jit, loading."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medusa_jax.errors import (ConfigError, CorruptWeightsError, MissingTensorError,
                               RequestError, TensorShapeError, WeightsNotFoundError)
from medusa_jax.config import MedusaConfig
from medusa_jax.models.llama import (AttentionScores, KVCache, Llama, LlamaConfig, apply_rope,
                                     causal_mask, rope, rope_tables)
from medusa_jax.models.llama import ROW_KERNEL_MAX_ROWS
from medusa_jax.models.llama_weights import load_llama


# ----------------------------------------------------------------- reference


def _params_np(model: Llama) -> dict:
  """The model's parameters as float64 NumPy, in HF names and [out, in] layout (either
  kernel layout)."""
  cfg = model.cfg
  p = {"embed": np.asarray(model.embed_tokens[...], np.float64),
       "norm": np.asarray(model.norm.weight[...], np.float64), "layers": []}

  def out_in(lin):
    k = np.asarray(lin.kernel[...], np.float64)
    return k if lin.transposed else k.T
  for layer in model.layers:
    a, m = layer.self_attn, layer.mlp
    p["layers"].append({
        "ln1": np.asarray(layer.input_layernorm.weight[...], np.float64),
        "ln2": np.asarray(layer.post_attention_layernorm.weight[...], np.float64),
        **{n: out_in(getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{n: out_in(getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")},
    })
  p["lm_head"] = (p["embed"] if cfg.tie_word_embeddings
                  else np.asarray(model.lm_head_kernel[...], np.float64).T)
  return p


def _ref_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _ref_rope(x, pos, theta):  # x [S, N, D], pos [S]
  D = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
  f = pos[:, None].astype(np.float64) * inv[None]
  cos, sin = np.cos(f)[:, None], np.sin(f)[:, None]
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _ref_forward(p, cfg, tokens, positions, visible):
  """One row, no cache: every token sees the tokens `visible[t]` marks.

  tokens, positions: [S]; visible: [S, S] bool. Returns hidden [S, H], logits [S, V].
  """
  Q, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  x = p["embed"][tokens]
  S = len(tokens)
  for lp in p["layers"]:
    h = _ref_rms(x, lp["ln1"], cfg.rms_norm_eps)
    q = _ref_rope((h @ lp["q_proj"].T).reshape(S, Q, D), positions, cfg.rope_theta)
    k = _ref_rope((h @ lp["k_proj"].T).reshape(S, G, D), positions, cfg.rope_theta)
    v = (h @ lp["v_proj"].T).reshape(S, G, D)
    out = np.zeros((S, Q, D))
    for i in range(Q):
      g = i // (Q // G)
      s = q[:, i] @ k[:, g].T / np.sqrt(D)
      s = np.where(visible, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      out[:, i] = (s / s.sum(-1, keepdims=True)) @ v[:, g]
    x = x + out.reshape(S, Q * D) @ lp["o_proj"].T
    h = _ref_rms(x, lp["ln2"], cfg.rms_norm_eps)
    gate = h @ lp["gate_proj"].T
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ lp["up_proj"].T)) @ lp["down_proj"].T
  h = _ref_rms(x, p["norm"], cfg.rms_norm_eps)
  return h, h @ p["lm_head"].T


def _randomize(model: Llama, seed: int, scale: float = 0.3):
  """Replaces every parameter (norm weights included) by fresh random values."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if path[-1] == "weight":  # norm weights: around 1, never exactly 1
      new = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      new = scale * rng.standard_normal(shape)
    var.set_value(jnp.asarray(new, dtype))
  return model


def _model(seed=0, **overrides) -> Llama:
  """A tiny Llama with random NumPy weights (built abstractly: no JAX init work)."""
  cfg = LlamaConfig.tiny(**overrides)
  return _randomize(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed))), seed + 100)


@nnx.jit
def _fwd(model, tokens, positions, cache, cache_index, mask):
  return model(tokens, positions, cache, cache_index, mask)


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("tied,use_jit,steps,layout", [
    (False, True, 4, "in_out"), (True, True, 4, "in_out"), (False, False, 0, "in_out"),
    (True, True, 4, "out_in")])
def test_prefill_then_decode_matches_reference(tied, use_jit, steps, layout):
  model = _model(seed=1, tie_word_embeddings=tied).with_kernel_layout(layout)
  assert model.kernel_layout == layout
  cfg = model.cfg
  rng = np.random.default_rng(2)
  B, P, L = 3, 7, 16
  lengths = np.array([7, 4, 5])  # left-aligned prompts of different lengths
  tokens = rng.integers(0, cfg.vocab_size, (B, P + steps))

  def eager(model, tok, pos, cache, idx, mask):
    return model(tok, pos, cache, idx, mask)
  call = _fwd if use_jit else eager

  cache = KVCache.init(cfg, B, L)
  idx = jnp.zeros((B,), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  h, cache = call(model, jnp.asarray(tokens[:, :P], jnp.int32), pos, cache, idx,
                  causal_mask(idx, P, L))
  p = _params_np(model)
  for b in range(B):
    n = lengths[b]
    ref_h, _ = _ref_forward(p, cfg, tokens[b, :n], np.arange(n), np.tril(np.ones((n, n), bool)))
    np.testing.assert_allclose(np.asarray(h[b, :n]), ref_h, rtol=2e-5, atol=2e-5)
  # Decode: each row continues right after its own prompt (padding slots get overwritten).
  cur = lengths.copy()
  for s in range(steps):
    tok = np.array([tokens[b, cur[b]] for b in range(B)])[:, None]
    idx = jnp.asarray(cur, jnp.int32)
    h, cache = call(model, jnp.asarray(tok, jnp.int32), idx[:, None], cache, idx,
                    causal_mask(idx, 1, L))
    logits = np.asarray(model.lm_head(h[:, 0]))
    assert logits.dtype == np.float32
    for b in range(B):
      seq = tokens[b, :cur[b] + 1]
      n = len(seq)
      ref_h, ref_logits = _ref_forward(p, cfg, seq, np.arange(n), np.tril(np.ones((n, n), bool)))
      np.testing.assert_allclose(np.asarray(h[b, 0]), ref_h[-1], rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(logits[b], ref_logits[-1], rtol=1e-4, atol=1e-4)
    cur += 1


def test_tree_mask_branches_are_independent():
  """A tree [root, a1, a2 | b1, b2] after a cached prefix: perturbing branch b
  leaves branch a's outputs unchanged, and each node matches the reference
  forward over its own root-to-node path."""
  model = _model(seed=3)
  cfg = model.cfg
  rng = np.random.default_rng(4)
  B, P, L = 2, 5, 24
  prefix = rng.integers(0, cfg.vocab_size, (B, P))
  cache = KVCache.init(cfg, B, L)
  idx = jnp.zeros((B,), jnp.int32)
  _, cache = _fwd(model, jnp.asarray(prefix, jnp.int32),
                   jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P)), cache, idx,
                   causal_mask(idx, P, L))
  parent = [-1, 0, 1, 0, 3]  # node -> parent (root, a1, a2, b1, b2)
  depth = np.array([0, 1, 2, 1, 2])
  T = len(parent)
  anc = np.zeros((T, T), bool)
  for t in range(T):
    j = t
    while j >= 0:
      anc[t, j] = True
      j = parent[j]
  mask = np.zeros((B, T, L), bool)
  mask[:, :, :P] = True
  mask[:, :, P:P + T] = anc
  idx = jnp.full((B,), P, jnp.int32)
  pos = jnp.asarray(np.broadcast_to(P + depth, (B, T)), jnp.int32)
  tree = rng.integers(0, cfg.vocab_size, (B, T))
  h1, _ = _fwd(model, jnp.asarray(tree, jnp.int32), pos, cache, idx, jnp.asarray(mask))
  perturbed = tree.copy()
  perturbed[:, 3:] = (tree[:, 3:] + 1 + rng.integers(0, cfg.vocab_size - 1, (B, 2))) % cfg.vocab_size
  h2, _ = _fwd(model, jnp.asarray(perturbed, jnp.int32), pos, cache, idx, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(h1[:, :3]), np.asarray(h2[:, :3]))
  assert np.abs(np.asarray(h1[:, 3:]) - np.asarray(h2[:, 3:])).max() > 1e-3
  p = _params_np(model)
  for b in range(B):
    for t in range(T):
      path = [j for j in range(T) if anc[t, j]]
      seq = np.concatenate([prefix[b], tree[b, path]])
      n = len(seq)
      ref_h, _ = _ref_forward(p, cfg, seq, np.arange(n), np.tril(np.ones((n, n), bool)))
      np.testing.assert_allclose(np.asarray(h1[b, t]), ref_h[-1], rtol=2e-5, atol=2e-5)


def test_cache_writes_at_per_row_offsets_and_masked_rows_are_finite():
  model = _model(seed=5)
  cfg = model.cfg
  rng = np.random.default_rng(6)
  B, T, L = 3, 2, 10
  cache = KVCache.init(cfg, B, L)
  old = [jnp.asarray(rng.standard_normal(c.shape), jnp.float32) for c in cache.k]
  cache = KVCache(k=tuple(old), v=tuple(old))
  offsets = np.array([0, 3, 8])
  idx = jnp.asarray(offsets, jnp.int32)
  mask = np.asarray(causal_mask(idx, T, L)).copy()
  mask[2] = False  # a padding row: no visible slot at all
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  h, new = _fwd(model, tokens, idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None], cache, idx,
                 jnp.asarray(mask))
  assert np.isfinite(np.asarray(h)).all()
  for layer in range(cfg.num_hidden_layers):
    k_old, k_new = np.asarray(old[layer]), np.asarray(new.k[layer])
    for b, o in enumerate(offsets):
      keep = np.ones(L, bool)
      keep[o:o + T] = False
      np.testing.assert_array_equal(k_new[b, keep], k_old[b, keep])
      assert not np.allclose(k_new[b, o:o + T], k_old[b, o:o + T])


def test_jit_with_donated_cache_matches_undonated():
  model = _model(seed=7)
  cfg = model.cfg
  rng = np.random.default_rng(8)
  B, T, L = 2, 3, 8
  graphdef, state = nnx.split(model)

  def step(state, cache, tokens, pos, idx, mask):
    m = nnx.merge(graphdef, state)
    return m(tokens, pos, cache, idx, mask)

  jstep = jax.jit(step, donate_argnames=("cache",))
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  idx = jnp.asarray([0, 2], jnp.int32)
  pos = idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  mask = causal_mask(idx, T, L)
  h_eager, c_eager = _fwd(model, tokens, pos, KVCache.init(cfg, B, L), idx, mask)
  cache = KVCache.init(cfg, B, L)
  h_jit, c_jit = jstep(state, cache, tokens, pos, idx, mask)
  assert cache.k[0].is_deleted()  # the donated buffers were consumed
  np.testing.assert_allclose(np.asarray(h_jit), np.asarray(h_eager), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(c_jit.v[1]), np.asarray(c_eager.v[1]), rtol=1e-5,
                             atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  cfg = LlamaConfig.tiny()
  m32 = _model(seed=9)
  m16 = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                     param_dtype=jnp.bfloat16))
  nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32)))
  rng = np.random.default_rng(10)
  B, T, L = 2, 6, 8
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  idx = jnp.zeros((B,), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  mask = causal_mask(idx, T, L)
  h32, _ = _fwd(m32, tokens, pos, KVCache.init(cfg, B, L), idx, mask)
  h16, c16 = _fwd(m16, tokens, pos, KVCache.init(cfg, B, L, jnp.bfloat16), idx, mask)
  assert h16.dtype == jnp.bfloat16 and c16.k[0].dtype == jnp.bfloat16
  l32, l16 = m32.lm_head(h32), m16.lm_head(h16)
  assert l16.dtype == jnp.float32
  err = np.abs(np.asarray(l16) - np.asarray(l32)).max() / np.abs(np.asarray(l32)).max()
  assert err < 5e-2, err


def test_causal_mask():
  m = np.asarray(causal_mask(jnp.asarray([0, 2], jnp.int32), 2, 5))
  np.testing.assert_array_equal(m[0], [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(m[1], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_bad_call_shapes_raise():
  model = _model(seed=11)
  cfg = model.cfg
  tokens = jnp.zeros((2, 3), jnp.int32) + 5
  idx = jnp.zeros((2,), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
  cache = KVCache.init(cfg, 2, 8)
  with pytest.raises(RequestError, match="positions"):
    model(tokens, pos[:, :2], cache, idx, causal_mask(idx, 3, 8))
  with pytest.raises(RequestError, match="cache_index"):
    model(tokens, pos, cache, idx[:1], causal_mask(idx, 3, 8))
  with pytest.raises(RequestError, match="attn_mask"):
    model(tokens, pos, cache, idx, causal_mask(idx, 3, 9))
  with pytest.raises(RequestError, match="cache"):
    model(tokens, pos, KVCache.init(cfg, 3, 8), idx, causal_mask(idx, 3, 8))
  with pytest.raises(ConfigError, match="batch"):
    KVCache.init(cfg, 0, 8)


# ----------------------------------------------------------------- fused projections


@pytest.mark.parametrize("tied,dtype", [(False, jnp.float32), (True, jnp.bfloat16)])
def test_fuse_projections_computes_the_same_function(tied, dtype):
  cfg = LlamaConfig.tiny(tie_word_embeddings=tied)
  m32 = _model(seed=21, tie_word_embeddings=tied)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(m32)))
  fused = model.fuse_projections()
  assert fused.fused_projections and not model.fused_projections
  assert fused.fuse_projections() is fused
  Q, G, D, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
  for src, dst in zip(model.layers, fused.layers):
    a, m = src.self_attn, src.mlp
    qkv = np.asarray(dst.self_attn.qkv_proj.kernel[...].astype(jnp.float32))
    assert qkv.shape == (cfg.hidden_size, (Q + 2 * G) * D)
    assert dst.self_attn.qkv_proj.kernel[...].dtype == dtype
    np.testing.assert_array_equal(qkv[:, :Q * D], np.asarray(a.q_proj.kernel[...].astype(jnp.float32)))
    np.testing.assert_array_equal(qkv[:, (Q + G) * D:],
                                  np.asarray(a.v_proj.kernel[...].astype(jnp.float32)))
    gu = np.asarray(dst.mlp.gate_up_proj.kernel[...].astype(jnp.float32))
    np.testing.assert_array_equal(gu[:, F:], np.asarray(m.up_proj.kernel[...].astype(jnp.float32)))
    assert not hasattr(dst.self_attn, "q_proj") and not hasattr(dst.mlp, "gate_proj")
  assert hasattr(model.layers[0].self_attn, "q_proj")  # the source keeps its layout

  rng = np.random.default_rng(22)
  B, P, T, L = 2, 5, 4, 16
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  idx0 = jnp.zeros((B,), jnp.int32)
  outs = []
  for m in (model, fused):
    h, cache = _fwd(m, prompt, pos, KVCache.init(cfg, B, L, dtype), idx0, causal_mask(idx0, P, L))
    idx = jnp.asarray([P, P - 2], jnp.int32)  # then a T-token step at per-row offsets
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32) if not outs else outs[0][3]
    h2, cache = _fwd(m, tok, idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None], cache, idx,
                     causal_mask(idx, T, L))
    outs.append((h, h2, cache, tok))
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in zip(jax.tree.leaves(outs[0][:3]), jax.tree.leaves(outs[1][:3])):
    a32, b32 = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
    assert np.isfinite(b32).all()
    err = np.linalg.norm(a32 - b32) / np.linalg.norm(a32)
    assert err <= tol, err


def test_fused_model_built_directly_and_through_the_engine():
  """A model built fused from scratch has the fused parameter shapes, and the
  engine's greedy tokens are the same with the fused and the unfused layout."""
  from medusa_jax.decoding.engine import Engine
  cfg = LlamaConfig.tiny(eos_token_ids=())
  direct = Llama(cfg, rngs=nnx.Rngs(0), fused_projections=True)
  shapes = {"/".join(map(str, k)): v.get_value().shape
            for k, v in nnx.to_flat_state(nnx.state(direct))}
  assert shapes["layers/0/self_attn/qkv_proj/kernel"] == (32, 64)
  assert shapes["layers/1/mlp/gate_up_proj/kernel"] == (32, 96)
  assert not any(f"/{name}/" in k for k in shapes
                 for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
  model = _model(seed=23, eos_token_ids=())
  rng = np.random.default_rng(24)
  prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (3, 7)]
  tokens = [Engine(m, max_cache_len=32).generate(prompts, 6).tokens
            for m in (model, model.fuse_projections())]
  assert tokens[0] == tokens[1] and all(len(t) == 6 for t in tokens[0])


def test_pallas_attention_through_the_engine_gives_the_same_tokens():
  """Plain and tree decoding (f32) with the Pallas attention kernel, interpreted: the tokens and
  steps of the grouped attention; prefill (longer than FLAT_MAX_TOKENS) stays grouped."""
  from medusa_jax.decoding.engine import Engine
  from medusa_jax.heads.modules import MedusaModel
  model = _model(seed=31, eos_token_ids=()).fuse_projections()
  cfg = model.cfg
  mcfg = MedusaConfig(base_model_name_or_path="test", medusa_num_heads=2, medusa_num_layers=1,
                      version=2.0)
  heads = MedusaModel(mcfg, cfg.hidden_size, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(32)
  prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (4, 70)]
  runs = []
  for m in (model, model.with_attention_scores("pallas"),
            model.with_attention_scores("pallas_fused")):
    eng = Engine(m, None, heads, max_cache_len=96, max_tree_rows=8, steps_per_call=2)
    runs.append([eng.generate(prompts, 5, speculate=mode) for mode in ("none", "tree")])
  for want, *got in zip(*runs):
    assert all(g.tokens == want.tokens and g.steps == want.steps for g in got)


@pytest.mark.parametrize("fused,method", [(False, "flat"), (True, "flat"), (True, "pallas"),
                                          (True, "pallas_fused"), (False, "pallas_fused")])
def test_flat_and_pallas_attention_match_grouped(fused, method):
  """FLAT scores and the Pallas kernels (interpreted; decode and tree calls) give the grouped
  attention: a prefill, a tree step with a fully masked padding row, and per-row cache
  offsets (so per-row kv lengths). PALLAS_FUSED runs RoPE and the cache write in its kernel;
  with unfused projections it falls back to PALLAS's attention-only kernel."""
  model = _model(seed=26)
  model = model.fuse_projections() if fused else model
  flat = model.with_attention_scores(method)
  want = AttentionScores(method)
  assert flat.attention_scores is want and model.with_attention_scores(
      AttentionScores.GROUPED) is model
  assert flat.layers[0].mlp.down_proj.kernel.get_value() is model.layers[0].mlp.down_proj.kernel.get_value()
  assert flat.fuse_projections().attention_scores is want
  cfg = model.cfg
  rng = np.random.default_rng(27)
  B, P, T, L = 3, 6, 5, 16
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  idx0 = jnp.zeros((B,), jnp.int32)
  tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  idx = jnp.asarray([P, P - 3, P], jnp.int32)
  mask = np.asarray(causal_mask(idx, T, L)).copy()
  mask[2] = False
  outs = []
  for m in (model, flat):
    _, cache = _fwd(m, prompt, pos, KVCache.init(cfg, B, L), idx0, causal_mask(idx0, P, L))
    h, cache = _fwd(m, tok, idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None], cache, idx,
                    jnp.asarray(mask))
    outs.append((np.asarray(h), np.asarray(cache.k[1]), np.asarray(cache.v[0])))
  assert np.isfinite(outs[1][0]).all()
  # The fully masked row is finite garbage, an average over the slots read: FLAT reads all
  # L, the kernel the row's kv_len (and its garbage reaches the next layers' cache).
  rows = slice(None) if method == "flat" else slice(0, 2)
  # The kernel's RoPE rounds differently from XLA's fusion (its products may contract into
  # an FMA), by an ulp or so of the keys.
  tol = 1e-5 if (method, fused) == ("pallas_fused", True) else 2e-6
  for a, b in zip(*outs):
    np.testing.assert_allclose(b[rows], a[rows], rtol=tol, atol=tol)


def test_attention_scores_auto_resolves_by_backend(monkeypatch):
  from medusa_jax.models import llama as llama_mod
  model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  gpu = AttentionScores.PALLAS if llama_mod._cuda() else AttentionScores.FLAT
  want = gpu if jax.default_backend() == "gpu" else AttentionScores.GROUPED
  assert model.attention_scores is want and model.layers[1].self_attn.scores is want
  assert model.with_attention_scores("auto") is model
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for cuda, want in ((True, AttentionScores.PALLAS), (False, AttentionScores.FLAT)):
    monkeypatch.setattr(llama_mod, "_cuda", lambda cuda=cuda: cuda)
    assert AttentionScores.AUTO.resolve() is want


@pytest.mark.parametrize("tied,dtype", [(False, jnp.float32), (True, jnp.bfloat16)])
def test_out_in_kernel_layout_computes_the_same_function(tied, dtype):
  """``with_kernel_layout('out_in')`` transposes every projection's kernel (and nothing else),
  round-trips exactly, survives fuse_projections, and computes the same prefill and T-token
  step as ``in_out``, fused and unfused."""
  m32 = _model(seed=41, tie_word_embeddings=tied)
  model = nnx.eval_shape(lambda: Llama(m32.cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(m32)))
  cfg = model.cfg
  nk = model.with_kernel_layout("out_in")
  assert nk.kernel_layout == "out_in" and model.kernel_layout == "in_out"
  assert nk.with_kernel_layout("out_in") is nk and model.with_kernel_layout("in_out") is model
  for src, dst in zip(model._linears(), nk._linears()):
    assert dst.transposed and not src.transposed
    np.testing.assert_array_equal(np.asarray(dst.kernel[...].astype(jnp.float32)),
                                  np.asarray(src.kernel[...].astype(jnp.float32)).T)
  assert len(model._linears()) == 7 * cfg.num_hidden_layers
  assert nk.embed_tokens.get_value() is model.embed_tokens.get_value()  # shared
  assert nk.layers[1].input_layernorm.weight.get_value() is (
      model.layers[1].input_layernorm.weight.get_value())
  back = nk.with_kernel_layout("in_out")
  for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))
  fused_nk = nk.fuse_projections()
  assert fused_nk.kernel_layout == "out_in" and fused_nk.fused_projections
  assert fused_nk.layers[0].self_attn.qkv_proj.kernel[...].shape == (
      (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim, cfg.hidden_size)

  rng = np.random.default_rng(42)
  B, P, T, L = 2, 5, 4, 16
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  idx0, idx = jnp.zeros((B,), jnp.int32), jnp.asarray([P, P - 2], jnp.int32)
  outs = []
  for m in (model, nk, model.fuse_projections(), fused_nk):
    h, cache = _fwd(m, prompt, pos, KVCache.init(cfg, B, L, dtype), idx0, causal_mask(idx0, P, L))
    h2, cache = _fwd(m, tok, idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None], cache, idx,
                     causal_mask(idx, T, L))
    outs.append([np.asarray(x.astype(jnp.float32)) for x in (h, h2, *cache.k, *cache.v)])
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for other in outs[1:]:
    for a, b in zip(outs[0], other):
      assert np.isfinite(b).all()
      assert np.linalg.norm(a - b) / np.linalg.norm(a) <= tol


def test_kernel_layout_default_and_errors(monkeypatch):
  from medusa_jax.models import llama as llama_mod
  cfg = LlamaConfig.tiny()
  model = _model(seed=43).fuse_projections()
  want = "out_in" if jax.default_backend() == "gpu" and llama_mod._cuda() else "in_out"
  assert llama_mod.default_kernel_layout() == want
  assert model.with_kernel_layout(None).kernel_layout == want
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for cuda, want in ((True, "out_in"), (False, "in_out")):
    monkeypatch.setattr(llama_mod, "_cuda", lambda cuda=cuda: cuda)
    assert llama_mod.default_kernel_layout() == want
  monkeypatch.setattr(llama_mod, "_cuda", lambda: True)
  rows = model.with_row_kernels(True).with_kernel_layout(None)
  assert rows.kernel_layout == "out_in" and rows.layers[0].row_kernels
  with pytest.raises(ConfigError, match="kernel_layout"):
    model.with_kernel_layout("nk")
  with pytest.raises(ConfigError, match="kernel_layout"):
    Llama(cfg, rngs=nnx.Rngs(0), kernel_layout="transposed")


def test_out_in_kernels_through_the_engine_give_the_same_tokens():
  """Plain and tree decoding (f32, greedy) with out_in kernels: the tokens and steps of in_out."""
  from medusa_jax.decoding.engine import Engine
  from medusa_jax.heads.modules import MedusaModel
  model = _model(seed=44, eos_token_ids=()).fuse_projections()
  mcfg = MedusaConfig(base_model_name_or_path="test", medusa_num_heads=2, medusa_num_layers=1,
                      version=2.0)
  heads = MedusaModel(mcfg, model.cfg.hidden_size, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(45)
  prompts = [list(rng.integers(3, model.cfg.vocab_size, n)) for n in (4, 9)]
  runs = []
  for m in (model, model.with_kernel_layout("out_in")):
    eng = Engine(m, None, heads, max_cache_len=48, max_tree_rows=8, steps_per_call=2)
    runs.append([eng.generate(prompts, 6, speculate=mode) for mode in ("none", "tree")])
  for want, got in zip(*runs):
    assert got.tokens == want.tokens and got.steps == want.steps
  assert runs[1][1].tokens == runs[1][0].tokens  # greedy speculation is exact in f32


def test_attention_scores_errors():
  with pytest.raises(ConfigError, match="attention_scores='dense'"):
    Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0), attention_scores="dense")
  with pytest.raises(ConfigError, match="attention_scores"):
    _model(seed=28).with_attention_scores("pairs")


def test_rope_tables_are_shared_rope():
  rng = np.random.default_rng(25)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 50, (2, 3)), jnp.int32)
  inv = LlamaConfig.tiny().inv_freq
  np.testing.assert_allclose(np.asarray(rope(x, pos, inv)),
                             _ref_rope(np.asarray(x, np.float64).reshape(6, 4, 8),
                                       np.asarray(pos).reshape(6), 1e4).reshape(2, 3, 4, 8),
                             rtol=1e-5, atol=1e-5)
  cos, sin = rope_tables(pos, inv)
  assert cos.shape == sin.shape == (2, 3, 1, 4)
  np.testing.assert_array_equal(np.asarray(apply_rope(x, cos, sin)), np.asarray(rope(x, pos, inv)))


# ----------------------------------------------------------------- config


def _hf_config(**over):
  d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97,
       "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
       "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
       "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 7],
       "max_position_embeddings": 128}
  d.update(over)
  return {k: v for k, v in d.items() if v is not None}


def test_config_from_hf(tmp_path):
  cfg = LlamaConfig.from_hf(_hf_config())
  assert (cfg.head_dim, cfg.rope_theta, cfg.eos_token_ids, cfg.rms_norm_eps) == (8, 5e5, (2, 7), 1e-6)
  assert cfg.tie_word_embeddings and cfg.pad_token_id is None and cfg.num_groups == 2
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(
      rope_parameters=None, rope_theta=1e4, eos_token_id=2, head_dim=16, num_key_value_heads=None)))
  for src in (tmp_path, tmp_path / "config.json", str(tmp_path)):
    cfg = LlamaConfig.from_hf(src)
    assert (cfg.head_dim, cfg.rope_theta, cfg.eos_token_ids, cfg.num_key_value_heads) == (
        16, 1e4, (2,), 4)


@pytest.mark.parametrize("over,match", [
    ({"hidden_size": None}, "hidden_size"),
    ({"vocab_size": "97"}, "vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 30}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": 1}, "attention_bias: expected a bool"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"eos_token_id": "2"}, "eos_token_id"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
    ({"rope_scaling": [1, 2]}, "rope_scaling: expected an object"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0}},
     "high_freq_factor > low_freq_factor"),
])
def test_config_errors(over, match):
  with pytest.raises(ConfigError, match=match):
    LlamaConfig.from_hf(_hf_config(**over))


def test_config_rope_scaling():
  from medusa_jax.models.llama_config import RopeType, rope_inv_freq
  cfg = LlamaConfig.from_hf(_hf_config(rope_scaling={"type": "linear", "factor": 4.0}))
  assert cfg.rope_scaling.rope_type is RopeType.LINEAR and cfg.rope_scaling.factor == 4.0
  np.testing.assert_allclose(cfg.inv_freq, rope_inv_freq(8, 5e5) / 4.0, rtol=1e-6)
  cfg = LlamaConfig.from_hf(_hf_config(rope_parameters={
      "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
  assert cfg.rope_scaling.rope_type is RopeType.LLAMA3 and cfg.rope_theta == 5e5
  assert LlamaConfig.from_hf(_hf_config()).rope_scaling.rope_type is RopeType.DEFAULT


def test_config_file_errors(tmp_path):
  with pytest.raises(ConfigError, match="no such config"):
    LlamaConfig.from_hf(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="JSON"):
    LlamaConfig.from_hf(tmp_path)


def test_tiny_overrides_and_validation():
  assert LlamaConfig.tiny(num_hidden_layers=3).num_hidden_layers == 3
  with pytest.raises(ConfigError, match="head_dim"):
    LlamaConfig.tiny(head_dim=7)
  with pytest.raises(ConfigError, match="eos_token_ids"):
    LlamaConfig.tiny(eos_token_ids=[2])


# ----------------------------------------------------------------- loading


def _save_hf(model: Llama, out, shards: int = 1):
  from safetensors.numpy import save_file
  cfg = model.cfg
  p = _params_np(model)
  t = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["norm"]}
  if not cfg.tie_word_embeddings:
    t["lm_head.weight"] = p["lm_head"]
  for i, lp in enumerate(p["layers"]):
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      t[f"model.layers.{i}.self_attn.{n}.weight"] = lp[n]
    for n in ("gate_proj", "up_proj", "down_proj"):
      t[f"model.layers.{i}.mlp.{n}.weight"] = lp[n]
    t[f"model.layers.{i}.input_layernorm.weight"] = lp["ln1"]
    t[f"model.layers.{i}.post_attention_layernorm.weight"] = lp["ln2"]
  t = {k: np.ascontiguousarray(v, np.float32) for k, v in t.items()}
  out.mkdir(exist_ok=True)
  hf = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings}
  (out / "config.json").write_text(json.dumps(hf))
  names = sorted(t)
  if shards == 1:
    save_file(t, str(out / "model.safetensors"))
  else:
    weight_map = {}
    for s in range(shards):
      fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: t[n] for n in names[s::shards]}
      save_file(part, str(out / fname))
      weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return t


@pytest.mark.parametrize("tied,shards", [(True, 1), (False, 3)])
def test_load_llama_round_trip(tmp_path, tied, shards):
  model = _model(seed=12, tie_word_embeddings=tied, rope_theta=5e4)
  _save_hf(model, tmp_path / "m", shards)
  loaded = load_llama(tmp_path / "m")
  # Missing fields take transformers' LlamaConfig defaults.
  assert loaded.cfg == dataclasses.replace(model.cfg, max_position_embeddings=2048,
                                           bos_token_id=1, eos_token_ids=(2,), pad_token_id=None)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  l16 = load_llama(tmp_path / "m", dtype=jnp.bfloat16)
  assert l16.embed_tokens[...].dtype == jnp.bfloat16
  l32 = load_llama(tmp_path / "m", dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert l32.embed_tokens[...].dtype == jnp.float32 and l32.dtype == jnp.bfloat16
  # Straight into [out, in] projections: the files' layout read as it is (its square q and o
  # kernels included), the same parameters as converting after the load.
  nk = load_llama(tmp_path / "m", kernel_layout="out_in")
  assert nk.kernel_layout == "out_in"
  for a, b in zip(jax.tree.leaves(nnx.state(loaded.with_kernel_layout("out_in"))),
                  jax.tree.leaves(nnx.state(nk))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ConfigError, match="kernel_layout"):
    load_llama(tmp_path / "m", kernel_layout="nk")


def test_load_llama_errors(tmp_path):
  from safetensors.numpy import save_file
  model = _model(seed=13)
  t = _save_hf(model, tmp_path / "m")
  with pytest.raises(WeightsNotFoundError):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    load_llama(tmp_path / "e")
  bad = dict(t)
  del bad["model.layers.1.mlp.up_proj.weight"]
  save_file(bad, str(tmp_path / "m" / "model.safetensors"))
  with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    load_llama(tmp_path / "m")
  bad = dict(t)
  bad["model.layers.0.self_attn.k_proj.weight"] = np.ones((8, 32), np.float32)
  save_file(bad, str(tmp_path / "m" / "model.safetensors"))
  with pytest.raises(TensorShapeError, match=r"k_proj.weight: expected shape \(16, 32\), got \(8, 32\)"):
    load_llama(tmp_path / "m")
  (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00junk")
  with pytest.raises(CorruptWeightsError):
    load_llama(tmp_path / "m")


# ----------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
  from medusa_jax.assets import cache as assets
  paths = assets.fetch(quiet=True)
  return paths, load_llama(paths.model_dir)


def test_smollm2_matches_transformers(smollm2):
  """Prefill logits match transformers' LlamaForCausalLM on the same weights, and
  16 greedy tokens (jitted step, donated cache) equal transformers' greedy tokens."""
  torch = pytest.importorskip("torch", reason="torch is a test extra (pip install -e .[test])")
  transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
  from medusa_jax.models.chat import apply_chat_template
  from medusa_jax.models.tokenizer import Tokenizer

  paths, model = smollm2
  assert model.cfg.num_hidden_layers == 30 and model.cfg.tie_word_embeddings
  tok = Tokenizer.from_file(paths.model_dir)
  ids = tok.encode(apply_chat_template([{"role": "user", "content": "Describe the sea."}]))
  P, steps, L = len(ids), 16, 64
  assert 25 <= P <= 40

  torch.set_num_threads(2)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(paths.model_dir), dtype=torch.float32)
  hf.eval()
  with torch.no_grad(), warnings.catch_warnings():
    # transformers renames past_key_values across 5.x; the value is the same cache.
    warnings.simplefilter("ignore", FutureWarning)
    ref_logits = hf(torch.tensor([ids])).logits[0].numpy()
    out = hf(torch.tensor([ids]), use_cache=True)
    ref_gen, past = [], out.past_key_values
    for _ in range(steps):  # greedy with transformers' own KV cache
      ref_gen.append(int(out.logits[0, -1].argmax()))
      out = hf(torch.tensor([[ref_gen[-1]]]), past_key_values=past, use_cache=True)
      past = out.past_key_values

  for m in (model, model.fuse_projections()):  # the checkpoint layout, then the fused one
    graphdef, state = nnx.split(m)

    def step(state, tokens, positions, cache, cache_index, graphdef=graphdef):
      m = nnx.merge(graphdef, state)
      T = tokens.shape[1]
      h, cache = m(tokens, positions, cache, cache_index, causal_mask(cache_index, T, L))
      return m.lm_head(h), cache

    jstep = jax.jit(step, donate_argnames=("cache",))
    cache = KVCache.init(model.cfg, 1, L)
    idx = jnp.zeros((1,), jnp.int32)
    logits, cache = jstep(state, jnp.asarray([ids], jnp.int32),
                          jnp.arange(P, dtype=jnp.int32)[None], cache, idx)
    logits = np.asarray(logits[0])
    diff = np.abs(logits - ref_logits).max()
    assert diff < 5e-4, f"fused={m.fused_projections}: max |logit diff| {diff}"
    np.testing.assert_array_equal(logits.argmax(-1), ref_logits.argmax(-1))

    out, cur, nxt = [], P, int(logits[-1].argmax())
    for _ in range(steps):
      out.append(nxt)
      idx = jnp.asarray([cur], jnp.int32)
      logits, cache = jstep(state, jnp.asarray([[nxt]], jnp.int32), idx[:, None], cache, idx)
      nxt = int(np.asarray(logits)[0, -1].argmax())
      cur += 1
    assert out == ref_gen, (m.fused_projections, tok.decode(out), tok.decode(ref_gen))


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}])
def test_random_hf_llama_loads_and_matches_transformers(tmp_path, rope):
  """A random transformers LlamaForCausalLM (untied, GQA, RoPE scaling) saved with
  save_pretrained loads through load_llama and gives the same logits."""
  torch = pytest.importorskip("torch", reason="torch is a test extra")
  transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
  torch.manual_seed(31)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3)
  params = {"rope_theta": 1000.0, "rope_type": "default"}
  params.update(rope or {})
  hf_cfg.rope_parameters = params
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # norms away from 1
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  hf.save_pretrained(str(tmp_path), safe_serialization=True)
  model = load_llama(tmp_path)
  assert model.cfg.rope_scaling.rope_type.value == (rope or {}).get("rope_type", "default")
  rng = np.random.default_rng(32)
  B, T, L = 2, 40, 48  # positions past original_max_position_embeddings
  tokens = rng.integers(0, 97, (B, T))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  idx = jnp.zeros((B,), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  h, _ = _fwd(model, jnp.asarray(tokens, jnp.int32), pos, KVCache.init(model.cfg, B, L), idx,
              causal_mask(idx, T, L))
  np.testing.assert_allclose(np.asarray(model.lm_head(h)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,layout", [
    (dict(), "out_in"),
    (dict(sliding_window=4, qkv_bias=True, o_bias=True, mlp_bias=True,
          tie_word_embeddings=True), "in_out"),
])
def test_row_kernels_compute_the_layers_of_a_few_tokens(overrides, layout):
  """With ``row_kernels`` a call of at most ROW_KERNEL_MAX_ROWS tokens runs the row kernels
  (interpreted): the hidden state and the cache of XLA's layers, f32, for a prefill of 6
  tokens and two decode steps (the window, where set, already sliding), and for the plain
  model a 4-node tree and two rows of 3 tokens, in either kernel layout; a longer call runs
  XLA's layers; the parameters are shared and the option survives fusing."""
  model = _model(seed=41, **overrides).with_kernel_layout(layout)
  rows = model.with_row_kernels(True).with_row_kernel_rows(ROW_KERNEL_MAX_ROWS)
  assert rows.row_kernels and not rows.layers[0].row_kernels  # unfused: no kernel to run
  rows = rows.fuse_projections()
  assert rows.row_kernel_rows == ROW_KERNEL_MAX_ROWS == rows.layers[0].row_kernel_rows
  assert rows.static_options()["row_kernel_rows"] == ROW_KERNEL_MAX_ROWS
  fused = model.fuse_projections()
  assert rows.layers[0].row_kernels and fused.with_row_kernels(False) is fused
  shared = fused.with_row_kernels(True)
  assert shared.layers[1].row_kernels and (shared.layers[0].mlp.down_proj.kernel.get_value()
                                           is fused.layers[0].mlp.down_proj.kernel.get_value())
  cfg = model.cfg
  rng = np.random.default_rng(42)
  P, L = 6, 16
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, P)), jnp.int32)
  idx0 = jnp.zeros((1,), jnp.int32)
  tree = np.tril(np.ones((4, 4), bool)) & np.asarray([[1, 0, 0, 0], [1, 1, 0, 0],
                                                       [1, 0, 1, 0], [1, 1, 0, 1]], bool)
  toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 3)), jnp.int32)
  outs = []
  for m in (fused, rows):
    h, cache = _fwd(m, prompt, jnp.arange(P, dtype=jnp.int32)[None], KVCache.init(cfg, 1, L),
                    idx0, causal_mask(idx0, P, L))
    hs = [h]
    for i, t in enumerate((5, 11)):
      idx = jnp.asarray([P + i], jnp.int32)
      h, cache = _fwd(m, jnp.asarray([[t]], jnp.int32), idx[:, None], cache, idx,
                      causal_mask(idx, 1, L))
      hs.append(h)
    if overrides:  # the plain model takes the tree and the two rows (kernels test the rest)
      outs.append((hs, (cache,)))
      continue
    # A tree of 4 nodes after the 8 committed slots: depths 1, 2, 2, 3.
    n = P + 2
    mask = np.zeros((1, 4, L), bool)
    mask[0, :, :n] = True
    mask[0, :, n:n + 4] = tree
    h, tree_cache = _fwd(m, jnp.asarray([[3, 7, 9, 1]], jnp.int32),
                         jnp.asarray([[n, n + 1, n + 1, n + 2]], jnp.int32), cache,
                         jnp.asarray([n], jnp.int32), jnp.asarray(mask))
    hs.append(h)
    two = KVCache.init(cfg, 2, L)
    idx2 = jnp.asarray([0, 4], jnp.int32)
    h, two = _fwd(m, toks, idx2[:, None] + jnp.arange(3, dtype=jnp.int32)[None], two, idx2,
                  causal_mask(idx2, 3, L))
    hs.append(h)
    outs.append((hs, (cache, tree_cache, two)))
  (want_h, want_c), (got_h, got_c) = outs
  for a, b in zip(want_h + jax.tree.leaves(want_c), got_h + jax.tree.leaves(got_c)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)
  long = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, ROW_KERNEL_MAX_ROWS + 1)), jnp.int32)
  n = long.shape[1]
  big = [_fwd(m, long, jnp.arange(n, dtype=jnp.int32)[None], KVCache.init(cfg, 1, n + 1),
              idx0, causal_mask(idx0, n, n + 1))[0] for m in (fused, rows)]
  np.testing.assert_array_equal(np.asarray(big[1]), np.asarray(big[0]))  # XLA's layers
  # One row (the default): the 6-token prefill runs XLA's layers, bit for bit.
  one = rows.with_row_kernel_rows(1)
  assert one.row_kernel_rows == 1 and one.with_row_kernel_rows(1) is one
  pre = [_fwd(m, prompt, jnp.arange(P, dtype=jnp.int32)[None], KVCache.init(cfg, 1, L), idx0,
              causal_mask(idx0, P, L))[0] for m in (fused, one)]
  np.testing.assert_array_equal(np.asarray(pre[1]), np.asarray(pre[0]))


def test_row_kernel_blocks_change_the_tiles_not_the_function():
  """Per-kernel launch parameters reach their kernels (a bad one is refused by its kernel)
  and leave one token's hidden state and cache as the defaults give them."""
  fused = _model(seed=49).with_kernel_layout("out_in").fuse_projections()
  rows = fused.with_row_kernels(True)
  tuned = rows.with_row_kernel_blocks({"o": {"block_n": 2}, "down": {"block_k": 32,
                                                                     "num_warps": 2},
                                       "qkv": {"block_n": 1}, "gate_up": {"block_k": 16}})
  assert tuned.with_row_kernel_blocks(dict(tuned.row_kernel_blocks)) is tuned
  assert tuned.static_options()["row_kernel_blocks"]["down"] == {"block_k": 32, "num_warps": 2}
  assert rows.with_row_kernel_blocks(None) is rows and tuned.fuse_projections() is tuned
  cfg, L = fused.cfg, 8
  idx = jnp.asarray([2], jnp.int32)
  args = (jnp.asarray([[5]], jnp.int32), idx[:, None], KVCache.init(cfg, 1, L), idx,
          causal_mask(idx, 1, L))
  fwd = nnx.jit(lambda m, *a: m(*a))
  want, got = (fwd(m, *args) for m in (rows, tuned))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="block_n=3"):
    fwd(rows.with_row_kernel_blocks({"o": {"block_n": 3}}), *args)


@pytest.mark.parametrize("blocks,match", [
    ({"lm_head": {}}, "unknown kernel 'lm_head'"),
    ({"o": {"block_x": 4}}, "unknown argument 'block_x'"),
    ({"o": {"block_n": 0}}, "expected a positive integer, got 0"),
    ({"o": {"block_n": True}}, "expected a positive integer, got True"),
    ({"o": {"mma": 1}}, "expected a bool, got 1"),
])
def test_row_kernel_blocks_errors(blocks, match):
  with pytest.raises(ConfigError, match=match):
    _model(seed=50).with_row_kernel_blocks(blocks)


@pytest.mark.parametrize("rows", [0, ROW_KERNEL_MAX_ROWS + 1, 2.0, True])
def test_row_kernel_rows_out_of_range_is_refused(rows):
  with pytest.raises(ConfigError, match="row_kernel_rows: expected an integer in"):
    _model(seed=48).with_row_kernel_rows(rows)


def test_row_kernels_merge_the_attention_s_cache_splits_in_the_o_projection(monkeypatch):
  """A GPU runs the one-token attention in cache splits (the interpreter in one): forced to
  3 splits of 16-slot tiles over 40-odd slots, the layers still give XLA's hidden state and
  cache (the o projection's prologue merges the splits)."""
  from medusa_jax.pallas import decode_attention as attention_module
  parts, calls = attention_module.decode_attention_parts, []

  def three_splits(*args, **kw):
    calls.append(1)
    return parts(*args, **{**kw, "splits": 3, "block_k": 16})

  monkeypatch.setattr(attention_module, "decode_attention_parts", three_splits)
  fused = _model(seed=45).with_kernel_layout("out_in").fuse_projections()
  rows = fused.with_row_kernels(True)
  fwd = nnx.jit(lambda m, *a: m(*a))  # a fresh trace: the patched kernel call
  cfg, P, L = fused.cfg, 40, 64
  rng = np.random.default_rng(46)
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, P)), jnp.int32)
  idx0 = jnp.zeros((1,), jnp.int32)
  outs = []
  for m in (fused, rows):
    _, cache = fwd(m, prompt, jnp.arange(P, dtype=jnp.int32)[None], KVCache.init(cfg, 1, L),
                   idx0, causal_mask(idx0, P, L))
    idx = jnp.asarray([P], jnp.int32)
    outs.append(fwd(m, jnp.asarray([[9]], jnp.int32), idx[:, None], cache, idx,
                    causal_mask(idx, 1, L)))
  assert calls  # the row path ran its attention through the patched call
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_row_kernels_in_bfloat16_are_close_and_give_the_engine_s_tokens():
  """bf16: one token's hidden state near XLA's; f32 through the engine at batch 1, plain
  decoding: XLA's tokens."""
  from medusa_jax.decoding.engine import Engine
  model = _model(seed=43, eos_token_ids=()).fuse_projections()
  cfg = model.cfg
  bf = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                    param_dtype=jnp.bfloat16, fused_projections=True))
  nnx.update(bf, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model)))
  idx = jnp.asarray([3], jnp.int32)
  hs = [np.asarray(_fwd(m, jnp.asarray([[7]], jnp.int32), idx[:, None],
                        KVCache.init(cfg, 1, 8, jnp.bfloat16), idx,
                        causal_mask(idx, 1, 8))[0].astype(jnp.float32))
        for m in (bf, bf.with_row_kernels(True))]
  assert np.linalg.norm(hs[1] - hs[0]) <= 2e-2 * np.linalg.norm(hs[0])
  prompt = [list(np.random.default_rng(44).integers(3, cfg.vocab_size, 5))]
  want, got = (Engine(m, max_cache_len=32, steps_per_call=2).generate(prompt, 6)
               for m in (model, model.with_row_kernels(True)))
  assert got.tokens == want.tokens and len(got.tokens[0]) == 6
