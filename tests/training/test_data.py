"""ShareGPT parsing (truncated JSON), prompt selection, MT-bench exclusion, caches."""

import json

import numpy as np
import pytest

from medusa_jax.errors import AssetError, DataFormatError, MedusaError, TrainingDataError
from medusa_jax.training import data as D
from medusa_jax.training.pipeline import mtbench_turns


def _conv(cid, *turns):
  return {"id": cid, "conversations": [{"from": r, "value": v} for r, v in turns]}


def _truncated_sharegpt(rng):
  convs = [
      _conv("a", ("human", "Hello, what is [1, 2]?"), ("gpt", "A list: {\"x\": ']'}")),
      _conv("b", ("system", "be nice"), ("human", "hi"), ("gpt", "hello")),  # system role
      _conv("c", ("gpt", "starts with the model"), ("human", "odd")),  # wrong order
      _conv("d", ("human", "Explain RoPE"), ("chatgpt", "Rotary..."), ("user", "more"),
            ("gpt", "sure")),
      _conv("e", ("human", ""), ("gpt", "empty user turn")),
      {"id": "f", "conversations": "not a list"},
      _conv("g", ("human", "last whole one"), ("gpt", "ok")),
      _conv("h", ("human", "this one is cut"), ("gpt", "never seen")),
  ]
  text = json.dumps(convs, indent=int(rng.integers(0, 3)))
  cut = text.index('"never seen') + int(rng.integers(1, 8))
  return text[:cut]


def test_truncated_json_keeps_every_whole_object():
  rng = np.random.default_rng()
  parsed = D.parse_sharegpt(_truncated_sharegpt(rng))
  assert [cid for cid, _ in parsed] == ["a", "d", "g"]
  assert parsed[0][1] == [{"role": "user", "content": "Hello, what is [1, 2]?"},
                          {"role": "assistant", "content": "A list: {\"x\": ']'}"}]
  assert [m["role"] for m in parsed[1][1]] == ["user", "assistant", "user", "assistant"]


def test_file_reader_matches_text_parser(tmp_path):
  rng = np.random.default_rng()
  text = _truncated_sharegpt(rng)
  path = tmp_path / "sg.json"
  path.write_text(text, encoding="utf-8")
  assert D.load_sharegpt_conversations(path) == D.parse_sharegpt(text)
  with pytest.raises(DataFormatError, match="top-level array"):
    D.parse_sharegpt('{"id": 1}')
  with pytest.raises(AssetError, match="JSON array"):
    path.write_text('{"id": 1}')
    D.load_sharegpt_conversations(path)


def test_training_data_error_lives_in_errors():
  assert D.TrainingDataError is TrainingDataError and issubclass(TrainingDataError, MedusaError)


def test_missing_id_gets_index():
  text = json.dumps([{"conversations": [{"from": "human", "value": "q"},
                                        {"from": "gpt", "value": "a"}]}])
  assert D.parse_sharegpt(text)[0][0] == "#0"


def _encode(messages):
  # a stand-in chat template: one id per character of the user turn, plus markers
  return [1] + [ord(c) % 200 + 3 for c in messages[0]["content"]] + [2]


QUESTIONS = ["Compose an engaging travel blog post about a recent trip to Hawaii.",
             "What is the capital of France?"]


def test_first_user_prompts_excludes_mtbench_and_filters():
  convs = [
      ("c0", [{"role": "user", "content": "  COMPOSE an engaging   travel blog post about a"
                                          " recent trip to Hawaii. "}]),
      ("c1", [{"role": "user", "content": "Please answer: what is the capital of france?"}]),
      ("c2", [{"role": "user", "content": "Write a poem about autumn leaves"}]),
      ("c3", [{"role": "user", "content": "Write a poem about autumn leaves"}]),  # duplicate
      ("c4", [{"role": "user", "content": "x" * 500}]),  # too long
      ("c5", [{"role": "user", "content": "hey"}]),  # too short
      ("c6", [{"role": "user", "content": "Prefix. Compose an engaging travel blog post about"
                                          " a recent trip to Hawaii. And more."}]),
      ("c7", [{"role": "user", "content": "Explain attention in transformers"}]),
  ]
  prompts = D.first_user_prompts(convs, encode_chat=_encode, exclude=QUESTIONS, max_prompts=10,
                                 max_prompt_tokens=100, val_fraction=0.5)
  # c0 equals a question (case/space-insensitive) and c6 contains one; c1 is
  # short-question containment below min_chars (30 chars) and is kept.
  assert [p.conv_id for p in prompts] == ["c1", "c2", "c7"]
  assert all(p.ids == tuple(_encode([{"content": p.text}])) for p in prompts)
  D.check_no_overlap([p.text for p in prompts], QUESTIONS)
  assert {p.split for p in prompts} <= {"train", "val"}


