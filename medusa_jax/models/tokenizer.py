"""Byte-level BPE tokenizer built from GGUF metadata, and a small wrapper.

:func:`tokenizer_from_gguf` needs only the ``tokenizers`` package: the GGUF
holds the vocabulary (``tokenizer.ggml.tokens``), the merges, and the token
types (type 3 = control tokens such as ``<|im_start|>``, which become special
added tokens). The pre-tokenizer is GPT-2's byte-level regex without a prefix
space; nothing is added around the ids (the chat template supplies the
leading ``<|im_start|>``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from medusa_jax.errors import ConfigError, CorruptWeightsError
from medusa_jax.models.gguf import field, open_gguf
from medusa_jax.models.llama_config import LlamaConfig

_CONTROL = 3  # llama.cpp token type of control (special) tokens


def tokenizer_from_gguf(gguf_path: str | os.PathLike):
  """Builds a ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.ggml.*`` fields.

  Raises:
    CorruptWeightsError: the file is missing or unreadable.
    ConfigError: the GGUF has no byte-level BPE ("gpt2") tokenizer or lacks
      tokens/merges.
  """

  path = os.fspath(gguf_path)
  return _from_reader(open_gguf(path), path)


def _from_reader(reader, path: str):
  from tokenizers import AddedToken
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers


  kind = field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ConfigError(f"{path}: tokenizer.ggml.model={kind!r}; expected 'gpt2' (byte-level BPE)")
  tokens = field(reader, "tokenizer.ggml.tokens")
  merges = field(reader, "tokenizer.ggml.merges")
  types = field(reader, "tokenizer.ggml.token_type")
  for key, value in (("tokens", tokens), ("merges", merges)):
    if not value:
      raise ConfigError(f"{path}: GGUF metadata field 'tokenizer.ggml.{key}' is missing")
  if types is None:
    types = [1] * len(tokens)
  if len(types) != len(tokens):
    raise ConfigError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries; expected "
                      f"{len(tokens)} (one per token)")
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep:
      raise ConfigError(f"{path}: tokenizer.ggml.merges entry {m!r}; expected 'left right'")
    pairs.append((a, b))
  tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                         for t, y in zip(tokens, types) if y == _CONTROL])
  return tk


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Tokenizer:
  """A thin wrapper over ``tokenizers.Tokenizer`` with the model's special ids.

  ``encode`` adds no special tokens; special-token text (``<|im_end|>``)
  inside the input maps to its id.
  """
  backend: object
  """The ``tokenizers.Tokenizer``."""
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int | None = None

  @property
  def eos_id(self) -> int | None:
    """The first end-of-sequence id (the one a chat turn ends with)."""
    return self.eos_ids[0] if self.eos_ids else None

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """text -> token ids (no bos/eos added)."""
    if not isinstance(text, str):
      raise ConfigError(f"encode: expected a str, got {type(text).__name__}")
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """token ids -> text; special tokens are kept unless asked otherwise."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def save(self, path: str | os.PathLike) -> None:
    """Writes ``tokenizer.json``."""
    self.backend.save(os.fspath(path))

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, bos_id: int | None = None,
                eos_ids: Sequence[int] = (), pad_id: int | None = None) -> Tokenizer:
    """Loads a ``tokenizer.json`` (or the one in a directory).

    When ``eos_ids``/``bos_id``/``pad_id`` are not given and a ``config.json``
    sits beside the file, its ``bos_token_id``/``eos_token_id``/``pad_token_id``
    are used.

    Raises:
      CorruptWeightsError: the file is missing or not a tokenizer.
    """
    from tokenizers import Tokenizer as HFTokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise CorruptWeightsError(f"{path}: no such tokenizer file")
    try:
      backend = HFTokenizer.from_file(path)
    except Exception as e:
      raise CorruptWeightsError(f"{path}: not a valid tokenizer.json ({e})") from None
    eos_ids = tuple(int(i) for i in eos_ids)
    config = os.path.join(os.path.dirname(path), "config.json")
    if os.path.isfile(config) and (bos_id is None or not eos_ids or pad_id is None):
      cfg = LlamaConfig.from_hf(config)
      bos_id = cfg.bos_token_id if bos_id is None else bos_id
      eos_ids = eos_ids or cfg.eos_token_ids
      pad_id = cfg.pad_token_id if pad_id is None else pad_id
    return cls(backend=backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id)

  @classmethod
  def from_gguf(cls, gguf_path: str | os.PathLike, *, reader=None) -> Tokenizer:
    """Builds the tokenizer and its special ids from a GGUF file.

    Args:
      gguf_path: the ``.gguf`` file.
      reader: the file already opened with ``gguf.open_gguf``, if at hand.
    """
    path = os.fspath(gguf_path)
    reader = open_gguf(path) if reader is None else reader
    backend = _from_reader(reader, path)
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    return cls(backend=backend, bos_id=field(reader, "tokenizer.ggml.bos_token_id"),
               eos_ids=() if eos is None else (int(eos),),
               pad_id=field(reader, "tokenizer.ggml.padding_token_id"))
