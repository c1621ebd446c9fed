"""MT-bench evaluation helpers: second-turn prompts, question preparation, plots."""

import json

import numpy as np

from medusa_jax.models.chat import apply_chat_template
from medusa_jax.training.evaluate import (TURN_PREFIX, TURN_SUFFIX, plot, prepare_questions,
                                          second_turn)


class _CharTokenizer:
  """One id per character: token boundaries cannot hide a template mismatch."""

  def encode(self, text):
    return [ord(c) for c in text]


def test_second_turn_text_equals_chat_template():
  rng = np.random.default_rng()
  words = ["alpha", "beta", "gamma", "delta", "x\ny", "ünï"]
  q1, a1, q2 = (" ".join(rng.choice(words, 4)) for _ in range(3))
  want = apply_chat_template([{"role": "user", "content": q1},
                              {"role": "assistant", "content": a1},
                              {"role": "user", "content": q2}], add_generation_prompt=True)
  got = (apply_chat_template([{"role": "user", "content": q1}], add_generation_prompt=True)
         + a1 + "<|im_end|>" + TURN_PREFIX + q2 + TURN_SUFFIX)
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
  tok = _CharTokenizer()
  qs = prepare_questions(str(path), tok)
  assert [q["question_id"] for q in qs] == [81, 82]
  assert qs[0]["turn1_ids"] == tok.encode(apply_chat_template(
      [{"role": "user", "content": "Write a haiku."}], add_generation_prompt=True))
  assert qs[0]["turn2_suffix_ids"] == tok.encode(TURN_PREFIX + "Shorter." + TURN_SUFFIX)
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
