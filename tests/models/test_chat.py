"""Chat templates rendered with jinja2: SmolLM2's ChatML and the GGUF's own template."""

from __future__ import annotations

import pytest

from medusa_jax.assets import cache as assets
from medusa_jax.errors import ConfigError, RequestError
from medusa_jax.models.chat import (CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT, ChatTemplate,
                                    apply_chat_template)

SYSTEM = f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"


def test_default_system_prompt_is_inserted():
  got = apply_chat_template([{"role": "user", "content": "Hi there"}])
  assert got == SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_multi_turn_with_own_system_and_no_generation_prompt():
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
  got = apply_chat_template(msgs, add_generation_prompt=False)
  assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                 "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n")


def test_cached_template_is_the_gguf_template(tmp_path):
  paths = assets.fetch(quiet=True)
  t = ChatTemplate.from_file(paths.model_dir)
  assert t.source == CHATML_TEMPLATE
  msgs = [{"role": "user", "content": "Tabs\tand {{ braces }} and {% raw %}"}]
  assert t.render(msgs) == apply_chat_template(msgs)
  path = t.save(tmp_path)
  assert ChatTemplate.from_file(path) == t


def test_matches_transformers_rendering():
  transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import models
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.BPE()))
  msgs = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Ok."},
          {"role": "user", "content": "Another."}]
  for gen in (True, False):
    ref = tok.apply_chat_template(msgs, chat_template=CHATML_TEMPLATE, tokenize=False,
                                  add_generation_prompt=gen)
    assert apply_chat_template(msgs, add_generation_prompt=gen) == ref


def test_custom_template_and_errors(tmp_path):
  t = ChatTemplate(source="{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant]{% endif %}")
  assert apply_chat_template([{"role": "user", "content": "x"}], template=t) == "[user]x\n[assistant]"
  with pytest.raises(ConfigError, match="invalid Jinja"):
    ChatTemplate(source="{% for %}")
  with pytest.raises(RequestError, match="non-empty list"):
    apply_chat_template([])
  with pytest.raises(RequestError, match="non-empty list"):
    apply_chat_template("hello")
  with pytest.raises(RequestError, match=r"messages\[1\]"):
    apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": 3}])
  failing = ChatTemplate(source="{{ raise_exception('roles must alternate') }}")
  with pytest.raises(RequestError, match="roles must alternate"):
    failing.render([{"role": "user", "content": "a"}])
  with pytest.raises(ConfigError, match="no such chat template"):
    ChatTemplate.from_file(tmp_path / "none.jinja")


def test_from_gguf(tmp_path):
  import gguf
  for name, template in (("with.gguf", CHATML_TEMPLATE), ("without.gguf", None)):
    w = gguf.GGUFWriter(str(tmp_path / name), "llama")
    if template is not None:
      w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  assert ChatTemplate.from_gguf(tmp_path / "with.gguf") == ChatTemplate()
  with pytest.raises(ConfigError, match="tokenizer.chat_template"):
    ChatTemplate.from_gguf(tmp_path / "without.gguf")
