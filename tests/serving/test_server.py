"""The OpenAI-compatible server over a fake scheduler, in a real uvicorn server on 127.0.0.1.

The official ``openai`` client drives the happy paths (completions and chat,
streaming and not); raw httpx sends what the client would not (malformed JSON,
refused fields) and checks status codes and error bodies.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from fake_scheduler import FakeScheduler, Script, token_text
from live_server import live_server
from medusa_jax.errors import OverloadedError, RequestError, ShuttingDownError
from medusa_jax.serving.server import create_app

MODEL = "smol-test"


@pytest.fixture(scope="module")
def served():
  """(fake scheduler, base URL): one server for the module."""
  fake = FakeScheduler(model="medusa-default")
  with live_server(create_app(fake, model_name=MODEL, shutdown_timeout=3.0)) as url:
    yield fake, url


@pytest.fixture
def fake(served):
  fake, _ = served
  fake.reset()
  return fake


@pytest.fixture
def url(served, fake):
  del fake  # reset first
  return served[1]


@pytest.fixture
def client(url):
  with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10) as c:
    yield c


@pytest.fixture
def http(url):
  with httpx.Client(base_url=url, timeout=10) as c:
    yield c


def _words(n: int, start: int = 0) -> str:
  return "".join(token_text(i) for i in range(start, start + n))


def _sse_payloads(text: str) -> list:
  """The ``data:`` payloads of an SSE body, JSON-decoded ([DONE] kept as a string)."""
  events = [e for e in text.split("\n\n") if e]
  assert all(e.startswith("data: ") for e in events), text
  return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def _assert_error(r: httpx.Response, status: int, *, param=None, code=None, needle=""):
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert set(error) == {"message", "type", "param", "code"}
  assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
  assert error["param"] == param
  if code is not None:
    assert error["code"] == code
  assert needle in error["message"], error


# ----------------------------------------------------------------------------- completions


def test_completion(client, fake):
  out = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5,
                                  temperature=0.0, top_p=0.9, seed=7, user="someone")
  assert out.id.startswith("cmpl-") and out.object == "text_completion"
  assert out.model == MODEL and out.created > 0
  assert out.choices[0].text == _words(5)
  assert out.choices[0].finish_reason == "length"
  assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 5,
                                                                                            8)
  req = fake.submitted[0]
  assert (req.prompt, req.chat, req.max_tokens, req.temperature, req.top_p, req.seed) == (
      "one two three", False, 5, 0.0, 0.9, 7)
  assert req.adapter is None and req.stop == () and req.request_id == out.id


def test_completion_defaults_follow_openai(client, fake):
  fake.script = Script(tokens=40)
  out = client.completions.create(model=MODEL, prompt="hi")
  assert out.usage.completion_tokens == 16  # OpenAI's max_tokens default for completions
  req = fake.submitted[0]
  assert (req.temperature, req.top_p, req.seed, req.max_tokens) == (1.0, 1.0, None, 16)


def test_completion_of_token_ids_and_a_list_of_one_prompt(client, fake):
  client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=2)
  client.completions.create(model=MODEL, prompt=["just one"], max_tokens=2)
  client.completions.create(model=MODEL, prompt=[[9, 10]], max_tokens=2)
  assert [r.prompt for r in fake.submitted] == [[5, 6, 7, 8], "just one", [9, 10]]


def test_completion_stops_with_reason_stop(client, fake):
  out = client.completions.create(model=MODEL, prompt="hi", max_tokens=50, stop=["w3", "w9"])
  assert out.choices[0].text == _words(3) and out.choices[0].finish_reason == "stop"
  assert fake.submitted[0].stop == ("w3", "w9")
  out = client.completions.create(model=MODEL, prompt="hi", max_tokens=50, stop="w1 ")
  assert out.choices[0].text == "w0 " and fake.submitted[1].stop == ("w1 ",)
  out = client.completions.create(model=MODEL, prompt="hi", max_tokens=50)
  assert out.choices[0].finish_reason == "stop"  # the fake's EOS after 8 tokens


def test_completion_stream(client, fake):
  fake.script = Script(tokens=6, per_event=2)
  chunks = list(client.completions.create(model=MODEL, prompt="a b", max_tokens=5, stream=True))
  assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") for c in chunks)
  assert "".join(c.choices[0].text for c in chunks) == _words(5)
  assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
  assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
  assert all(c.usage is None for c in chunks)


def test_completion_stream_with_usage(client):
  chunks = list(client.completions.create(model=MODEL, prompt="a b c", max_tokens=4, stream=True,
                                          stream_options={"include_usage": True}))
  assert chunks[-1].choices == []
  usage = chunks[-1].usage
  assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 4, 7)
  assert all(c.usage is None for c in chunks[:-1])
  assert chunks[-2].choices[0].finish_reason == "length"


def test_stream_wire_format(http):
  r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                         "stream": True})
  assert r.status_code == 200
  assert r.headers["content-type"].startswith("text/event-stream")
  assert r.text.endswith("data: [DONE]\n\n")
  payloads = _sse_payloads(r.text)
  assert payloads[-1] == "[DONE]"
  assert [p["choices"][0]["text"] for p in payloads[:-1]] == ["w0 ", "w1 ", ""]


# ----------------------------------------------------------------------------- chat


def test_chat(client, fake):
  messages = [{"role": "system", "content": "be brief"},
              {"role": "user", "content": "hello there"},
              {"role": "assistant", "content": "hi"},
              {"role": "user", "content": [{"type": "text", "text": "and "},
                                           {"type": "text", "text": "now?"}]}]
  out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                       temperature=0.5)
  assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
  msg = out.choices[0].message
  assert (msg.role, msg.content) == ("assistant", _words(3))
  assert out.choices[0].finish_reason == "length"
  assert out.usage.completion_tokens == 3 and out.usage.prompt_tokens == 7
  req = fake.submitted[0]
  assert req.chat and req.max_tokens == 3 and req.temperature == 0.5
  assert req.prompt == [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello there"},
                        {"role": "assistant", "content": "hi"},
                        {"role": "user", "content": "and now?"}]


def test_chat_max_completion_tokens_and_default_budget(client, fake):
  client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                 max_completion_tokens=2)
  client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "x"}])
  assert [r.max_tokens for r in fake.submitted] == [2, None]  # chat: no default budget
  assert fake.submitted[1].prompt[0]["role"] == "system"


def test_chat_stream(client, fake):
  fake.script = Script(tokens=4, per_event=3)
  chunks = list(client.chat.completions.create(
      model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
      stream_options={"include_usage": True}))
  assert chunks[0].object == "chat.completion.chunk" and chunks[0].id.startswith("chatcmpl-")
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == _words(4)
  assert chunks[-2].choices[0].finish_reason == "stop"
  assert chunks[-1].usage.completion_tokens == 4


# ----------------------------------------------------------------------------- adapters, models


def test_model_picks_the_adapter(client, fake):
  out = client.completions.create(model="alpha", prompt="x", max_tokens=1)
  assert out.model == "alpha"
  client.completions.create(model="medusa-default", prompt="x", max_tokens=1)
  client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={
      "adapter_id": "beta"})
  client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}],
                                 max_tokens=1)
  assert [r.adapter for r in fake.submitted] == ["alpha", None, "beta", "beta"]


def test_unknown_adapter_is_404(client, http):
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="nope", prompt="x", max_tokens=1)
  assert e.value.code == "model_not_found"
  r = http.post("/v1/chat/completions", json={"model": "nope", "messages": [
      {"role": "user", "content": "x"}], "stream": True})
  _assert_error(r, 404, param="model", code="model_not_found", needle="nope")


def test_adapter_id_and_model_must_agree(http):
  r = http.post("/v1/completions", json={"model": "alpha", "adapter_id": "beta", "prompt": "x"})
  _assert_error(r, 400, param="adapter_id", needle="different adapters")


def test_models(client, http):
  assert [m.id for m in client.models.list()] == [MODEL, "alpha", "beta"]  # the served name
  assert client.models.retrieve("alpha").id == "alpha"
  assert client.models.retrieve("medusa-default").id == "medusa-default"
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("nope")
  assert http.get("/v1/models").json()["object"] == "list"


# ----------------------------------------------------------------------------- refused requests


def test_malformed_json_is_400(http):
  for body in (b'{"prompt": "x",', b"\xff\xfe", b'{"prompt": "x", "temperature": NaN}'):
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    _assert_error(r, 400, code="invalid_json", needle="not valid JSON")
  r = http.post("/v1/chat/completions", json=["not", "an", "object"])
  _assert_error(r, 400, needle="JSON object")


@pytest.mark.parametrize("route, field, value", [
    ("completions", "n", 2),
    ("completions", "logprobs", 1),
    ("completions", "echo", True),
    ("completions", "best_of", 3),
    ("completions", "suffix", "end"),
    ("completions", "presence_penalty", 0.5),
    ("completions", "logit_bias", {"5": 10}),
    ("completions", "frobnicate", 1),
    ("completions", "tools", []),
    ("chat", "n", 2),
    ("chat", "logprobs", True),
    ("chat", "top_logprobs", 2),
    ("chat", "frequency_penalty", 1.0),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat", "tool_choice", "auto"),
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "echo", False),
    ("chat", "frobnicate", None),
])
def test_unsupported_fields_are_refused_by_name(http, fake, route, field, value):
  body = ({"prompt": "x"} if route == "completions"
          else {"messages": [{"role": "user", "content": "x"}]})
  path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
  r = http.post(path, json={"model": MODEL, **body, field: value})
  _assert_error(r, 400, param=field, needle=field)
  assert not fake.submitted


@pytest.mark.parametrize("field, value", [
    ("n", 1), ("n", None), ("presence_penalty", 0), ("frequency_penalty", 0.0),
    ("logprobs", False), ("logprobs", None), ("echo", False), ("best_of", 1), ("logit_bias", {}),
    ("suffix", None), ("user", "u-1"), ("stream", False), ("seed", None), ("stop", None),
])
def test_neutral_values_are_accepted(http, fake, field, value):
  r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1,
                                         field: value})
  assert r.status_code == 200, r.text
  assert len(fake.submitted) == 1


def test_chat_neutral_values_are_accepted(http):
  r = http.post("/v1/chat/completions", json={
      "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
      "response_format": {"type": "text"}, "tools": None, "n": 1, "top_logprobs": None})
  assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param, needle", [
    ({}, "prompt", "required"),
    ({"prompt": ["one", "two"]}, "prompt", "2 prompts in one request"),
    ({"prompt": [[1, 2], [3]]}, "prompt", "one prompt per request"),
    ({"prompt": []}, "prompt", "expected a string"),
    ({"prompt": [1, "a"]}, "prompt", "expected a string"),
    ({"prompt": [True, 2]}, "prompt", "expected a string"),
    ({"prompt": 5}, "prompt", "expected a string"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "expected an integer"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "expected an integer"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "expected a number"),
    ({"prompt": "x", "temperature": True}, "temperature", "expected a number"),
    ({"prompt": "x", "top_p": [1]}, "top_p", "expected a number"),
    ({"prompt": "x", "seed": 1.5}, "seed", "expected an integer"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "stop": [1]}, "stop", "list of strings"),
    ({"prompt": "x", "stop": ""}, "stop", "empty"),
    ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed with stream=true"),
    ({"prompt": "x", "stream": True, "stream_options": {"foo": 1}}, "stream_options.foo",
     "unknown"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage",
     "true or false"),
    ({"prompt": "x", "model": 3}, "model", "expected a string"),
    ({"prompt": "x", "user": 3}, "user", "expected a string"),
])
def test_bad_completion_fields_name_the_field(http, fake, body, param, needle):
  r = http.post("/v1/completions", json=body)
  _assert_error(r, 400, param=param, needle=needle)
  assert not fake.submitted


@pytest.mark.parametrize("body, param, needle", [
    ({}, "messages", "required"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "role and content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "expected one of"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name",
     "unsupported"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "expected a"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", "only text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
      "max_completion_tokens": 4}, "max_completion_tokens", "disagrees"),
])
def test_bad_chat_fields_name_the_field(http, fake, body, param, needle):
  r = http.post("/v1/chat/completions", json=body)
  _assert_error(r, 400, param=param, needle=needle)
  assert not fake.submitted


def test_request_errors_of_the_scheduler_are_400(client, fake):
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=MODEL, prompt="", max_tokens=1)
  assert "prompt: empty" in e.value.message
  fake.script = Script(submit_error=RequestError("temperature=-1: expected >= 0 (0 = greedy)"))
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=MODEL, prompt="x", temperature=-1)
  assert "temperature=-1" in e.value.message


@pytest.mark.parametrize("error, code", [(OverloadedError("queue full (256 requests)"),
                                          "overloaded"),
                                         (ShuttingDownError("shutting down"), "shutting_down")])
def test_overloaded_and_shutting_down_are_503(http, fake, error, code):
  fake.script = Script(submit_error=error)
  for stream in (False, True):
    r = http.post("/v1/completions", json={"prompt": "x", "stream": stream})
    _assert_error(r, 503, code=code, needle=str(error))
  if code == "overloaded":
    assert r.headers["retry-after"] == "1"


def test_overloaded_through_the_client(client, fake):
  fake.script = Script(submit_error=OverloadedError("queue full"))
  with pytest.raises(openai.InternalServerError) as e:
    client.completions.create(model=MODEL, prompt="x")
  assert e.value.status_code == 503


def test_unexpected_errors_are_500(http, fake):
  fake.script = Script(submit_error=KeyError("internal detail"))
  r = http.post("/v1/completions", json={"prompt": "x"})
  _assert_error(r, 500, code="internal_error", needle="KeyError")
  assert "internal detail" not in r.text


def test_unknown_route_and_method_have_openai_errors(http):
  _assert_error(http.get("/v1/nothing"), 404, code="not_found")
  _assert_error(http.get("/v1/completions"), 405, code="method_not_allowed")


# ----------------------------------------------------------------------------- failures


def test_failure_before_the_first_token_is_an_error_status(client, http, fake):
  fake.script = Script(fail_after=0)
  with pytest.raises(openai.BadRequestError) as e:  # NonFiniteLogitsError is a RequestError
    client.completions.create(model=MODEL, prompt="x")
  assert "NaN" in e.value.message
  r = http.post("/v1/completions", json={"prompt": "x", "stream": True})
  _assert_error(r, 400, needle="NaN")
  fake.script = Script(fail_after=0, error=RuntimeError("device lost"))
  _assert_error(http.post("/v1/completions", json={"prompt": "x", "stream": True}), 500,
                code="internal_error", needle="RuntimeError")


def test_failure_mid_stream_ends_with_an_error_chunk(http, client, fake):
  fake.script = Script(fail_after=3)
  r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                              "stream": True})
  assert r.status_code == 200
  payloads = _sse_payloads(r.text)
  assert payloads[-1] == "[DONE]"
  assert set(payloads[-2]["error"]) == {"message", "type", "param", "code"}
  assert "NaN" in payloads[-2]["error"]["message"]
  contents = [p["choices"][0]["delta"].get("content") for p in payloads[:-2]]
  assert "".join(contents) == _words(3)
  with pytest.raises(openai.APIError, match="NaN"):  # the client raises on the error chunk
    for _ in client.completions.create(model=MODEL, prompt="x", stream=True):
      pass


def test_failure_after_tokens_without_stream_is_an_error_status(http, fake):
  fake.script = Script(fail_after=2, error=RuntimeError("device lost"))
  _assert_error(http.post("/v1/completions", json={"prompt": "x"}), 500, code="internal_error")


def test_server_side_cancel_is_503(http, fake):
  fake.script = Script(hang_after=1)
  with http.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    next(iter(fake.handles.values())).cancel()  # as the scheduler's shutdown(drain=False)
    rest = "\n".join(lines)
  assert '"code":"cancelled"' in rest and rest.rstrip().endswith("data: [DONE]")


# ----------------------------------------------------------------------------- disconnects


def _wait_for(predicate, timeout=5.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def test_streaming_client_that_goes_away_cancels_its_request(url, fake):
  fake.script = Script(tokens=10_000, delay_s=0.01)
  with httpx.stream("POST", f"{url}/v1/completions", timeout=10, json={
      "prompt": "x", "stream": True, "max_tokens": 10_000}) as r:
    for line in r.iter_lines():
      if line.startswith("data: "):
        break
  (rid,) = fake.handles
  finish = fake.wait_finished(rid)
  assert finish.reason.value == "cancelled" and finish.completion_tokens < 10_000


def test_streaming_client_gone_while_no_token_comes(url, fake):
  fake.script = Script(hang_after=2)
  with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=10, json={
      "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
    next(r.iter_lines())
  (rid,) = fake.handles
  assert fake.wait_finished(rid).reason.value == "cancelled"


def test_client_gone_before_the_first_token_cancels(url, fake):
  fake.script = Script(hang_after=0)
  for stream in (True, False):
    with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
      c.post("/v1/completions", json={"prompt": "x", "stream": stream})
  assert len(fake.handles) == 2
  for rid in fake.handles:
    assert fake.wait_finished(rid).reason.value == "cancelled"


def test_non_streaming_client_that_goes_away_cancels_its_request(url, fake):
  fake.script = Script(tokens=10_000, delay_s=0.01)
  with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
    c.post("/v1/completions", json={"prompt": "x", "max_tokens": 10_000})
  (rid,) = fake.handles
  assert fake.wait_finished(rid).reason.value == "cancelled"


# ----------------------------------------------------------------------------- health, metrics


def test_health(http, fake):
  r = http.get("/health")
  assert (r.status_code, r.json()) == (200, {"status": "ok"})
  fake.healthy = False
  assert http.get("/health").status_code == 503


def test_metrics(http, client):
  client.completions.create(model=MODEL, prompt="x", max_tokens=3)
  r = http.get("/metrics")
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
  assert "medusa_jax_requests_started_total" in r.text
  assert 'medusa_jax_requests_finished_total{reason="length"}' in r.text


def test_concurrent_streams_are_independent(url, fake):
  import concurrent.futures
  fake.script = Script(tokens=20, per_event=3, delay_s=0.002)

  def one(i):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
      chunks = c.completions.create(model=MODEL, prompt="x", max_tokens=5 + i, stream=True)
      return "".join(ch.choices[0].text for ch in chunks)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    texts = list(pool.map(one, range(8)))
  assert texts == [_words(5 + i) for i in range(8)]


def test_shutdown_drains_the_scheduler():
  fake = FakeScheduler()
  with live_server(create_app(fake, model_name=MODEL, shutdown_timeout=2.5)) as url:
    assert httpx.get(f"{url}/health").status_code == 200
    assert fake.shutdowns == []
  assert fake.shutdowns == [(True, 2.5)]
