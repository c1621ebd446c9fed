"""The HTTP layer: OpenAI-compatible routes over a scheduler (FastAPI, server-sent events).

A thin client of the serving loop: each request body is parsed here, from raw
JSON, into one :class:`GenerationRequest`; ``scheduler.submit`` (quick and
thread-safe) admits it; its events come back through the handle's asyncio
queue, so nothing here blocks the event loop.

Routes::

  POST /v1/completions        prompt (a text or token ids) -> text; stream or not
  POST /v1/chat/completions   messages -> an assistant message; stream or not
  GET  /v1/models             the served model's name (the default adapter), then the adapters
  GET  /v1/models/{model}
  GET  /health                200 {"status": "ok"} while the scheduler is healthy, else 503
  GET  /metrics               Prometheus text of scheduler.metrics.registry

Request fields map onto the request as OpenAI documents them; a field this
server cannot honour (``n=2``, ``logprobs``, ``tools``, an unknown field) is
refused with a 400 naming it, never silently ignored. ``model`` picks the
Medusa adapter: the server's model name (or the default's) is the default
adapter, any other name is an adapter loaded, or loadable, by the scheduler;
LoRAX's ``adapter_id`` field does the same. ``user`` is informational and
ignored. The completions ``max_tokens`` defaults to 16, as OpenAI's does; chat
requests default to what the cache holds.

Errors are OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``:
a bad request (``RequestError``) is 400, an unknown adapter 404
(``model_not_found``), a full queue or a shutdown 503, anything else 500. A
request that fails alone after its stream has begun ends the stream with an
error chunk, ``data: {"error": {...}}``, then ``data: [DONE]``; one that fails
before its first token gets the error status instead of a stream.

A client that goes away cancels its request (its slot is freed at the
scheduler's next step): streaming or not, a watcher polls the connection, and
a stream's generator cancels the handle when it is closed early.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator, Callable

import fastapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from medusa_jax.errors import (AdapterNotFoundError, MedusaError, OverloadedError, RequestError,
                               ShuttingDownError)
from medusa_jax.serving.api import (FinishEvent, FinishReason, GenerationRequest, RequestHandle,
                                    TokenEvent)

logger = logging.getLogger(__name__)

COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of ``/v1/completions`` (chat has none)."""
MAX_STOP = 4
"""Stop strings per request (OpenAI's limit)."""
DISCONNECT_POLL_S = 0.2
"""How often a request's watcher checks that its client is still there."""
_DONE = "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
  """An error answer: HTTP status and OpenAI's error fields."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.type = type
    self.param = param
    self.code = code
    self.headers = headers

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}

  def response(self) -> JSONResponse:
    return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(error: BaseException) -> ApiError:
  """The answer for an exception of the scheduler (or of a request that failed alone).

  ``AdapterNotFoundError`` is a ``RequestError``, so it is tested first.
  """
  if isinstance(error, ApiError):
    return error
  message = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, AdapterNotFoundError):
    return ApiError(404, message, param="model", code="model_not_found")
  if isinstance(error, RequestError):
    return ApiError(400, message, param=getattr(error, "param", None))
  if isinstance(error, OverloadedError):
    return ApiError(503, message, type="server_error", code="overloaded",
                    headers={"Retry-After": "1"})
  if isinstance(error, ShuttingDownError):
    return ApiError(503, message, type="server_error", code="shutting_down")
  if isinstance(error, MedusaError):  # typed, so its message is meant for people
    return ApiError(500, message, type="server_error", code="internal_error")
  return ApiError(500, f"internal server error ({type(error).__name__})", type="server_error",
                  code="internal_error")


def _cancelled_error() -> ApiError:
  return ApiError(503, "the request was cancelled by the server (shutting down?)",
                  type="server_error", code="cancelled")


# ----------------------------------------------------------------------------- request bodies


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParsedRequest:
  """A request body, parsed.

  Attributes:
    request: what the scheduler gets.
    stream: answer with server-sent events.
    include_usage: ``stream_options.include_usage``: a last chunk with ``usage``.
    model: the ``model`` the answers carry.
  """
  request: GenerationRequest
  stream: bool
  include_usage: bool
  model: str


def _refuse_unless(ok: Callable[[Any], bool], expected: str) -> Callable[[str, Any], None]:
  """A check for a field that is accepted only at a value that changes nothing."""
  def check(key: str, value: Any) -> None:
    if not ok(value):
      raise ApiError(400, f"{key}={value!r} is not supported by this server; {expected}",
                     param=key, code="unsupported_parameter")
  return check


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


# Accepted only where they change nothing (None, the JSON null, always means "not given").
_NEUTRAL = {
    "n": _refuse_unless(lambda v: v == 1 and not isinstance(v, bool), "only n=1"),
    "presence_penalty": _refuse_unless(lambda v: _is_number(v) and v == 0, "only 0"),
    "frequency_penalty": _refuse_unless(lambda v: _is_number(v) and v == 0, "only 0"),
    "logprobs": _refuse_unless(lambda v: v is False, "logprobs are not returned"),
    "top_logprobs": _refuse_unless(lambda v: v == 0 and not isinstance(v, bool),
                                   "logprobs are not returned"),
    "echo": _refuse_unless(lambda v: v is False, "only false"),
    "best_of": _refuse_unless(lambda v: v == 1 and not isinstance(v, bool), "only 1"),
    "logit_bias": _refuse_unless(lambda v: v == {}, "only an empty map"),
    "suffix": _refuse_unless(lambda v: False, "only null"),
    "response_format": _refuse_unless(lambda v: v == {"type": "text"}, 'only {"type": "text"}'),
}
# Refused whenever given: this server calls no tools.
_REFUSED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
_COMMON = frozenset({"model", "adapter_id", "max_tokens", "temperature", "top_p", "seed", "stop",
                     "stream", "stream_options", "user", "n", "presence_penalty",
                     "frequency_penalty", "logprobs", "logit_bias"})
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                         *_REFUSED}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
               "assistant": "assistant"}


def _bad(key: str, message: str) -> ApiError:
  return ApiError(400, f"{key}: {message}", param=key)


def _get(body: dict, key: str, kind: type | tuple, expected: str, default: Any = None) -> Any:
  """``body[key]`` if it is of ``kind`` (bool is never a number), ``default`` when absent/null."""
  value = body.get(key)
  if value is None:
    return default
  if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
    raise _bad(key, f"expected {expected}, got {value!r}")
  return value


def _float(body: dict, key: str, default: float) -> float:
  value = _get(body, key, (int, float), "a number", default)
  if not math.isfinite(value):
    raise _bad(key, f"expected a finite number, got {value!r}")
  return float(value)


def _stop(body: dict) -> tuple[str, ...]:
  value = body.get("stop")
  if value is None:
    return ()
  stops = [value] if isinstance(value, str) else value
  if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
    raise _bad("stop", f"expected a string or a list of strings, got {value!r}")
  if len(stops) > MAX_STOP:
    raise _bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
  if any(not s for s in stops):
    raise _bad("stop", "a stop string is empty")
  return tuple(stops)


def _stream_flags(body: dict) -> tuple[bool, bool]:
  """(stream, include_usage)."""
  stream = _get(body, "stream", bool, "true or false", False)
  options = body.get("stream_options")
  if options is None:
    return stream, False
  if not stream:
    raise _bad("stream_options", "only allowed with stream=true")
  if not isinstance(options, dict):
    raise _bad("stream_options", f"expected an object, got {options!r}")
  for key in options:
    if key != "include_usage":
      raise _bad(f"stream_options.{key}", "unknown or unsupported field")
  return stream, _get(options, "include_usage", bool, "true or false", False)


def _model(body: dict, base_names: tuple[str, ...]) -> tuple[str | None, str]:
  """(the adapter, None for the default; the model name answers carry)."""
  model = _get(body, "model", str, "a string")
  adapter_id = _get(body, "adapter_id", str, "a string")
  if adapter_id is not None and model is not None and model not in base_names \
      and model != adapter_id:
    raise _bad("adapter_id", f"{adapter_id!r} and model={model!r} name different adapters")
  name = adapter_id if adapter_id is not None else model
  if name is None or name in base_names:
    return None, model or base_names[0]
  return name, name


def _check_fields(body: Any, allowed: frozenset) -> dict:
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
  for key, value in body.items():
    if key not in allowed:
      raise ApiError(400, f"{key}: unknown or unsupported field", param=key,
                     code="unsupported_parameter")
    if value is None:
      continue
    if key in _REFUSED:
      raise ApiError(400, f"{key}: not supported by this server (no tool calls)", param=key,
                     code="unsupported_parameter")
    if key in _NEUTRAL:
      _NEUTRAL[key](key, value)
  return body


def _request(body: dict, prompt: Any, *, chat: bool, max_tokens: int | None, stream: bool,
             include_usage: bool, base_names: tuple[str, ...], request_id: str) -> ParsedRequest:
  adapter, model = _model(body, base_names)
  _get(body, "user", str, "a string")  # informational
  request = GenerationRequest(
      prompt=prompt, chat=chat, max_tokens=max_tokens,
      temperature=_float(body, "temperature", 1.0), top_p=_float(body, "top_p", 1.0),
      seed=_get(body, "seed", int, "an integer"), stop=_stop(body), adapter=adapter,
      request_id=request_id)
  return ParsedRequest(request=request, stream=stream, include_usage=include_usage, model=model)


def _token_ids(value: list) -> bool:
  return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompt(body: dict) -> str | list[int]:
  """One prompt: a text or token ids (a list holding one of them is unwrapped)."""
  if "prompt" not in body or body["prompt"] is None:
    raise _bad("prompt", "required")
  prompt = body["prompt"]
  if isinstance(prompt, str):
    return prompt
  if not isinstance(prompt, list) or not prompt:
    raise _bad("prompt", f"expected a string or a list of token ids, got {prompt!r}")
  if _token_ids(prompt):
    return prompt
  if not all(isinstance(p, str) or (isinstance(p, list) and _token_ids(p)) for p in prompt):
    raise _bad("prompt", "expected a string, a list of token ids, or a list holding one of them")
  if len(prompt) > 1:
    raise _bad("prompt", f"{len(prompt)} prompts in one request; this server takes one prompt"
               " per request (send one request each)")
  return prompt[0]


def parse_completion(body: Any, *, base_names: tuple[str, ...],
                     request_id: str = "") -> ParsedRequest:
  """A ``/v1/completions`` body (decoded JSON).

  Args:
    body: the decoded body.
    base_names: the names that mean the default adapter (the server's first).
    request_id: the id the answers carry.

  Raises:
    ApiError: 400 naming the field at fault.
  """
  body = _check_fields(body, COMPLETION_FIELDS)
  prompt = _prompt(body)
  stream, include_usage = _stream_flags(body)
  max_tokens = _get(body, "max_tokens", int, "an integer", COMPLETION_MAX_TOKENS)
  return _request(body, prompt, chat=False, max_tokens=max_tokens, stream=stream,
                  include_usage=include_usage, base_names=base_names, request_id=request_id)


def _content(where: str, content: Any) -> str:
  """A message's content: a string, or a list of text parts (joined)."""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    texts = []
    for i, part in enumerate(content):
      if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise _bad(f"{where}.content[{i}]", f"only text parts are supported, got {kind!r}")
      if set(part) != {"type", "text"} or not isinstance(part["text"], str):
        raise _bad(f"{where}.content[{i}]", 'expected {"type": "text", "text": "..."}')
      texts.append(part["text"])
    return "".join(texts)
  raise _bad(f"{where}.content", f"expected a string or a list of text parts, got {content!r}")


def _messages(body: dict) -> list[dict[str, str]]:
  messages = body.get("messages")
  if messages is None:
    raise _bad("messages", "required")
  if not isinstance(messages, list) or not messages:
    raise _bad("messages", f"expected a non-empty list of messages, got {messages!r}")
  out = []
  for i, message in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(message, dict):
      raise _bad(where, f"expected an object with role and content, got {message!r}")
    for key in message:
      if key not in ("role", "content"):
        raise _bad(f"{where}.{key}", "unknown or unsupported field")
    role = message.get("role")
    if role not in _CHAT_ROLES:
      raise _bad(f"{where}.role", f"expected one of {', '.join(_CHAT_ROLES)}, got {role!r}")
    out.append({"role": _CHAT_ROLES[role], "content": _content(where, message.get("content"))})
  return out


def parse_chat(body: Any, *, base_names: tuple[str, ...], request_id: str = "") -> ParsedRequest:
  """A ``/v1/chat/completions`` body (decoded JSON); see :func:`parse_completion`."""
  body = _check_fields(body, CHAT_FIELDS)
  messages = _messages(body)
  stream, include_usage = _stream_flags(body)
  max_tokens = _get(body, "max_tokens", int, "an integer")
  max_completion = _get(body, "max_completion_tokens", int, "an integer")
  if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
    raise _bad("max_completion_tokens", f"{max_completion} disagrees with max_tokens="
               f"{max_tokens}")
  return _request(body, messages, chat=True, max_tokens=max_tokens if max_completion is None else max_completion,
                  stream=stream, include_usage=include_usage, base_names=base_names,
                  request_id=request_id)


def _reject_constant(name: str):
  raise ValueError(f"{name} is not JSON")


async def _read_json(request: fastapi.Request) -> Any:
  raw = await request.body()
  try:
    return json.loads(raw, parse_constant=_reject_constant)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json")


# ----------------------------------------------------------------------------- answers


@dataclasses.dataclass(frozen=True, slots=True)
class _Kind:
  """What differs between completions and chat answers."""
  chat: bool
  prefix: str       # of the response id
  obj: str          # "object" of a whole answer
  chunk_obj: str    # "object" of a streamed chunk
  parse: Callable[..., ParsedRequest]

  def choice(self, text: str, finish: str | None) -> dict[str, Any]:
    if self.chat:
      return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

  def delta(self, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
    if not self.chat:
      return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    delta: dict[str, Any] = {}
    if role:
      delta["role"] = "assistant"
    if text is not None:
      delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


COMPLETIONS = _Kind(False, "cmpl-", "text_completion", "text_completion", parse_completion)
CHAT = _Kind(True, "chatcmpl-", "chat.completion", "chat.completion.chunk", parse_chat)


def _usage(finish: FinishEvent) -> dict[str, int]:
  return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
          "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def _sse(payload: dict[str, Any]) -> str:
  return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def _failure(finish: FinishEvent) -> ApiError | None:
  """The error of a request that did not end with stop or length."""
  if finish.reason in _FINISH:
    return None
  if finish.reason is FinishReason.CANCELLED:
    return _cancelled_error()
  error = finish.error if finish.error is not None else RuntimeError("request failed")
  if not isinstance(error, MedusaError):
    logger.error("request failed: %r", error, exc_info=error)
  return api_error(error)


async def _watch(request: fastapi.Request, handle: RequestHandle) -> None:
  """Cancels ``handle`` when the client goes away before its request ends."""
  while not handle.finished:
    if await request.is_disconnected():
      logger.info("client of %s went away: cancelling", handle.request_id)
      handle.cancel()
      return
    await asyncio.sleep(DISCONNECT_POLL_S)


async def _sse_stream(kind: _Kind, parsed: ParsedRequest, handle: RequestHandle,
                  first: TokenEvent | FinishEvent, events: AsyncIterator,
                  watcher: asyncio.Task, created: int) -> AsyncIterator[str]:
  """The SSE chunks of one request, ``first`` event included; cancels it if closed early."""
  head = {"id": handle.request_id, "object": kind.chunk_obj, "created": created,
          "model": parsed.model}
  usage = {"usage": None} if parsed.include_usage else {}
  chunk = lambda **delta: _sse({**head, "choices": [kind.delta(**delta)], **usage})
  try:
    if kind.chat:
      yield chunk(text="", finish=None, role=True)
    event = first
    while isinstance(event, TokenEvent):
      if event.text:
        yield chunk(text=event.text, finish=None)
      event = await anext(events)
    error = _failure(event)
    if error is not None:
      yield _sse(error.body())
    else:
      yield chunk(text=None if kind.chat else "", finish=_FINISH[event.reason])
      if parsed.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(event)})
    yield _DONE
  finally:  # also when the client went away and the server closed the stream
    watcher.cancel()
    if not handle.finished:
      handle.cancel()


