"""The batched generation engine: plain, chain (LoRAX) and tree (Medusa) decoding.

``Engine.generate`` (or ``Engine.stream``) takes a batch of prompts of
different lengths and one :class:`~medusa_jax.decoding.requests.SamplingParams`
(or its fields as keywords), validates every request on the host
(``requests.validate``: a bad one fails alone), pads the batch to a bucket,
prefills once and then runs K decode steps per jitted call in one device loop
(``Decoder.steps``, K = ``EngineConfig.steps_per_call``), with exactly one
``jax.device_get`` per call. Rows stop independently at EOS or at
their token budget; finished rows are masked until the whole batch is done.
The speculation policy (tree, chain, none) is described in requests.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.adapters.registry import DEFAULT_INDEX, AdapterRegistry
from medusa_jax.adapters.weights import MedusaWeights
from medusa_jax.config import EngineConfig
from medusa_jax.decoding import buckets
from medusa_jax.decoding import policy as policy_mod
from medusa_jax.decoding.decoder import Decoder
from medusa_jax.decoding.loading import DEFAULT_NUM_HEADS, load_model
from medusa_jax.decoding.requests import (Batch, OnError, Request, RequestContext,
                                          SamplingParams, encode_prompt, validate)
from medusa_jax.decoding.results import GenerationResult, RowStats, StreamEvent
from medusa_jax.decoding.state import StepConfig
from medusa_jax.errors import (AdapterLoadError, ArchitectureError, ConfigError,
                               NonFiniteLogitsError)
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.heads.routed import BatchMedusaWeights
from medusa_jax.models.llama_sharding import partitionable, shard_cache
from medusa_jax.parallel.mesh import DATA, axis_size, shard_batch

logger = logging.getLogger(__name__)

MEASURE_CACHE_LEN = 512
"""Cache slots per row of the steps the measured tree policy times."""


class Engine:
  """Batched Medusa generation over a Llama-family model.

  Example::

    eng = Engine.load()                        # SmolLM2 + bundled heads
    res = eng.generate(["Hi!"], max_new_tokens=32, speculate="tree", chat=True)
    print(res.texts[0], res.stats[0].tokens_per_step)
  """

  def __init__(self, llama, tokenizer=None, medusa=None, *, config: EngineConfig | None = None,
               heads_notice: str | None = None, chat_template=None, mesh=None,
               **config_fields):
    """Args:
      llama: the base ``Llama``.
      tokenizer: optional; ``encode(str) -> list[int]``, ``decode(ids) -> str``.
      medusa: ``MedusaWeights``, a ``MedusaModel`` (any heads of the heads
        protocol), an adapter-id -> ``MedusaWeights`` map (several adapters,
        routed per row: ``generate(..., adapters=[...])``), or None (plain
        decoding only).
      config: the engine knobs (:class:`~medusa_jax.config.EngineConfig`).
      heads_notice: a message about the heads (e.g. "freshly initialised").
      chat_template: a ``ChatTemplate`` for ``chat=True``; None: chat prompts
        fail, saying how to pass one (``Engine.load`` finds the model's own).
      mesh: a ``('data', 'model')`` mesh the model and heads are placed on
        (``Engine.load(..., mesh=)`` places them); batches are then padded to a
        multiple of the ``data`` axis and split over it, with the KV cache.
      **config_fields: :class:`EngineConfig` fields replacing ``config``'s
        (``Engine(llama, max_cache_len=64)``).
    """
    config = _config(config, config_fields)
    limit = llama.cfg.position_limit
    if limit is not None and config.max_cache_len > limit:
      raise ConfigError(
          f"max_cache_len={config.max_cache_len} exceeds max_position_embeddings={limit}:"
          f" rope_scaling type {llama.cfg.rope_scaling.rope_type.value!r} is exact only up to"
          f" it (transformers rescales the frequencies past it); use max_cache_len <= {limit}")
    self.adapter_slots: dict[int, int] | None = None
    self.registry = AdapterRegistry()
    routed = None
    if isinstance(medusa, Mapping):
      medusa, routed = self._adapters(medusa)
    elif medusa is not None:
      if isinstance(medusa, MedusaModel):
        medusa = MedusaWeights(medusa.config, medusa)
      self.registry.load_default(medusa)
    model = getattr(medusa, "model", medusa)
    _check_heads_fit(model, llama, getattr(medusa, "source", None))
    self.config = config
    self.llama = llama = partitionable(llama, mesh)
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.medusa = medusa
    self.heads = model
    self.cfg = llama.cfg
    self.cache_dtype = config.cache_dtype or getattr(llama, "dtype", jnp.float32)
    self.max_batch_size = config.speculation_limit(None if model is None else model.max_batch_size)
    self.heads_notice = heads_notice
    self.model_name = "medusa-jax"  # Engine.load names it after the base model
    self.chat_template = chat_template
    self.eos_ids = (tuple(llama.cfg.eos_token_ids) if config.eos_ids is None
                    else config.eos_ids)
    self.num_heads = None if model is None else model.num_heads
    self.context = RequestContext(
        vocab_size=llama.cfg.vocab_size, max_cache_len=config.max_cache_len,
        num_heads=self.num_heads, max_batch_size=self.max_batch_size,
        max_tree_rows=config.max_tree_rows, tree_choices=config.tree_choices,
        eos_ids=self.eos_ids, adapter_slots=self.adapter_slots, tokenizer=tokenizer,
        chat_template=chat_template)
    self.decoder = Decoder(llama, model if routed is None else routed,
                           transpose_lm_head=config.transpose_lm_head)
    self.measured: dict[int, Any] = {}
    """Batch bucket -> the ``SpeculationPolicy`` measured for it (``tree_policy="measured"``)."""
    self.row_spread: tuple[float, ...] = policy_mod.DEFAULT_ROW_SPREAD
    """The rows' relative extra tokens per step seen so far (the prior until as many are
    observed): a static batch is valued by its slowest rows
    (:meth:`~medusa_jax.decoding.policy.SpeculationPolicy.static_batch_factor`)."""
    if config.tree_policy == "measured" and self.num_heads is not None and mesh is None:
      # Timed on first use of each batch bucket (cached on disk), not here:
      # only the buckets a workload uses cost anything.
      self.context = dataclasses.replace(self.context, tree_policy=self._measured_tree)

  def _measured_tree(self, batch: int):
    """The measured policy's tree for ``batch`` requests (None: plain pays best)."""
    rows = buckets.batch_bucket(batch)
    if rows not in self.measured:  # timed, or read from the disk cache, once per bucket
      self.measured[rows] = self.measure_policy(
          (rows,), cache_len=min(MEASURE_CACHE_LEN, self.config.max_cache_len),
          log=logger.info)
    # Kept with the rows seen so far, so that its table shows what was chosen.
    self.measured[rows] = dataclasses.replace(self.measured[rows], row_spread=self.row_spread)
    return self.measured[rows].tree_for(batch, static=True)

  def use_policy(self, policy) -> None:
    """Lets a measured speculation policy pick the tree of ``speculate="tree"`` calls.

    Args:
      policy: a :class:`~medusa_jax.decoding.policy.SpeculationPolicy`, any
        ``batch -> TreeBuffers | None``, "measured" (:meth:`measure_policy`
        per batch bucket on first use, as ``EngineConfig.tree_policy =
        "measured"``), or None (the row budget, ``EngineConfig.max_tree_rows``).
    """
    if policy == "measured":
      tree_for = self._measured_tree
    elif isinstance(policy, policy_mod.SpeculationPolicy):
      tree_for = functools.partial(self._static_tree, policy)
    else:
      tree_for = getattr(policy, "tree_for", policy)
    self.context = dataclasses.replace(self.context, tree_policy=tree_for)

  def _static_tree(self, policy, batch: int):
    """``policy``'s tree for a static batch of ``batch`` rows, valued by the rows seen so far
    (the batch decodes until its slowest row is done)."""
    return dataclasses.replace(policy, row_spread=self.row_spread).tree_for(batch, static=True)

  def measure_policy(self, batch_sizes=(1, 2, 4, 8, 16, 32, 64), *, cache_len: int = 512,
                     steps_per_call: int | None = None, log=None):
    """This model's :class:`~medusa_jax.decoding.policy.SpeculationPolicy` on this device.

    Times plain decoding, the chain and best-first prefixes of the adapter's
    tree at each batch size, ``steps_per_call`` steps per device loop (None:
    ``EngineConfig.steps_per_call``, what :meth:`generate` runs) over a cache
    of the engine's dtype (cached under ``$MEDUSA_JAX_HOME/policy``: later
    calls read the table), with the adapter's per-head acceptance from its
    ``recipe.json`` when it has one.
    """
    if self.num_heads is None:
      raise ConfigError("measure_policy: this engine has no Medusa heads")
    source = getattr(self.medusa, "source", None)
    if source and not os.path.isdir(source):
      source = os.path.dirname(source)  # a weight file: its adapter directory
    acceptance = policy_mod.acceptance_from_recipe(source) if source else None
    return policy_mod.load_or_measure(
        self.decoder, choices=self.config.tree_choices, num_heads=self.num_heads,
        acceptance=acceptance, batch_sizes=tuple(batch_sizes),
        cache_len=min(cache_len, self.config.max_cache_len),
        model_key=f"{self.model_name}-{source or 'heads'}", dtype=self.cache_dtype,
        steps_per_call=steps_per_call or self.config.steps_per_call,
        model_options=dict(getattr(self.llama, "static_options", dict)(),
                           lm_head_copy=self.decoder.params.lm_head_t is not None), log=log)

  @property
  def max_cache_len(self) -> int:
    return self.config.max_cache_len

  @property
  def max_tree_rows(self) -> int:
    return self.config.max_tree_rows

  @property
  def tree_choices(self):
    return self.config.tree_choices

  def _adapters(self, adapters: Mapping):
    """(default adapter's weights, BatchMedusaWeights) of an adapter-id -> weights map.

    Sets ``adapter_slots``: every id of the map -> its weight slot; ids whose
    entry has no Medusa heads (None, other adapter types) use slot 0, the
    default adapter (id 0), as in LoRAX.
    """
    adapters = dict(adapters)
    for k in adapters:
      if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise AdapterLoadError(f"adapters: ids must be integers >= 0, got {k!r}")
    registry = self.registry
    default = adapters.get(DEFAULT_INDEX)
    if not isinstance(default, MedusaWeights):
      raise AdapterLoadError(
          f"adapter {DEFAULT_INDEX}: expected the default Medusa adapter (MedusaWeights),"
          f" got {type(default).__name__}; adapters {sorted(adapters)}")
    registry.load_default(default)
    for k in sorted(adapters):
      if k != DEFAULT_INDEX and isinstance(adapters[k], MedusaWeights):
        registry.load_dynamic(int(k), adapters[k])  # LoRAX's rules, LoRAX's messages
    routed = BatchMedusaWeights.load(dict(registry.items()), [0])
    slot = {a: i for i, a in enumerate(registry.medusa_ids)}
    self.adapter_slots = {int(k): slot.get(int(k), 0) for k in adapters}
    return adapters[0], routed

  # ------------------------------------------------------------------------- loading

  @classmethod
  def load(cls, base: str | os.PathLike | None = None, medusa: Any = None, *,
           dtype: Any = jnp.float32, num_heads: int = DEFAULT_NUM_HEADS, seed: int = 0,
           mesh=None, fuse_projections: bool = True, notice=None, chat_template=None,
           config: EngineConfig | None = None, **config_fields) -> "Engine":
    """Loads a base model and heads (``loading.load_model``) and builds the engine.

    Everything that can be checked without weights is checked first (the
    base's config, the adapter's sizes and dtype), so a mismatch fails in
    seconds with one line.

    Args:
      base, medusa, dtype, num_heads, seed, mesh, fuse_projections, notice,
        chat_template: see :func:`~medusa_jax.decoding.loading.load_model`
        (``base`` and ``medusa`` may be Hugging Face ids).
      config, **config_fields: see :class:`Engine`. An adapter's
        ``medusa_choices.json`` becomes ``tree_choices`` unless one is given;
        the EOS ids are the tokenizer's and the model's (``generation_config.json``,
        ``config.json``) unless ``eos_ids`` is given.
    """
    loaded = load_model(base, medusa, dtype=dtype, num_heads=num_heads, seed=seed, mesh=mesh,
                        fuse_projections=fuse_projections, notice=notice,
                        chat_template=chat_template)
    config = _config(config, config_fields)
    if config.tree_choices is None and loaded.tree_choices is not None:
      config = dataclasses.replace(config, tree_choices=loaded.tree_choices)
    if config.eos_ids is None and loaded.eos_ids:
      config = dataclasses.replace(config, eos_ids=loaded.eos_ids)
    engine = cls(loaded.llama, loaded.tokenizer, loaded.medusa, config=config,
                 heads_notice=loaded.notice, chat_template=loaded.chat_template, mesh=mesh)
    engine.model_name = _model_name(base)
    return engine

  # ------------------------------------------------------------------------- generation

  def generate(self, prompts: Sequence[Sequence[int] | str],
               max_new_tokens: int | Sequence[int] | None = None, *,
               params: SamplingParams | None = None, adapters: Sequence[int] | None = None,
               chat: bool = False, on_error: str | OnError = "raise",
               **options) -> GenerationResult:
    """Generates continuations of a batch of prompts.

    Args:
      prompts: token-id lists, or strings (tokenised; with ``chat=True`` each
        string is a user turn wrapped in the model's chat template).
      max_new_tokens: one budget for all, or one per prompt (>= 1); replaces
        ``params.max_new_tokens`` (default 64).
      params: the call's :class:`SamplingParams` (speculate, temperature,
        top_p, typical, seed, tree, adaptive); None: the defaults (plain
        greedy decoding).
      adapters: one adapter id per prompt, for an engine built with several
        Medusa adapters (``medusa={id: weights}``); None = the default (0).
        Routed per row on device: any mix shares one compilation.
      chat: apply the chat template to string prompts.
      on_error: "raise" (the default: the first bad request raises before any
        device work) or "skip" (bad requests get an error entry, the others run).
      **options: :class:`SamplingParams` fields replacing ``params``'s, e.g.
        ``speculate="tree", temperature=0.7``.

    Returns:
      A :class:`GenerationResult`.

    Raises:
      RequestError: a bad option, or (on_error="raise") a bad request, naming it.
    """
    for event in self.stream(prompts, max_new_tokens, params=params, adapters=adapters,
                             chat=chat, on_error=on_error, **options):
      pass
    return event.result

  def stream(self, prompts: Sequence[Sequence[int] | str],
             max_new_tokens: int | Sequence[int] | None = None, *,
             params: SamplingParams | None = None, adapters: Sequence[int] | None = None,
             chat: bool = False, on_error: str | OnError = "raise",
             **options) -> Iterator[StreamEvent]:
    """Generates like :meth:`generate`, yielding each step's tokens as soon as read.

    Same arguments and checks as :meth:`generate` (raised on the first
    ``next``, before any device work). One :class:`StreamEvent` per step,
    the first with each request's first token; the last event carries the
    :class:`GenerationResult`.

    Example::

      for event in eng.stream(["Hi!"], 32, speculate="tree", chat=True):
        print(eng.tokenizer.decode(event.tokens[0]), end="", flush=True)
    """
    t_start = time.perf_counter()
    if max_new_tokens is not None:
      options["max_new_tokens"] = max_new_tokens
    params = SamplingParams.make(params, **options)
    batch = validate(prompts, params, self.context, adapters=adapters, chat=chat,
                     on_error=on_error)
    yield from self.run(batch, t_start=t_start, on_error=on_error)

  def run(self, batch: Batch, *, t_start: float | None = None,
          on_error: str | OnError = "raise") -> Iterator[StreamEvent]:
    """Runs a validated :class:`~medusa_jax.decoding.requests.Batch`, as :meth:`stream`.

    A request whose logits turn NaN or inf fails alone: its row stops, and its
    error (a :class:`~medusa_jax.errors.NonFiniteLogitsError`) is raised at
    once with ``on_error="raise"``, else recorded in the result.
    """
    on_error = OnError.parse(on_error)
    t_start = time.perf_counter() if t_start is None else t_start
    num = len(batch.requests)
    valid, config = batch.valid, batch.config
    outs: dict[int, dict] = {}
    errors = list(batch.errors)
    decode_s, decode_tokens, steps = 0.0, 0, 0
    if valid:
      outs, decode_s, decode_tokens, steps = yield from self._decode_loop(
          valid, config, batch.params.seed, t_start, num, errors, on_error)
      if config.tree is not None and len(outs) > 1:
        self.row_spread = policy_mod.observe_rows(self.row_spread, policy_mod.row_spread(
            [len(o["tokens"]) for o in outs.values()], [o["steps"] for o in outs.values()]))
    wall = time.perf_counter() - t_start
    tokens = [outs[i]["tokens"] if i in outs else [] for i in range(num)]
    stats = [_row_stats(outs[i], config) if i in outs else None for i in range(num)]
    texts = None
    if self.tokenizer is not None:
      texts = [self.decode(t) if t else "" for t in tokens]
    result = GenerationResult(tokens=tokens, steps=[s.steps if s else 0 for s in stats],
                              texts=texts, stats=stats, errors=errors,
                              speculate=batch.params.speculate, tree_nodes=config.num_nodes,
                              speculation_skipped=batch.speculation_skipped, wall_s=wall,
                              decode_s=decode_s, decode_tokens=decode_tokens)
    yield StreamEvent(step=steps, num_requests=num, result=result)

  def encode_prompt(self, prompt: str | Sequence[Mapping[str, str]] | Sequence[int], *,
                    chat: bool = True) -> list[int]:
    """Exactly the token ids this engine feeds the model for ``prompt``.

    Args:
      prompt: a user message (with ``chat``), a list of ``{"role", "content"}``
        messages (with ``chat``), raw text (without ``chat``: transformers'
        ``tokenizer(text)`` ids, BOS as the tokenizer adds it), or token ids
        (checked and returned).
      chat: render string and message prompts with the chat template
        (transformers' ``apply_chat_template(..., add_generation_prompt=True)``,
        BOS first when the tokenizer adds it and the template did not).

    Raises:
      RequestError: no tokenizer or chat template, a bad message, an id out of
        the vocabulary.
    """
    return list(encode_prompt(prompt, self.context, chat=chat))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of new tokens, without special tokens (EOS) when the tokenizer can drop them."""
    try:
      return self.tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
      return self.tokenizer.decode(ids)

  # ------------------------------------------------------------------------- internals

  def _decode_loop(self, valid: list[Request], config: StepConfig, seed: int, t_start: float,
                   num_requests: int, errors: list, on_error: OnError):
    """Prefill + the step loop for the valid requests, yielding a StreamEvent per step.

    Requests whose logits turn non-finite get their entry of ``errors`` set
    (or raise, with ``OnError.RAISE``) and no output.

    Returns (through ``yield from``): (outs, decode_s, decode_tokens, steps).
    """
    rows = buckets.batch_bucket(len(valid))
    if self.mesh is not None:
      data = axis_size(self.mesh, DATA)
      rows = -(-rows // data) * data  # split evenly over the data axis
    longest = max(len(r.prompt) for r in valid)
    need = max(len(r.prompt) + r.max_new_tokens for r in valid) + config.num_nodes
    cache_len = buckets.cache_bucket(need, self.config.max_cache_len, self.config.min_cache_len)
    width = buckets.prompt_bucket(longest, cache_len)
    prompt = np.zeros((rows, width), np.int32)
    lens = np.ones((rows,), np.int32)
    budget = np.ones((rows,), np.int32)
    pad = np.ones((rows,), bool)
    temp_B = np.zeros((rows,), np.float32)
    top_p_B = np.ones((rows,), np.float32)
    slot_B = np.zeros((rows,), np.int32)
    for b, r in enumerate(valid):
      prompt[b, :len(r.prompt)] = r.prompt
      lens[b], budget[b], pad[b] = len(r.prompt), r.max_new_tokens, False
      temp_B[b], top_p_B[b], slot_B[b] = r.temperature, r.top_p, r.adapter_slot
    if self.adapter_slots is None:
      slot_B = None  # one adapter: the heads take no row slots

    dec = self.decoder
    cache = dec.init_cache(rows, cache_len, self.cache_dtype)
    put = jnp.asarray
    if self.mesh is not None:
      cache = shard_cache(cache, self.cfg, self.mesh)
      put = functools.partial(shard_batch, mesh=self.mesh)
    state, pending = dec.prefill(cache, put(prompt), put(lens), put(budget), put(pad),
                                 jax.random.PRNGKey(seed), config=config,
                                 temperature=put(temp_B), top_p=put(top_p_B),
                                 adapter_slot=None if slot_B is None else put(slot_B))
    n = len(valid)
    rows_to_requests = tuple(r.index for r in valid)
    outputs = []      # host copies of every step's StepOutput (prefill first)
    finished = np.full((n,), np.nan)
    decode_t0, decode_tokens = None, 0
    # A fallback when every row finished within the first decode call: all
    # decode calls, timed from the prefill's read (compilation included, if any).
    span_t0, span_tokens = None, 0
    steps_per_call = self.config.steps_per_call
    # K steps per call in one device loop (stopping on the device when every row
    # is done), and call c+1 dispatched before call c's tokens are read, so the
    # host's read overlaps device work; a call after the end costs one loop test.
    chunks = 0
    while True:
      state, nxt = dec.steps(state, configs=config, num_steps=steps_per_call)
      host_chunk = jax.device_get(pending)
      now = time.perf_counter()
      if chunks == 0:
        host_steps = [host_chunk]
      else:
        host_steps = [host_chunk.step(j) for j in range(int(host_chunk.steps))]
      for host in host_steps:
        k = len(outputs)
        outputs.append(host)
        for b in np.flatnonzero(~host.finite[:n]):
          r = valid[b]
          if errors[r.index] is None:
            errors[r.index] = NonFiniteLogitsError(
                f"request {r.index}: the model's logits became NaN or infinite at step {k}"
                f" (after {int(sum(o.count[b] for o in outputs))} tokens); the base model or"
                f" the heads are corrupt, or overflow {jnp.dtype(self.cache_dtype).name}")
            if on_error is OnError.RAISE:
              raise errors[r.index]
        newly_done = host.done[:n] & np.isnan(finished)
        finished[newly_done] = now - t_start
        if chunks > 1:
          decode_tokens += int(host.count[:n].sum())
        if chunks > 0:
          span_tokens += int(host.count[:n].sum())
      if chunks == 0:
        span_t0 = now
      if chunks == 1:
        decode_t0 = now  # the first decode call paid for its compilation
      t_yield = time.perf_counter()
      first_step = len(outputs) - len(host_steps)
      for j, host in enumerate(host_steps):
        yield StreamEvent(step=first_step + j, host=host, rows=rows_to_requests,
                          num_requests=num_requests)
      consumer_s = time.perf_counter() - t_yield  # the consumer's time is not decoding
      if decode_t0 is not None:
        decode_t0 += consumer_s
      if span_t0 is not None:
        span_t0 += consumer_s
      chunks += 1
      if bool(np.all(outputs[-1].done[:n])):
        break
      pending = nxt
    decode_s = (time.perf_counter() - decode_t0) if decode_t0 is not None else 0.0
    if decode_tokens == 0 and span_tokens and span_t0 is not None:
      decode_s, decode_tokens = time.perf_counter() - span_t0, span_tokens

    tokens_SxBxW = np.stack([np.pad(o.tokens[:n], ((0, 0), (0, config.width - o.tokens.shape[1])),
                                    constant_values=-1) for o in outputs])
    count_SxB = np.stack([o.count[:n] for o in outputs])
    active_SxB = np.stack([o.active[:n] for o in outputs])
    accept_SxB = np.stack([o.accept_len[:n] for o in outputs])
    outs = {}
    for b, r in enumerate(valid):
      if errors[r.index] is not None:
        continue  # failed during decoding: no output
      emitted = [tokens_SxBxW[s, b, :count_SxB[s, b]] for s in range(len(outputs))]
      steps_b = active_SxB[1:, b]  # decode steps the row took part in
      hist = np.bincount(accept_SxB[1:, b][steps_b], minlength=config.width)
      outs[r.index] = dict(tokens=[int(t) for t in np.concatenate(emitted)],
                           steps=int(steps_b.sum()), hist=[int(h) for h in hist],
                           finished=None if np.isnan(finished[b]) else float(finished[b]))
    return outs, decode_s, decode_tokens, len(outputs) - 1


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _model_name(base) -> str:
  """The name a server answers to: a directory's name, a hub id as given, or the default's."""
  if base is None:
    return DEFAULT_MODEL_NAME
  text = os.fspath(base).rstrip("/\\")
  return os.path.basename(text) if os.path.isdir(text) else text


def _check_heads_fit(heads, llama, source: str | None) -> None:
  """Raises ArchitectureError unless the heads' H (and V1's V) are the base model's.

  Checked when the engine is built, not at the first step's trace, where a
  mismatch would surface as an einsum error.
  """
  if heads is None:
    return
  where = f" ({source})" if source else ""
  for name, got, want in (("hidden size", getattr(heads, "hidden_size", None),
                           llama.cfg.hidden_size),
                          ("vocabulary size", getattr(heads, "vocab_size", None),
                           llama.cfg.vocab_size)):
    if got is not None and got != want:
      raise ArchitectureError(f"Medusa heads{where}: {name} {got}; expected the base model's"
                              f" {want} (heads trained on another base model?)")


def _row_stats(o: dict, config: StepConfig) -> RowStats:
  n_tok, steps = len(o["tokens"]), o["steps"]
  hist = tuple(o["hist"])
  heads = tuple(sum(hist[a] for a in range(k + 1, len(hist))) for k in range(len(hist) - 1))
  wall = o["finished"] or float("nan")
  return RowStats(new_tokens=n_tok, steps=steps,
                  tokens_per_step=(n_tok - 1) / steps if steps else 0.0,
                  accept_hist=hist, head_accepts=heads, wall_s=wall,
                  tokens_per_s=n_tok / wall if wall and wall > 0 else float("nan"))


def _config(config: EngineConfig | None, fields: Mapping[str, Any]) -> EngineConfig:
  """``config`` with ``fields`` replaced; a fresh ``EngineConfig(**fields)`` without one."""
  if config is None:
    return EngineConfig(**fields)
  return dataclasses.replace(config, **fields) if fields else config
