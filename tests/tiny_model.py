"""Test helper: a tiny Hugging Face Llama directory (config, safetensors, byte-level tokenizer).

Written from NumPy with random weights, so tests run the real loading path
(``load_llama``, ``Tokenizer.from_file``) in well under a second.
"""

from __future__ import annotations

import json
import os

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_tokenizer():
  """Byte-level BPE without merges: one token per byte, plus ChatML specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {tok: i for i, tok in enumerate(SPECIALS)}
  for ch in sorted(alphabet):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIALS))
  return tok, len(vocab)


def make_tiny_llama_dir(out: str | os.PathLike, *, seed: int = 0, hidden: int = 32,
                        layers: int = 2) -> dict:
  """Writes config.json, model.safetensors and tokenizer.json to ``out``; returns the config."""
  from safetensors.numpy import save_file
  out = os.fspath(out)
  os.makedirs(out, exist_ok=True)
  tok, vocab = _byte_tokenizer()
  tok.save(os.path.join(out, "tokenizer.json"))
  from medusa_jax.models.chat import ChatTemplate
  ChatTemplate().save(out)  # SmolLM2's ChatML, whose specials the byte tokenizer has
  heads, kv_heads, head_dim, inter = 4, 2, hidden // 4, 48
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
         "num_hidden_layers": layers, "num_attention_heads": heads,
         "num_key_value_heads": kv_heads, "head_dim": head_dim, "rope_theta": 10000.0,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 1024,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  rng = np.random.default_rng(seed)

  def w(*shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  t = {"model.embed_tokens.weight": w(vocab, hidden, scale=1.0),
       "model.norm.weight": 1.0 + w(hidden, scale=0.05)}
  for i in range(layers):
    p = f"model.layers.{i}."
    t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
    t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
    t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
    t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
    t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
    t[p + "mlp.up_proj.weight"] = w(inter, hidden)
    t[p + "mlp.down_proj.weight"] = w(hidden, inter)
    t[p + "input_layernorm.weight"] = 1.0 + w(hidden, scale=0.05)
    t[p + "post_attention_layernorm.weight"] = 1.0 + w(hidden, scale=0.05)
  save_file(t, os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  return cfg


def make_tiny_adapter_dir(out: str | os.PathLike, *, hidden: int = 32, num_heads: int = 3,
                          seed: int = 1, base: str = "tiny-llama") -> str:
  """A LoRAX-layout V2 adapter (config.json + model.safetensors) for the tiny model."""
  from medusa_files import head_tensors
  from safetensors.numpy import save_file
  out = os.fspath(out)
  os.makedirs(out, exist_ok=True)
  tensors = head_tensors(np.random.default_rng(seed), n=num_heads, hidden=hidden)
  save_file(tensors, os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"base_model_name_or_path": base, "medusa_num_heads": num_heads,
               "medusa_num_layers": 1, "version": 2}, f)
  return out
