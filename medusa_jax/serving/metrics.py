"""Prometheus metrics of the server: requests, latency, throughput and Medusa acceptance.

:class:`ServingMetrics` owns its ``CollectorRegistry`` (so two servers, or two
tests, in one process never share counters); ``GET /metrics`` prints it with
``prometheus_client.generate_latest``. The scheduler calls the ``observe_*`` /
``set_*`` methods from its thread (prometheus-client metrics are thread-safe).

Every name starts with ``medusa_jax_``; counters get prometheus-client's
``_total`` suffix. Ratios are left to the query, as Prometheus prefers:

* tokens per decode step (all time): ``generated_tokens_total / decode_row_steps_total``;
* acceptance of head k: ``head_accepted_total{head="k"} / verify_row_steps_total``
  (heads count from 0: head k drafts the token k + 1 places after the verified one).
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "medusa_jax_"

# Latency buckets in seconds: sub-millisecond CPU steps up to minute-long requests.
_LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
              30.0, 60.0, 120.0)
_E2E_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Tokens per decode step: 1 (plain decoding) up to 1 + n heads (every draft accepted).
_PER_STEP = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
_TOKENS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServingMetrics:
  """The server's metrics, in their own registry.

  Args:
    registry: where to register (default: a new ``CollectorRegistry``).
  """

  def __init__(self, registry: CollectorRegistry | None = None):
    self.registry = CollectorRegistry() if registry is None else registry
    r = self.registry
    n = lambda name: PREFIX + name
    self._started = Counter(n("requests_started"), "Requests admitted by the scheduler.",
                            registry=r)
    self._finished = Counter(n("requests_finished"),
                             "Requests ended, by finish reason (stop, length, cancelled, error).",
                             ["reason"], registry=r)
    self._running = Gauge(n("requests_running"), "Requests admitted and not yet ended.",
                          registry=r)
    self._e2e = Histogram(n("e2e_request_latency_seconds"),
                          "Seconds from submission to the last token.", buckets=_E2E_S,
                          registry=r)
    self._completion = Histogram(n("request_completion_tokens"),
                                 "Tokens generated per finished request.", buckets=_TOKENS,
                                 registry=r)
    self._ttft = Histogram(n("time_to_first_token_seconds"),
                           "Seconds from submission to the first generated token.",
                           buckets=_LATENCY_S, registry=r)
    self._itl = Histogram(n("inter_token_latency_seconds"),
                          "Seconds between consecutive tokens of a request (tokens that arrive"
                          " together share the gap).", buckets=_LATENCY_S, registry=r)
    self._tokens = Counter(n("generated_tokens"), "Tokens generated, all requests.", registry=r)
    self._steps = Counter(n("decode_steps"), "Decode steps dispatched (all slots at once).",
                          registry=r)
    self._row_steps = Counter(n("decode_row_steps"),
                              "Decode steps times active slots (one per slot per step).",
                              registry=r)
    self._dispatch_s = Histogram(n("dispatch_seconds"),
                                 "Seconds per generate dispatch (K steps over all slots).",
                                 buckets=_LATENCY_S, registry=r)
    self._tps = Gauge(n("tokens_per_second"), "Tokens per second of the last dispatch.",
                      registry=r)
    self._per_step = Histogram(n("tokens_per_step"),
                               "Tokens per slot and decode step, one sample per dispatch.",
                               buckets=_PER_STEP, registry=r)
    self._accepted = Counter(n("head_accepted"),
                             "Draft tokens of Medusa head k accepted by verification.",
                             ["head"], registry=r)
    self._verify_steps = Counter(n("verify_row_steps"),
                                 "Slot-steps that verified drafts (acceptance denominator).",
                                 registry=r)
    self._queue = Gauge(n("queue_depth"), "Requests waiting for a slot.", registry=r)
    self._slots_active = Gauge(n("slots_active"), "Decode slots holding a request.", registry=r)
    self._slots_total = Gauge(n("slots_total"), "Decode slots.", registry=r)

  # -- requests
  def request_started(self) -> None:
    """A request was admitted."""
    self._started.inc()
    self._running.inc()

  def request_finished(self, reason: str, completion_tokens: int, e2e_s: float) -> None:
    """A request ended.

    Args:
      reason: its finish reason (``FinishReason`` value: stop, length, cancelled, error).
      completion_tokens: tokens it generated.
      e2e_s: seconds from submission to its end.
    """
    self._finished.labels(reason=str(getattr(reason, "value", reason))).inc()
    self._running.dec()
    self._completion.observe(completion_tokens)
    self._e2e.observe(e2e_s)

  def observe_ttft(self, seconds: float) -> None:
    """Time to first token of one request."""
    self._ttft.observe(seconds)

  def observe_itl(self, seconds: float, count: int = 1) -> None:
    """``count`` tokens of one request arrived together, ``seconds`` after its previous ones.

    Each of them counts as one gap of ``seconds / count`` (a Medusa step that
    accepts 3 tokens in 30 ms is 3 tokens at 10 ms), so the histogram's mean
    is seconds per token.
    """
    if count <= 0:
      return
    gap = seconds / count
    for _ in range(count):  # count <= K * (n + 1): a handful
      self._itl.observe(gap)

  # -- decoding
  def observe_dispatch(self, tokens: int, steps: int, row_steps: int, seconds: float) -> None:
    """One ``generate`` dispatch.

    Args:
      tokens: tokens it generated over all slots.
      steps: decode steps it ran (K, or fewer).
      row_steps: sum over active slots of the steps each took part in.
      seconds: its wall time.
    """
    self._tokens.inc(tokens)
    self._steps.inc(steps)
    self._row_steps.inc(row_steps)
    self._dispatch_s.observe(seconds)
    if seconds > 0:
      self._tps.set(tokens / seconds)
    if row_steps > 0:
      self._per_step.observe(tokens / row_steps)

  def observe_accepts(self, head_accepts: Sequence[int], row_steps: int) -> None:
    """Accepted drafts per head over ``row_steps`` verifying slot-steps.

    Args:
      head_accepts: ``head_accepts[k]`` = drafts of head k accepted.
      row_steps: slot-steps that verified (each could accept one draft per head).
    """
    for k, accepted in enumerate(head_accepts):
      self._accepted.labels(head=str(k)).inc(accepted)
    self._verify_steps.inc(row_steps)

  # -- occupancy
  def set_queue_depth(self, n: int) -> None:
    """Requests waiting for a slot."""
    self._queue.set(n)

  def set_slots(self, active: int, total: int) -> None:
    """Decode slots in use, of ``total``."""
    self._slots_active.set(active)
    self._slots_total.set(total)
