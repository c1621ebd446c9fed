"""The real server: scheduler + slot core + FastAPI on uvicorn, driven by the official openai client.

One server (a tiny Llama with a byte tokenizer, a default V2 adapter and an
adapter directory) serves the whole module, so it compiles once; every test
checks that nothing recompiled since warm-up.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time

import httpx
import numpy as np
import openai
import pytest

from live_server import live_server
from tiny_model import make_tiny_adapter_dir, make_tiny_llama_dir

from medusa_jax.decoding.engine import Engine
from medusa_jax.serving.scheduler import Scheduler
from medusa_jax.serving.server import create_app

CACHE = 160
SLOTS = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(base_url, scheduler, engine, adapter_dir, trace counts after warm-up)."""
  root = tmp_path_factory.mktemp("served")
  make_tiny_llama_dir(root / "tiny-llama", seed=3)
  default = make_tiny_adapter_dir(root / "default-heads", seed=4)
  adapters = root / "adapters"
  make_tiny_adapter_dir(adapters / "alpha", seed=5)
  make_tiny_adapter_dir(adapters / "beta", seed=6)
  make_tiny_adapter_dir(adapters / "two-heads", num_heads=2, seed=7)
  old = os.path.join(make_tiny_adapter_dir(adapters / "version-one", seed=8), "config.json")
  with open(old) as f:
    cfg = json.load(f)
  cfg["version"] = 1
  with open(old, "w") as f:
    json.dump(cfg, f)
  engine = Engine.load(root / "tiny-llama", default, max_cache_len=CACHE, max_tree_rows=4)
  sched = Scheduler.from_engine(engine, num_slots=SLOTS, steps_per_call=3, speculate="tree",
                                adapter_dir=adapters, max_adapters=2, max_queue=64)
  sched.start()
  counts = dict(sched.core.trace_counts)
  app = create_app(sched, model_name=engine.model_name)
  with live_server(app) as url:
    yield url, sched, engine, adapters, counts
  shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def client(served):
  url = served[0]
  return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
def no_recompilation(request):
  """Every test ends with the trace counts of warm-up: nothing recompiled."""
  yield
  if "served" in request.fixturenames:
    sched, counts = request.getfixturevalue("served")[1], request.getfixturevalue("served")[4]
    assert dict(sched.core.trace_counts) == counts


def alone(engine: Engine, prompt, max_tokens: int, *, chat: bool = False):
  """(text, token count) of the request run alone through Engine.generate, greedy."""
  res = engine.generate([prompt], max_tokens, chat=chat)
  return res.texts[0], len(res.tokens[0])


def wait_idle(sched: Scheduler, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while any(j is not None for j in sched._slots) or sched._queue:
    assert time.monotonic() < deadline, "slots still busy"
    time.sleep(0.02)


def test_completion_and_chat_match_the_engine_streaming_or_not(served, client):
  _, _, engine, _, _ = served
  model = engine.model_name
  text, n = alone(engine, "The cat", 12)
  got = client.completions.create(model=model, prompt="The cat", max_tokens=12, temperature=0)
  assert got.choices[0].text == text and got.usage.completion_tokens == n
  assert got.choices[0].finish_reason in ("length", "stop")
  assert got.usage.prompt_tokens == len(engine.encode_prompt("The cat", chat=False))
  pieces = [c.choices[0].text for c in client.completions.create(
      model=model, prompt="The cat", max_tokens=12, temperature=0, stream=True) if c.choices]
  assert "".join(pieces) == text

  chat_text, chat_n = alone(engine, "Hello there", 10, chat=True)
  msgs = [{"role": "user", "content": "Hello there"}]
  got = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
  assert got.choices[0].message.content == chat_text and got.usage.completion_tokens == chat_n
  stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=10,
                                          temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_text


def test_32_concurrent_clients_each_equal_to_the_request_run_alone(served, client):
  _, sched, engine, _, _ = served
  rng = np.random.default_rng(int(time.time()))
  words = ["tree", "jax", "token", "draft", "head", "cache", "slot", "mesh"]
  jobs = []
  for i in range(32):
    prompt = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
    jobs.append(dict(prompt=prompt, max_tokens=int(rng.integers(1, 40)),
                     model=[engine.model_name, "alpha", "beta"][i % 3],
                     temperature=0.0 if i % 4 else 0.9))

  def ask(job):
    return client.completions.create(**job)

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(ask, jobs))
  for job, got in zip(jobs, answers):
    assert got.usage.completion_tokens <= job["max_tokens"]
    if job["temperature"] == 0.0:  # lossless: the adapter changes speed, never the text
      text, n = alone(engine, job["prompt"], job["max_tokens"])
      assert (got.choices[0].text, got.usage.completion_tokens) == (text, n), job
  wait_idle(sched)


