"""Byte-level BPE tokenizer built from GGUF metadata, and a small wrapper.

:func:`tokenizer_from_gguf` needs only the ``tokenizers`` package: the GGUF
holds the vocabulary (``tokenizer.ggml.tokens``), the merges, and the token
types (type 3 = control tokens such as ``<|im_start|>``, which become special
added tokens). The pre-tokenizer is GPT-2's byte-level regex without a prefix
space; BOS is added only when the GGUF's ``tokenizer.ggml.add_bos_token`` says
so (SmolLM2's does not: its chat template supplies the leading ``<|im_start|>``).

:class:`Tokenizer` also reads a Hugging Face tokenizer directory
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``generation_config.json``) by transformers' conventions.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from medusa_jax._validate import read_json_object
from medusa_jax.errors import ConfigError, CorruptWeightsError
from medusa_jax.models.gguf import field, open_gguf

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



def _bos_processor(bos: str, bos_id: int):
  """A post-processor that puts ``bos`` first, as transformers builds it for ``add_bos_token``."""
  from tokenizers import processors
  return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                       special_tokens=[(bos, bos_id)])


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Tokenizer:
  """A thin wrapper over ``tokenizers.Tokenizer`` with the model's special tokens.

  ``encode`` adds no special tokens unless asked; special-token text
  (``<|im_end|>``) inside the input maps to its id. With
  ``add_special_tokens=True`` it adds what transformers'
  ``tokenizer(text)`` adds: BOS/EOS by ``add_bos``/``add_eos`` when the
  ``tokenizer_config.json`` sets them, else whatever the ``tokenizer.json``
  post-processor adds.
  """
  backend: object
  """The ``tokenizers.Tokenizer``."""
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  """Every id that ends a generation: the tokenizer's EOS first, then
  ``generation_config.json``'s (or ``config.json``'s) ``eos_token_id``."""
  pad_id: int | None = None
  bos_token: str | None = None
  """The BOS text (``<s>``, ``<|begin_of_text|>``), given to chat templates."""
  eos_token: str | None = None
  unk_token: str | None = None
  pad_token: str | None = None
  add_bos: bool | None = None
  """``add_bos_token`` of ``tokenizer_config.json``; None: the post-processor decides."""
  add_eos: bool | None = None
  """``add_eos_token``; None: the post-processor decides."""

  @property
  def eos_id(self) -> int | None:
    """The first end-of-sequence id (the one a chat turn ends with)."""
    return self.eos_ids[0] if self.eos_ids else None

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def adds_bos(self) -> bool:
    """Whether ``encode(text, add_special_tokens=True)`` starts with BOS."""
    if self.bos_id is None:
      return False
    if self.add_bos is not None or self.add_eos is not None:
      return bool(self.add_bos)
    ids = self.backend.encode("", add_special_tokens=True).ids
    return bool(ids) and ids[0] == self.bos_id

  def special_tokens(self) -> dict[str, str]:
    """The named special tokens a chat template sees (``bos_token``, ``eos_token``, ...)."""
    return {name: getattr(self, name) for name in _SPECIAL_NAMES
            if getattr(self, name) is not None}

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """text -> token ids; BOS/EOS only with ``add_special_tokens`` (see the class)."""
    if not isinstance(text, str):
      raise ConfigError(f"encode: expected a str, got {type(text).__name__}")
    if not add_special_tokens or (self.add_bos is None and self.add_eos is None):
      return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if self.add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if self.add_eos and self.eos_id is not None:
      ids = ids + [self.eos_id]
    return ids

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
    """Loads a ``tokenizer.json`` with the files beside it, by the Hugging Face conventions.

    Beside the file (or in the directory) it reads, when present:
    ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``unk_token``,
    ``pad_token``, ``add_bos_token``, ``add_eos_token``; a token may be a
    string or an ``AddedToken`` object), ``special_tokens_map.json`` (for the
    tokens the first does not name), ``generation_config.json`` and
    ``config.json`` (``eos_token_id``, possibly a list, and the ids of tokens
    named nowhere else). Explicit ``bos_id``/``eos_ids``/``pad_id`` win.

    Raises:
      CorruptWeightsError: the file is missing or not a tokenizer (a
        directory with only a sentencepiece ``tokenizer.model`` says how to
        make the ``tokenizer.json``).
      ConfigError: a JSON file beside it is malformed.
    """
    from tokenizers import Tokenizer as HFTokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, TOKENIZER_FILE)
    folder = os.path.dirname(path)
    if not os.path.isfile(path):
      hint = ""
      if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        hint = ("; the directory has only a sentencepiece tokenizer.model: write the fast"
                " tokenizer once with `python -c \"from transformers import AutoTokenizer;"
                f" AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')\"`")
      raise CorruptWeightsError(f"{path}: no such tokenizer file{hint}")
    try:
      backend = HFTokenizer.from_file(path)
    except Exception as e:
      raise CorruptWeightsError(f"{path}: not a valid tokenizer.json ({e})") from None

    def optional(name):
      file = os.path.join(folder, name)
      return read_json_object(file) if os.path.isfile(file) else {}

    tok_cfg, special_map = optional(TOKENIZER_CONFIG), optional(SPECIAL_TOKENS_MAP)
    gen, model_cfg = optional(GENERATION_CONFIG), optional("config.json")
    where = os.path.join(folder, TOKENIZER_CONFIG)
    names = {}
    for name in _SPECIAL_NAMES:
      value = tok_cfg.get(name)
      value = special_map.get(name) if value is None else value
      names[name] = _token_text(value, f"{where}: {name}")
    flags = {}
    for key in ("add_bos_token", "add_eos_token"):
      value = tok_cfg.get(key)
      if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}: expected a bool, got {value!r}")
      flags[key] = value
    if flags["add_bos_token"] is not None or flags["add_eos_token"] is not None:
      flags = {k: bool(v) for k, v in flags.items()}  # transformers: the other one is False

    def token_id(name, config_key):
      text = names[name]
      tid = backend.token_to_id(text) if text is not None else None
      if tid is None:
        tid = _first_id(gen.get(config_key), f"{GENERATION_CONFIG}: {config_key}")
      if tid is None:
        tid = _first_id(model_cfg.get(config_key), f"config.json: {config_key}")
      return tid

    bos_id = token_id("bos_token", "bos_token_id") if bos_id is None else bos_id
    pad_id = token_id("pad_token", "pad_token_id") if pad_id is None else pad_id
    if not eos_ids:
      eos_ids = []
      tid = backend.token_to_id(names["eos_token"]) if names["eos_token"] else None
      listed = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
      listed = listed if isinstance(listed, list) else ([] if listed is None else [listed])
      for i in ([tid] if tid is not None else []) + listed:
        if isinstance(i, bool) or not isinstance(i, int):
          raise ConfigError(f"{folder}: eos_token_id: expected an int or a list of ints, got"
                            f" {listed!r}")
        if i not in eos_ids:
          eos_ids.append(i)
    eos_ids = tuple(int(i) for i in eos_ids)
    # Name the tokens that only the model config gives by id.
    for name, tid in (("bos_token", bos_id), ("eos_token", eos_ids[0] if eos_ids else None),
                      ("pad_token", pad_id)):
      if names[name] is None and tid is not None:
        names[name] = backend.id_to_token(tid)
    return cls(backend=backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
               add_bos=flags["add_bos_token"], add_eos=flags["add_eos_token"], **names)

  @classmethod
  def from_gguf(cls, gguf_path: str | os.PathLike, *, reader=None) -> Tokenizer:
    """Builds the tokenizer and its special tokens from a GGUF file.

    ``tokenizer.ggml.add_bos_token`` is honoured: when set, the backend's
    post-processor puts BOS first (so the saved ``tokenizer.json`` does too,
    for transformers as well).

    Args:
      gguf_path: the ``.gguf`` file.
      reader: the file already opened with ``gguf.open_gguf``, if at hand.
    """
    path = os.fspath(gguf_path)
    reader = open_gguf(path) if reader is None else reader
    backend = _from_reader(reader, path)
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    add_bos = field(reader, "tokenizer.ggml.add_bos_token")
    add_eos = field(reader, "tokenizer.ggml.add_eos_token")
    text = lambda i: None if i is None else backend.id_to_token(int(i))  # noqa: E731
    if add_bos and bos is not None:
      backend.post_processor = _bos_processor(text(bos), int(bos))
    return cls(backend=backend, bos_id=bos, eos_ids=() if eos is None else (int(eos),),
               pad_id=pad, bos_token=text(bos), eos_token=text(eos), pad_token=text(pad),
               add_bos=None if add_bos is None and add_eos is None else bool(add_bos),
               add_eos=None if add_bos is None and add_eos is None else bool(add_eos))


def _token_text(value, where: str) -> str | None:
  """A special token from a tokenizer config: a string, or an ``AddedToken`` object."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ConfigError(f"{where}: expected a string or {{'content': str, ...}}, got {value!r:.80}")


def _first_id(value, where: str) -> int | None:
  if isinstance(value, list):
    value = value[0] if value else None
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f"{where}: expected an integer token id, got {value!r}")
  return value
