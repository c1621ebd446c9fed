"""A stand-in for ``serving.scheduler.Scheduler``: deterministic tokens, injectable failures.

It has the scheduler's surface (``submit``, ``model_names``, ``healthy``,
``metrics``, ``start``, ``shutdown``) and feeds real :class:`RequestHandle` objects from a
thread per request, as the real scheduler feeds them from its thread, so the
server under test sees the same cross-thread delivery.

Token ``i`` of every answer is id ``100 + i`` with text ``"w{i} "``. A request
generates ``Script.tokens`` tokens then stops (``stop``), unless its
``max_tokens`` comes first (``length``) or a stop string appears in the text
(``stop``, the text cut before it). The prompt counts one token per id, or per
whitespace-separated word (chat: over all messages).
"""

from __future__ import annotations

import dataclasses
import threading
import time

from medusa_jax.errors import (AdapterNotFoundError, NonFiniteLogitsError, OverloadedError,
                               RequestError, ShuttingDownError)
from medusa_jax.serving.api import (FinishEvent, FinishReason, GenerationRequest, RequestHandle,
                                    TokenEvent)
from medusa_jax.serving.metrics import ServingMetrics


@dataclasses.dataclass(kw_only=True)
class Script:
  """How the fake answers the next requests.

  Attributes:
    tokens: tokens before the fake's "EOS".
    per_event: tokens per TokenEvent (a Medusa step accepts several).
    delay_s: seconds before each event.
    fail_after: fail (FinishEvent ERROR) after this many tokens.
    error: the error of ``fail_after``.
    hang_after: after this many tokens, send nothing more until cancelled.
    submit_error: raised by ``submit`` itself.
  """
  tokens: int = 8
  per_event: int = 1
  delay_s: float = 0.0
  fail_after: int | None = None
  error: BaseException = dataclasses.field(
      default_factory=lambda: NonFiniteLogitsError("request: the logits became NaN at step 2"))
  hang_after: int | None = None
  submit_error: BaseException | None = None


def token_text(i: int) -> str:
  return f"w{i} "


class FakeScheduler:
  """The scheduler's interface over scripted answers.

  Attributes:
    script: how requests are answered (replace it per test).
    submitted: every request admitted, in order.
    handles: request id -> handle.
    finishes: request id -> the FinishEvent it ended with.
    shutdowns: the (drain, timeout) of every ``shutdown`` call.
  """

  def __init__(self, *, model: str = "fake-model", adapters: tuple[str, ...] = ("alpha", "beta"),
               max_active: int = 64):
    self.model = model
    self.adapters = list(adapters)
    self.max_active = max_active
    self.metrics = ServingMetrics()
    self.script = Script()
    self.submitted: list[GenerationRequest] = []
    self.handles: dict[str, RequestHandle] = {}
    self.finishes: dict[str, FinishEvent] = {}
    self.shutdowns: list[tuple[bool, float | None]] = []
    self.started = False
    self.healthy = True
    self._lock = threading.Lock()
    self._done = threading.Condition(self._lock)
    self._active = 0
    self._closed = False

  def reset(self) -> None:
    """A fresh script and records (between tests sharing one server)."""
    with self._lock:
      self.script = Script()
      self.submitted.clear()
      self.handles.clear()
      self.finishes.clear()
      self.healthy = True

  def start(self) -> None:
    self.started = True

  def model_names(self) -> list[str]:
    return [self.model, *self.adapters]

  def submit(self, request: GenerationRequest, *, loop=None) -> RequestHandle:
    script = self.script
    if loop is None:
      raise AssertionError("the server must pass its event loop")
    if script.submit_error is not None:
      raise script.submit_error
    if self._closed:
      raise ShuttingDownError("the server is shutting down")
    if request.adapter is not None and request.adapter not in self.adapters:
      raise AdapterNotFoundError(f"adapter {request.adapter!r} not found; loaded:"
                                 f" {', '.join(self.adapters)}")
    if not request.prompt:
      raise RequestError("prompt: empty")
    with self._lock:
      if self._active >= self.max_active:
        raise OverloadedError(f"queue full ({self.max_active} requests)")
      self._active += 1
      handle = RequestHandle(request.request_id or f"fake-{len(self.submitted)}",
                             _prompt_tokens(request), loop)
      self.submitted.append(request)
      self.handles[handle.request_id] = handle
    self.metrics.request_started()
    threading.Thread(target=self._run, args=(request, handle, script), daemon=True).start()
    return handle

  def _run(self, request: GenerationRequest, handle: RequestHandle, script: Script) -> None:
    start = time.perf_counter()
    text, n = "", 0
    budget = request.max_tokens if request.max_tokens is not None else 1 << 30
    reason, error = FinishReason.STOP, None
    while True:
      if handle.cancelled:
        reason = FinishReason.CANCELLED
        break
      if script.hang_after is not None and n >= script.hang_after:
        time.sleep(0.01)
        continue
      if script.fail_after is not None and n >= script.fail_after:
        reason, error = FinishReason.ERROR, script.error
        break
      if n >= min(script.tokens, budget):
        reason = FinishReason.LENGTH if n >= budget else FinishReason.STOP
        break
      if script.delay_s:
        time.sleep(script.delay_s)
      count = min(script.per_event, budget - n, script.tokens - n)
      piece = "".join(token_text(n + i) for i in range(count))
      ids = tuple(100 + n + i for i in range(count))
      n += count
      cut = _first_stop(text + piece, request.stop)
      if cut is not None:
        handle.put(TokenEvent(ids, (text + piece)[len(text):cut]))
        reason = FinishReason.STOP
        break
      text += piece
      handle.put(TokenEvent(ids, piece))
    finish = FinishEvent(reason=reason, prompt_tokens=handle.prompt_tokens, completion_tokens=n,
                         error=error)
    handle.put(finish)
    self.metrics.request_finished(reason.value, n, time.perf_counter() - start)
    with self._lock:
      self.finishes[handle.request_id] = finish
      self._active -= 1
      self._done.notify_all()

  def wait_finished(self, request_id: str, timeout: float = 5.0) -> FinishEvent:
    """The FinishEvent of ``request_id``, once it has ended."""
    with self._done:
      if not self._done.wait_for(lambda: request_id in self.finishes, timeout):
        raise TimeoutError(f"{request_id} did not finish within {timeout} s")
      return self.finishes[request_id]

  def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
    self.shutdowns.append((drain, timeout))
    self._closed = True
    self.healthy = False


def _prompt_tokens(request: GenerationRequest) -> int:
  prompt = request.prompt
  if isinstance(prompt, str):
    return len(prompt.split())
  if request.chat and not isinstance(prompt[0], int):
    return sum(len(m["content"].split()) for m in prompt)
  return len(prompt)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
  hits = [text.find(s) for s in stops if s in text]
  return min(hits) if hits else None
