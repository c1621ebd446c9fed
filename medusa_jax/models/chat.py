"""Chat templates (Jinja, as in Hugging Face tokenizers) and the ids of a chat prompt.

Templates render exactly as transformers' ``apply_chat_template`` renders them:
the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, the ``{% generation %}`` tag, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text), with ``messages``,
``add_generation_prompt``, ``tools=None``, ``documents=None`` and the tokenizer's
named special tokens (``bos_token``, ``eos_token``, ...).

Where a template comes from (:func:`load_chat_templates`, transformers' order):
``chat_template.jinja`` (and ``additional_chat_templates/NAME.jinja``), else
``tokenizer_config.json``'s ``chat_template`` -- a string, or the named-template
list ``[{"name": ..., "template": ...}]`` whose ``default`` is used -- else
``chat_template.json``. :func:`resolve_chat_template` picks one by name: one of
the model's named templates, a built-in conversation format (:data:`BUILTIN`,
e.g. ``vicuna_v1.1``, the original Medusa heads' base format), a ``.jinja``
file, or a Jinja string.

:func:`chat_ids` gives the ids fed to the model: the rendered text encoded with
no special tokens (as ``apply_chat_template(..., tokenize=True)``), with BOS put
first when the tokenizer adds BOS (``add_bos_token``, or its post-processor) and
the text does not already start with it -- so templates that write
``{{ bos_token }}`` (Llama 3, Mistral) get exactly transformers' ids, and
formats that leave BOS to the tokenizer (Vicuna, as FastChat tokenizes it) get
it once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from typing import Any, Mapping, Sequence

from medusa_jax._validate import read_json_object
from medusa_jax.errors import ConfigError, RequestError
from medusa_jax.models.gguf import field, open_gguf

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""SmolLM2-Instruct's ChatML template (built-in name ``smollm2``)."""

VICUNA_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant."
                        " The assistant gives helpful, detailed, and polite answers to the"
                        " user's questions.")

# FastChat's vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>"):
# "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:". BOS comes from the tokenizer.
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}"
    "{% set system = '" + VICUNA_SYSTEM_PROMPT.replace("'", "\\'") + "' %}"
    "{% set turns = messages %}{% endif %}"
    "{{ system + ' ' }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('vicuna_v1.1: roles are user and assistant after an"
    " optional first system message') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

PLAIN_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Meta's Llama 3 Instruct template (tokenizer_config.json of Meta-Llama-3-8B-Instruct).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# Mistral-7B-Instruct-v0.1's [INST] template.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')"
    " }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}")

# Llama 2 chat ([INST] with a <<SYS>> block in the first user turn).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')"
    " }}{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

BUILTIN: dict[str, str] = {
    "chatml": PLAIN_CHATML_TEMPLATE,
    "smollm2": CHATML_TEMPLATE,
    "vicuna_v1.1": VICUNA_TEMPLATE,
    "llama2": LLAMA2_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
}
"""Built-in conversation formats, by name (``--chat-template NAME``)."""

TEMPLATE_FILE = "chat_template.jinja"
ADDITIONAL_DIR = "additional_chat_templates"
DEFAULT_NAME = "default"


class _RaisedByTemplate(Exception):
  """``raise_exception`` inside a template (turned into a RequestError by ``render``)."""


