"""GGUF (llama.cpp) Llama checkpoints -> Hugging Face-named safetensors + config.json.

Quantised tensors are dequantised with the ``gguf`` package; the dequantised
array is already in torch's ``[out, in]`` layout. llama.cpp stores q_proj and
k_proj with each head's rows interleaved for its pair-wise RoPE;
:func:`unpermute_qk` restores Hugging Face's rotate-half order, so the result
loads in :func:`medusa_jax.models.llama.load_llama` and in transformers alike.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medusa_jax import _atomic
from medusa_jax.errors import ConfigError, CorruptWeightsError, MissingTensorError

# GGUF top-level tensor -> HF name.
_TOP = {"token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
# GGUF per-block tensor kind -> HF module under model.layers.{i}.
_PER_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def permute_qk(w_RxK: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's HF -> GGUF row permutation of q_proj / k_proj (for tests).

  Args:
    w_RxK: [n_head * D, K] HF weight (rotate-half order within each head).
    n_head: heads covered by the rows (query heads for Q, kv heads for K).

  Returns:
    [n_head * D, K]: each head's rows reordered ``(0, D/2, 1, D/2+1, ...)``.
  """
  R = w_RxK.shape[0]
  return w_RxK.reshape(n_head, 2, R // n_head // 2, *w_RxK.shape[1:]).swapaxes(1, 2).reshape(
      w_RxK.shape)


