"""ServingMetrics: each method moves the series it names, read back from the Prometheus text."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from medusa_jax.serving.metrics import ServingMetrics


def _samples(metrics: ServingMetrics) -> dict[tuple[str, tuple], float]:
  """(sample name, sorted labels) -> value, parsed from ``generate_latest``."""
  text = generate_latest(metrics.registry).decode()
  out = {}
  for family in text_string_to_metric_families(text):
    for s in family.samples:
      out[(s.name, tuple(sorted(s.labels.items())))] = s.value
  return out


def _value(metrics, name, **labels):
  return _samples(metrics)[("medusa_jax_" + name, tuple(sorted(labels.items())))]


def test_every_name_has_the_prefix_and_registries_are_separate():
  a, b = ServingMetrics(), ServingMetrics()
  a.request_started()
  assert _value(a, "requests_started_total") == 1
  assert _value(b, "requests_started_total") == 0
  assert all(name.startswith("medusa_jax_") for name, _ in _samples(a))


def test_request_lifecycle():
  m = ServingMetrics()
  m.request_started()
  m.request_started()
  assert _value(m, "requests_running") == 2
  m.request_finished("stop", completion_tokens=7, e2e_s=0.3)
  m.request_finished("length", completion_tokens=20, e2e_s=1.7)
  assert _value(m, "requests_running") == 0
  assert _value(m, "requests_finished_total", reason="stop") == 1
  assert _value(m, "requests_finished_total", reason="length") == 1
  assert _value(m, "e2e_request_latency_seconds_count") == 2
  assert _value(m, "e2e_request_latency_seconds_sum") == pytest.approx(2.0)
  assert _value(m, "e2e_request_latency_seconds_bucket", le="0.5") == 1
  assert _value(m, "request_completion_tokens_sum") == 27


def test_finish_reason_may_be_an_enum_member():
  from medusa_jax.serving.api import FinishReason
  m = ServingMetrics()
  m.request_started()
  m.request_finished(FinishReason.CANCELLED, completion_tokens=0, e2e_s=0.01)
  assert _value(m, "requests_finished_total", reason="cancelled") == 1


def test_ttft_and_itl_split_tokens_that_arrive_together():
  m = ServingMetrics()
  m.observe_ttft(0.2)
  m.observe_itl(0.03, count=3)  # one Medusa step, three tokens: three gaps of 10 ms
  m.observe_itl(0.02)
  m.observe_itl(0.5, count=0)  # nothing arrived: nothing observed
  assert _value(m, "time_to_first_token_seconds_count") == 1
  assert _value(m, "time_to_first_token_seconds_sum") == pytest.approx(0.2)
  assert _value(m, "inter_token_latency_seconds_count") == 4
  assert _value(m, "inter_token_latency_seconds_sum") == pytest.approx(0.05)
  assert _value(m, "inter_token_latency_seconds_bucket", le="0.01") == 3


def test_dispatch_throughput_and_tokens_per_step():
  m = ServingMetrics()
  m.observe_dispatch(tokens=30, steps=4, row_steps=12, seconds=0.5)
  assert _value(m, "generated_tokens_total") == 30
  assert _value(m, "decode_steps_total") == 4
  assert _value(m, "decode_row_steps_total") == 12
  assert _value(m, "tokens_per_second") == pytest.approx(60.0)
  assert _value(m, "tokens_per_step_sum") == pytest.approx(2.5)
  assert _value(m, "tokens_per_step_bucket", le="2.5") == 1
  assert _value(m, "tokens_per_step_bucket", le="2.25") == 0
  m.observe_dispatch(tokens=8, steps=4, row_steps=8, seconds=0.1)
  assert _value(m, "generated_tokens_total") == 38
  assert _value(m, "tokens_per_second") == pytest.approx(80.0)  # the last dispatch
  assert _value(m, "dispatch_seconds_count") == 2


def test_an_empty_dispatch_divides_by_nothing():
  m = ServingMetrics()
  m.observe_dispatch(tokens=0, steps=0, row_steps=0, seconds=0.0)
  assert _value(m, "tokens_per_step_count") == 0
  assert _value(m, "tokens_per_second") == 0


def test_head_acceptance_counters_give_the_ratio():
  m = ServingMetrics()
  m.observe_accepts([8, 5, 2], row_steps=10)
  m.observe_accepts([2, 1, 0], row_steps=5)
  steps = _value(m, "verify_row_steps_total")
  assert steps == 15
  rates = [_value(m, "head_accepted_total", head=str(k)) / steps for k in range(3)]
  assert rates == pytest.approx([10 / 15, 6 / 15, 2 / 15])


def test_queue_and_slot_gauges():
  m = ServingMetrics()
  m.set_queue_depth(5)
  m.set_slots(active=3, total=16)
  assert _value(m, "queue_depth") == 5
  assert (_value(m, "slots_active"), _value(m, "slots_total")) == (3, 16)
  m.set_queue_depth(0)
  assert _value(m, "queue_depth") == 0


def test_calls_from_several_threads_are_all_counted():
  m = ServingMetrics()

  def work():
    for _ in range(500):
      m.observe_dispatch(tokens=2, steps=1, row_steps=1, seconds=0.001)

  threads = [threading.Thread(target=work) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert _value(m, "generated_tokens_total") == 4000
