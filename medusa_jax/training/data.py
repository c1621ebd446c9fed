"""Training data for Medusa heads: ShareGPT prompts, self-distilled examples.

The pipeline (each stage cached as JSONL under the run's work directory):

1. ``load_sharegpt_conversations``: the package's JSON is cut short, so whole
   conversation objects are decoded one by one (``medusa_jax.assets.datasets``) and
   the partial tail is dropped.
2. ``first_user_prompts``: the first user turn of each well-formed
   conversation (roles ``human``/``user`` -> user, ``gpt``/``chatgpt`` ->
   assistant), minus anything that overlaps an MT-bench question, split into
   train/validation by a stable hash of the conversation id.
   ``user_turn_prompts``: every user turn instead, each with the
   conversation before it as context (the dataset's own earlier answers).
3. Self-distillation (``distill.py``): the base model answers each prompt
   greedily; an ``Example`` is ``chat prompt + generated answer`` with a loss
   mask on the answer tokens only.
4. ``token_rows``: Medusa targets per position (``losses.medusa_targets``);
   hidden states come from the frozen base model (``distill.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from medusa_jax import _atomic
from medusa_jax.assets.datasets import iter_json_array_objects, load_sharegpt
from medusa_jax.errors import TrainingDataError

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "assistant"})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Prompt:
  """One user turn, rendered with its context and tokenised.

  Attributes:
    conv_id: the ShareGPT conversation id.
    text: the user turn.
    ids: chat-template token ids of the conversation up to this turn, ending
      with the generation prompt.
    split: "train" or "val" (all turns of a conversation share it).
    turn: 0-based index of the user turn in its conversation.
  """
  conv_id: str
  text: str
  ids: tuple[int, ...]
  split: str
  turn: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Example:
  """A training sequence: prompt ids followed by the base model's answer.

  Attributes:
    conv_id: the conversation it came from.
    split: "train" or "val".
    ids: [S] int token ids (prompt then answer, the answer ending with eos
      unless it hit the length limit).
    prompt_len: tokens of ``ids`` that belong to the prompt; the loss mask is
      ``arange(S) >= prompt_len``.
  """
  conv_id: str
  split: str
  ids: tuple[int, ...]
  prompt_len: int

  @property
  def loss_mask(self) -> np.ndarray:
    """[S] bool: True on answer (assistant) tokens."""
    return np.arange(len(self.ids)) >= self.prompt_len


# --------------------------------------------------------------------------- ShareGPT


def conversation_messages(conv: Any) -> list[dict[str, str]] | None:
  """Maps a ShareGPT conversation to chat messages, or None when malformed.

  Roles ``human``/``user`` become ``user`` and ``gpt``/``chatgpt``/
  ``assistant`` become ``assistant``; a conversation with any other role
  (system, bing, bard), a non-string turn, an empty turn or turns that do not
  alternate starting with the user is malformed.
  """
  if not isinstance(conv, dict):
    return None
  turns = conv.get("conversations")
  if not isinstance(turns, list) or not turns:
    return None
  messages = []
  for j, turn in enumerate(turns):
    if not isinstance(turn, dict):
      return None
    role, value = turn.get("from"), turn.get("value")
    if not isinstance(value, str) or not value.strip():
      return None
    if role in USER_ROLES:
      role = "user"
    elif role in ASSISTANT_ROLES:
      role = "assistant"
    else:
      return None
    if role != ("user" if j % 2 == 0 else "assistant"):
      return None
    messages.append({"role": role, "content": value})
  return messages


def sharegpt_conversations(convs: Iterable[Any]) -> list[tuple[str, list[dict[str, str]]]]:
  """Whole, well-formed conversations as ``(conv_id, messages)`` pairs, in order.

  Conversations without an id get ``"#<index>"``; malformed ones (see
  :func:`conversation_messages`) are dropped.
  """
  out = []
  for index, conv in enumerate(convs):
    messages = conversation_messages(conv)
    if messages is None:
      continue
    conv_id = conv.get("id")
    out.append((conv_id if isinstance(conv_id, str) else f"#{index}", messages))
  return out


def parse_sharegpt(text: str) -> list[tuple[str, list[dict[str, str]]]]:
  """:func:`sharegpt_conversations` of a (possibly truncated) ShareGPT JSON text.

  Raises:
    DataFormatError: the text does not start with a JSON array.
  """
  return sharegpt_conversations(iter_json_array_objects(text))


def load_sharegpt_conversations(path: str | os.PathLike) -> list[tuple[str, list[dict[str, str]]]]:
  """:func:`sharegpt_conversations` of a ShareGPT file (``medusa_jax.datasets.load_sharegpt``).

  Raises:
    AssetError: the file is missing or not a JSON array.
  """
  return sharegpt_conversations(load_sharegpt(path))


# --------------------------------------------------------------------------- MT-bench


def normalize_text(text: str) -> str:
  """Lower-case with runs of whitespace collapsed: the overlap test's key."""
  return re.sub(r"\s+", " ", text).strip().lower()


