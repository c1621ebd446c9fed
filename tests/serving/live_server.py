"""A real uvicorn server for any ASGI app, on 127.0.0.1 and a free port, in a background thread.

    with live_server(create_app(scheduler, model_name="m")) as base_url:
      openai.OpenAI(base_url=f"{base_url}/v1", api_key="x").completions.create(...)

The socket is bound before the server starts (port 0: the kernel picks a free
one), so there is no window in which another process could take the port.
Leaving the block asks the server to exit and runs the app's lifespan shutdown
(the scheduler's ``shutdown``), as Ctrl-C does to ``medusa-jax serve``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import uvicorn


class ServerThread:
  """A uvicorn server running in a daemon thread (see :func:`live_server`)."""

  def __init__(self, app, *, host: str = "127.0.0.1", **config):
    self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind((host, 0))
    self.host, self.port = self.sock.getsockname()[:2]
    config.setdefault("log_level", "warning")
    config.setdefault("timeout_graceful_shutdown", 5)
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, **config))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True, name=f"uvicorn:{self.port}")

  @property
  def base_url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self, timeout: float = 20.0) -> str:
    """Starts the server; returns its base URL once it accepts connections."""
    self.thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if not self.thread.is_alive():
        raise RuntimeError(f"uvicorn on port {self.port} exited during start-up")
      if time.monotonic() > deadline:
        self.stop()
        raise TimeoutError(f"uvicorn on port {self.port} not started after {timeout} s")
      time.sleep(0.01)
    return self.base_url

  def stop(self, timeout: float = 20.0) -> None:
    """Asks the server to exit (graceful shutdown, then lifespan shutdown) and waits."""
    self.server.should_exit = True
    self.thread.join(timeout)
    self.sock.close()
    if self.thread.is_alive():
      raise TimeoutError(f"uvicorn on port {self.port} still running after {timeout} s")


@contextlib.contextmanager
def live_server(app, **config) -> Iterator[str]:
  """Serves ``app`` for the block; yields the base URL (``http://127.0.0.1:PORT``)."""
  server = ServerThread(app, **config)
  server.start()
  try:
    yield server.base_url
  finally:
    server.stop()
