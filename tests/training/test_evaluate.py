"""MT-bench evaluation helpers: second-turn prompts, question preparation, plots."""

import json

import numpy as np
import pytest

from medusa_jax.models.chat import ChatTemplate, apply_chat_template, chat_ids
from medusa_jax.models.tokenizer import Tokenizer
from medusa_jax.training.evaluate import plot, prepare_questions, second_turn, turn2_suffix


def _byte_tokenizer():
  """Byte-level, one token per byte, with ChatML and Llama specials (ids 0-5)."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
  tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens(specials)
  return tk


@pytest.mark.parametrize("name,eos,bos", [("smollm2", "<|im_end|>", None),
                                          ("vicuna_v1.1", "</s>", "<s>"),
                                          ("mistral", "</s>", "<s>"), ("llama2", "</s>", "<s>")])
def test_second_turn_ids_equal_the_whole_conversation(name, eos, bos):
  """turn-1 prompt + answer + EOS + suffix == the chat ids of the whole conversation."""
  backend = _byte_tokenizer()
  tok = Tokenizer(backend=backend, eos_ids=(backend.token_to_id(eos),), eos_token=eos,
                  bos_token=bos, bos_id=None if bos is None else backend.token_to_id(bos),
                  add_bos=bos is not None)
  template = ChatTemplate.builtin(name)
  rng = np.random.default_rng()
  words = ["alpha", "beta", "gamma", "delta", "x\ny", "ünï"]
  q1, a1, q2 = (" ".join(rng.choice(words, 4)) for _ in range(3))
  # The answer as the model says it after the generation prompt.
  spoken = " " + a1 if name in ("vicuna_v1.1", "llama2") else a1
  turn1 = chat_ids(tok, template, [{"role": "user", "content": q1}])
  q = {"turn1_ids": turn1, "turn2_suffix_ids": turn2_suffix(tok, template, q1, q2)}
  got = second_turn(q, tok.encode(spoken), eos_id=tok.eos_id)
  whole = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
           {"role": "user", "content": q2}]
  want = chat_ids(tok, template, whole)
  if name == "llama2":  # its template writes " answer </s>": the model's answer has no space
    want = turn1 + tok.encode(spoken) + [tok.eos_id] + tok.encode(f"<s>[INST] {q2} [/INST]")
    assert chat_ids(tok, template, whole) == (turn1 + tok.encode(spoken + " ") + [tok.eos_id]
                                              + q["turn2_suffix_ids"])
  assert got == want


def test_second_turn_ids():
  q = {"turn1_ids": [1, 5, 6], "turn2_suffix_ids": [9, 8]}
  assert second_turn(q, [7, 2], eos_id=2) == [1, 5, 6, 7, 2, 9, 8]
  assert second_turn(q, [7, 7], eos_id=2) == [1, 5, 6, 7, 7, 2, 9, 8]  # cut answer gets closed
  assert second_turn(q, [], eos_id=2) == [1, 5, 6, 2, 9, 8]


def test_prepare_questions(tmp_path):
  path = tmp_path / "question.jsonl"
  rows = [{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Shorter."]},
          {"question_id": 82, "category": "math", "turns": ["What is 2+2?"]}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  backend = _byte_tokenizer()
  tok = Tokenizer(backend=backend, eos_ids=(2,), eos_token="<|im_end|>")
  qs = prepare_questions(str(path), tok, ChatTemplate())
  assert [q["question_id"] for q in qs] == [81, 82]
  assert qs[0]["turn1_ids"] == tok.encode(apply_chat_template(
      [{"role": "user", "content": "Write a haiku."}], add_generation_prompt=True))
  # SmolLM2's ChatML: what the hard-coded ChatML suffix used to be.
  assert qs[0]["turn2_suffix_ids"] == tok.encode(
      "\n<|im_start|>user\nShorter.<|im_end|>\n<|im_start|>assistant\n")
  assert qs[1]["turn2_suffix_ids"] == [] and qs[1]["category"] == "math"


def test_plot_writes_pngs(tmp_path):
  rng = np.random.default_rng()
  entry = {"plain": {"tokens_per_s": 1.0},
           "chain": {"tokens_per_step": 1.4, "accept_hist": rng.integers(1, 50, 6).tolist()},
           "tree": {"tokens_per_step": 1.9, "accept_hist": rng.integers(1, 50, 5).tolist()}}
  report = {"turns": {"turn1": entry, "turn2": entry},
            "head_accuracy": {"top1": rng.random(4).tolist(), "top5": rng.random(4).tolist()}}
  paths = plot(report, str(tmp_path))
  assert len(paths) == 2
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
