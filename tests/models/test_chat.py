"""Chat templates rendered with jinja2: SmolLM2's ChatML and the GGUF's own template."""

from __future__ import annotations

import pytest

from medusa_jax.assets import cache as assets
from medusa_jax.errors import ConfigError, RequestError
from medusa_jax.models.chat import (BUILTIN, CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT,
                                    VICUNA_SYSTEM_PROMPT, ChatTemplate, apply_chat_template,
                                    chat_ids, load_chat_templates, text_ids)

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


# ----------------------------------------------------------------------------- template families
# For each family, a tokenizer built locally (tokenizers + PreTrainedTokenizerFast, saved with
# save_pretrained) and read back by medusa_jax: the ids it feeds equal transformers'
# apply_chat_template(..., add_generation_prompt=True).

CONVERSATIONS = [
    [{"role": "user", "content": "What is JAX?"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I"
                                                                                " help?"},
     {"role": "user", "content": "Tell me a joke."}],
]
SYSTEM_CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def _save_tokenizer(out, *, specials, bos, eos, template, metaspace=False, add_bos=None,
                    bos_post_processor=False, unk=None):
  """A tiny tokenizer in the Hugging Face layout; returns transformers' view of it."""
  import string

  transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, processors
  if metaspace:  # sentencepiece-like: "▁" marks a word start, prepended to the first piece only
    chars = ["▁"] + sorted(set(string.printable) - set(" \t\r\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(list(specials) + chars)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                split=False)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
  else:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(list(specials) + alphabet)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens(list(specials))
  if bos_post_processor:  # as Llama 3's tokenizer.json does it
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, vocab[bos])])
  kw = dict(tokenizer_object=tk, bos_token=bos, eos_token=eos)
  if unk is not None:
    kw["unk_token"] = unk
  if add_bos is not None:
    kw["add_bos_token"] = add_bos
  hf = transformers.PreTrainedTokenizerFast(**kw)
  if template is not None:
    hf.chat_template = template
  hf.save_pretrained(str(out))
  return transformers.AutoTokenizer.from_pretrained(str(out))


def _hf_ids(hf, messages, template=None):
  out = hf.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


