"""Tokenizer built from GGUF metadata: parity with transformers' GGUF tokenizer, errors."""

from __future__ import annotations

import pytest

from medusa_jax.assets import cache as assets
from medusa_jax.errors import ConfigError, CorruptWeightsError
from medusa_jax.models.chat import apply_chat_template
from medusa_jax.models.tokenizer import Tokenizer, tokenizer_from_gguf

TEXTS = [
    "What is the capital of France?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: héllo wörld — 日本語 🙂 ∑x²",
    "def f(x):\n    return x ** 2  # 12345 digits 3.14159",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def paths():
  return assets.fetch(quiet=True)


@pytest.fixture(scope="module")
def tok(paths):
  return Tokenizer.from_file(paths.model_dir)


def test_special_ids_and_vocab(tok):
  assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (1, (2,), 2, 2)
  assert tok.vocab_size == 49152
  assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
  chat = apply_chat_template([{"role": "user", "content": "Hi there"}])
  ids = tok.encode(chat)
  assert ids[0] == 1 and ids[-3:] == tok.encode("assistant\n") and ids.count(2) == 2


def test_matches_transformers_gguf_tokenizer(tok, paths):
  transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
  ref = transformers.AutoTokenizer.from_pretrained(
      str(paths.gguf_path.parent), gguf_file=paths.gguf_path.name)
  texts = TEXTS + [apply_chat_template([{"role": "user", "content": t}]) for t in TEXTS[:3]]
  for text in texts:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(ids) == text
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  ids = tok.encode(texts[-1])
  assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_save_and_explicit_ids(tok, tmp_path):
  tok.save(tmp_path / "tokenizer.json")
  again = Tokenizer.from_file(tmp_path / "tokenizer.json", eos_ids=[2, 0])
  assert again.eos_ids == (2, 0) and again.bos_id is None  # no config.json beside it
  assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_errors(tmp_path):
  with pytest.raises(CorruptWeightsError, match="no such tokenizer"):
    Tokenizer.from_file(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(CorruptWeightsError, match="not a valid tokenizer.json"):
    Tokenizer.from_file(tmp_path / "tokenizer.json")
  with pytest.raises(ConfigError, match="encode: expected a str"):
    Tokenizer(backend=None).encode(b"bytes")


def _write_tokenizer_gguf(path, *, model="gpt2", merges=True, types=True):
  import gguf
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model(model)
  tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"]
  w.add_token_list(tokens)
  if merges:
    w.add_token_merges(["a b", "Ġ ab"])
  if types:
    w.add_token_types([3, 1, 1, 1, 1, 1])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_synthetic_gguf_tokenizer(tmp_path):
  _write_tokenizer_gguf(tmp_path / "t.gguf")
  tk = tokenizer_from_gguf(tmp_path / "t.gguf")
  assert tk.encode("ab ab<|endoftext|>", add_special_tokens=False).ids == [3, 5, 0]
  wrapped = Tokenizer.from_gguf(tmp_path / "t.gguf")
  assert (wrapped.bos_id, wrapped.eos_ids, wrapped.vocab_size) == (None, (), 6)
  assert wrapped.encode("ab ab") == [3, 5] and wrapped.decode([3, 5, 0]) == "ab ab<|endoftext|>"
  _write_tokenizer_gguf(tmp_path / "l.gguf", model="llama")
  with pytest.raises(ConfigError, match="tokenizer.ggml.model='llama'"):
    tokenizer_from_gguf(tmp_path / "l.gguf")
  _write_tokenizer_gguf(tmp_path / "m.gguf", merges=False)
  with pytest.raises(ConfigError, match="merges"):
    tokenizer_from_gguf(tmp_path / "m.gguf")
  with pytest.raises(CorruptWeightsError, match="no such GGUF"):
    tokenizer_from_gguf(tmp_path / "none.gguf")