def _raise(message: str):
  raise _RaisedByTemplate(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _environment():
  """transformers' chat-template environment (``_cached_compile_jinja_template``)."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (assistant-mask marker)."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChatTemplate:
  """A Jinja chat template, compiled once.

  Attributes:
    source: the Jinja text.
    name: where it came from (a built-in or template name, a file), for messages.
  """
  source: str = CHATML_TEMPLATE
  name: str = dataclasses.field(default="", compare=False)
  _compiled: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    import jinja2

    if not isinstance(self.source, str):
      raise ConfigError(f"chat template {self.name}: expected Jinja text, got"
                        f" {type(self.source).__name__}")
    try:
      compiled = _environment().from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      where = f" {self.name}" if self.name else ""
      raise ConfigError(f"chat template{where}: invalid Jinja at line {e.lineno}: {e.message}"
                        ) from None
    object.__setattr__(self, "_compiled", compiled)

  def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
             **extra: Any) -> str:
    """Renders a conversation.

    Args:
      messages: ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``
        (other keys are passed through; keys whose value is None are dropped,
        as transformers does).
      add_generation_prompt: end with the assistant-turn opener.
      **extra: more template variables (``bos_token``, ``eos_token``, ...).

    Raises:
      RequestError: a message is not a ``{role, content}`` mapping of strings,
        or the template raised (``raise_exception``), with its message.
    """
    import jinja2

    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
      raise RequestError(f"messages: expected a non-empty list of {{role, content}} dicts, "
                         f"got {messages!r:.80}")
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
          m.get("content"), str):
        raise RequestError(f"messages[{i}]: expected {{'role': str, 'content': str}}, "
                           f"got {m!r:.80}")
    clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = dict(tools=None, documents=None)
    variables.update(extra)
    try:
      return self._compiled.render(messages=clean, add_generation_prompt=add_generation_prompt,
                                   **variables)
    except _RaisedByTemplate as e:
      raise RequestError(f"chat template: {e}") from None
    except jinja2.TemplateError as e:
      raise RequestError(f"chat template {self.name or ''}: {type(e).__name__}: {e}") from None

  def save(self, directory: str | os.PathLike) -> str:
    """Writes ``chat_template.jinja`` into ``directory``; returns its path."""
    path = os.path.join(os.fspath(directory), TEMPLATE_FILE)
    with open(path, "w", encoding="utf-8") as f:
      f.write(self.source)
    return path

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> ChatTemplate:
    """Reads ``chat_template.jinja`` (or the one in a directory).

    Raises:
      ConfigError: the file is missing or not valid Jinja.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, TEMPLATE_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        return cls(source=f.read(), name=path)
    except FileNotFoundError:
      raise ConfigError(f"{path}: no such chat template file") from None

  @classmethod
  def from_gguf(cls, gguf_path: str | os.PathLike, *, reader=None) -> ChatTemplate:
    """The GGUF's ``tokenizer.chat_template``.

    Args:
      gguf_path: the ``.gguf`` file.
      reader: the file already opened with ``gguf.open_gguf``, if at hand.

    Raises:
      ConfigError: the GGUF has no chat template.
    """

    path = os.fspath(gguf_path)
    reader = open_gguf(path) if reader is None else reader
    source = field(reader, "tokenizer.chat_template")
    if not source:
      raise ConfigError(f"{path}: GGUF metadata field 'tokenizer.chat_template' is missing")
    return cls(source=source, name=path)

  @classmethod
  def builtin(cls, name: str) -> ChatTemplate:
    """A built-in conversation format (:data:`BUILTIN`).

    Raises:
      ConfigError: an unknown name (the known ones listed).
    """
    if name not in BUILTIN:
      raise ConfigError(f"chat_template={name!r}; expected one of {', '.join(BUILTIN)}")
    return cls(source=BUILTIN[name], name=name)


def load_chat_templates(model_dir: str | os.PathLike) -> dict[str, str]:
  """The chat templates of a Hugging Face model directory: name -> Jinja source.

  The main template is named ``default``. Sources, in transformers' order:
  ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``
  (a string, or a list of ``{"name", "template"}``), else
  ``chat_template.json``; plus ``additional_chat_templates/*.jinja``.

  Raises:
    ConfigError: a malformed ``chat_template`` entry (named).
  """
  folder = os.fspath(model_dir)
  out: dict[str, str] = {}
  config = os.path.join(folder, "tokenizer_config.json")
  if os.path.isfile(config):
    spec = read_json_object(config).get("chat_template")
    if isinstance(spec, str):
      out[DEFAULT_NAME] = spec
    elif isinstance(spec, list):
      for i, entry in enumerate(spec):
        if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)):
          raise ConfigError(f"{config}: chat_template[{i}]: expected {{'name': str, 'template':"
                            f" str}}, got {entry!r:.80}")
        out[entry["name"]] = entry["template"]
    elif spec is not None:
      raise ConfigError(f"{config}: chat_template: expected a string or a list of named"
                        f" templates, got {type(spec).__name__}")
  json_file = os.path.join(folder, "chat_template.json")
  if DEFAULT_NAME not in out and os.path.isfile(json_file):
    spec = read_json_object(json_file).get("chat_template")
    if isinstance(spec, str):
      out[DEFAULT_NAME] = spec
  jinja = os.path.join(folder, TEMPLATE_FILE)
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      out[DEFAULT_NAME] = f.read()
  extra = os.path.join(folder, ADDITIONAL_DIR)
  if os.path.isdir(extra):
    for name in sorted(os.listdir(extra)):
      if name.endswith(".jinja"):
        with open(os.path.join(extra, name), encoding="utf-8") as f:
          out[name[:-len(".jinja")]] = f.read()
  return out


