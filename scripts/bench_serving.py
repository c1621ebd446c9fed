"""Serving benchmark: Poisson arrivals of MT-bench prompts through the in-process scheduler.

For each request rate (requests/s, Poisson arrivals; ``inf`` = every request
at once) and each decoding mode -- ``none`` (plain decoding), ``tree``
(Medusa's adaptive tree), optionally ``chain`` (LoRAX's chain of drafts) --
it submits the same prompts at the same arrival times to one
:class:`~medusa_jax.serving.scheduler.Scheduler` per mode (built once, warmed
up, reused across rates; the modes take turns at each rate, so drift of a
shared machine hits them alike) and measures, as a client of the scheduler
sees it:

* TTFT: submission to the first token (queueing + prefill);
* TPOT: ``(e2e - ttft) / (tokens - 1)`` per request (e2e = submission to the
  last token);
* ITL: inter-token latency. Tokens arrive in chunks (K steps per dispatch,
  several tokens per Medusa step); each token of a chunk counts as one gap of
  ``chunk gap / tokens in the chunk`` (as the server's Prometheus histogram
  does). The raw chunk gaps are in the JSON too (``gap_ms``);
* request throughput and output tokens/s over the run (first submission to
  the last finish);
* tokens per decode step (``FinishEvent.accepted_per_step``, token-weighted),
  per-head acceptance, and how many outputs equal plain decoding's (greedy).

For every rate it prints the speculative/plain ratios of output tokens/s and of
p99 ITL. No HTTP (no fastapi, uvicorn or prometheus-client needed): only the
``medusa_jax`` package, numpy and jax. Assets (SmolLM2-135M-Instruct, the
bundled heads, MT-bench ``question.jsonl``) come from the cache
(``$MEDUSA_JAX_HOME``, default ``~/.cache/medusa_jax``; ``medusa-jax fetch``).

Usage (GPU, defaults: bf16, 16 slots, 80 requests, 128 tokens)::

  PYTHONPATH=. python3 scripts/bench_serving.py --out $OUT/bench-serving-h200.json

Small CPU run (a few minutes)::

  PYTHONPATH=. python scripts/bench_serving.py --slots 4 --num-requests 24 \\
      --max-tokens 64 --rates 0.5,2,inf --max-cache-len 512 --out /tmp/serving.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

MODES = ("none", "tree", "chain")
MODE_NAMES = {"none": "plain", "tree": "medusa", "chain": "chain"}


def _log(msg: str) -> None:
  print(f"[bench_serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- what the scheduler reports ---------------------------------------------------------------


class _Recorder:
  """Stands in for ``ServingMetrics`` (no prometheus-client): keeps what one run needs."""

  def __init__(self):
    self.lock = threading.Lock()
    self.dispatches = []     # (tokens, steps, row_steps, seconds)
    self.head_accepts = None
    self.verify_row_steps = 0
    self.max_queue = 0

  def observe_dispatch(self, tokens, steps, row_steps, seconds):
    with self.lock:
      self.dispatches.append((int(tokens), int(steps), int(row_steps), float(seconds)))

  def observe_accepts(self, head_accepts, row_steps):
    with self.lock:
      if self.head_accepts is None:
        self.head_accepts = [0] * len(head_accepts)
      for k, a in enumerate(head_accepts):
        self.head_accepts[k] += int(a)
      self.verify_row_steps += int(row_steps)

  def set_queue_depth(self, n):
    self.max_queue = max(self.max_queue, int(n))

  def __getattr__(self, name):  # request_started, observe_ttft, set_slots, ...: not needed
    if name.startswith("_"):
      raise AttributeError(name)
    return lambda *args, **kwargs: None


def _timed_handle_class():
  """A ``RequestHandle`` that stamps each event with ``perf_counter`` as the scheduler puts it."""
  from medusa_jax.serving.api import RequestHandle

  class TimedHandle(RequestHandle):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.stamps = []  # (perf_counter, event)

    def put(self, event):
      if not self.finished:
        self.stamps.append((time.perf_counter(), event))
      super().put(event)

  return TimedHandle


def _install_timed_handles():
  """Makes the scheduler create timed handles (it builds them in ``Scheduler._check``)."""
  from medusa_jax.serving import scheduler as scheduler_mod
  cls = _timed_handle_class()
  scheduler_mod.RequestHandle = cls
  return cls


def _ensure_timed(handle, timed_cls):
  """``handle``, stamped: a timed handle, else (the package changed) its ``put`` wrapped now.

  A wrapped handle may already hold its first events; they get the time of wrapping.
  """
  if isinstance(handle, timed_cls):
    return handle
  now = time.perf_counter()
  handle.stamps = [(now, e) for e in list(getattr(handle, "_events", []))]
  original = handle.put

  def put(event):
    if not handle.finished:
      handle.stamps.append((time.perf_counter(), event))
    original(event)

  handle.put = put
  return handle


# -- statistics -------------------------------------------------------------------------------


def _pct(values, q):
  return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else None


def _summary_ms(values_s):
  v = [1e3 * x for x in values_s]
  if not v:
    return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
  return {"mean": float(np.mean(v)), "p50": _pct(v, 50), "p90": _pct(v, 90), "p99": _pct(v, 99),
          "n": len(v)}


def _request_stats(t_submit, handle):
  """Per-request timings from the handle's stamped events."""
  from medusa_jax.serving.api import FinishEvent, TokenEvent
  chunks = [(t, len(e.token_ids)) for t, e in handle.stamps
            if isinstance(e, TokenEvent) and e.token_ids]
  finish = next((e for _, e in handle.stamps if isinstance(e, FinishEvent)), None)
  out = {"finish": None if finish is None else str(getattr(finish.reason, "value", finish.reason)),
         "tokens": 0 if finish is None else int(finish.completion_tokens),
         "prompt_tokens": None if finish is None else int(finish.prompt_tokens),
         "accepted_per_step": None if finish is None else float(finish.accepted_per_step),
         "error": None if finish is None or finish.error is None else repr(finish.error)}
  if not chunks:
    out.update(ttft=None, e2e=None, tpot=None, itl=[], gaps=[])
    return out
  ttft = chunks[0][0] - t_submit
  e2e = chunks[-1][0] - t_submit
  tokens = sum(n for _, n in chunks)
  itl, gaps = [], []
  for (t0, _), (t1, n) in zip(chunks, chunks[1:]):
    gaps.append(t1 - t0)
    itl += [(t1 - t0) / n] * n
  out.update(ttft=ttft, e2e=e2e, tpot=(e2e - ttft) / (tokens - 1) if tokens > 1 else None,
             itl=itl, gaps=gaps, t_end=chunks[-1][0])
  return out


