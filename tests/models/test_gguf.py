"""GGUF -> HF safetensors: Q/K un-permutation, metadata, a synthetic GGUF round trip, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medusa_jax.errors import ConfigError, CorruptWeightsError, MissingTensorError
from medusa_jax.models import gguf as mg

sys.path.insert(0, str(Path(__file__).parent))


def _permute_reference(w, n_head):
  """llama.cpp's permutation written out row by row: within each head, row
  2j comes from row j and row 2j+1 from row j + D/2."""
  rows = w.shape[0]
  D = rows // n_head
  out = np.empty_like(w)
  for h in range(n_head):
    for j in range(D // 2):
      out[h * D + 2 * j] = w[h * D + j]
      out[h * D + 2 * j + 1] = w[h * D + D // 2 + j]
  return out


@pytest.mark.parametrize("n_head,D,K", [(9, 64, 5), (3, 8, 7), (1, 2, 3)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, D, K):
  rng = np.random.default_rng(n_head * 100 + D)
  w = rng.standard_normal((n_head * D, K))
  permuted = _permute_reference(w, n_head)
  np.testing.assert_array_equal(mg.permute_qk(w, n_head), permuted)
  np.testing.assert_array_equal(mg.unpermute_qk(permuted, n_head), w)


def test_unpermute_rejects_bad_split():
  with pytest.raises(ConfigError, match="9 rows"):
    mg.unpermute_qk(np.zeros((9, 4)), 3)


# ----------------------------------------------------------------- synthetic GGUF


def write_tiny_gguf(path: Path, model, *, quantize_embed=True, arch="llama", drop=(),
                    tokenizer=None, chat_template=None):
  """Writes a random tiny Llama as llama.cpp would (permuted Q/K, ggml names)."""
  import gguf
  from gguf.quants import quantize
  from test_llama import _params_np

  cfg = model.cfg
  p = _params_np(model)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_vocab_size(cfg.vocab_size)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  if tokenizer is not None:
    tokens, merges, types = tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
  if chat_template is not None:
    w.add_chat_template(chat_template)
  tensors = {}
  embed = p["embed"].astype(np.float32)
  if quantize_embed:
    q = quantize(embed, gguf.GGMLQuantizationType.Q8_0)
    tensors["token_embd.weight"] = (q, embed.shape, gguf.GGMLQuantizationType.Q8_0)
  else:
    tensors["token_embd.weight"] = (embed, None, None)
  tensors["output_norm.weight"] = (p["norm"].astype(np.float32), None, None)
  if not cfg.tie_word_embeddings:
    tensors["output.weight"] = (p["lm_head"].astype(np.float32), None, None)
  names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
           "ln1": "attn_norm", "ln2": "ffn_norm"}
  for i, lp in enumerate(p["layers"]):
    for k, g in names.items():
      a = lp[k].astype(np.float32)
      if k == "q_proj":
        a = mg.permute_qk(a, cfg.num_attention_heads)
      elif k == "k_proj":
        a = mg.permute_qk(a, cfg.num_key_value_heads)
      tensors[f"blk.{i}.{g}.weight"] = (np.ascontiguousarray(a), None, None)
  for name, (arr, shape, dtype) in tensors.items():
    if name in drop:
      continue
    if dtype is None:
      w.add_tensor(name, arr)
    else:
      w.add_tensor(name, arr, raw_dtype=dtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return p


@pytest.mark.parametrize("tied", [True, False])
def test_convert_synthetic_gguf_round_trip(tmp_path, tied):
  from gguf.quants import dequantize, quantize
  import gguf
  from flax import nnx
  import jax.numpy as jnp
  from test_llama import _model, _params_np
  from medusa_jax.models.llama import KVCache, causal_mask
  from medusa_jax.models.llama_weights import load_llama

  model = _model(seed=21, tie_word_embeddings=tied, rope_theta=5e4, rms_norm_eps=1e-6)
  p = write_tiny_gguf(tmp_path / "tiny.gguf", model)
  cfg = mg.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
  assert json.loads((tmp_path / "hf" / "config.json").read_text()) == cfg
  assert (cfg["tie_word_embeddings"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (tied, 5e4, 1e-6)
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
  loaded = load_llama(tmp_path / "hf")
  q = _params_np(loaded)
  embed_q8 = dequantize(quantize(p["embed"].astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                        gguf.GGMLQuantizationType.Q8_0)
  np.testing.assert_array_equal(q["embed"], embed_q8)
  for a, b in zip(p["layers"], q["layers"]):
    for k in a:
      np.testing.assert_array_equal(b[k], a[k].astype(np.float32))
  # The converted model computes what the original computes (up to the Q8_0 embedding).
  nnx.update(model, {"embed_tokens": nnx.Param(jnp.asarray(embed_q8))})
  rng = np.random.default_rng(22)
  tokens = jnp.asarray(rng.integers(0, 97, (1, 6)), jnp.int32)
  pos = jnp.arange(6, dtype=jnp.int32)[None]
  idx = jnp.zeros((1,), jnp.int32)
  fwd = nnx.jit(lambda m: m.lm_head(m(tokens, pos, KVCache.init(m.cfg, 1, 8), idx,
                                      causal_mask(idx, 6, 8))[0]))
  outs = [fwd(m) for m in (model, loaded)]
  np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)


def test_convert_bfloat16(tmp_path):
  from test_llama import _model
  from safetensors.numpy import load_file
  write_tiny_gguf(tmp_path / "t.gguf", _model(seed=23), quantize_embed=False)
  cfg = mg.convert_gguf(tmp_path / "t.gguf", tmp_path / "hf", dtype="bfloat16")
  assert cfg["torch_dtype"] == "bfloat16"
  t = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert t["model.embed_tokens.weight"].dtype.name == "bfloat16"
  with pytest.raises(ConfigError, match="dtype"):
    mg.convert_gguf(tmp_path / "t.gguf", tmp_path / "x", dtype="float16")


def test_convert_errors(tmp_path):
  from test_llama import _model
  model = _model(seed=24)
  with pytest.raises(CorruptWeightsError, match="no such"):
    mg.convert_gguf(tmp_path / "missing.gguf", tmp_path / "o")
  (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(60)))
  with pytest.raises(CorruptWeightsError, match="not a readable GGUF"):
    mg.convert_gguf(tmp_path / "junk.gguf", tmp_path / "o")
  write_tiny_gguf(tmp_path / "g.gguf", model, arch="gemma3")
  with pytest.raises(ConfigError, match="architecture='gemma3'"):
    mg.convert_gguf(tmp_path / "g.gguf", tmp_path / "o")
  write_tiny_gguf(tmp_path / "m.gguf", model, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    mg.convert_gguf(tmp_path / "m.gguf", tmp_path / "o")
  assert not (tmp_path / "o").exists()
