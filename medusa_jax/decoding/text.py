"""A thin text layer over ``Engine.stream``: one request in, chunks of tokens and text out.

Usable from Python and behind the ``medusa-jax generate``, ``chat`` and
``bench`` commands::

  eng = Engine.load()                                   # SmolLM2 + bundled heads
  params = SamplingParams(speculate="tree", max_new_tokens=64)
  for piece in stream_text(eng, chat_ids(eng, "Hi!"), params):
    print(piece.text, end="", flush=True)

:func:`stream_tokens` runs one request through ``Engine.stream`` (the same
validation, tree policy and jitted loop as ``Engine.generate``, one row wide)
and yields each step's tokens as soon as the step is read back, so text
appears while the answer is being decoded.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from medusa_jax.decoding.engine import Engine
from medusa_jax.decoding.requests import SamplingParams, Speculate, chat_prompt, encode_prompt
from medusa_jax.decoding.results import RowStats
from medusa_jax.errors import RequestError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StreamChunk:
  """What one step emitted.

  Attributes:
    tokens: the new token ids (1 for a plain step, up to depth + 1 when speculating).
    accepted: draft tokens accepted in this step (0 for the prefill and plain steps).
    text: the new text (filled by :func:`stream_text`; "" from :func:`stream_tokens`).
    stats: set on the last chunk only.
  """
  tokens: tuple[int, ...]
  accepted: int = 0
  text: str = ""
  stats: "StreamStats | None" = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StreamStats(RowStats):
  """Statistics of one streamed request: the request's :class:`RowStats`, and

  Attributes:
    tree_nodes: T, tokens verified per step (1 when plain).
    speculate: the mode used ("none" when a guard turned speculation off).

  Here ``wall_s`` runs from the first dispatch to the last token, compilation
  included, and ``tokens_per_s`` is ``new_tokens / wall_s``.
  """
  tree_nodes: int
  speculate: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def chat_ids(engine: Engine, messages: str | Sequence[Mapping[str, str]]) -> list[int]:
  """Token ids of a conversation in the model's chat template, ready for the answer.

  Args:
    engine: an ``Engine`` with a tokenizer.
    messages: one user message, or ``[{"role": ..., "content": ...}, ...]``.
  """
  return _prepared(lambda: chat_prompt(messages, engine.context))


def text_ids(engine: Engine, text: str) -> list[int]:
  """Token ids of ``text`` as it is (no chat template)."""
  return _prepared(lambda: list(encode_prompt(text, engine.context)))


def _prepared(prepare: Callable[[], list[int]]) -> list[int]:
  """``prepare()``, with any exception it raises (the tokenizer's on a lone
  surrogate, say) turned into a RequestError: a bad prompt fails alone."""
  try:
    return prepare()
  except RequestError:
    raise
  except Exception as e:  # noqa: BLE001
    raise RequestError(f"cannot prepare the prompt ({type(e).__name__}: {str(e)[:300]})"
                       ) from e


def stream_tokens(engine: Engine, prompt_ids: Sequence[int], params: SamplingParams
                  ) -> Iterator[StreamChunk]:
  """Generates one request, yielding each step's tokens as soon as it is read.

  The last chunk carries :class:`StreamStats`.

  Args:
    engine: an ``Engine``.
    prompt_ids: [P] token ids.
    params: the request's options.

  Raises:
    RequestError: as ``Engine.stream`` (an empty prompt, an id out of range,
      a request that does not fit the cache, speculation without heads).
  """
  t0 = time.perf_counter()
  last = None  # the final chunk waits for the result's statistics
  for event in engine.stream([prompt_ids], params=params):
    if event.result is not None:
      res = event.result
      row = res.stats[0]
      mode = Speculate.NONE if res.speculation_skipped else res.speculate
      wall = time.perf_counter() - t0
      stats = StreamStats(
          **{**dataclasses.asdict(row), "wall_s": wall,
             "tokens_per_s": row.new_tokens / wall if wall > 0 else float("nan")},
          tree_nodes=res.tree_nodes, speculate=mode.value)
      yield dataclasses.replace(last, stats=stats)
      return
    chunk = StreamChunk(tokens=tuple(event.tokens[0]), accepted=event.accept_len[0])
    if event.done[0]:
      last = chunk
    else:
      yield chunk


def stream_text(engine: Engine, prompt_ids: Sequence[int], params: SamplingParams
                ) -> Iterator[StreamChunk]:
  """:func:`stream_tokens` with ``text`` filled (special tokens dropped).

  Text is emitted only once its bytes are complete, so a multi-byte character
  split over two tokens is never printed half.
  """
  if engine.tokenizer is None:
    raise RequestError("this model has no tokenizer.json; use stream_tokens")
  out: list[int] = []
  shown = ""
  for chunk in stream_tokens(engine, prompt_ids, params):
    out.extend(chunk.tokens)
    text = engine.decode(out)
    piece = ""
    if chunk.stats is not None or not text.endswith("\ufffd"):
      piece = text[len(shown):] if text.startswith(shown) else text
      shown = text
    yield dataclasses.replace(chunk, text=piece)


def generate_text(engine: Engine, prompt: str | Sequence[Mapping[str, str]],
                  params: SamplingParams, *, chat: bool = True,
                  on_text: Callable[[str], None] | None = None) -> tuple[str, StreamStats]:
  """Generates one answer; ``on_text`` receives the text as it is decoded.

  Args:
    engine: an ``Engine`` with a tokenizer.
    prompt: a user message (or, with ``chat``, a list of messages).
    params: the request's options.
    chat: wrap the prompt in the chat template.
    on_text: called with each new piece of text.

  Returns:
    (text, stats).
  """
  ids = chat_ids(engine, prompt) if chat else text_ids(engine, prompt)
  pieces, stats = [], None
  for chunk in stream_text(engine, ids, params):
    pieces.append(chunk.text)
    if on_text is not None and chunk.text:
      on_text(chunk.text)
    stats = chunk.stats or stats
  return "".join(pieces), stats


class ChatSession:
  """A multi-turn conversation in the model's chat template; old turns are dropped when
  the cache is full."""

  def __init__(self, engine, params, *, system: str | None = None):
    """Args:
      engine: an ``Engine`` with a tokenizer.
      params: the ``SamplingParams`` of every answer.
      system: a system message.
    """
    self.engine = engine
    self.params = params
    self.system = system
    self.turns: list[dict[str, str]] = []

  def reset(self) -> None:
    self.turns = []

  def messages(self, user: str) -> list[dict[str, str]]:
    head = [{"role": "system", "content": self.system}] if self.system else []
    return head + self.turns + [{"role": "user", "content": user}]

  def reply(self, user: str, on_text: Callable[[str], None] | None = None):
    """Answers ``user`` in the context of the earlier turns, and records both.

    Returns:
      (answer, ``text.StreamStats``).
    """
    budget = self.engine.max_cache_len - self.params.max_new_tokens - 64  # 64: tree nodes
    messages = self.messages(user)
    while len(chat_ids(self.engine, messages)) > budget and self.turns:
      self.turns = self.turns[2:]  # the oldest user/assistant pair
      messages = self.messages(user)
    answer, stats = generate_text(self.engine, messages, self.params, on_text=on_text)
    self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return answer, stats