def test_check_no_overlap_raises_on_overlap():
  with pytest.raises(D.TrainingDataError, match="MT-bench"):
    D.check_no_overlap(["ok text", "what is the CAPITAL of France?"], QUESTIONS)


def test_real_mtbench_questions_never_reach_training(tmp_path):
  path = tmp_path / "question.jsonl"
  rows = [{"question_id": 81 + i, "category": "writing", "turns": [q, q + " Again."]}
          for i, q in enumerate(QUESTIONS)]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  turns = mtbench_turns(path)
  assert len(turns) == 4
  convs = [(f"q{i}", [{"role": "user", "content": t}]) for i, t in enumerate(turns)]
  convs.append(("keep", [{"role": "user", "content": "Tell me about the moon landing"}]))
  prompts = D.first_user_prompts(convs, encode_chat=_encode, exclude=turns, max_prompts=99,
                                 max_prompt_tokens=999, val_fraction=0.0)
  assert [p.conv_id for p in prompts] == ["keep"]
  assert prompts[0].split == "train"


def test_split_is_stable_and_near_fraction():
  ids = [f"conv{i}" for i in range(4000)]
  splits = [D.split_of(c, 0.1) for c in ids]
  assert splits == [D.split_of(c, 0.1) for c in ids]
  assert 0.07 < splits.count("val") / len(ids) < 0.13
  with pytest.raises(D.TrainingDataError, match="val_fraction"):
    D.first_user_prompts([], encode_chat=_encode, exclude=[], max_prompts=1,
                         max_prompt_tokens=1, val_fraction=1.0)


def test_jsonl_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng()
  prompts = [D.Prompt(conv_id=f"c{i}", text=f"t{i}", ids=tuple(int(x) for x in
                      rng.integers(0, 500, 5)), split="train") for i in range(3)]
  D.write_jsonl(tmp_path / "p.jsonl", prompts)
  assert D.read_prompts(tmp_path / "p.jsonl") == prompts
  ex = [D.Example(conv_id="c", split="val", ids=(5, 6, 7, 8), prompt_len=2)]
  D.write_jsonl(tmp_path / "e.jsonl", ex)
  assert D.read_examples(tmp_path / "e.jsonl") == ex
  assert ex[0].loss_mask.tolist() == [False, False, True, True]
  (tmp_path / "bad.jsonl").write_text('{"conv_id": "c", "split": "train", "ids": [1],'
                                      ' "prompt_len": 3}\n')
  with pytest.raises(D.TrainingDataError, match="prompt_len=3"):
    D.read_examples(tmp_path / "bad.jsonl")
  (tmp_path / "broken.jsonl").write_text("{not json\n")
  with pytest.raises(D.TrainingDataError, match="broken.jsonl:1"):
    D.read_examples(tmp_path / "broken.jsonl")


def test_pad_examples():
  ex = [D.Example(conv_id="a", split="train", ids=(4, 5, 6), prompt_len=1),
        D.Example(conv_id="b", split="train", ids=(7, 8), prompt_len=1)]
  ids, mask, valid = D.pad_examples(ex, 4, pad_id=0)
  assert ids.tolist() == [[4, 5, 6, 0], [7, 8, 0, 0]]
  assert mask.tolist() == [[False, True, True, False], [False, True, False, False]]
  assert valid.tolist() == [[True, True, True, False], [True, True, False, False]]
  with pytest.raises(D.TrainingDataError, match="at most 2"):
    D.pad_examples(ex, 2, pad_id=0)


def _encode_all(messages):
  """A stand-in chat template over every message: a role marker, then one id per character."""
  out = [1]
  for m in messages:
    out.append(5 if m["role"] == "user" else 6)
    out.extend(ord(c) % 200 + 10 for c in m["content"])
  return out + [2]


def _chat(*texts):
  return [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
          for i, t in enumerate(texts)]


