"""The scheduler, the slot core and the adapter pool, without HTTP (tiny random model)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_files import random_v2_heads
from tiny_model import make_tiny_adapter_dir

from medusa_jax.adapters.weights import load_medusa_adapter
from medusa_jax.decoding import tree as tree_mod
from medusa_jax.decoding.engine import Engine
from medusa_jax.errors import (AdapterLoadError, AdapterNotFoundError, ConfigError,
                               OverloadedError, RequestError, ShuttingDownError)
from medusa_jax.models.llama import Llama, LlamaConfig
from medusa_jax.serving.adapters import AdapterPool
from medusa_jax.serving.api import FinishReason, GenerationRequest
from medusa_jax.serving.scheduler import Scheduler, _find_stop, _safe_length
from medusa_jax.serving.slots import SlotCore, speculation_table


@pytest.fixture(scope="module")
def engine():
  cfg = LlamaConfig.tiny(eos_token_ids=())
  llama = Llama(cfg, rngs=nnx.Rngs(21))
  return Engine(llama, None, random_v2_heads(cfg, 3, seed=22), max_cache_len=96)


@pytest.fixture(scope="module")
def running(engine):
  """A started scheduler: 2 slots, LoRAX's chain, 2 steps per call."""
  sched = Scheduler.from_engine(engine, num_slots=2, steps_per_call=2, speculate="chain",
                                max_queue=3).start()
  yield sched
  sched.shutdown(drain=False, timeout=10)


def ids_request(n: int, max_tokens: int, seed: int = 0, **kw) -> GenerationRequest:
  rng = np.random.default_rng(seed)
  return GenerationRequest(prompt=[int(t) for t in rng.integers(0, 64, n)],
                           max_tokens=max_tokens, temperature=0.0, **kw)


# ----------------------------------------------------------------------------- speculation table


def test_chain_table_follows_loraxs_guard_per_occupancy():
  table = speculation_table("chain", 8, 3, max_tree_rows=64, max_batch_size=12)
  # B * (n + 1) <= 12: up to 3 busy slots speculate, more decode plainly.
  assert [table.tree_for(a) is not None for a in range(1, 9)] == [True] * 3 + [False] * 5
  assert table.carrier.choices == tree_mod.chain_choices(3)


def test_tree_table_shrinks_with_occupancy_and_every_tree_is_in_the_carrier():
  table = speculation_table("tree", 16, 5, max_tree_rows=64)
  sizes = [table.tree_for(a).num_nodes for a in range(1, 17)]
  assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
  carried = set(table.carrier.choices)
  assert all(set(t.choices) <= carried for t in table.trees if t is not None)
  assert "busy" in table.describe()
  assert speculation_table("none", 4, 5, max_tree_rows=64).carrier is None
  with pytest.raises(ConfigError, match="no Medusa heads"):
    speculation_table("tree", 4, None, max_tree_rows=64)


def test_slot_core_refuses_bad_sizes(engine):
  table = speculation_table("none", 2, None, max_tree_rows=8)
  for bad in (dict(num_slots=0), dict(cache_len=-1), dict(steps_per_call=True)):
    kw = dict(num_slots=2, cache_len=64, steps_per_call=2) | bad
    with pytest.raises(ConfigError):
      SlotCore(engine.llama, None, table=table, **kw)
  core = SlotCore(engine.llama, None, num_slots=2, cache_len=64, steps_per_call=2, table=table)
  with pytest.raises(ConfigError, match="must fit cache_len"):
    core.prefill([1] * 60, max_new=10)
  with pytest.raises(ConfigError, match="out of range"):
    core.insert(None, core.init_state(), 5)


# ----------------------------------------------------------------------------- stop strings


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab\ufffd", max_size=24),
       stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=3), max_size=3),
       cuts=st.lists(st.integers(0, 24), max_size=6))
def test_streamed_text_never_shows_what_a_stop_string_later_removes(text, stops, cuts):
  """Growing the text piece by piece, what is delivered is always a prefix of the final answer.

  Generation ends at the first delivery whose text holds a stop string (as in
  vLLM: with stops "a" and "baa", "ba" ends at "b" and "baa" never comes), so
  the final answer is that text cut at the stop; it holds no stop string.
  """
  sent, delivered = 0, ""
  for cut in sorted(cuts) + [len(text)]:
    now = text[:cut]
    hit = _find_stop(now, stops, sent)
    if hit is not None:
      final = now[:hit]
      assert final.startswith(delivered) or "\ufffd" in delivered
      assert not any(s in final for s in stops)
      return
    upto = len(now) if cut == len(text) else _safe_length(now, stops)
    sent = max(sent, upto)
    assert now[:sent].startswith(delivered)
    delivered = now[:sent]
  assert delivered == text and not any(s in text for s in stops)