def overlaps(text: str, questions: Iterable[str], *, min_chars: int = 32) -> bool:
  """True when ``text`` equals, contains or is contained in a question.

  Containment counts only for strings of at least ``min_chars`` characters,
  so that a short greeting does not match every question.
  """
  return _overlaps_key(normalize_text(text), [normalize_text(q) for q in questions], min_chars)


def _overlaps_key(key: str, question_keys: Sequence[str], min_chars: int = 32) -> bool:
  for qk in question_keys:
    if key == qk:
      return True
    if len(qk) >= min_chars and qk in key:
      return True
    if len(key) >= min_chars and key in qk:
      return True
  return False


def check_no_overlap(texts: Iterable[str], questions: Sequence[str]) -> None:
  """Raises if any training text overlaps an evaluation question.

  Raises:
    TrainingDataError: naming the first overlapping text.
  """
  keys = [normalize_text(q) for q in questions]
  for text in texts:
    if _overlaps_key(normalize_text(text), keys):
      raise TrainingDataError(
          f"training prompt {text[:60]!r}: overlaps an MT-bench question; expected"
          " no evaluation question in the training data")


# --------------------------------------------------------------------------- prompts


def split_of(conv_id: str, val_fraction: float) -> str:
  """"val" for a stable ``val_fraction`` of conversation ids, else "train"."""
  digest = hashlib.sha256(conv_id.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "little") / 2.0**64
  return "val" if u < val_fraction else "train"


