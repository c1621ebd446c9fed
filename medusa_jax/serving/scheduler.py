"""The Scheduler: a FCFS queue in front of the slot core, run by one thread.

Requests are checked when submitted (the decoding layer's validator: prompt
ids, options, a prompt that cannot fit the cache, an unknown adapter), queued
first come first served (a full queue answers ``OverloadedError``), and
admitted into free slots of the running :class:`~medusa_jax.serving.slots.SlotCore`
as slots free up. Each loop iteration:

1. admits queued requests into free slots (prefill + insert; a request whose
   adapter is not resident loads it into a weight slot first, or waits while
   every weight slot is held);
2. frees the slots of cancelled requests and of requests ended on the host
   (a stop string), on the device, in one call;
3. dispatches ``generate`` (K steps) over all slots;
4. while the device works, reads the *previous* dispatch's tokens, turns them
   into text (stop strings, held-back partial characters), and delivers them,
   then the first tokens of the requests admitted in step 1 (their prefills
   ran before this dispatch, so reading them never waits for it).

So the host pays once per K steps and its work overlaps the device's. A
request that fails (its adapter cannot be loaded, its logits turn NaN) ends
alone with ``FinishReason.ERROR``; the others never notice.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
import uuid
from typing import Sequence

import jax

from medusa_jax.decoding.requests import SamplingParams, Speculate, encode_prompt
from medusa_jax.errors import (AdapterNotFoundError, MedusaError, NonFiniteLogitsError,
                               OverloadedError, RequestError, ShuttingDownError)
from medusa_jax.serving.adapters import AdapterPool
from medusa_jax.serving.api import (FinishEvent, FinishReason, GenerationRequest, RequestHandle,
                                    TokenEvent)
from medusa_jax.serving.slots import SlotCore, speculation_table

MAX_STOP_STRINGS = 16


@dataclasses.dataclass(eq=False)
class _Job:
  """A request from submission to its end (host bookkeeping)."""
  handle: RequestHandle
  request: GenerationRequest
  prompt: tuple[int, ...]
  max_new: int
  t_submit: float
  slot: int | None = None
  weight_slot: int | None = None
  ids: list[int] = dataclasses.field(default_factory=list)
  sent: int = 0          # characters of text delivered
  text: str = ""
  # Incremental detokenization: ids[prefix:read] decoded to the end of
  # ``text``; only the window ids[prefix:] is decoded again per delivery.
  prefix: int = 0
  read: int = 0
  t_last: float | None = None
  steps: int = 0
  done: bool = False     # ended on the host (its device row may still run)


class Scheduler:
  """Continuous batching over a :class:`SlotCore`, one background thread.

  Example::

    sched = Scheduler.from_engine(Engine.load(), num_slots=8)
    sched.start()                                  # warms up: compiles everything
    h = sched.submit(GenerationRequest(prompt="Hi!", chat=True, max_tokens=32,
                                       temperature=0.0))
    ids, text, finish = h.get(timeout=60)
    sched.shutdown()
  """

  def __init__(self, core: SlotCore, *, tokenizer=None, context=None, pool: AdapterPool | None,
               model_name: str = "medusa", max_queue: int = 256, metrics=None):
    """Args:
      core: the slot core.
      tokenizer: ``decode(ids) -> str`` (``skip_special_tokens`` honoured when
        it takes it), or None (token-id prompts; texts are empty).
      context: the engine's ``RequestContext`` (vocabulary, template, tokenizer).
      pool: the adapters by name (None: the default heads only).
      model_name: the name that selects the default adapter.
      max_queue: requests waiting beyond the running ones before submit
        answers ``OverloadedError``.
      metrics: a ``ServingMetrics`` (None: a fresh one).
    """
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
      raise RequestError(f"max_queue: expected an integer >= 0, got {max_queue!r}")
    if metrics is None:
      from medusa_jax.serving.metrics import ServingMetrics
      metrics = ServingMetrics()
    self.core = core
    self.tokenizer = tokenizer
    self.context = context
    self.pool = pool
    self.model_name = model_name
    self.max_queue = max_queue
    self.metrics = metrics
    self._queue: collections.deque[_Job] = collections.deque()
    self._slots: list[_Job | None] = [None] * core.num_slots
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._accepting = False
    self._state = None
    self._ids = itertools.count()
    self._rng = jax.random.PRNGKey(core.seed)
    self.error: BaseException | None = None
    self.healthy = False
    self.dispatches = 0
    if pool is not None and pool.heads is not None:
      pool.on_update = core.decoder.replace_heads

  @classmethod
  def from_engine(cls, engine, *, num_slots: int = 16, steps_per_call: int | None = None,
                  speculate: str = "tree", adapter_dir=None, max_adapters: int = 4,
                  max_queue: int = 256, metrics=None, model_name: str | None = None,
                  cache_len: int | None = None, policy=None, log=None) -> "Scheduler":
    """A scheduler over ``engine``'s model, heads, tokenizer and limits.

    Args:
      engine: an :class:`~medusa_jax.decoding.engine.Engine`.
      num_slots: S, requests decoded together.
      steps_per_call: K decode steps per dispatch (None: ``EngineConfig.steps_per_call``).
      speculate: "tree", "chain" or "none" (see ``slots``).
      adapter_dir: directory of adapters loadable by name.
      max_adapters: weight slots, the default's included.
      max_queue: see :class:`Scheduler`.
      metrics: a ``ServingMetrics``.
      model_name: the served model's name (None: from the engine).
      cache_len: L per slot (None: the engine's ``max_cache_len``).
      policy: for "tree", the choice of tree per count of busy slots: a
        ``decoding.policy.SpeculationPolicy`` (or any ``active -> TreeBuffers |
        None``), "measured" (time the candidate trees on this device now, or
        read the times cached under ``$MEDUSA_JAX_HOME/policy``), "budget"
        (the row budget, ``EngineConfig.max_tree_rows``), or None (the
        engine's ``EngineConfig.tree_policy``).
      log: called with a line when the candidate trees are timed.
    """
    speculate = Speculate.parse(speculate)
    if policy is None:
      # On a mesh the candidates are not timed (the timing runs unsharded).
      policy = engine.config.tree_policy if getattr(engine, "mesh", None) is None else "budget"
    if policy == "budget" or speculate is not Speculate.TREE:
      policy = None
    elif policy == "measured":
      policy = measured_policy(engine, num_slots, cache_len or engine.config.max_cache_len,
                               steps_per_call=steps_per_call, log=log)
    if policy is not None and hasattr(policy, "tree_for"):
      policy = policy.tree_for
    default = engine.medusa if speculate is not Speculate.NONE or adapter_dir else None
    name = model_name or getattr(engine, "model_name", None) or "medusa-jax"
    pool = AdapterPool(default, max_adapters=max_adapters, adapter_dir=adapter_dir,
                       default_name=name)
    heads = pool.heads if pool.heads is not None else (
        engine.heads if speculate is not Speculate.NONE else None)
    table = speculation_table(speculate, num_slots, engine.num_heads,
                              max_tree_rows=engine.config.max_tree_rows,
                              tree_choices=engine.config.tree_choices,
                              max_batch_size=engine.max_batch_size, tree_for=policy)
    core = SlotCore(engine.llama, heads, num_slots=num_slots,
                    cache_len=cache_len or engine.config.max_cache_len,
                    steps_per_call=steps_per_call or engine.config.steps_per_call,
                    table=table, eos_ids=engine.eos_ids, cache_dtype=engine.cache_dtype,
                    transpose_lm_head=engine.config.transpose_lm_head,
                    mesh=getattr(engine, "mesh", None))
    return cls(core, tokenizer=engine.tokenizer, context=engine.context, pool=pool,
               model_name=name, max_queue=max_queue, metrics=metrics)

  # -- lifecycle ----------------------------------------------------------------------------

  def start(self, *, warmup: bool = True, progress=None) -> "Scheduler":
    """Compiles everything (``warmup``) and starts the loop thread."""
    if self._thread is not None:
      raise RuntimeError("Scheduler.start: already started")
    if warmup:
      self.core.warmup(progress)
    self._state = self.core.init_state()
    self._thread = threading.Thread(target=self._run, name="medusa-jax-scheduler", daemon=True)
    self._accepting = True
    self.healthy = True
    self.metrics.set_slots(0, self.core.num_slots)
    self._thread.start()
    return self

  def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops admitting, finishes (``drain``) or cancels what runs, and stops the thread.

    Args:
      drain: let queued and running requests finish (up to ``timeout``
        seconds); the rest are cancelled.
      timeout: seconds to wait for draining (None: no limit).
    """
    with self._cond:
      self._accepting = False
      self._cond.notify_all()
    deadline = None if timeout is None else time.monotonic() + timeout
    if drain and self._thread is not None:
      while self._busy() and (deadline is None or time.monotonic() < deadline):
        if not self._thread.is_alive():
          break
        time.sleep(0.01)
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout=None if timeout is None else max(1.0, timeout))
    for job in list(self._queue) + [j for j in self._slots if j is not None]:
      self._finish(job, FinishReason.CANCELLED)
    self._queue.clear()
    self.healthy = False

  def _busy(self) -> bool:
    with self._cond:
      return bool(self._queue) or any(j is not None for j in self._slots)

  # -- requests -----------------------------------------------------------------------------

  def model_names(self) -> list[str]:
    """The served names: the model (the default adapter) first, then adapter names."""
    if self.pool is None:
      return [self.model_name]
    return self.pool.names()

  def submit(self, request: GenerationRequest, *, loop=None) -> RequestHandle:
    """Checks and queues a request; its events arrive on the returned handle.

    Raises:
      RequestError: a bad prompt or option (naming it), a prompt that leaves
        no room in the cache, or a seed (per-request seeds are not supported).
      AdapterNotFoundError: an unknown adapter name.
      OverloadedError: the queue is full.
      ShuttingDownError: the server is shutting down.
    """
    if not isinstance(request, GenerationRequest):
      raise RequestError(f"submit: expected a GenerationRequest, got {type(request).__name__}")
    if not self._accepting:
      raise ShuttingDownError("the server is shutting down (or not started); not accepting"
                              " requests")
    job = self._check(request, loop)
    with self._cond:
      if len(self._queue) >= self.max_queue + self._free_slots():
        raise OverloadedError(f"the server is overloaded: {len(self._queue)} requests queued"
                              f" (max_queue={self.max_queue}); retry later")
      self._queue.append(job)
      self.metrics.set_queue_depth(len(self._queue))
      self._cond.notify_all()
    self.metrics.request_started()
    return job.handle

  def _free_slots(self) -> int:
    return sum(j is None for j in self._slots)

  def _check(self, r: GenerationRequest, loop) -> _Job:
    if r.seed is not None:
      raise RequestError("seed: per-request seeds are not supported by this server (sampled"
                         " requests share the server's random stream); omit it", param="seed")
    if not isinstance(r.chat, bool):
      raise RequestError(f"chat: expected a bool, got {r.chat!r}")
    stop = r.stop
    if isinstance(stop, str) or not isinstance(stop, (tuple, list)):
      raise RequestError(f"stop: expected a list of strings, got {type(stop).__name__}",
                         param="stop")
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
      raise RequestError(f"stop: expected at most {MAX_STOP_STRINGS} non-empty strings, got"
                         f" {list(stop)!r}", param="stop")
    if stop and self.tokenizer is None:
      raise RequestError("stop: stop strings need a tokenizer; this server has none",
                         param="stop")
    if self.pool is not None:
      self.pool.check(r.adapter)
    elif r.adapter not in (None, self.model_name):
      raise AdapterNotFoundError(f"adapter {r.adapter!r}: this server has no adapters")
    try:
      params = SamplingParams.make(temperature=r.temperature, top_p=r.top_p)
    except RequestError as e:
      name = "temperature" if str(e).startswith("temperature") else "top_p"
      raise RequestError(str(e), param=name) from None
    try:
      prompt = encode_prompt(r.prompt, self.context, chat=r.chat, index=None)
    except RequestError as e:
      raise RequestError(str(e), param="messages" if r.chat else "prompt") from None
    room = self.core.max_new_tokens(len(prompt))
    if room < 1:
      raise RequestError(
          f"prompt: {len(prompt)} tokens leave no room in the context of"
          f" {self.core.cache_len} tokens ({self.core.nodes} are reserved for the tree);"
          f" shorten the prompt", param="messages" if r.chat else "prompt")
    max_new = room if r.max_tokens is None else r.max_tokens
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
      raise RequestError(f"max_tokens: expected an integer >= 1, got {max_new!r}",
                         param="max_tokens")
    if max_new > room:
      raise RequestError(
          f"max_tokens: the prompt ({len(prompt)} tokens) + max_tokens ({max_new}) + tree"
          f" ({self.core.nodes}) exceeds the context of {self.core.cache_len} tokens; at most"
          f" {room} new tokens fit", param="max_tokens")
    rid = r.request_id or uuid.uuid4().hex
    r = dataclasses.replace(r, request_id=rid, temperature=float(params.temperature),
                            top_p=float(params.top_p), stop=tuple(stop))
    handle = RequestHandle(rid, len(prompt), loop)
    return _Job(handle=handle, request=r, prompt=prompt, max_new=max_new,
                t_submit=time.perf_counter())

  # -- the loop -----------------------------------------------------------------------------

  def _run(self) -> None:
    pending = None  # (StepsOutput on device, slot -> job at dispatch, dispatch time)
    while True:
      with self._cond:
        idle = not self._queue and all(j is None for j in self._slots) and pending is None
        if self._stopping:
          break
        if idle:
          self._cond.wait(timeout=0.5)
          continue
      try:
        admitted = self._admit()
        self._free_ended()
        running = [j for j in self._slots if j is not None]
        dispatched = None
        if running:
          greedy = all(j.request.temperature == 0.0 for j in running)
          self._state, out = self.core.generate(self._state, greedy=greedy)
          dispatched = (out, list(self._slots), time.perf_counter())
          self.dispatches += 1
        if pending is not None:
          self._deliver(*pending)  # waits for the previous call only
        self._take_firsts(admitted)  # their prefills ran before this call
        pending = dispatched
      except Exception as e:  # noqa: BLE001 - a device or library failure: fail what runs, go on
        pending = None
        self._recover(e)

  def _recover(self, error: BaseException) -> None:
    """Fails the running requests with ``error`` and starts from a fresh state."""
    self.error = error
    for job in [j for j in self._slots if j is not None]:
      self._finish(job, FinishReason.ERROR, error)
    try:
      self._state = self.core.init_state()
    except Exception as e:  # noqa: BLE001
      self.healthy = False
      self.error = e

  def _admit(self) -> list:
    """Moves queued requests into free slots, first come first served.

    Prefills and inserts them without reading anything back: returns
    ``[(job, its first-token output on the device)]`` for :meth:`_take_firsts`,
    which the loop calls only after dispatching the next decode call, so no
    admission ever stalls the host on the device.
    """
    admitted: list = []
    self._admit_into(admitted)
    return admitted

  def _take_firsts(self, admitted: list) -> None:
    """Delivers the first tokens of requests admitted this iteration (one host read)."""
    if not admitted:
      return
    firsts = jax.device_get([first for _, first in admitted])
    now = time.perf_counter()
    for (job, _), first in zip(admitted, firsts):
      if job.done:
        continue
      self.metrics.observe_ttft(now - job.t_submit)
      job.t_last = now
      self._take(job, first.tokens[0, :first.count[0]].tolist(), bool(first.done[0]),
                 bool(first.finite[0]))
    self.metrics.set_slots(self._busy_slots(), self.core.num_slots)

  def _admit_into(self, admitted: list) -> None:
    while True:
      with self._cond:
        free = [s for s, j in enumerate(self._slots) if j is None]
        if not free or not self._queue:
          return
        job = None
        for cand in list(self._queue):
          if cand.handle.cancelled:
            self._queue.remove(cand)
            self._finish(cand, FinishReason.CANCELLED)
            continue
          job = cand
          break
        if job is None:
          return
      try:
        weight_slot = self.pool.acquire(job.request.adapter) if self.pool is not None else 0
      except MedusaError as e:
        with self._cond:
          self._queue.remove(job)
        if not isinstance(e, RequestError):  # the adapter the request named is unusable
          e = _as_request_error(e, param="model")
        self._finish(job, FinishReason.ERROR, e)
        continue
      if weight_slot is None:
        return  # every weight slot is held: wait for one to be released
      slot = free[0]
      with self._cond:
        # The job holds its slot from here, so the overload test of submit
        # never counts it twice or not at all.
        self._queue.remove(job)
        self._slots[slot] = job
        self.metrics.set_queue_depth(len(self._queue))
      job.weight_slot, job.slot = weight_slot, slot
      try:
        self._rng, key = jax.random.split(self._rng)
        prefix = self.core.prefill(job.prompt, max_new=job.max_new,
                                   temperature=job.request.temperature, top_p=job.request.top_p,
                                   adapter_slot=weight_slot, rng=key)
        self._state = self.core.insert(prefix, self._state, slot)
      except MedusaError as e:
        with self._cond:
          self._slots[slot] = None
        self._finish(job, FinishReason.ERROR, e)
        continue
      admitted.append((job, prefix.first))

  def _busy_slots(self) -> int:
    return sum(j is not None for j in self._slots)

  def _free_ended(self) -> None:
    """Ends cancelled requests and frees, on the device, slots whose request ended on the host."""
    ended = []
    for s, job in enumerate(self._slots):
      if job is None:
        continue
      if job.handle.cancelled and not job.done:
        self._finish(job, FinishReason.CANCELLED)
      if job.done:
        ended.append(s)
        with self._cond:
          self._slots[s] = None
    if ended:
      self._state = self.core.release(self._state, ended)
      self.metrics.set_slots(self._busy_slots(), self.core.num_slots)

  def _deliver(self, out, slots: Sequence[_Job | None], t_dispatch: float) -> None:
    """Reads one dispatch's tokens and delivers them (see the module docstring)."""
    host = jax.device_get(out)
    now = time.perf_counter()
    steps = int(host.steps)
    emitted = host.count[:steps].sum(axis=0)   # [S]
    row_steps = int(host.active[:steps].sum())
    self.metrics.observe_dispatch(tokens=int(emitted.sum()), steps=steps, row_steps=row_steps,
                                  seconds=max(now - t_dispatch, 1e-9))
    if row_steps:
      accept_KxS = host.accept_len[:steps][host.active[:steps]]
      depth = self.core.width - 1
      self.metrics.observe_accepts([int((accept_KxS > k).sum()) for k in range(depth)], row_steps)
    for s, job in enumerate(slots):
      if job is None or job.done:
        continue
      ids = host.tokens[:steps, s][host.tokens[:steps, s] >= 0].tolist()
      finite = bool(host.finite[:steps, s].all())
      done = bool(host.done[steps - 1, s]) if steps else False
      job.steps += int(host.active[:steps, s].sum())
      if ids and job.t_last is not None:
        self.metrics.observe_itl((now - job.t_last) / len(ids), count=len(ids))
      job.t_last = now
      self._take(job, ids, done, finite)
    self.metrics.set_slots(self._busy_slots(), self.core.num_slots)

  def _take(self, job: _Job, ids: list[int], done: bool, finite: bool) -> None:
    """Adds a request's new tokens: text, stop strings, EOS, budget, failure."""
    if not finite:
      self._finish(job, FinishReason.ERROR, NonFiniteLogitsError(
          f"request {job.handle.request_id}: the model's logits became NaN or infinite after"
          f" {len(job.ids)} tokens"))
      return
    job.ids += ids
    stops = job.request.stop
    if self.tokenizer is not None:
      if done:
        job.text = self._decode(job.ids)  # once, so the answer is exactly the engine's text
      else:
        self._extend_text(job)
      text = job.text
      hit = _find_stop(text, stops, job.sent)
      if hit is not None:
        job.text = text[:hit]
        self._emit(job, ids, len(job.text))
        self._finish(job, FinishReason.STOP)
        return
      self._emit(job, ids, len(text) if done else _safe_length(text, stops))
    elif ids:
      job.handle.put(TokenEvent(tuple(ids), ""))
    if done:
      eos = job.ids and job.ids[-1] in self.core.eos_ids
      self._finish(job, FinishReason.STOP if eos else FinishReason.LENGTH)

  def _extend_text(self, job: _Job) -> None:
    """Appends the text of ``job.ids``' new tokens to ``job.text``, decoding a short window.

    The window starts one delivery back (``prefix``) so that a token whose
    text depends on its left neighbour (a leading space, a character split
    over tokens) decodes as in the whole sequence; new text is taken only once
    it no longer ends in a partial character. Each delivery costs O(window),
    not O(answer).
    """
    before = self._decode(job.ids[job.prefix:job.read])
    now = self._decode(job.ids[job.prefix:])
    if len(now) > len(before) and not now.endswith("\ufffd"):
      job.text += now[len(before):]
      job.prefix, job.read = job.read, len(job.ids)

  def _emit(self, job: _Job, ids: list[int], upto: int) -> None:
    piece = job.text[job.sent:upto] if upto > job.sent else ""
    if ids or piece:
      job.handle.put(TokenEvent(tuple(ids), piece))
    job.sent = max(job.sent, upto)

  def _decode(self, ids: list[int]) -> str:
    try:
      return self.tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
      return self.tokenizer.decode(ids)

  def _finish(self, job: _Job, reason: FinishReason, error: BaseException | None = None) -> None:
    if job.done:
      return
    job.done = True
    if job.weight_slot is not None and self.pool is not None:
      self.pool.release(job.weight_slot)
      job.weight_slot = None
    tokens = len(job.ids)
    job.handle.put(FinishEvent(reason=reason, prompt_tokens=len(job.prompt),
                               completion_tokens=tokens, error=error,
                               accepted_per_step=(tokens - 1) / job.steps if job.steps else 0.0))
    self.metrics.request_finished(reason.value, tokens, time.perf_counter() - job.t_submit)


def measured_policy(engine, num_slots: int, cache_len: int, *, steps_per_call: int | None = None,
                    log=None):
  """The engine's measured speculation policy at power-of-two batch sizes up to S.

  Timed with the scheduler's K steps per call (None: the engine's).
  """
  if engine.num_heads is None:
    return None
  sizes, b = [], 1
  while b < num_slots:
    sizes.append(b)
    b *= 2
  return engine.measure_policy(tuple(sizes) + (num_slots,), cache_len=cache_len,
                               steps_per_call=steps_per_call, log=log)


def _as_request_error(error: BaseException, *, param: str) -> RequestError:
  """``error`` as the request's own fault (HTTP 400), chained to it."""
  out = RequestError(str(error), param=param)
  out.__cause__ = error
  return out


def _find_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
  """Index of the earliest stop string in ``text`` that ends after ``sent``, or None."""
  best = None
  for s in stops:
    i = text.find(s, max(0, sent - len(s) + 1))
    if i >= 0 and (best is None or i < best):
      best = i
  return best


def _safe_length(text: str, stops: Sequence[str]) -> int:
  """How much of ``text`` can be delivered now.

  Held back: a trailing replacement character (a multi-byte character split
  over tokens) and any tail that could be the start of a stop string.
  """
  end = len(text)
  while end and text[end - 1] == "\ufffd":
    end -= 1
  hold = 0
  for s in stops:
    for k in range(min(len(s) - 1, end), 0, -1):
      if text[end - k:end] == s[:k]:
        hold = max(hold, k)
        break
  return end - hold