# -- one run ----------------------------------------------------------------------------------


def _arrivals(rate: float, n: int, seed: int) -> np.ndarray:
  """Arrival offsets in seconds: the first at 0, then exponential gaps of mean 1/rate."""
  if rate == float("inf"):
    return np.zeros(n)
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
  return np.concatenate([[0.0], np.cumsum(gaps[1:])])


def _request(prompt, args):
  from medusa_jax.serving.api import GenerationRequest
  return GenerationRequest(prompt=prompt, chat=True, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_p=args.top_p)


def run_once(sched, prompts, arrivals, args, timed_cls):
  """Submits ``prompts`` at ``arrivals`` (s from now); waits for all; returns raw per-request data."""
  from medusa_jax.errors import OverloadedError
  sched.metrics = rec = _Recorder()
  handles = [None] * len(prompts)
  submitted = [None] * len(prompts)
  rejected = 0
  t0 = time.perf_counter()
  for i, (prompt, at) in enumerate(zip(prompts, arrivals)):
    delay = t0 + at - time.perf_counter()
    if delay > 0:
      time.sleep(delay)
    t = time.perf_counter()
    try:
      h = sched.submit(_request(prompt, args))
    except OverloadedError:
      rejected += 1
      continue
    handles[i] = _ensure_timed(h, timed_cls)
    submitted[i] = t
  lag = max((s - (t0 + a) for s, a in zip(submitted, arrivals) if s is not None), default=0.0)
  for h in handles:
    if h is not None:
      h.get(timeout=args.request_timeout)
  per = [None if h is None else _request_stats(s, h) for h, s in zip(handles, submitted)]
  for p, h in zip(per, handles):
    if h is not None:
      p["ids"] = h.get(timeout=0)[0]
  return per, rec, t0, rejected, lag


