"""``medusa-jax serve``: an OpenAI-compatible HTTP server with continuous batching.

Order of work, so that what can fail fast does: flags, the serve packages
(``pip install 'medusa_jax[serve]'``), the listening socket (a port in use
fails here, before minutes of loading), the engine, the scheduler and its
warm-up (every shape compiled once; JAX's persistent compilation cache under
``$MEDUSA_JAX_HOME/jax_cache`` makes later starts quick), then uvicorn. Ctrl-C
or SIGTERM stops accepting, lets running requests finish for
``--shutdown-timeout`` seconds, then drains and stops the scheduler.
"""

from __future__ import annotations

import argparse
import os
import socket

from medusa_jax.app._flags import SPECULATE_CHOICES, add_engine_flags, load_engine, stderr
from medusa_jax.errors import MedusaError

HELP = "OpenAI-compatible HTTP server (continuous batching, Medusa speculation, adapters)"
EPILOG = """\
examples:
  medusa-jax serve --served-model-name smollm2       # SmolLM2 + bundled heads on 127.0.0.1:8000
  medusa-jax serve --model-dir ~/llama --adapter ~/medusa --adapter-dir ~/adapters --slots 32
  medusa-jax serve --host 0.0.0.0 --port 9000 --speculate chain

then:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 16}'
  # or any OpenAI client: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")

`model` picks the Medusa adapter: the served model's name (see GET /v1/models) is the default
adapter; the name of a subdirectory of --adapter-dir loads that adapter. GET /health, GET /metrics
(Prometheus).
"""

SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _at_least(low: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < low:
      raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value
  parse.__name__ = f"integer >= {low}"
  return parse


def _port(text: str) -> int:
  value = _at_least(0)(text)
  if value > 65535:
    raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
  return value


def _seconds(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
  return value


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
  p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free one)")
  add_engine_flags(p)
  p.add_argument("--adapter-dir", metavar="DIR",
                 help="a directory whose subdirectories are Medusa adapters, loaded by name"
                 " (the request's `model`) when first asked for")
  p.add_argument("--max-adapters", type=_at_least(1), default=4,
                 help="adapter weight slots on the device (default 4)")
  p.add_argument("--slots", type=_at_least(1), default=16,
                 help="decode slots: requests decoded together (default 16)")
  p.add_argument("--steps-per-call", type=_at_least(1), default=None, metavar="K",
                 help="decode steps per jitted call (default: the decoder's)")
  p.add_argument("--speculate", default="tree", choices=SPECULATE_CHOICES,
                 help="none: plain decoding; chain: LoRAX's one draft per head; tree: Medusa's"
                 " candidate tree (default)")
  p.add_argument("--policy", default=None, choices=("budget", "measured"),
                 help="tree per number of busy slots: measured = time the candidate trees on this"
                 " device at start-up (cached under $MEDUSA_JAX_HOME/policy) and pick the most"
                 " expected tokens/s, plain included; budget = the row budget (--max-tree-rows)."
                 " Default: $MEDUSA_JAX_TREE_POLICY, else measured")
  p.add_argument("--max-queue", type=_at_least(1), default=256,
                 help="requests waiting for a slot before new ones get 503 (default 256)")
  p.add_argument("--served-model-name", default=None, metavar="NAME",
                 help="the name clients pass as `model` for the default adapter (default: the"
                 " scheduler's first model name)")
  p.add_argument("--shutdown-timeout", type=_seconds, default=30.0, metavar="S",
                 help="on Ctrl-C/SIGTERM, seconds running requests get to finish (default 30)")
  p.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                 help="uvicorn's log level (default warning)")
  p.add_argument("--access-log", action="store_true", help="log every HTTP request")


def check_serve_packages() -> None:
  """Raises MedusaError naming the extra when a serve package is not installed."""
  import importlib
  missing = []
  for name in SERVE_PACKAGES:
    try:
      importlib.import_module(name)
    except ImportError:  # absent, or installed without what it needs
      missing.append(name)
  if missing:
    raise MedusaError(f"medusa-jax serve needs {', '.join(missing)}: pip install"
                      " 'medusa_jax[serve]'")


def bind(host: str, port: int) -> socket.socket:
  """A socket bound to (host, port): a bad address or a port in use fails here, named."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise MedusaError(f"--host {host!r}: {e.strerror}") from None
  family, kind, proto, _, address = infos[0]
  sock = socket.socket(family, kind, proto)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as e:
    sock.close()
    raise MedusaError(f"--host {host} --port {port}: cannot listen ({e.strerror})") from None
  return sock


def url(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def enable_compilation_cache() -> str:
  """JAX's persistent compilation cache, under ``$MEDUSA_JAX_HOME/jax_cache`` (unless
  ``JAX_COMPILATION_CACHE_DIR`` names another); returns the directory."""
  import jax  # CLI dispatch: JAX loads here
  from medusa_jax.assets.cache import default_home
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_home() / "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def make_server(scheduler, sock: socket.socket, *, model_name: str, shutdown_timeout: float,
                log_level: str = "warning", access_log: bool = False, ready=None):
  """The uvicorn server of the app over ``scheduler``, to be run on ``sock``.

  ``ready(url)`` is called once it accepts connections (default: print
  "serving MODEL on URL"). Its lifespan shutdown drains the scheduler.
  """
  import uvicorn

  from medusa_jax.serving.server import create_app
  app = create_app(scheduler, model_name=model_name, shutdown_timeout=shutdown_timeout)
  config = uvicorn.Config(app, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=max(1, round(shutdown_timeout)))
  ready = ready or (lambda u: print(f"serving {model_name} on {u}", flush=True))

  class Server(uvicorn.Server):
    async def startup(self, sockets=None):
      await super().startup(sockets=sockets)
      if not self.should_exit:
        ready(url(sock))

  return Server(config)


def run(ns: argparse.Namespace) -> int:
  """Loads the engine, starts the scheduler and serves until interrupted."""
  check_serve_packages()
  if ns.adapter_dir is not None and not os.path.isdir(ns.adapter_dir):
    what = "not a directory" if os.path.exists(ns.adapter_dir) else "no such directory"
    raise MedusaError(f"--adapter-dir {ns.adapter_dir}: {what}")
  sock = bind(ns.host, ns.port)
  try:
    cache_dir = enable_compilation_cache()
    engine = load_engine(ns, lambda m: stderr(f"note: {m}"))
    from medusa_jax.serving.scheduler import Scheduler  # CLI dispatch (after the engine: JAX)
    scheduler = Scheduler.from_engine(
        engine, num_slots=ns.slots, steps_per_call=ns.steps_per_call, speculate=ns.speculate,
        adapter_dir=ns.adapter_dir, max_adapters=ns.max_adapters, max_queue=ns.max_queue,
        policy=ns.policy, log=lambda m: stderr(f"{m} (once; cached under $MEDUSA_JAX_HOME/policy)"))
    stderr(f"warming up {ns.slots} slots (compiling; the compilation cache {cache_dir} makes"
           " later starts quicker)")
    scheduler.start()
    model_name = ns.served_model_name or scheduler.model_names()[0]
    server = make_server(scheduler, sock, model_name=model_name,
                         shutdown_timeout=ns.shutdown_timeout, log_level=ns.log_level,
                         access_log=ns.access_log)
    try:
      server.run(sockets=[sock])
    finally:
      if not server.started:  # the lifespan never ran, so it did not stop the scheduler
        scheduler.shutdown(drain=False, timeout=ns.shutdown_timeout)
  finally:
    sock.close()
  return 0 if server.started else 1