def create_app(scheduler, *, model_name: str,
               shutdown_timeout: float | None = 30.0) -> fastapi.FastAPI:
  """The OpenAI-compatible app over ``scheduler``.

  Args:
    scheduler: a started ``serving.scheduler.Scheduler`` (or anything with its
      ``submit``, ``model_names``, ``healthy``, ``metrics`` and ``shutdown``).
    model_name: the name of the served model; ``model`` = this name (or the
      first of ``model_names()``) means the default adapter. ``/v1/models``
      lists it first, then ``model_names()[1:]`` (the adapters).
    shutdown_timeout: seconds the app's shutdown gives the scheduler to drain.

  Returns:
    The app; on shutdown it calls ``scheduler.shutdown(drain=True, timeout=...)``.
  """

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    yield
    # in a thread: draining may take a while, and handles still post to this loop
    await asyncio.to_thread(scheduler.shutdown, drain=True, timeout=shutdown_timeout)

  app = fastapi.FastAPI(title="medusa_jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                        openapi_url=None)

  @app.exception_handler(ApiError)
  async def _api_error(request, error: ApiError):
    del request
    return error.response()

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, error: StarletteHTTPException):
    del request  # unknown route, wrong method: OpenAI's shape too
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return ApiError(error.status_code, str(error.detail), code=code).response()

  @app.exception_handler(Exception)
  async def _unexpected(request, error: Exception):
    del request
    logger.error("unexpected error", exc_info=error)
    return api_error(error).response()

  def base_names() -> tuple[str, ...]:
    names = list(scheduler.model_names())
    return (model_name, *names[:1])

  async def serve(request: fastapi.Request, kind: _Kind) -> Response:
    created = int(time.time())
    parsed = kind.parse(await _read_json(request), base_names=base_names(),
                        request_id=kind.prefix + uuid.uuid4().hex)
    try:
      handle = scheduler.submit(parsed.request, loop=asyncio.get_running_loop())
    except Exception as e:  # typed: 400 / 404 / 503; anything else 500
      if not isinstance(e, MedusaError):
        logger.exception("submit failed")
      return api_error(e).response()
    watcher = asyncio.create_task(_watch(request, handle))
    events = handle.events()
    try:  # the first event decides between an error status and a stream
      first = await anext(events)
      if isinstance(first, FinishEvent) and (error := _failure(first)) is not None:
        return error.response()
      if parsed.stream:
        stream = _sse_stream(kind, parsed, handle, first, events, watcher, created)
        watcher = None  # the stream owns it now
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
      texts, event = [], first
      while isinstance(event, TokenEvent):
        texts.append(event.text)
        event = await anext(events)
      if (error := _failure(event)) is not None:
        return error.response()
      return JSONResponse({"id": handle.request_id, "object": kind.obj, "created": created,
                           "model": parsed.model,
                           "choices": [kind.choice("".join(texts), _FINISH[event.reason])],
                           "usage": _usage(event)})
    finally:
      if watcher is not None:
        watcher.cancel()
        if not handle.finished:  # this coroutine was cancelled (server shutting down)
          handle.cancel()

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    return await serve(request, COMPLETIONS)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    return await serve(request, CHAT)

  def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "medusa_jax"}

  def listed() -> list[str]:
    # the default adapter under the server's name, then the adapters
    return [model_name, *(n for n in scheduler.model_names()[1:] if n != model_name)]

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card(n) for n in listed()]}

  @app.get("/v1/models/{name:path}")
  async def model(name: str):
    if name not in (*base_names(), *listed()):
      raise ApiError(404, f"model {name!r} not found", param="model", code="model_not_found")
    return model_card(name)

  @app.get("/health")
  async def health():
    if scheduler.healthy:
      return {"status": "ok"}
    return JSONResponse({"status": "unavailable"}, status_code=503)

  @app.get("/metrics")
  async def metrics():
    return Response(generate_latest(scheduler.metrics.registry), media_type=CONTENT_TYPE_LATEST)

  return app