def summarize(per, rec, t0, rejected, lag, reference=None):
  ok = [p for p in per if p is not None and p["ttft"] is not None and p["finish"] != "error"]
  errors = sum(1 for p in per if p is not None and p["finish"] == "error")
  t_end = max((p["t_end"] for p in ok), default=t0)
  duration = max(t_end - t0, 1e-9)
  tokens = sum(p["tokens"] for p in ok)
  # token-weighted tokens per step: sum(tokens - 1) / sum(steps)
  num = sum(p["tokens"] - 1 for p in ok if p["accepted_per_step"])
  den = sum((p["tokens"] - 1) / p["accepted_per_step"] for p in ok if p["accepted_per_step"])
  disp = rec.dispatches
  res = {
      "completed": len(ok), "errors": errors, "rejected": rejected,
      "duration_s": duration, "request_throughput": len(ok) / duration,
      "output_tokens": tokens, "output_tokens_per_s": tokens / duration,
      "ttft_ms": _summary_ms([p["ttft"] for p in ok]),
      "tpot_ms": _summary_ms([p["tpot"] for p in ok if p["tpot"] is not None]),
      "itl_ms": _summary_ms([x for p in ok for x in p["itl"]]),
      "gap_ms": _summary_ms([x for p in ok for x in p["gaps"]]),
      "e2e_ms": _summary_ms([p["e2e"] for p in ok]),
      "tokens_per_step": num / den if den else None,
      "finish_reasons": {r: sum(1 for p in ok if p["finish"] == r)
                         for r in sorted({p["finish"] for p in ok})},
      "dispatches": len(disp),
      "dispatch_ms_mean": 1e3 * float(np.mean([d[3] for d in disp])) if disp else None,
      "max_queue_depth": rec.max_queue,
      "submit_lag_ms": 1e3 * lag,
  }
  if rec.head_accepts and rec.verify_row_steps:
    res["head_acceptance"] = [a / rec.verify_row_steps for a in rec.head_accepts]
  if reference is not None:
    pairs = [(p, r) for p, r in zip(per, reference) if p is not None and r is not None]
    res["same_as_plain"] = sum(p["ids"] == r["ids"] for p, r in pairs)
    res["compared"] = len(pairs)
  return res


