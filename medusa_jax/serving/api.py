"""What a client of the scheduler hands in and gets back: requests, events, handles.

The HTTP layer (``server.py``) maps OpenAI JSON onto :class:`GenerationRequest`
and reads :class:`TokenEvent` / :class:`FinishEvent` from a
:class:`RequestHandle`; the scheduler (``scheduler.py``) validates requests
with the decoding layer's one validator and feeds the handles from its thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from medusa_jax.options import Option


class FinishReason(Option):
  """Why a request ended (OpenAI's ``finish_reason``, plus two of the server's own)."""
  STOP = "stop"            # an EOS id or a stop string
  LENGTH = "length"        # max_tokens, or the cache is full
  CANCELLED = "cancelled"  # the client went away or cancelled
  ERROR = "error"          # the request failed alone (FinishEvent.error says why)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
  """One request, as the HTTP layer hands it to the scheduler (checked there).

  Attributes:
    prompt: token ids, a text (``chat=False``: continued as is), or, with
      ``chat=True``, a user message or a list of ``{"role", "content"}``
      messages rendered with the model's chat template.
    chat: render ``prompt`` with the chat template.
    max_tokens: the budget of new tokens; None: as many as the cache holds.
    temperature: 0 = greedy; > 0 samples (lossless under speculation).
    top_p: nucleus mass in (0, 1].
    seed: PRNG seed of the request; None: drawn by the server.
    stop: stop strings; the text ends before the first one (not included).
    adapter: the Medusa adapter's name; None: the default adapter.
    request_id: the id answers carry (the scheduler makes one when empty).
  """
  prompt: Sequence[int] | str | Sequence[Mapping[str, str]]
  chat: bool = False
  max_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  adapter: str | None = None
  request_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
  """New tokens of a request: their ids and the text they complete.

  ``text`` is the newly printable text (a multi-byte character split over
  tokens is held back until complete; text that may start a stop string is
  held back until it is known not to).
  """
  token_ids: tuple[int, ...]
  text: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FinishEvent:
  """The last event of a request.

  Attributes:
    reason: why it ended.
    prompt_tokens: tokens of the prompt as fed to the model.
    completion_tokens: tokens generated (EOS included when hit).
    error: for ``FinishReason.ERROR``, the exception (a MedusaError subclass
      for the request's own fault).
    accepted_per_step: mean tokens per decode step of the request.
  """
  reason: FinishReason
  prompt_tokens: int
  completion_tokens: int
  error: BaseException | None = None
  accepted_per_step: float = 0.0


Event = TokenEvent | FinishEvent


class RequestHandle:
  """A submitted request: its events, in order, and a way to cancel it.

  The scheduler thread calls :meth:`put`; an asyncio consumer iterates
  :meth:`events` (or awaits :meth:`collect`), a thread consumer calls
  :meth:`get`. Cancelling frees the request's slot at the scheduler's next
  step; the handle then ends with ``FinishReason.CANCELLED``.
  """

  def __init__(self, request_id: str, prompt_tokens: int,
               loop: asyncio.AbstractEventLoop | None = None):
    self.request_id = request_id
    self.prompt_tokens = prompt_tokens
    self._loop = loop
    self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
    self._events: list[Event] = []
    self._cond = threading.Condition()
    self._cancelled = threading.Event()
    self.finished = False

  # -- scheduler side
  def put(self, event: Event) -> None:
    """Delivers one event (thread-safe; after a FinishEvent nothing more is put)."""
    with self._cond:
      if self.finished:
        return
      self.finished = isinstance(event, FinishEvent)
      self._events.append(event)
      self._cond.notify_all()
    if self._loop is not None:
      try:
        self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
      except RuntimeError:  # the consumer's loop is closed: nobody listens any more
        self._cancelled.set()

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  # -- consumer side
  def cancel(self) -> None:
    """Asks the scheduler to stop this request and free its slot."""
    self._cancelled.set()

  async def events(self) -> AsyncIterator[Event]:
    """The events as they come (needs a handle made with a ``loop``)."""
    if self._aqueue is None:
      raise RuntimeError("RequestHandle.events: the handle was made without an event loop")
    while True:
      event = await self._aqueue.get()
      yield event
      if isinstance(event, FinishEvent):
        return

  async def collect(self) -> tuple[list[int], str, FinishEvent]:
    """(token ids, text, the FinishEvent) once the request has ended."""
    ids: list[int] = []
    text: list[str] = []
    async for event in self.events():
      if isinstance(event, TokenEvent):
        ids += event.token_ids
        text.append(event.text)
      else:
        return ids, "".join(text), event
    raise AssertionError("unreachable")

  def get(self, timeout: float | None = None) -> tuple[list[int], str, FinishEvent]:
    """Blocking :meth:`collect` for thread consumers.

    Raises:
      TimeoutError: the request did not end within ``timeout`` seconds.
    """
    with self._cond:
      if not self._cond.wait_for(lambda: self.finished, timeout):
        raise TimeoutError(f"request {self.request_id}: not finished after {timeout} s")
      events = list(self._events)
    ids = [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids]
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    return ids, text, events[-1]


def describe(error: BaseException) -> dict[str, Any]:
  """A one-line, JSON-ready description of an error (type and message)."""
  return {"type": type(error).__name__, "message": str(error)}