def test_bad_requests_fail_alone_with_their_status(served, client):
  url, sched, engine, _, _ = served
  model = engine.model_name
  good = [dict(model=model, prompt=f"good {i}", max_tokens=8, temperature=0) for i in range(4)]
  bad_bodies = [
      (b'{"model": "m", "prompt": "x", ', 400),                                    # malformed
      (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),                # adapter
      (json.dumps({"model": model, "prompt": "x" * (CACHE + 10)}).encode(), 400),  # too long
      (json.dumps({"model": model, "prompt": "x", "max_tokens": -3}).encode(), 400),
      (json.dumps({"model": model, "prompt": "x", "n": 2}).encode(), 400),         # unsupported
      (json.dumps({"model": "version-one", "prompt": "x"}).encode(), 400),         # LoRAX rule
      (json.dumps({"model": "two-heads", "prompt": "x"}).encode(), 400),           # LoRAX rule
  ]

  def post(body):
    return httpx.post(f"{url}/v1/completions", content=body,
                      headers={"content-type": "application/json"}, timeout=60)

  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    good_f = [pool.submit(client.completions.create, **g) for g in good]
    bad_f = [pool.submit(post, body) for body, _ in bad_bodies]
    for (body, status), f in zip(bad_bodies, bad_f):
      r = f.result()
      assert r.status_code == status, (body, r.text)
      assert r.json()["error"]["message"]
    for g, f in zip(good, good_f):
      text, n = alone(engine, g["prompt"], 8)
      assert f.result().choices[0].text == text
  over = post(json.dumps({"model": model, "prompt": "x", "max_tokens": -3}).encode()).json()
  assert over["error"]["param"] == "max_tokens"
  versioned = post(json.dumps({"model": "version-one", "prompt": "x"}).encode()).json()
  assert "Dynamic adapter loading is not supported" in versioned["error"]["message"]
  heads = post(json.dumps({"model": "two-heads", "prompt": "x"}).encode()).json()
  assert "different number of heads" in heads["error"]["message"]
  # The server keeps serving.
  assert client.completions.create(model=model, prompt="after", max_tokens=4).choices
  wait_idle(sched)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, client):
  url, sched, engine, _, _ = served
  body = {"model": engine.model_name, "prompt": "long", "max_tokens": 120, "stream": True,
          "temperature": 0}
  with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if line.startswith("data: {"):
        break  # one chunk read, then the client goes away
  wait_idle(sched)
  metrics = httpx.get(f"{url}/metrics").text
  assert 'medusa_jax_requests_finished_total{reason="cancelled"}' in metrics
  assert "medusa_jax_slots_active 0.0" in metrics
  assert client.completions.create(model=engine.model_name, prompt="still", max_tokens=3).choices


def test_adapters_by_name_are_loaded_and_evicted_without_recompiling(served, client):
  url, sched, engine, adapters, _ = served
  names = [m.id for m in client.models.list().data]
  assert names[0] == engine.model_name and {"alpha", "beta"} <= set(names)
  for name in ("alpha", "beta", "alpha", "beta"):  # one dynamic weight slot: evicts each time
    got = client.completions.create(model=name, prompt="swap", max_tokens=6, temperature=0)
    assert got.choices[0].text == alone(engine, "swap", 6)[0]
    assert sched.pool.slot_of(name) == 1
  make_tiny_adapter_dir(adapters / "gamma", seed=9)  # appears while the server runs
  got = client.completions.create(model="gamma", prompt="new", max_tokens=5, temperature=0)
  assert got.choices[0].text == alone(engine, "new", 5)[0]
  assert "medusa_jax_head_accepted_total" in httpx.get(f"{url}/metrics").text
  assert httpx.get(f"{url}/health").status_code == 200


def test_stop_strings_end_the_text_before_them(served, client):
  _, _, engine, _, _ = served
  full, _ = alone(engine, "Say", 30)
  if len(full) < 6:
    pytest.skip("the random model's text is too short to cut")
  stop = full[3:5]
  got = client.completions.create(model=engine.model_name, prompt="Say", max_tokens=30,
                                  temperature=0, stop=[stop])
  assert got.choices[0].text == full[:full.index(stop)]
  assert got.choices[0].finish_reason == "stop"
  chunks = client.completions.create(model=engine.model_name, prompt="Say", max_tokens=30,
                                     temperature=0, stop=[stop], stream=True)
  assert "".join(c.choices[0].text for c in chunks if c.choices) == full[:full.index(stop)]
