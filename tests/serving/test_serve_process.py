"""End to end: `medusa-jax serve` as its own process with SmolLM2 and the bundled heads.

The official openai client talks to it on 127.0.0.1; its greedy answers equal
``Engine.generate`` on the same model in this process; Ctrl-C (SIGINT) shuts
it down gracefully (exit status 0, or 130 as after any Ctrl-C).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from medusa_jax.assets import cache as assets
from medusa_jax.errors import AssetError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = 128


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm2_server():
  try:
    assets.fetch(quiet=True)
  except AssetError as e:
    pytest.skip(f"SmolLM2 assets unavailable: {e}")
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "medusa_jax", "serve", "--port", str(port), "--slots", "2",
         "--max-cache-len", str(CACHE), "--steps-per-call", "2", "--speculate", "chain",
         "--shutdown-timeout", "20"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines: queue.Queue = queue.Queue()
  log: list[str] = []
  threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
  deadline = time.monotonic() + 400
  while True:
    try:
      line = lines.get(timeout=1)
    except queue.Empty:
      line = ""
    log.append(line)
    if line.startswith("serving "):
      break
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail("medusa-jax serve did not start:\n" + "".join(log[-40:]))
  yield f"http://127.0.0.1:{port}", proc, line
  if proc.poll() is None:
    proc.kill()


def test_serve_process_answers_the_openai_client_like_the_engine(smollm2_server):
  url, proc, ready = smollm2_server
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
  model = client.models.list().data[0].id
  assert model in ready
  question = "Name a primary color."
  stream = client.chat.completions.create(
      model=model, messages=[{"role": "user", "content": question}], max_tokens=24,
      temperature=0, stream=True, stream_options={"include_usage": True})
  chunks = list(stream)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  usage = chunks[-1].usage

  from medusa_jax.decoding.engine import Engine
  engine = Engine.load(max_cache_len=CACHE)
  want = engine.generate([question], 24, chat=True)
  assert text == want.texts[0]
  assert usage.completion_tokens == len(want.tokens[0])

  proc.send_signal(signal.SIGINT)  # Ctrl-C: graceful shutdown, then the shell's 128 + SIGINT
  assert proc.wait(timeout=60) in (0, 128 + signal.SIGINT)