# ----------------------------------------------------------------------------- the scheduler


def test_greedy_requests_equal_the_engine_and_nothing_recompiles(running, engine):
  counts = dict(running.core.trace_counts)
  reqs = [ids_request(int(n), int(m), seed=i) for i, (n, m) in
          enumerate([(3, 9), (17, 1), (40, 20), (5, 33), (1, 4)])]
  handles = []
  for r in reqs:
    while True:
      try:
        handles.append(running.submit(r))
        break
      except OverloadedError:
        time.sleep(0.05)
  for r, h in zip(reqs, handles):
    ids, _, fin = h.get(timeout=60)
    assert ids == engine.generate([list(r.prompt)], r.max_tokens).tokens[0]
    assert fin.reason is FinishReason.LENGTH and fin.completion_tokens == r.max_tokens
    assert fin.prompt_tokens == len(r.prompt)
  assert dict(running.core.trace_counts) == counts


def test_submit_checks_the_request_and_names_the_field(running):
  cases = [
      (ids_request(3, 0), "max_tokens"),
      (ids_request(3, 200), "max_tokens"),
      (ids_request(95, None), "prompt"),
      (ids_request(3, 4, seed=1, stop=("x",) * 17), "stop"),
      (GenerationRequest(prompt=[1, 2], max_tokens=3, temperature=-1.0), "temperature"),
      (GenerationRequest(prompt=[1, 2], max_tokens=3, top_p=0.0), "top_p"),
      (GenerationRequest(prompt=[1, 2], max_tokens=3, seed=7), "seed"),
      (GenerationRequest(prompt=[1, 10**6], max_tokens=3), "prompt"),
      (GenerationRequest(prompt=[], max_tokens=3), "prompt"),
  ]
  for request, param in cases:
    with pytest.raises(RequestError) as info:
      running.submit(request)
    assert info.value.param == param, (request, info.value)
  with pytest.raises(RequestError, match="stop strings need a tokenizer"):
    running.submit(ids_request(3, 4, stop=("a",)))
  with pytest.raises(AdapterNotFoundError):
    running.submit(ids_request(3, 4, adapter="../etc"))


def test_a_full_queue_answers_overloaded_and_cancelled_requests_free_their_places(running):
  handles = []
  with pytest.raises(OverloadedError, match="overloaded"):
    for i in range(50):  # 2 slots + a queue of 3
      handles.append(running.submit(ids_request(4, 60, seed=i)))
  assert 5 <= len(handles) < 50
  for h in handles:
    h.cancel()
  for h in handles:
    _, _, fin = h.get(timeout=60)
    assert fin.reason in (FinishReason.CANCELLED, FinishReason.LENGTH)
  assert any(h.get()[2].reason is FinishReason.CANCELLED for h in handles)
  deadline = time.monotonic() + 30
  while any(j is not None for j in running._slots):
    assert time.monotonic() < deadline
    time.sleep(0.02)
  ids, _, fin = running.submit(ids_request(2, 3)).get(timeout=60)  # still serving
  assert len(ids) == 3


def test_shutdown_drains_or_cancels_and_then_refuses(engine):
  sched = Scheduler.from_engine(engine, num_slots=2, steps_per_call=2, speculate="none")
  with pytest.raises(ShuttingDownError):
    sched.submit(ids_request(2, 2))  # not started
  sched.start(warmup=False)
  drained = [sched.submit(ids_request(3, 5, seed=i)) for i in range(3)]
  sched.shutdown(drain=True, timeout=60)
  assert all(h.get(timeout=1)[2].reason is FinishReason.LENGTH for h in drained)
  with pytest.raises(ShuttingDownError):
    sched.submit(ids_request(2, 2))
  sched.shutdown()  # twice is fine

  sched = Scheduler.from_engine(engine, num_slots=1, steps_per_call=1, speculate="none")
  sched.start(warmup=False)
  h = sched.submit(ids_request(3, 80))
  sched.shutdown(drain=False, timeout=10)
  assert h.get(timeout=1)[2].reason is FinishReason.CANCELLED


# ----------------------------------------------------------------------------- the adapter pool