def resolve_chat_template(spec: ChatTemplate | str | os.PathLike | None,
                          available: Mapping[str, str] | None = None, *,
                          where: str = "the model") -> ChatTemplate | None:
  """The template ``spec`` names, among the model's ``available`` ones.

  Args:
    spec: None (the model's ``default``), a :class:`ChatTemplate`, a name of
      one of ``available`` or of :data:`BUILTIN`, a path to a Jinja file, or a
      Jinja string.
    available: the model's templates (:func:`load_chat_templates`).
    where: the model, named in errors.

  Returns:
    The template, or None when ``spec`` is None and the model has none.

  Raises:
    ConfigError: a name that is none of these (the known ones listed), or
      named templates without a ``default`` and no name given.
  """
  available = dict(available or {})
  if isinstance(spec, ChatTemplate):
    return spec
  if spec is None:
    if DEFAULT_NAME in available:
      return ChatTemplate(source=available[DEFAULT_NAME], name=f"{where}: default")
    if available:
      raise ConfigError(f"{where} has several chat templates and no default: pass"
                        f" chat_template= one of {', '.join(sorted(available))}")
    return None
  spec_str = os.fspath(spec)
  if spec_str in available:
    return ChatTemplate(source=available[spec_str], name=f"{where}: {spec_str}")
  if spec_str in BUILTIN:
    return ChatTemplate.builtin(spec_str)
  if os.path.isfile(spec_str):
    return ChatTemplate.from_file(spec_str)
  if "{{" in spec_str or "{%" in spec_str:
    return ChatTemplate(source=spec_str, name="the given template")
  names = sorted(available) + list(BUILTIN)
  raise ConfigError(f"chat_template={spec_str!r}: not a template of {where}, a built-in format,"
                    f" a file or Jinja text; expected one of {', '.join(names)}, a .jinja file"
                    " or a template string")


def chat_ids(tokenizer, template: ChatTemplate | None, messages, *,
             add_generation_prompt: bool = True) -> list[int]:
  """The token ids fed to the model for a conversation.

  Renders ``messages`` with ``template`` and the tokenizer's special tokens,
  encodes the text with no special tokens (transformers'
  ``apply_chat_template(..., tokenize=True)``), then puts BOS first when the
  tokenizer adds BOS and the ids do not already start with it (see the module
  docstring).

  Args:
    tokenizer: a :class:`~medusa_jax.models.tokenizer.Tokenizer` (or anything
      with ``encode(str)``; ``special_tokens()``, ``adds_bos`` and ``bos_id``
      are used when present).
    template: the chat template.
    messages: one user message (a string), or ``[{"role", "content"}, ...]``.
    add_generation_prompt: end with the assistant-turn opener.

  Raises:
    RequestError: no tokenizer or no template (saying how to pass one), or a
      bad message.
  """
  if tokenizer is None:
    raise RequestError("this model has no tokenizer.json; pass token ids")
  if template is None:
    raise RequestError(
        "this model has no chat template (no chat_template in tokenizer_config.json, no"
        " chat_template.jinja); pass chat_template= (--chat-template) one of"
        f" {', '.join(BUILTIN)}, a .jinja file or a template string, or send a raw prompt")
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  special = tokenizer.special_tokens() if hasattr(tokenizer, "special_tokens") else {}
  text = template.render(list(messages), add_generation_prompt=add_generation_prompt, **special)
  ids = list(tokenizer.encode(text))
  bos = getattr(tokenizer, "bos_id", None)
  if getattr(tokenizer, "adds_bos", False) and bos is not None and ids[:1] != [bos]:
    ids = [bos] + ids
  return ids


def text_ids(tokenizer, text: str) -> list[int]:
  """The token ids fed to the model for a raw (non-chat) prompt: transformers'
  ``tokenizer(text).input_ids`` (BOS/EOS as the tokenizer adds them)."""
  if tokenizer is None:
    raise RequestError("this model has no tokenizer.json; pass token ids")
  try:
    return list(tokenizer.encode(text, add_special_tokens=True))
  except TypeError:  # a minimal tokenizer: encode(text) only
    return list(tokenizer.encode(text))


def apply_chat_template(messages: Sequence[Mapping[str, str]], *,
                        add_generation_prompt: bool = True,
                        template: ChatTemplate | None = None, **extra: Any) -> str:
  """Renders ``messages`` with ``template`` (default: SmolLM2's ChatML)."""
  template = _DEFAULT if template is None else template
  return template.render(messages, add_generation_prompt=add_generation_prompt, **extra)


_DEFAULT = ChatTemplate()