def unpermute_qk(w_RxK: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of :func:`permute_qk`: GGUF q/k rows -> Hugging Face order.

  Args:
    w_RxK: [n_head * D, K] weight as stored in the GGUF (dequantised).
    n_head: query heads for ``attn_q``, kv heads for ``attn_k``.

  Raises:
    ConfigError: the rows do not split into ``n_head`` heads of even width.
  """
  R = w_RxK.shape[0]
  if n_head <= 0 or R % (2 * n_head):
    raise ConfigError(f"unpermute_qk: {R} rows do not split into {n_head} heads of even width")
  return w_RxK.reshape(n_head, R // n_head // 2, 2, *w_RxK.shape[1:]).swapaxes(1, 2).reshape(
      w_RxK.shape)


def open_gguf(path: str | os.PathLike):
  """Opens a GGUF file (memory-mapped) as a ``gguf.GGUFReader``.

  Opening parses every field and tensor header (seconds for a large file):
  pass the reader to :func:`convert_gguf`, ``Tokenizer.from_gguf`` and
  ``ChatTemplate.from_gguf`` to open it once.

  Raises:
    CorruptWeightsError: the file is missing or not a GGUF.
  """
  from gguf import GGUFReader  # 0.2 s to import: only when a GGUF is opened
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CorruptWeightsError(f"{path}: no such GGUF file")
  try:
    return GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/struct.error/... on bad files
    raise CorruptWeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader, key: str, default: Any = None) -> Any:
  """A GGUF metadata value as a Python str/int/float/list, or ``default``."""
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def _need(reader, key: str, path: str) -> Any:
  value = field(reader, key)
  if value is None:
    raise ConfigError(f"{path}: GGUF metadata field {key!r} is missing")
  return value


def gguf_config(reader, path: str = "<gguf>") -> dict[str, Any]:
  """The Hugging Face ``config.json`` dict of a Llama GGUF.

  Raises:
    ConfigError: the architecture is not ``llama``, a required field is
      missing, or the GGUF asks for RoPE scaling.
  """
  arch = field(reader, "general.architecture")
  if arch != "llama":
    raise ConfigError(f"{path}: general.architecture={arch!r}; expected 'llama'")
  a = lambda key: _need(reader, f"llama.{key}", path)  # noqa: E731
  n_head, hidden = int(a("attention.head_count")), int(a("embedding_length"))
  n_kv = int(field(reader, "llama.attention.head_count_kv", n_head))
  head_dim = hidden // n_head
  rot = field(reader, "llama.rope.dimension_count", head_dim)
  if rot != head_dim:
    raise ConfigError(f"{path}: llama.rope.dimension_count={rot}; expected the head dim {head_dim}")
  scaling = field(reader, "llama.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ConfigError(f"{path}: llama.rope.scaling.type={scaling!r}; expected 'none'")
  names = {t.name for t in reader.tensors}
  vocab = field(reader, "llama.vocab_size")
  if vocab is None:
    tokens = field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
      raise ConfigError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
    vocab = len(tokens)
  eos = field(reader, "tokenizer.ggml.eos_token_id")
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama",
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(a("feed_forward_length")), num_hidden_layers=int(a("block_count")),
      num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
      # GGUF stores eps as float32; round-trip through str(float32) keeps 1e-5 as 1e-5.
      rms_norm_eps=float(str(np.float32(a("attention.layer_norm_rms_epsilon")))),
      rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(field(reader, "llama.context_length", 4096)),
      tie_word_embeddings="output.weight" not in names,
      hidden_act="silu", attention_bias=False, mlp_bias=False,
      bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=eos,
      pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
      torch_dtype="float32",
  )


def _hf_name(name: str, path: str) -> tuple[str, str | None]:
  """(HF name, per-layer kind or None) of a GGUF tensor name."""
  if name in _TOP:
    return _TOP[name], None
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _PER_LAYER:
    return f"model.layers.{int(parts[1])}.{_PER_LAYER[parts[2]]}.weight", parts[2]
  raise ConfigError(f"{path}: unexpected tensor {name!r} for a llama GGUF "
                    "(biases and extra tensors are not supported)")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str = "float32", reader=None, overwrite: bool = False
                 ) -> dict[str, Any]:
  """Converts a Llama GGUF into ``out_dir/model.safetensors`` + ``config.json``.

  The directory is written atomically (built under a temporary name, then
  swapped into place): a crash leaves the old checkpoint or the new one.

  Args:
    gguf_path: the ``.gguf`` file.
    out_dir: the checkpoint directory to write.
    dtype: ``"float32"`` or ``"bfloat16"`` for the written tensors.
    reader: the file already opened with :func:`open_gguf`, if at hand.
    overwrite: replace an existing checkpoint directory (whole).

  Returns:
    The ``config.json`` dict.

  Raises:
    CorruptWeightsError: the file is missing or unreadable.
    ConfigError: not a Llama GGUF, or a metadata field is missing.
    MissingTensorError: a tensor the model needs is absent (named).
    OutputExistsError: ``out_dir`` holds files and ``overwrite`` is False, or
      files that are not part of a checkpoint.
    WriteError: the disk is full or the directory is not writable.
  """
  from gguf.quants import dequantize

  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype={dtype!r}; expected one of float32, bfloat16")
  path = os.fspath(gguf_path)
  reader = open_gguf(path) if reader is None else reader
  cfg = gguf_config(reader, path)
  out_np = np.dtype(np.float32)
  if dtype == "bfloat16":
    import ml_dtypes
    out_np = np.dtype(ml_dtypes.bfloat16)
    cfg["torch_dtype"] = "bfloat16"
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    hf, kind = _hf_name(t.name, path)
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)  # [out, in]
    except Exception as e:
      raise CorruptWeightsError(f"{path}: tensor {t.name} cannot be dequantised ({e})") from None
    if kind == "attn_q":
      w = unpermute_qk(w, cfg["num_attention_heads"])
    elif kind == "attn_k":
      w = unpermute_qk(w, cfg["num_key_value_heads"])
    # safetensors writes raw buffers: the array must be C-contiguous.
    tensors[hf] = np.ascontiguousarray(w, dtype=out_np)
  _check_complete(tensors, cfg, path)
  with _atomic.replace_dir(out_dir, overwrite=overwrite, what="a converted Llama checkpoint",
                           belongs=checkpoint_entry) as tmp:
    _atomic.write_safetensors(os.path.join(tmp, "model.safetensors"), tensors,
                              metadata={"format": "pt"})
    _atomic.write_json(os.path.join(tmp, "config.json"), cfg, indent=1)
  return cfg


def checkpoint_entry(name: str, is_dir: bool) -> bool:
  """Whether an entry of an existing directory is part of a Hugging Face checkpoint."""
  return not is_dir and name.endswith((".safetensors", ".json", ".jinja", ".model", ".txt",
                                       ".md", ".gitattributes"))


def _check_complete(tensors: dict[str, np.ndarray], cfg: dict[str, Any], path: str) -> None:
  need = ["model.embed_tokens.weight", "model.norm.weight"]
  for i in range(cfg["num_hidden_layers"]):
    need += [f"model.layers.{i}.{m}.weight" for m in _PER_LAYER.values()]
  for name in need:
    if name not in tensors:
      raise MissingTensorError(f"{path}: GGUF has no tensor for {name}")