def test_pool_evicts_the_least_recently_used_unpinned_adapter(tmp_path):
  d = make_tiny_adapter_dir(tmp_path / "default", seed=1)
  for name, seed in (("a", 2), ("b", 3), ("c", 4)):
    make_tiny_adapter_dir(tmp_path / "lib" / name, seed=seed)
  updates = []
  pool = AdapterPool(load_medusa_adapter(d), max_adapters=3, adapter_dir=tmp_path / "lib",
                     default_name="base")
  pool.on_update = updates.append
  assert pool.names() == ["base", "a", "b", "c"]
  sa, sb = pool.acquire("a"), pool.acquire("b")
  assert {sa, sb} == {1, 2} and len(updates) == 2
  assert pool.acquire("c") is None  # both dynamic slots held
  pool.release(sa)
  assert pool.acquire("c") == sa and pool.slot_of("a") is None
  want = load_medusa_adapter(tmp_path / "lib" / "c").model.medusa.kernel[...]
  np.testing.assert_array_equal(np.asarray(pool.heads.fused_w[sa]), np.asarray(want))
  assert pool.acquire("base") == 0 and pool.acquire(None) == 0
  for bad in ("../x", ".hidden", "a/b", "missing"):
    with pytest.raises(AdapterNotFoundError):
      pool.check(bad)


def test_pool_refuses_what_lorax_refuses(tmp_path):
  d = make_tiny_adapter_dir(tmp_path / "default", seed=1)
  make_tiny_adapter_dir(tmp_path / "lib" / "two", num_heads=2)
  old = make_tiny_adapter_dir(tmp_path / "lib" / "old")
  with open(os.path.join(old, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(old, "config.json"), "w") as f:
    json.dump(cfg | {"version": 1}, f)
  broken = make_tiny_adapter_dir(tmp_path / "lib" / "broken")
  with open(os.path.join(broken, "model.safetensors"), "wb") as f:
    f.write(b"not a safetensors file")
  pool = AdapterPool(load_medusa_adapter(d), max_adapters=2, adapter_dir=tmp_path / "lib")
  with pytest.raises(AdapterLoadError, match="different number of heads"):
    pool.acquire("two")
  with pytest.raises(AdapterLoadError, match="Dynamic adapter loading is not supported"):
    pool.acquire("old")
  with pytest.raises(AdapterLoadError, match="broken"):
    pool.acquire("broken")
  assert pool.acquire(None) == 0  # the default still serves
  with pytest.raises(ConfigError, match="not a directory"):
    AdapterPool(load_medusa_adapter(d), adapter_dir=tmp_path / "nope")
  with pytest.raises(ConfigError, match="need a default"):
    AdapterPool(None, adapter_dir=tmp_path / "lib")


def test_a_measured_policy_sets_the_tree_per_occupancy_plain_included(engine):
  from medusa_jax.decoding.policy import SpeculationPolicy
  chain = tree_mod.chain_choices(3)
  small = ((0,), (1,), (0, 0))
  # At 1 busy slot the chain is cheap enough to win; from 2 on, plain.
  policy = SpeculationPolicy(candidates=(None, chain, small), batch_sizes=(1, 2),
                             step_times=((1.0, 1.05, 1.5), (1.0, 8.0, 8.0)),
                             acceptance=((0.9,) * 4,) * 3)
  sched = Scheduler.from_engine(engine, num_slots=3, steps_per_call=2, speculate="tree",
                                policy=policy)
  table = sched.core.table
  assert table.tree_for(1).choices == chain
  assert table.tree_for(2) is None and table.tree_for(3) is None


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab é€😀\n", min_size=1, max_size=30),
       cuts=st.lists(st.integers(1, 80), max_size=8))
def test_incremental_text_is_always_a_prefix_of_the_whole_decode(text, cuts):
  """Decoding a short window per delivery gives the text of decoding every id at once."""
  from tiny_model import _byte_tokenizer
  from medusa_jax.serving.api import RequestHandle
  from medusa_jax.serving.scheduler import _Job
  tok, _ = _byte_tokenizer()
  ids = tok.encode(text).ids
  sched = Scheduler.__new__(Scheduler)
  sched.tokenizer = tok
  job = _Job(handle=RequestHandle("r", 1), request=GenerationRequest(prompt=[1]), prompt=(1,),
             max_new=len(ids), t_submit=0.0)
  for cut in sorted(set(c for c in cuts if c < len(ids))) + [len(ids)]:
    job.ids = list(ids[:cut])
    sched._extend_text(job)
    assert tok.decode(ids).startswith(job.text)
  assert job.text == tok.decode(ids)
