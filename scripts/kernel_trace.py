"""Where a jitted loop's device time goes, kernel by kernel, from a profiler trace.

``trace(run, per=steps)`` calls ``run()`` (compiled and warm already) once under
``jax.profiler.trace``, reads the trace back with ``jax.profiler.ProfileData`` and sums
the device events per HLO op (``hlo_op`` stat; the kernel name where an event has none):

* ``ops``: ``{op: [count, total us]}`` per ``per`` (one step of a loop of ``per`` steps),
  the largest first;
* ``kinds``: the same summed by op kind (the op's name without its ``.N`` suffix,
  ``loop_add_fusion``, ``gemm_fusion``, ``custom-call``, ...);
* ``names``: the same summed by kernel name without its ``_N``/``.N`` suffix (inside a
  CUDA graph every kernel's op is the graph's ``command_buffer``: the names tell them
  apart);
* ``kernels``, ``busy_us``, ``span_us``: events, their summed time, and first start to
  last end, per step (``span - busy`` is the device idle between kernels: launch gaps);
* ``lines``: the trace lines the events came from.

Control-flow ops (``CONTAINERS``), whose events span their bodies' kernels, are left out.

On a GPU the events are the device planes' kernels (CUPTI); on a CPU, where XLA's
thunks run on host threads, the host plane's events that carry an ``hlo_op``. Only the
trace's own per-event timing is used; its overhead shows in ``span_us``, so step times
come from the untraced timings, and this only says how a step's time divides.
"""

from __future__ import annotations

import glob
import re
import tempfile
from collections import defaultdict

_SUFFIX = re.compile(r"(\.\d+)+$")
_NAME_SUFFIX = re.compile(r"([._]\d+)+$")

CONTAINERS = frozenset({"while", "call", "conditional"})
"""Op kinds whose events span their bodies' kernels (XLA:CPU's thunks): not counted."""


def op_kind(name: str) -> str:
  """``loop_add_fusion.12`` -> ``loop_add_fusion``; ``custom-call.3`` -> ``custom-call``."""
  return _SUFFIX.sub("", name)


def _events(profile):
  """(line name, op name, kernel name, start ns, duration ns) of every kernel event in a
  ProfileData."""
  device = [p for p in profile.planes if p.name.startswith("/device:")]
  planes = device or [p for p in profile.planes if p.name.startswith("/host:")]
  for plane in planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        op = stats.get("hlo_op")
        if op is None and not device:
          continue  # host-side events without an op are the runtime's, not kernels
        if op is not None and op_kind(str(op)) in CONTAINERS:
          continue
        yield line.name, str(op or ev.name), str(ev.name), ev.start_ns, ev.duration_ns


def summarize(events, per: int = 1, top: int = 30) -> dict:
  """The summary described in the module docstring, of ``(line, op, kernel name, start_ns,
  dur_ns)``."""
  ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
  names: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
  lines: set[str] = set()
  spans = []
  for line, op, name, start, dur in events:
    for table, key in ((ops, op), (names, _NAME_SUFFIX.sub("", name))):
      table[key][0] += 1
      table[key][1] += dur / 1e3
    lines.add(line)
    spans.append((start, start + dur))
  busy, end = 0.0, float("-inf")
  for s, e in sorted(spans):  # union of intervals: overlapping streams count once
    if e > end:
      busy += e - max(s, end)
      end = e
  kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
  for op, (n, us) in ops.items():
    kinds[op_kind(op)][0] += n
    kinds[op_kind(op)][1] += us
  norm = lambda d: {k: [round(n / per, 2), round(us / per, 3)]  # noqa: E731
                    for k, (n, us) in sorted(d.items(), key=lambda kv: -kv[1][1])[:top]}
  span = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e3 if spans else 0.0
  return {"kernels": round(sum(n for n, _ in ops.values()) / per, 2),
          "busy_us": round(busy / 1e3 / per, 3), "span_us": round(span / per, 3),
          "kinds": norm(kinds), "names": norm(names), "ops": norm(ops),
          "lines": sorted(lines)}


def trace(run, per: int = 1, top: int = 30) -> dict:
  """Calls ``run()`` once under the profiler (it must block until its results are ready)
  and summarizes its device events per ``per`` steps (see :func:`summarize`)."""
  import jax
  from jax.profiler import ProfileData

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      run()
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
      return {"error": "the profiler wrote no trace"}
    return summarize(_events(ProfileData.from_file(files[0])), per=per, top=top)
