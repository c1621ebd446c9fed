"""``medusa-jax serve``: flags, fail-fast checks, and a whole run over a fake scheduler."""

from __future__ import annotations

import queue
import socket
import sys
import threading
import types

import httpx
import openai
import pytest

from medusa_jax.app import main as cli
from medusa_jax.app import serve
from serving.fake_scheduler import FakeScheduler


def _one_line_error(capsys, *needles):
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--slots", "0"], "--slots: expected an integer >= 1, got '0'"),
    (["--max-queue", "x"], "--max-queue: expected an integer >= 1"),
    (["--max-adapters", "-1"], "--max-adapters"),
    (["--steps-per-call", "0"], "--steps-per-call"),
    (["--port", "70000"], "expected a port in 0..65535"),
    (["--shutdown-timeout", "-3"], "expected seconds >= 0"),
    (["--speculate", "wide"], "--speculate"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, needle):
  assert cli.main(["serve", *argv]) == 2
  _one_line_error(capsys, "medusa-jax serve", needle)


def test_missing_serve_packages_name_the_extra(capsys, monkeypatch):
  monkeypatch.setattr(serve, "SERVE_PACKAGES", ("uvicorn", "no_such_module_for_serve"))
  assert cli.main(["serve"]) == 2
  _one_line_error(capsys, "no_such_module_for_serve", "pip install 'medusa_jax[serve]'")


def test_adapter_dir_must_be_a_directory(capsys, tmp_path):
  assert cli.main(["serve", "--adapter-dir", str(tmp_path / "none")]) == 2
  _one_line_error(capsys, "--adapter-dir", "no such directory")
  (tmp_path / "file").write_text("x")
  assert cli.main(["serve", "--adapter-dir", str(tmp_path / "file")]) == 2
  _one_line_error(capsys, "not a directory")


def test_a_port_in_use_fails_before_loading(capsys, monkeypatch):
  monkeypatch.setattr(serve, "load_engine", lambda *a, **k: pytest.fail("engine loaded"))
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert cli.main(["serve", "--port", str(port)]) == 2
  _one_line_error(capsys, f"--port {port}", "cannot listen")


def test_bad_host_is_one_line(capsys):
  assert cli.main(["serve", "--host", "no such host.invalid"]) == 2
  _one_line_error(capsys, "--host")


def test_compilation_cache_goes_under_the_home(monkeypatch, tmp_path):
  import jax
  monkeypatch.setenv("MEDUSA_JAX_HOME", str(tmp_path))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  before = jax.config.jax_compilation_cache_dir
  try:
    assert serve.enable_compilation_cache() == str(tmp_path / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert serve.enable_compilation_cache() == str(tmp_path / "mine")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_serve_runs_the_scheduler_behind_the_app(monkeypatch, tmp_path):
  """The whole command, in a thread, over a fake scheduler and no engine."""
  engine = object()
  fake = FakeScheduler(model="smol-default")
  made = {}

  class Scheduler:
    @classmethod
    def from_engine(cls, eng, **kwargs):
      made.update(kwargs, engine=eng)
      return fake

  module = types.ModuleType("medusa_jax.serving.scheduler")
  module.Scheduler = Scheduler
  monkeypatch.setitem(sys.modules, "medusa_jax.serving.scheduler", module)
  monkeypatch.setattr(serve, "load_engine", lambda ns, notice: engine)
  monkeypatch.setattr(serve, "enable_compilation_cache", lambda: str(tmp_path / "jax_cache"))
  servers, urls, lines = [], queue.Queue(), []
  real = serve.make_server

  def make_server(*args, **kwargs):
    # The ready line is kept here, not printed: the command runs in a thread that
    # may outlive a captured stdout.
    ready = lambda u: (lines.append(f"ready {u}"), urls.put(u))
    servers.append(real(*args, **kwargs, ready=ready))
    return servers[-1]

  monkeypatch.setattr(serve, "make_server", make_server)
  (tmp_path / "adapters").mkdir()
  argv = ["serve", "--port", "0", "--slots", "3", "--steps-per-call", "2", "--speculate",
          "chain", "--max-queue", "9", "--max-adapters", "2", "--adapter-dir",
          str(tmp_path / "adapters"), "--shutdown-timeout", "2"]
  rc = []
  thread = threading.Thread(target=lambda: rc.append(cli.main(argv)), daemon=True)
  thread.start()
  url = urls.get(timeout=20)
  try:
    assert fake.started
    log = made.pop("log")
    assert callable(log)  # where the policy's timing lines go (stderr)
    assert made == {"engine": engine, "num_slots": 3, "steps_per_call": 2, "speculate": "chain",
                    "adapter_dir": str(tmp_path / "adapters"), "max_adapters": 2,
                    "max_queue": 9, "policy": None}
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
      assert [m.id for m in client.models.list()] == ["smol-default", "alpha", "beta"]
      out = client.completions.create(model="smol-default", prompt="hi", max_tokens=3)
      assert out.choices[0].text == "w0 w1 w2 "
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
  finally:
    servers[0].should_exit = True
    thread.join(20)
  assert rc == [0]
  assert fake.shutdowns == [(True, 2.0)]
  assert lines and lines[0].startswith("ready http://127.0.0.1:")


def test_ready_line_names_the_model(capsys):
  fake = FakeScheduler()
  with serve.bind("127.0.0.1", 0) as sock:
    port = sock.getsockname()[1]
    server = serve.make_server(fake, sock, model_name="the-model", shutdown_timeout=1)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(2000):
      if server.started or started.wait(0.01):
        break
    server.should_exit = True
    thread.join(10)
  assert server.started and fake.shutdowns == [(True, 1)]
  assert capsys.readouterr().out == f"serving the-model on http://127.0.0.1:{port}\n"