FAMILIES = {
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                   eos="<|im_end|>", template=BUILTIN["chatml"]),
    "llama3": dict(specials=["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                             "<|end_header_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>",
                   template=BUILTIN["llama3"], bos_post_processor=True),
    "mistral": dict(specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>",
                    template=BUILTIN["mistral"], metaspace=True, add_bos=True),
    "llama2": dict(specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>",
                   template=BUILTIN["llama2"], metaspace=True, add_bos=True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_ids_equal_transformers(family, tmp_path):
  from medusa_jax.decoding.loading import load_tokenizer
  spec = FAMILIES[family]
  hf = _save_tokenizer(tmp_path, **spec)
  tok, template = load_tokenizer(tmp_path)
  assert template is not None and template.source == spec["template"]
  convs = CONVERSATIONS + ([SYSTEM_CONV] if family in ("chatml", "llama3", "llama2") else [])
  for messages in convs:
    want = _hf_ids(hf, messages)
    assert chat_ids(tok, template, messages) == want, (family, messages)
  # The BOS rule: put first once, never twice.
  ids = chat_ids(tok, template, CONVERSATIONS[0])
  assert (ids[0] == tok.bos_id) == (spec["bos"] is not None)
  assert ids[1] != tok.bos_id
  # Raw prompts get what tokenizer(text) gives.
  assert text_ids(tok, "Hello world") == list(hf("Hello world")["input_ids"])


def test_vicuna_format_equals_fastchat_and_transformers(tmp_path):
  """Vicuna v1.1 by name: FastChat's text, BOS from the tokenizer (as FastChat tokenizes it);
  equal to transformers with the same format given as a template (with its bos_token)."""
  from medusa_jax.decoding.loading import load_tokenizer
  hf = _save_tokenizer(tmp_path, specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>",
                       unk="<unk>", template=None, metaspace=True, add_bos=True)
  tok, template = load_tokenizer(tmp_path)
  assert template is None  # the model has none, and no name says Vicuna
  tok, template = load_tokenizer(tmp_path, chat_template="vicuna_v1.1")
  msgs = CONVERSATIONS[1]
  text = template.render(msgs, **tok.special_tokens())
  assert text == (VICUNA_SYSTEM_PROMPT + " USER: Hi there ASSISTANT: Hello! How can I help?</s>"
                  "USER: Tell me a joke. ASSISTANT:")
  fastchat = list(hf(text)["input_ids"])  # FastChat: tokenizer(prompt).input_ids
  assert chat_ids(tok, template, msgs) == fastchat
  # "<s>A chat" as text would lose the sentencepiece word-start mark after <s>: not
  # how Vicuna was trained. With a byte-level tokenizer the two agree.
  assert _hf_ids(hf, msgs, "{{ bos_token }}" + BUILTIN["vicuna_v1.1"]) != fastchat
  byte_dir = tmp_path / "bytes"
  hf = _save_tokenizer(byte_dir, specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>",
                       template=None, add_bos=True)
  tok, template = load_tokenizer(byte_dir, chat_template="vicuna_v1.1")
  for messages in CONVERSATIONS:
    assert chat_ids(tok, template, messages) == _hf_ids(
        hf, messages, "{{ bos_token }}" + BUILTIN["vicuna_v1.1"])
  own = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
  assert template.render(own) == "You are terse. USER: Hi ASSISTANT:"
  # A Vicuna base without a template gets the format by name, with a notice.
  notes = []
  _, template = load_tokenizer(byte_dir, names=("lmsys/vicuna-7b-v1.3",), notice=notes.append)
  assert template.source == BUILTIN["vicuna_v1.1"] and "vicuna_v1.1" in notes[0]


def test_named_templates_and_overrides(tmp_path):
  import json as json_mod
  from medusa_jax.decoding.loading import load_tokenizer
  _save_tokenizer(tmp_path, **FAMILIES["chatml"])
  cfg_path = tmp_path / "tokenizer_config.json"
  (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
  cfg = json_mod.loads(cfg_path.read_text())
  cfg["chat_template"] = [{"name": "default", "template": BUILTIN["chatml"]},
                          {"name": "terse", "template": "{{ messages[-1]['content'] }}"}]
  cfg_path.write_text(json_mod.dumps(cfg))
  assert load_chat_templates(tmp_path) == {"default": BUILTIN["chatml"],
                                           "terse": "{{ messages[-1]['content'] }}"}
  tok, t = load_tokenizer(tmp_path)
  assert t.source == BUILTIN["chatml"]
  _, t = load_tokenizer(tmp_path, chat_template="terse")
  assert t.render([{"role": "user", "content": "x"}]) == "x"
  _, t = load_tokenizer(tmp_path, chat_template="llama3")
  assert t.source == BUILTIN["llama3"]
  (tmp_path / "my.jinja").write_text("[{{ messages[0]['content'] }}]")
  _, t = load_tokenizer(tmp_path, chat_template=str(tmp_path / "my.jinja"))
  assert t.render([{"role": "user", "content": "y"}]) == "[y]"
  _, t = load_tokenizer(tmp_path, chat_template="<{{ messages[0]['content'] }}>")
  assert t.render([{"role": "user", "content": "z"}]) == "<z>"
  with pytest.raises(ConfigError, match=r"chat_template='nope'.*terse.*vicuna_v1\.1"):
    load_tokenizer(tmp_path, chat_template="nope")
  cfg["chat_template"] = cfg["chat_template"][1:]
  cfg_path.write_text(json_mod.dumps(cfg))
  with pytest.raises(ConfigError, match="no default.*terse"):
    load_tokenizer(tmp_path)
  cfg["chat_template"] = [{"name": 3}]
  cfg_path.write_text(json_mod.dumps(cfg))
  with pytest.raises(ConfigError, match=r"chat_template\[0\]"):
    load_chat_templates(tmp_path)


def test_transformers_environment_features():
  """loopcontrols, {% generation %}, tojson keeping non-ASCII, strftime_now, namespace."""
  src = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
         "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m | tojson }}{% endgeneration %}"
         "{% endfor %}{{ ns.n }}{{ strftime_now('%Y')[:2] }}{{ tools is none }}")
  msgs = [{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"},
          {"role": "user", "content": "c"}]
  got = ChatTemplate(source=src).render(msgs)
  assert got.startswith('{"role": "user", "content": "é"}') and got.endswith("220True")
  assert got.count('"role"') == 2


def test_no_template_is_a_clear_error():
  with pytest.raises(RequestError, match="no chat template.*--chat-template"):
    chat_ids(object(), None, "hi")
  with pytest.raises(RequestError, match="no tokenizer"):
    chat_ids(None, ChatTemplate(), "hi")
