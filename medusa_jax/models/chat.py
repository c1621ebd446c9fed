"""Chat templates (Jinja, as in Hugging Face tokenizers) rendered with jinja2.

The default is SmolLM2-Instruct's ChatML template, which inserts SmolLM's
system prompt when the conversation does not start with a system message.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from medusa_jax.errors import ConfigError, RequestError
from medusa_jax.models.gguf import field, open_gguf

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TEMPLATE_FILE = "chat_template.jinja"


def _raise(message: str):
  raise RequestError(f"chat template: {message}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChatTemplate:
  """A Jinja chat template, compiled once."""
  source: str = CHATML_TEMPLATE
  _compiled: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment options as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
      compiled = env.from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise ConfigError(f"chat template: invalid Jinja at line {e.lineno}: {e.message}") from None
    object.__setattr__(self, "_compiled", compiled)

  def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
             **extra: Any) -> str:
    """Renders a conversation.

    Args:
      messages: ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``.
      add_generation_prompt: end with the assistant-turn opener.
      **extra: more template variables (e.g. ``bos_token``).

    Raises:
      RequestError: a message is not a ``{role, content}`` mapping of strings.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
      raise RequestError(f"messages: expected a non-empty list of {{role, content}} dicts, "
                         f"got {messages!r:.80}")
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
          m.get("content"), str):
        raise RequestError(f"messages[{i}]: expected {{'role': str, 'content': str}}, "
                           f"got {m!r:.80}")
    return self._compiled.render(messages=[dict(m) for m in messages],
                                 add_generation_prompt=add_generation_prompt, **extra)

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
        return cls(source=f.read())
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
    return cls(source=source)


def apply_chat_template(messages: Sequence[Mapping[str, str]], *,
                        add_generation_prompt: bool = True,
                        template: ChatTemplate | None = None) -> str:
  """Renders ``messages`` with ``template`` (default: SmolLM2's ChatML)."""
  template = _DEFAULT if template is None else template
  return template.render(messages, add_generation_prompt=add_generation_prompt)


_DEFAULT = ChatTemplate()
