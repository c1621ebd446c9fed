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


def _write_tokenizer_gguf(path, *, model="gpt2", merges=True, types=True, add_bos=None):
  import gguf
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model(model)
  if add_bos is not None:
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(add_bos)
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


@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_add_bos_flag_is_honoured(tmp_path, add_bos):
  """tokenizer.ggml.add_bos_token decides BOS, here and in the saved tokenizer.json."""
  transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
  from medusa_jax.models.chat import ChatTemplate, chat_ids, text_ids
  _write_tokenizer_gguf(tmp_path / "t.gguf", add_bos=add_bos)
  tok = Tokenizer.from_gguf(tmp_path / "t.gguf")
  assert tok.add_bos is add_bos and tok.adds_bos is add_bos and tok.bos_token == "<|endoftext|>"
  assert text_ids(tok, "ab ab") == [0] * add_bos + [3, 5]
  template = ChatTemplate(source="{% for m in messages %}{{ m['content'] }}{% endfor %}")
  assert chat_ids(tok, template, "ab") == [0] * add_bos + [3]
  tok.save(tmp_path / "tokenizer.json")
  again = Tokenizer.from_file(tmp_path)
  assert text_ids(again, "ab ab") == text_ids(tok, "ab ab")
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  assert list(hf("ab ab")["input_ids"]) == text_ids(tok, "ab ab")


def test_hugging_face_tokenizer_files(tmp_path):
  """tokenizer_config.json tokens (string or AddedToken form), add_bos/add_eos, and EOS ids
  from generation_config.json (a list) after the tokenizer's own."""
  import json
  tk = tokenizer_from_gguf(_gguf(tmp_path))
  tk.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": {"content": "<|endoftext|>", "__type": "AddedToken"}, "eos_token": None,
      "add_bos_token": True}))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 0, 5]}))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3, "pad_token_id": 2}))
  tok = Tokenizer.from_file(tmp_path)
  assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (0, (0, 4, 5), 2)
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "b")
  assert (tok.add_bos, tok.add_eos) == (True, False)
  assert tok.encode("ab", add_special_tokens=True) == [0, 3] and tok.encode("ab") == [3]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
  with pytest.raises(ConfigError, match="add_bos_token: expected a bool"):
    Tokenizer.from_file(tmp_path)
  (tmp_path / "tokenizer.json").unlink()
  (tmp_path / "tokenizer.model").write_bytes(b"")
  with pytest.raises(CorruptWeightsError, match="only a sentencepiece tokenizer.model.*"
                     "save_pretrained"):
    Tokenizer.from_file(tmp_path)


def _gguf(tmp_path):
  _write_tokenizer_gguf(tmp_path / "x.gguf")
  return tmp_path / "x.gguf"