# -- setup ------------------------------------------------------------------------------------


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_commit() -> str | None:
  """The checkout's short commit, "+dirty" when the package differs from it (read at start)."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=here, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "../medusa_jax"],
                           capture_output=True, text=True, cwd=here, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return (commit + "+dirty" if dirty else commit) or None


def _questions(path: str | None, limit: int) -> list[str]:
  """First turns of the MT-bench questions, in file order."""
  from medusa_jax.assets import datasets
  if path is None:
    from medusa_jax.assets.cache import asset_paths
    path = str(asset_paths().mtbench_jsonl)
    if not os.path.exists(path):
      from medusa_jax.assets.cache import fetch
      path = str(fetch(quiet=True).mtbench_jsonl)
  turns = [q["turns"][0] for q in datasets.load_mtbench(path) if q.get("turns")]
  return turns[:limit] if limit else turns


def _rates(text: str) -> list[float]:
  out = []
  for part in text.split(","):
    part = part.strip().lower()
    if not part:
      continue
    r = float("inf") if part in ("inf", "infinity", "max") else float(part)
    if not r > 0:
      raise argparse.ArgumentTypeError(f"--rates: expected positive numbers or inf, got {part!r}")
    out.append(r)
  if not out:
    raise argparse.ArgumentTypeError("--rates: empty")
  return out


def _modes(text: str) -> list[str]:
  out = [m.strip().lower() for m in text.split(",") if m.strip()]
  bad = [m for m in out if m not in MODES]
  if bad or not out:
    raise argparse.ArgumentTypeError(f"--modes: expected some of {','.join(MODES)}, got {text!r}")
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description="Serving benchmark: Poisson arrivals of MT-bench prompts through the"
                  " in-process scheduler, plain vs Medusa (TTFT, TPOT, ITL, throughput).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--rates", type=_rates, default="0.5,1,2,4,inf",
                 help="request rates in req/s, comma-separated; inf = all at once")
  p.add_argument("--num-requests", type=int, default=80, help="requests per rate and mode")
  p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request")
  p.add_argument("--modes", type=_modes, default="none,tree",
                 help="speculate modes: none (plain), tree (Medusa), chain (LoRAX)")
  p.add_argument("--slots", type=int, default=16, help="scheduler slots (requests decoded together)")
  p.add_argument("--steps-per-call", type=int, default=None,
                 help="decode steps per dispatch; None: the platform's")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="model dtype; auto = float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--max-cache-len", type=int, default=2048, help="KV cache length per slot")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
  p.add_argument("--warmup-requests", type=int, default=None,
                 help="requests run once per mode before timing; None: --slots")
  p.add_argument("--base", default=None, help="base model dir or id; None: the cached SmolLM2-135M-Instruct")
  p.add_argument("--medusa", default=None, help="heads dir or id; None: the bundled heads")
  p.add_argument("--questions", default=None, help="MT-bench question.jsonl; None: the cached one")
  p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request")
  p.add_argument("--compile-cache", default=None,
                 help="JAX persistent compilation cache dir; None: JAX's own setting"
                      " ($JAX_COMPILATION_CACHE_DIR)")
  p.add_argument("--date", default=None, help="date stamped into the JSON; None: today")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  for name in ("num_requests", "max_tokens", "slots", "max_cache_len"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}: expected >= 1")
  if args.steps_per_call is not None and args.steps_per_call < 1:
    p.error("--steps-per-call: expected >= 1")
  return args


# -- output -----------------------------------------------------------------------------------


def _f(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def print_table(results, modes):
  head = (f"{'rate':>5} {'mode':>6} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9}"
          f" {'TPOT':>6} {'ITL p50':>8} {'ITL p99':>8} {'tok/step':>8} {'=plain':>7}")
  print(head)
  print("-" * len(head))
  for r in results:
    rate = "inf" if r["rate"] == float("inf") else f"{r['rate']:g}"
    for m in modes:
      x = r["modes"][m]
      same = f"{x['same_as_plain']}/{x['compared']}" if "same_as_plain" in x else "-"
      print(f"{rate:>5} {MODE_NAMES[m]:>6} {x['request_throughput']:6.2f}"
            f" {x['output_tokens_per_s']:7.1f} {_f(x['ttft_ms']['p50']):>9}"
            f" {_f(x['ttft_ms']['p99']):>9} {_f(x['tpot_ms']['mean']):>6}"
            f" {_f(x['itl_ms']['p50']):>8} {_f(x['itl_ms']['p99']):>8}"
            f" {_f(x['tokens_per_step'], '.2f'):>8} {same:>7}")
    for m, ratio in r.get("vs_plain", {}).items():
      print(f"{'':>5} {MODE_NAMES[m] + '/plain':>13}: tok/s x{_f(ratio['throughput'], '.2f')},"
            f" p99 ITL x{_f(ratio['itl_p99'], '.2f')}, p50 TTFT x{_f(ratio['ttft_p50'], '.2f')}")
  print("(times in ms; TPOT = mean (e2e - ttft) / (tokens - 1); ITL = chunk gap / tokens in"
        " chunk, per token)")


def _jsonable(x):
  """``x`` with infinite floats (the ``inf`` rate) as the string "inf" (strict JSON)."""
  if isinstance(x, float) and x == float("inf"):
    return "inf"
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


# -- main -------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  commit = _git_commit()  # now: the package imported below is this one, not a later checkout's
  import jax
  import jax.numpy as jnp
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)

  from medusa_jax.decoding.engine import Engine
  from medusa_jax.decoding.requests import encode_prompt
  from medusa_jax.serving.scheduler import Scheduler

  backend = jax.default_backend()
  dev = jax.devices()[0]
  dtype_name = args.dtype if args.dtype != "auto" else (
      "float32" if backend == "cpu" else "bfloat16")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  timed_cls = _install_timed_handles()

  t = time.perf_counter()
  eng = Engine.load(args.base, args.medusa, dtype=dtype, max_cache_len=args.max_cache_len,
                    notice=_log)
  _log(f"engine loaded in {time.perf_counter() - t:.1f} s ({dtype_name}, {backend},"
       f" {dev.device_kind})")

  scheds, policy_s = {}, {}
  for m in args.modes:
    t = time.perf_counter()  # "tree" under the measured policy times its candidates here
    scheds[m] = Scheduler.from_engine(eng, num_slots=args.slots,
                                      steps_per_call=args.steps_per_call, speculate=m,
                                      max_queue=max(1024, args.num_requests),
                                      metrics=_Recorder())
    policy_s[m] = time.perf_counter() - t

  # prompts that fit every mode's cache (prompt + max_tokens + tree nodes <= cache length)
  questions = _questions(args.questions, 0)
  fits = []
  for q in questions:
    n = len(encode_prompt(q, eng.context, chat=True, index=None))
    if all(s.core.max_new_tokens(n) >= args.max_tokens for s in scheds.values()):
      fits.append((q, n))
  if not fits:
    raise SystemExit("no MT-bench prompt fits --max-cache-len with --max-tokens; raise the"
                     " cache length")
  if len(fits) < len(questions):
    _log(f"{len(questions) - len(fits)} of {len(questions)} questions do not fit the cache;"
         " left out")
  prompts = [fits[i % len(fits)][0] for i in range(args.num_requests)]
  prompt_lens = [fits[i % len(fits)][1] for i in range(args.num_requests)]

  startup = {}
  warm_n = args.slots if args.warmup_requests is None else args.warmup_requests
  for m, s in scheds.items():
    t = time.perf_counter()
    s.start(progress=lambda msg, m=m: _log(f"{m}: {msg}"))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    if warm_n:
      warm = [fits[-1 - i % len(fits)][0] for i in range(warm_n)]  # the other end of the file
      run_once(s, warm, np.zeros(len(warm)), args, timed_cls)
    startup[m] = {"policy_s": policy_s[m], "tree_policy": eng.config.tree_policy,
                  "compile_s": compile_s, "warmup_s": time.perf_counter() - t,
                  "table": s.core.table.describe(), "steps_per_call": s.core.steps_per_call,
                  "nodes": s.core.nodes}
    _log(f"{m}: started in {compile_s:.1f} s, {warm_n} warm-up requests in"
         f" {startup[m]['warmup_s']:.1f} s; speculation: {startup[m]['table']}")

  results = []
  for ri, rate in enumerate(args.rates):
    arrivals = _arrivals(rate, args.num_requests, args.seed + ri)
    entry = {"rate": rate, "modes": {}}
    raw = {}
    for m in args.modes:
      _log(f"rate {rate:g} req/s, {m}: {args.num_requests} requests")
      per, rec, t0, rejected, lag = run_once(scheds[m], prompts, arrivals, args, timed_cls)
      raw[m] = per
      ref = raw.get("none") if m != "none" else None
      entry["modes"][m] = summarize(per, rec, t0, rejected, lag, reference=ref)
      x = entry["modes"][m]
      _log(f"  {x['output_tokens_per_s']:.1f} tok/s, {x['request_throughput']:.2f} req/s,"
           f" TTFT p50 {_f(x['ttft_ms']['p50'])} ms, ITL p99 {_f(x['itl_ms']['p99'])} ms")
    if "none" in entry["modes"]:
      base = entry["modes"]["none"]
      entry["vs_plain"] = {
          m: {"throughput": _ratio(x["output_tokens_per_s"], base["output_tokens_per_s"]),
              "itl_p99": _ratio(x["itl_ms"]["p99"], base["itl_ms"]["p99"]),
              "ttft_p50": _ratio(x["ttft_ms"]["p50"], base["ttft_ms"]["p50"]),
              "tpot_mean": _ratio(x["tpot_ms"]["mean"], base["tpot_ms"]["mean"])}
          for m, x in entry["modes"].items() if m != "none"}
    results.append(entry)

  for s in scheds.values():
    s.shutdown(drain=True, timeout=60)

  print_table(results, args.modes)
  if args.out:
    doc = {
        "benchmark": "serving",
        "date": args.date or datetime.date.today().isoformat(),
        "device": {"backend": backend, "device_kind": dev.device_kind,
                   "num_devices": jax.device_count(), "cpu": _cpu_name(),
                   "cpu_count": os.cpu_count()},
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "dtype": dtype_name,
        "args": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                 for k, v in vars(args).items()},
        "prompts": {"source": "MT-bench first turns (chat template)",
                    "distinct": len(set(prompts)), "left_out": len(questions) - len(fits),
                    "prompt_tokens_mean": float(np.mean(prompt_lens)),
                    "prompt_tokens_max": int(max(prompt_lens))},
        "startup": startup,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(_jsonable(doc), f, indent=1, allow_nan=False, default=str)
      f.write("\n")
    _log(f"wrote {args.out}")


if __name__ == "__main__":
  main()