def test_user_turn_prompts_every_turn_with_dataset_context():
  convs = [("a", _chat("first question here", "dataset answer one", "a follow-up turn",
                       "dataset answer two", "third question now", "answer three")),
           ("b", _chat("only one user turn", "its answer"))]
  prompts = D.user_turn_prompts(convs, encode_chat=_encode_all, exclude=QUESTIONS,
                                max_prompts=99, max_prompt_tokens=999, val_fraction=0.5)
  assert [(p.conv_id, p.turn) for p in prompts] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
  msgs = convs[0][1]
  # turn k's prompt: the conversation up to it, with the dataset's own earlier answers
  for p in prompts[:3]:
    assert p.ids == tuple(_encode_all(msgs[:2 * p.turn + 1]))
    assert p.text == msgs[2 * p.turn]["content"]
  # every turn of a conversation lands in the conversation's split
  assert len({p.split for p in prompts[:3]}) == 1
  assert prompts[0].split == D.split_of("a", 0.5)
  assert prompts[3].split == D.split_of("b", 0.5)
  # the first turns alone are the first-turn builder's prompts (same ids)
  first = D.first_user_prompts(convs, encode_chat=_encode_all, exclude=QUESTIONS,
                               max_prompts=99, max_prompt_tokens=999, val_fraction=0.5)
  assert [p.ids for p in first] == [p.ids for p in prompts if p.turn == 0]


def test_user_turn_prompts_drop_oldest_pairs_to_fit_and_cap():
  rng = np.random.default_rng()
  texts = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(n)))
           for n in rng.integers(20, 40, 8)]
  convs = [("a", _chat(*texts))]
  limit = int(rng.integers(70, 110))
  prompts = D.user_turn_prompts(convs, encode_chat=_encode_all, exclude=[], max_prompts=99,
                                max_prompt_tokens=limit, val_fraction=0.0)
  msgs = convs[0][1]
  assert [p.turn for p in prompts] == [0, 1, 2, 3]
  for p in prompts:
    u = 2 * p.turn
    # the longest suffix of whole (user, assistant) pairs that fits, ending at turn u
    fits = [s for s in range(0, u + 1, 2) if len(_encode_all(msgs[s:u + 1])) <= limit]
    assert fits and p.ids == tuple(_encode_all(msgs[fits[0]:u + 1]))
    assert len(p.ids) <= limit
  capped = D.user_turn_prompts(convs, encode_chat=_encode_all, exclude=[], max_prompts=2,
                               max_prompt_tokens=limit, val_fraction=0.0)
  assert capped == prompts[:2]
  # a turn too long alone is dropped; later turns start after it
  long = _chat("short opener text", "ok", "y" * 200, "ok", "a later question", "ok")
  got = D.user_turn_prompts([("L", long)], encode_chat=_encode_all, exclude=[],
                            max_prompts=9, max_prompt_tokens=60, val_fraction=0.0)
  assert [p.turn for p in got] == [0, 2]
  assert got[1].ids == tuple(_encode_all(long[4:5]))


def test_user_turn_prompts_never_overlap_mtbench_and_dedupe():
  hawaii = QUESTIONS[0]
  convs = [
      ("clean", _chat("Tell me about the moon", "It orbits.", "And the sun?", "A star.")),
      # an evaluation question in a later turn: the whole conversation goes
      ("later", _chat("An innocent opener here", "Sure.", hawaii.upper(), "Aloha...")),
      # ... and in an answer (context) too
      ("ctx", _chat("Please write something nice", "Prefix " + hawaii + " suffix", "more",
                    "ok")),
      ("dup", _chat("Tell me about the moon", "It orbits.", "Something else now", "ok")),
      ("short", _chat("hey", "hi", "Now a real question", "ok")),
  ]
  prompts = D.user_turn_prompts(convs, encode_chat=_encode_all, exclude=QUESTIONS,
                                max_prompts=99, max_prompt_tokens=999, val_fraction=0.0)
  # "dup" turn 0 repeats "clean" turn 0 exactly (same context): kept once; its turn 1 differs
  assert [(p.conv_id, p.turn) for p in prompts] == [("clean", 0), ("clean", 1), ("dup", 1),
                                                    ("short", 1)]
  D.check_no_overlap([p.text for p in prompts], QUESTIONS)
  with pytest.raises(D.TrainingDataError, match="val_fraction"):
    D.user_turn_prompts(convs, encode_chat=_encode_all, exclude=[], max_prompts=1,
                        max_prompt_tokens=9, val_fraction=1.0)


def test_prompt_turn_round_trips_and_old_caches_read_as_first_turns(tmp_path):
  p = D.Prompt(conv_id="c", text="t", ids=(1, 2, 3), split="val", turn=3)
  D.write_jsonl(tmp_path / "p.jsonl", [p])
  assert D.read_prompts(tmp_path / "p.jsonl") == [p]
  (tmp_path / "old.jsonl").write_text('{"conv_id": "c", "text": "t", "ids": [1], "split":'
                                      ' "train"}\n')
  assert D.read_prompts(tmp_path / "old.jsonl")[0].turn == 0