def first_user_prompts(
    conversations: Sequence[tuple[str, list[dict[str, str]]]],
    *,
    encode_chat: Callable[[list[dict[str, str]]], Sequence[int]],
    exclude: Sequence[str],
    max_prompts: int,
    max_prompt_tokens: int,
    val_fraction: float,
    min_chars: int = 8,
) -> list[Prompt]:
  """Rendered first user turns, in file order, for self-distillation.

  Args:
    conversations: ``parse_sharegpt`` output.
    encode_chat: messages -> token ids of the chat prompt ending with the
      generation prompt (the base model's chat template).
    exclude: evaluation questions; overlapping prompts are dropped.
    max_prompts: stop after this many prompts.
    max_prompt_tokens: drop prompts longer than this.
    val_fraction: fraction of conversations held out for validation.
    min_chars: drop user turns shorter than this.

  Returns:
    Prompts with their split; they never overlap ``exclude``.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise TrainingDataError(f"val_fraction={val_fraction}: expected a value in [0, 1)")
  exclude_keys = [normalize_text(q) for q in exclude]
  prompts: list[Prompt] = []
  seen: set[str] = set()
  for conv_id, messages in conversations:
    if len(prompts) >= max_prompts:
      break
    text = messages[0]["content"].strip()
    key = normalize_text(text)
    if len(text) < min_chars or key in seen or _overlaps_key(key, exclude_keys):
      continue
    ids = tuple(int(t) for t in encode_chat([{"role": "user", "content": text}]))
    if len(ids) > max_prompt_tokens:
      continue
    seen.add(key)
    prompts.append(Prompt(conv_id=conv_id, text=text, ids=ids,
                          split=split_of(conv_id, val_fraction)))
  check_no_overlap((p.text for p in prompts), list(exclude))
  return prompts


# --------------------------------------------------------------------------- caches


def user_turn_prompts(
    conversations: Sequence[tuple[str, list[dict[str, str]]]],
    *,
    encode_chat: Callable[[list[dict[str, str]]], Sequence[int]],
    exclude: Sequence[str],
    max_prompts: int,
    max_prompt_tokens: int,
    val_fraction: float,
    min_chars: int = 8,
) -> list[Prompt]:
  """Every user turn of every conversation, in file order, with its context.

  The prompt of user turn k is the conversation up to it: the earlier user
  turns and the dataset's own earlier answers (not the base model's), then
  turn k and the generation prompt. Dataset answers keep later turns
  coherent (they often refer to the earlier answer: "shorten the second
  paragraph") and let every turn be generated in one batched pass instead of
  one pass per turn depth; the loss only ever sees the base model's answer.
  A context longer than ``max_prompt_tokens`` loses its oldest
  (user, assistant) pairs until it fits; a turn that does not fit alone is
  dropped. A conversation any of whose texts overlaps an evaluation question
  is dropped whole, and a repeated context (the same turns) is kept once.

  Args: as :func:`first_user_prompts`; ``max_prompts`` caps the turns.

  Returns:
    Prompts with their split (by conversation) and turn index; none of their
    texts (context included) overlaps ``exclude``.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise TrainingDataError(f"val_fraction={val_fraction}: expected a value in [0, 1)")
  exclude_keys = [normalize_text(q) for q in exclude]
  prompts: list[Prompt] = []
  contexts: list[list[dict[str, str]]] = []
  seen: set[tuple[str, ...]] = set()
  for conv_id, messages in conversations:
    if len(prompts) >= max_prompts:
      break
    keys = [normalize_text(m["content"]) for m in messages]
    if any(_overlaps_key(k, exclude_keys) for k in keys):
      continue
    split = split_of(conv_id, val_fraction)
    start = 0  # first message of the context (a user turn); only moves forward
    for u in range(0, len(messages), 2):
      if len(prompts) >= max_prompts:
        break
      text = messages[u]["content"].strip()
      if len(text) < min_chars:
        continue
      ids = None
      while start <= u:
        ids = tuple(int(t) for t in encode_chat(_context(messages, start, u)))
        if len(ids) <= max_prompt_tokens:
          break
        start, ids = start + 2, None
      if ids is None:
        start = u + 2  # the turn alone is too long: later turns start after it
        continue
      key = tuple(keys[start:u + 1])
      if key in seen:
        continue
      seen.add(key)
      prompts.append(Prompt(conv_id=conv_id, text=text, ids=ids, split=split, turn=u // 2))
      contexts.append(messages[start:u + 1])
  check_no_overlap((m["content"] for c in contexts for m in c), list(exclude))
  return prompts


def _context(messages: Sequence[dict[str, str]], start: int, stop: int) -> list[dict[str, str]]:
  """Messages ``start..stop`` (both user turns), the last one stripped."""
  out = [dict(m) for m in messages[start:stop + 1]]
  out[-1]["content"] = out[-1]["content"].strip()
  return out


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
  """Writes dataclass records (or dicts) as JSONL, atomically (a pipeline cache: replaced)."""
  with _atomic.writing(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def fill(tmp: str) -> None:
    with open(tmp, "x", encoding="utf-8") as f:
      for r in records:
        d = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r
        f.write(json.dumps(d, ensure_ascii=False) + "\n")
  _atomic.write_file(path, fill, overwrite=True)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
  """Reads ``write_jsonl`` output of Prompts."""
  out = []
  for d in _read_jsonl(path):
    out.append(Prompt(conv_id=d["conv_id"], text=d["text"], ids=tuple(d["ids"]),
                      split=d["split"], turn=int(d.get("turn", 0))))
  return out


def read_examples(path: str | os.PathLike) -> list[Example]:
  """Reads ``write_jsonl`` output of Examples."""
  out = []
  for d in _read_jsonl(path):
    ex = Example(conv_id=d["conv_id"], split=d["split"], ids=tuple(d["ids"]),
                 prompt_len=int(d["prompt_len"]))
    if not 0 < ex.prompt_len <= len(ex.ids):
      raise TrainingDataError(f"{path}: example {ex.conv_id!r} has prompt_len="
                              f"{ex.prompt_len}; expected 0 < prompt_len <= {len(ex.ids)}")
    out.append(ex)
  return out


def _read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise TrainingDataError(f"{path}:{lineno}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- batching


def pad_examples(examples: Sequence[Example], length: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-pads examples into arrays.

  Returns:
    ids [B, length] int32, loss_mask [B, length] bool (answer tokens),
    valid [B, length] bool (real tokens).
  """
  b = len(examples)
  ids = np.full((b, length), pad_id, np.int32)
  loss_mask = np.zeros((b, length), bool)
  valid = np.zeros((b, length), bool)
  for i, ex in enumerate(examples):
    s = len(ex.ids)
    if s > length:
      raise TrainingDataError(f"example {ex.conv_id!r}: {s} tokens; expected at most {length}")
    ids[i, :s] = ex.ids
    loss_mask[i, :s] = ex.loss_mask
    valid[i, :s] = True
  return ids, loss_mask, valid
