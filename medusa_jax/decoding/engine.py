"""The batched generation engine: plain, chain (LoRAX) and tree (Medusa) decoding.

``Engine.generate`` takes a batch of prompts of different lengths, validates
every request on the host (a bad one fails alone), pads the batch to a bucket,
prefills once and then runs one jitted step per iteration (see step.py), with
exactly one ``jax.device_get`` per step. Rows stop independently at EOS or at
their token budget; finished rows are masked until the whole batch is done.

Speculation policy, chosen once per call (never per step, so it never
oscillates):

* ``tree`` (the adaptive policy): the tree comes from ``tree_for_batch`` --
  large at batch 1, smaller as the batch grows, at least LoRAX's chain -- so
  large batches still speculate. The speculation max-batch guard does not
  apply.
* ``chain`` (LoRAX's scheme: argmax per head, prefix match, one bonus token):
  LoRAX's guard is honoured. LoRAX's V2 heads skip drafting when the rows
  entering the LM head, ``B * (n + 1)`` in a verifying step, exceed the
  speculation max batch size (32, or ``LORAX_SPECULATION_MAX_BATCH_SIZE``);
  there it alternates between drafting and plain steps. Here the same test
  is made once per call: if ``B * (n + 1)`` exceeds the limit, the whole call
  decodes plainly and ``GenerationResult.speculation_skipped`` says so.
  ``adaptive=True`` lifts the guard.
* ``none``: plain decoding, one token per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.decoding import buckets
from medusa_jax.decoding.step import Decoder, StepConfig
from medusa_jax.errors import RequestError
from medusa_jax.options import Option

BUNDLED_HEADS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bundled", "heads",
                             "smollm2-135m-instruct")
DEFAULT_NUM_HEADS = 4
CHOICES_NAME = "medusa_choices.json"
"""An adapter's best-first tree paths, used by the adaptive tree policy when present."""


class Speculate(Option):
  """How drafts are made and verified."""
  __error__ = RequestError
  NONE = "none"
  CHAIN = "chain"
  TREE = "tree"


class OnError(Option):
  """What ``generate`` does with a bad request."""
  __option__ = "on_error"
  __error__ = RequestError
  RAISE = "raise"
  SKIP = "skip"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RowStats:
  """Per-request statistics.

  Attributes:
    new_tokens: tokens generated (the first comes from the prefill).
    steps: decode steps the request took part in (prefill not counted).
    tokens_per_step: tokens emitted by decode steps / steps (1.0 when plain).
    accept_hist: ``accept_hist[a]`` = steps that accepted ``a`` drafts (0..D).
    head_accepts: ``head_accepts[k]`` = steps in which head k's draft (depth
      k+1) was accepted.
    wall_s: seconds from the start of the call until the row finished.
    tokens_per_s: new_tokens / wall_s.
  """
  new_tokens: int
  steps: int
  tokens_per_step: float
  accept_hist: tuple[int, ...]
  head_accepts: tuple[int, ...]
  wall_s: float
  tokens_per_s: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResult:
  """The output of :meth:`Engine.generate`, one entry per request, in order.

  Attributes:
    tokens: new token ids per request (EOS included when hit; [] on error).
    steps: decode steps per request.
    texts: decoded texts without special tokens (None without a tokenizer).
    stats: per-request :class:`RowStats` (None on error).
    errors: per-request RequestError, or None.
    speculate: the mode asked for.
    tree_nodes: T, tokens verified per row per step (1 when plain).
    speculation_skipped: True when the chain guard turned speculation off.
    wall_s: whole call, compile included.
    decode_s: decode steps after the first (compile excluded).
    decode_tokens: tokens those steps emitted.
  """
  tokens: list[list[int]]
  steps: list[int]
  texts: list[str] | None
  stats: list[RowStats | None]
  errors: list[RequestError | None]
  speculate: Speculate
  tree_nodes: int
  speculation_skipped: bool
  wall_s: float
  decode_s: float
  decode_tokens: int

  @property
  def tokens_per_s(self) -> float:
    """Steady-state throughput: tokens of decode steps 2.. over their time."""
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

  @property
  def tokens_per_step(self) -> float:
    """Mean tokens per decode step over the successful requests."""
    done = [s for s in self.stats if s is not None and s.steps]
    if not done:
      return float("nan")
    return sum(s.tokens_per_step * s.steps for s in done) / sum(s.steps for s in done)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEvent:
  """One step of :meth:`Engine.stream`: what each request emitted.

  The per-request lists are built on access (a serving loop that does not
  read them pays no per-row Python work).

  Attributes:
    step: 0 for the first token (from the prefill), then one per decode step.
    result: the :class:`GenerationResult`, on the last event only (whose
      ``tokens`` are then empty).
  """
  step: int
  host: Any = None
  rows: tuple[int, ...] = ()
  num_requests: int = 0
  result: "GenerationResult | None" = None

  @property
  def tokens(self) -> list[list[int]]:
    """New tokens per request this step ([] for finished, failed or idle ones)."""
    out: list[list[int]] = [[] for _ in range(self.num_requests)]
    if self.host is not None:
      for b, i in enumerate(self.rows):
        out[i] = [int(t) for t in self.host.tokens[b, :self.host.count[b]]]
    return out

  @property
  def accept_len(self) -> list[int]:
    """Drafts accepted per request this step (0 for the first event)."""
    out = [0] * self.num_requests
    if self.host is not None and self.step > 0:
      for b, i in enumerate(self.rows):
        out[i] = int(self.host.accept_len[b])
    return out

  @property
  def done(self) -> list[bool]:
    """Per request: finished after this step (failed requests count as done)."""
    out = [True] * self.num_requests
    if self.host is not None:
      for b, i in enumerate(self.rows):
        out[i] = bool(self.host.done[b])
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
  index: int
  prompt: tuple[int, ...]
  max_new: int


class Engine:
  """Batched Medusa generation over a Llama-family model.

  Example::

    eng = Engine.load()                        # SmolLM2 + bundled heads
    res = eng.generate(["Hi!"], max_new_tokens=32, speculate="tree", chat=True)
    print(res.texts[0], res.stats[0].tokens_per_step)
  """

  def __init__(self, llama, tokenizer=None, medusa=None, *, max_cache_len: int = 2048,
               cache_dtype=None, max_tree_rows: int = 64, tree_choices=None,
               max_batch_size: int | None = None, heads_notice: str | None = None,
               chat_template=None, eos_ids: Sequence[int] | None = None,
               min_cache_len: int = 64, mesh=None):
    """Args:
      llama: the base ``Llama``.
      tokenizer: optional; ``encode(str) -> list[int]``, ``decode(ids) -> str``.
      medusa: ``MedusaWeights``, a ``MedusaModel``, or None (plain decoding only).
      max_cache_len: the largest KV cache (prompt + new tokens + tree nodes).
      cache_dtype: KV cache dtype (default: the model's compute dtype).
      max_tree_rows: budget B * T of the adaptive tree policy. 64 gives the
        64-node tree at batch 1, 16 nodes at batch 4 and LoRAX's chain from
        batch 16 on; on an H100 a 64-node tree at batch 4 cost 2.2x a plain
        step, more than trained SmolLM2 heads gain (docs/perf_decode.md).
      tree_choices: the best-first path list the adaptive policy cuts trees
        from (None: Medusa's ``mc_sim_7b_63``).
      max_batch_size: LoRAX's speculation guard for ``chain`` (None: the heads'
        own limit, else env / 32).
      heads_notice: a message about the heads (e.g. "freshly initialised").
      chat_template: a ``ChatTemplate`` for ``chat=True`` (None: ChatML).
      eos_ids: ids that end a request (None: the model config's).
      min_cache_len: the smallest cache bucket (a larger one means fewer
        distinct shapes, hence fewer compilations, across calls).
      mesh: a ``('data', 'model')`` mesh the model and heads are placed on
        (``Engine.load(..., mesh=)`` places them); batches are then padded to a
        multiple of the ``data`` axis and split over it, with the KV cache.
    """
    from medusa_jax.heads import speculation_max_batch_size
    self.adapter_slots: dict[int, int] | None = None
    routed = None
    if isinstance(medusa, Mapping):
      medusa, routed = self._adapters(medusa)
    model = getattr(medusa, "model", medusa)
    self.llama = llama
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.medusa = medusa
    self.heads = model
    self.cfg = llama.cfg
    self.max_cache_len = int(max_cache_len)
    self.min_cache_len = int(min_cache_len)
    self.cache_dtype = cache_dtype or getattr(llama, "dtype", jnp.float32)
    self.max_tree_rows = int(max_tree_rows)
    self.tree_choices = tree_choices
    if max_batch_size is None:
      max_batch_size = getattr(getattr(model, "medusa", None), "max_batch_size", None)
    self.max_batch_size = speculation_max_batch_size(max_batch_size)
    self.heads_notice = heads_notice
    self.chat_template = chat_template
    self.eos_ids = tuple(int(i) for i in (llama.cfg.eos_token_ids if eos_ids is None else eos_ids))
    self.num_heads = None if model is None else int(model.config.medusa_num_heads)
    self.decoder = Decoder(llama, model if routed is None else routed)

  def _adapters(self, adapters: Mapping):
    """(default adapter's weights, BatchMedusaWeights) of an adapter-id -> weights map.

    Sets ``adapter_slots``: every id of the map -> its weight slot; ids whose
    entry has no Medusa heads (None, other adapter types) use slot 0, the
    default adapter (id 0), as in LoRAX.
    """
    from medusa_jax.batching import BatchMedusaWeights, _is_medusa
    from medusa_jax.errors import AdapterLoadError
    adapters = dict(adapters)
    for k in adapters:
      if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise AdapterLoadError(f"adapters: ids must be integers >= 0, got {k!r}")
    routed = BatchMedusaWeights.load(adapters, [0])
    if routed is None:
      raise AdapterLoadError(f"adapters {sorted(adapters)}: none has Medusa weights")
    with_heads = sorted(int(k) for k, w in adapters.items() if _is_medusa(w))
    slot = {a: i for i, a in enumerate(with_heads)}
    self.adapter_slots = {int(k): slot.get(int(k), 0) for k in adapters}
    return adapters[0], routed

  # ------------------------------------------------------------------------- loading

  @classmethod
  def load(cls, base: str | os.PathLike | None = None, medusa: Any = None, *,
           dtype=jnp.float32, max_cache_len: int = 2048, num_heads: int = DEFAULT_NUM_HEADS,
           seed: int = 0, mesh=None, fuse_projections: bool = True, **kwargs) -> "Engine":
    """Loads a base model and heads.

    Args:
      base: a Hugging Face Llama directory; None = the cached
        SmolLM2-135M-Instruct (fetched by ``medusa_jax.assets.fetch``).
      medusa: an adapter directory, a ``MedusaWeights``, or None = the bundled
        SmolLM2 heads when shipped, else freshly initialised V2 heads (with a
        notice: they draft the base model's next token, not later ones). An
        adapter directory's ``medusa_choices.json`` (best-first paths) feeds
        the adaptive tree policy.
      dtype: compute and parameter dtype of the base model and heads.
      max_cache_len: see :class:`Engine`.
      num_heads: heads of freshly initialised heads.
      seed: their initialisation seed.
      mesh: a ``('data', 'model')`` mesh (``medusa_jax.sharding.make_mesh``):
        the base model and the heads are read straight onto it, each device
        reading only its block of each tensor (tensor-parallel over ``model``,
        batches over ``data``).
      fuse_projections: fuse q/k/v and gate/up into one matmul each
        (``Llama.fuse_projections``: the same function with fewer kernels per
        step); on a mesh the Megatron layout keeps them apart.
      **kwargs: passed to :class:`Engine`.
    """
    if base is None:
      from medusa_jax import assets
      base = assets.fetch().model_dir
    if mesh is None:
      from medusa_jax.models.llama_weights import load_llama
      llama = load_llama(base, dtype=dtype)
      if fuse_projections:
        llama = llama.fuse_projections()
    else:
      from medusa_jax.sharding import load_llama_sharded
      llama = load_llama_sharded(base, mesh, dtype=dtype)
    tokenizer, chat_template = _load_tokenizer(base)
    notice = None
    loaded_on_mesh = False
    if medusa is None and os.path.exists(os.path.join(BUNDLED_HEADS, "config.json")):
      medusa = BUNDLED_HEADS
    if isinstance(medusa, (str, os.PathLike)):
      from medusa_jax.weights import load_medusa_adapter
      choices = os.path.join(os.fspath(medusa), CHOICES_NAME)
      if "tree_choices" not in kwargs and os.path.exists(choices):
        kwargs["tree_choices"] = _read_choices(choices)
      medusa = load_medusa_adapter(medusa, dtype=dtype, mesh=mesh)
      loaded_on_mesh = True
    elif medusa is None:
      from medusa_jax.config import MedusaConfig
      from medusa_jax.weights import MedusaWeights
      config = MedusaConfig(base_model_name_or_path=str(base), medusa_num_heads=num_heads,
                            medusa_num_layers=1, version=2.0)
      medusa = MedusaWeights.init(config, llama.cfg.hidden_size, seed=seed, dtype=dtype)
      notice = (f"no trained Medusa heads found at {BUNDLED_HEADS}: using {num_heads} freshly"
                " initialised heads (identity ResBlocks), so drafts are rarely accepted and"
                " speculation shows its overhead, not its speed-up")
      warnings.warn(notice, stacklevel=2)
    if mesh is not None and not loaded_on_mesh and hasattr(medusa, "shard"):
      medusa = medusa.shard(mesh)
    return cls(llama, tokenizer, medusa, max_cache_len=max_cache_len, heads_notice=notice,
               chat_template=chat_template, mesh=mesh, **kwargs)

  # ------------------------------------------------------------------------- generation

  def generate(self, prompts: Sequence[Sequence[int] | str], max_new_tokens: int | Sequence[int] = 64,
               *, speculate: str | Speculate = "none",
               temperature: float | Sequence[float] = 0.0,
               top_p: float | Sequence[float] = 1.0, typical: bool = False, seed: int = 0,
               tree=None,
               chat: bool = False, adaptive: bool | None = None,
               on_error: str | OnError = "raise",
               adapters: Sequence[int] | None = None) -> GenerationResult:
    """Generates continuations of a batch of prompts.

    Args:
      prompts: token-id lists, or strings (tokenised; with ``chat=True`` each
        string is a user turn wrapped in the model's chat template).
      max_new_tokens: one budget for all, or one per prompt (>= 1).
      speculate: "none", "chain" or "tree".
      temperature: 0 = greedy; > 0 samples (lossless: each emitted token is a
        sample of the warped target distribution). One value for all, or one
        per prompt: the values are traced arrays, so changing them never
        recompiles and greedy and sampled rows can share a batch.
      top_p: nucleus mass in (0, 1]; one value or one per prompt.
      typical: Medusa's typical acceptance (temperature > 0).
      seed: PRNG seed.
      tree: for "tree": Medusa choices (a list of paths) or ``TreeBuffers``;
        None = the adaptive policy (``tree_for_batch``).
      chat: apply the chat template to string prompts.
      adaptive: lift the chain guard (default: False for chain).
      on_error: "raise" (the default: the first bad request raises before any
        device work) or "skip" (bad requests get an error entry, the others run).
      adapters: one adapter id per prompt, for an engine built with several
        Medusa adapters (``medusa={id: weights}``); None = the default (0).
        Routed per row on device: any mix shares one compilation.

    Returns:
      A :class:`GenerationResult`.

    Raises:
      RequestError: a bad option, or (on_error="raise") a bad request, naming it.
    """
    events = self.stream(prompts, max_new_tokens, speculate=speculate, temperature=temperature,
                         top_p=top_p, typical=typical, seed=seed, tree=tree, chat=chat,
                         adaptive=adaptive, on_error=on_error, adapters=adapters)
    for event in events:
      pass
    return event.result

  def stream(self, prompts: Sequence[Sequence[int] | str], max_new_tokens: int | Sequence[int] = 64,
               *, speculate: str | Speculate = "none",
               temperature: float | Sequence[float] = 0.0,
               top_p: float | Sequence[float] = 1.0, typical: bool = False, seed: int = 0,
               tree=None,
               chat: bool = False, adaptive: bool | None = None,
               on_error: str | OnError = "raise",
               adapters: Sequence[int] | None = None) -> Iterator[StreamEvent]:
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
    mode = Speculate.parse(speculate)
    on_error = OnError.parse(on_error)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
      raise RequestError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    strategy, temps, top_ps = self._strategy(temperature, top_p, typical, len(prompts))
    slots = self._slots(adapters, len(prompts))
    if mode is not Speculate.NONE and self.heads is None:
      raise RequestError(f"speculate={mode.value!r}: this engine has no Medusa heads")
    budgets = self._budgets(max_new_tokens, len(prompts))

    requests: list[_Request | None] = [None] * len(prompts)
    errors: list[RequestError | None] = [None] * len(prompts)
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
      try:
        requests[i] = _Request(i, self._encode(i, prompt, chat), self._check_budget(i, budget))
      except RequestError as e:
        errors[i] = e
    valid = [r for r in requests if r is not None]
    tree, skipped = self._choose_tree(mode, tree, max(len(valid), 1), adaptive)
    config = StepConfig(tree=tree, strategy=strategy, eos_ids=self.eos_ids)
    for r in list(valid):
      need = len(r.prompt) + r.max_new + config.num_nodes
      if need > self.max_cache_len:
        errors[r.index] = RequestError(
            f"request {r.index}: prompt ({len(r.prompt)} tokens) + max_new_tokens ({r.max_new})"
            f" + tree nodes ({config.num_nodes}) = {need} exceeds max_cache_len"
            f" ({self.max_cache_len})")
        requests[r.index] = None
    if on_error is OnError.RAISE:
      first = next((e for e in errors if e is not None), None)
      if first is not None:
        raise first
    valid = [r for r in requests if r is not None]

    outs: dict[int, dict] = {}
    decode_s, decode_tokens, steps = 0.0, 0, 0
    if valid:
      outs, decode_s, decode_tokens, steps = yield from self._run(
          valid, config, seed, t_start, temps, top_ps, len(prompts), slots)
    wall = time.perf_counter() - t_start
    tokens = [outs[i]["tokens"] if i in outs else [] for i in range(len(prompts))]
    stats = [self._row_stats(outs[i], config) if i in outs else None for i in range(len(prompts))]
    texts = None
    if self.tokenizer is not None:
      texts = [self._decode(t) if t else "" for t in tokens]
    result = GenerationResult(tokens=tokens, steps=[s.steps if s else 0 for s in stats],
                              texts=texts, stats=stats, errors=errors, speculate=mode,
                              tree_nodes=config.num_nodes, speculation_skipped=skipped,
                              wall_s=wall, decode_s=decode_s, decode_tokens=decode_tokens)
    yield StreamEvent(step=steps, num_requests=len(prompts), result=result)

  # ------------------------------------------------------------------------- internals

  def _decode(self, ids: list[int]) -> str:
    """Text of new tokens, without special tokens (EOS) when the tokenizer can drop them."""
    try:
      return self.tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
      return self.tokenizer.decode(ids)

  @staticmethod
  def _strategy(temperature, top_p, typical, count: int):
    """(static strategy kind, per-prompt temperatures, per-prompt top-p)."""
    from medusa_jax.decoding.verify import Greedy, Sampling, Typical
    values = {}
    for name, value in (("temperature", temperature), ("top_p", top_p)):
      if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != count:
          raise RequestError(f"{name}: expected one value per prompt ({count}), got {len(value)}")
        items = list(value)
      else:
        items = [value] * count
      for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or (
            not math.isfinite(v)):
          raise RequestError(f"{name}={v!r}: expected a finite number")
      values[name] = [float(v) for v in items]
    for t in values["temperature"]:
      if t < 0:
        raise RequestError(f"temperature={t!r}: expected >= 0 (0 = greedy)")
    for p in values["top_p"]:
      if not 0 < p <= 1:
        raise RequestError(f"top_p={p!r}: expected 0 < top_p <= 1")
    if not isinstance(typical, bool):
      raise RequestError(f"typical={typical!r}: expected a bool")
    # Only the kind is static: the values travel as per-row arrays.
    if all(t == 0 for t in values["temperature"]):
      kind = Greedy()
    else:
      kind = Typical() if typical else Sampling()
    return kind, values["temperature"], values["top_p"]

  def _slots(self, adapters, count: int) -> list[int] | None:
    """Weight slot per prompt from its adapter id (None: every row the default)."""
    if adapters is None:
      return None
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or (
        len(adapters) != count):
      raise RequestError(f"adapters: expected one adapter id per prompt ({count}), got"
                         f" {adapters!r}")
    known = self.adapter_slots or {0: 0}
    out = []
    for i, a in enumerate(adapters):
      if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or int(a) not in known:
        raise RequestError(f"request {i}: adapter {a!r}; expected one of {sorted(known)}")
      out.append(known[int(a)])
    return out

  @staticmethod
  def _budgets(max_new_tokens, count: int) -> list:
    if isinstance(max_new_tokens, Sequence) and not isinstance(max_new_tokens, (str, bytes)):
      if len(max_new_tokens) != count:
        raise RequestError(f"max_new_tokens: expected one budget per prompt ({count}), got"
                           f" {len(max_new_tokens)}")
      return list(max_new_tokens)
    return [max_new_tokens] * count

  @staticmethod
  def _check_budget(i: int, budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
      raise RequestError(f"request {i}: max_new_tokens={budget!r}; expected an integer >= 1")
    return int(budget)

  def _encode(self, i: int, prompt, chat: bool) -> tuple[int, ...]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise RequestError(f"request {i}: a string prompt needs a tokenizer; pass token ids")
      if chat:
        from medusa_jax.models.chat import apply_chat_template
        rendered = apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, template=self.chat_template)
        ids = self.tokenizer.encode(rendered)
      else:
        ids = self.tokenizer.encode(prompt)
    else:
      ids = prompt
    if isinstance(ids, np.ndarray):
      ids = ids.tolist()
    if not isinstance(ids, Sequence) or isinstance(ids, bytes):
      raise RequestError(f"request {i}: expected a list of token ids or a string, got"
                         f" {type(prompt).__name__}")
    if len(ids) == 0:
      raise RequestError(f"request {i}: empty prompt; expected at least one token")
    vocab = self.cfg.vocab_size
    for j, t in enumerate(ids):
      if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
        raise RequestError(f"request {i}: token {j} = {t!r}; expected an integer id in"
                           f" [0, {vocab})")
    return tuple(int(t) for t in ids)

  def _choose_tree(self, mode: Speculate, tree, batch: int, adaptive: bool | None):
    """(TreeBuffers | None, speculation_skipped) for this call."""
    from medusa_jax.decoding import tree as tree_mod
    if mode is Speculate.NONE:
      return None, False
    n = self.num_heads
    if mode is Speculate.CHAIN:
      if not adaptive and batch * (n + 1) > self.max_batch_size:
        return None, True
      return tree_mod.build_tree(tree_mod.chain_choices(n)), False
    if tree is None:
      return tree_mod.tree_for_batch(batch, n, max_tree_rows=self.max_tree_rows,
                                     choices=self.tree_choices), False
    if not isinstance(tree, tree_mod.TreeBuffers):
      tree = tree_mod.build_tree(tree)
    if tree.depth > n:
      raise RequestError(f"tree: depth {tree.depth} exceeds the {n} Medusa heads")
    if tree.max_rank + 1 > self.cfg.vocab_size:
      raise RequestError(f"tree: uses top-{tree.max_rank + 1} ranks; expected at most the"
                         f" vocabulary size ({self.cfg.vocab_size})")
    return tree, False

  def _run(self, valid: list[_Request], config: StepConfig, seed: int, t_start: float,
           temps: Sequence[float], top_ps: Sequence[float], num_requests: int,
           slots: Sequence[int] | None = None):
    """Prefill + the step loop for the valid requests, yielding a StreamEvent per step.

    Returns (through ``yield from``): (outs, decode_s, decode_tokens, steps).
    """
    rows = buckets.batch_bucket(len(valid))
    if self.mesh is not None:
      from medusa_jax.sharding import DATA, axis_size
      data = axis_size(self.mesh, DATA)
      rows = -(-rows // data) * data  # split evenly over the data axis
    longest = max(len(r.prompt) for r in valid)
    need = max(len(r.prompt) + r.max_new for r in valid) + config.num_nodes
    cache_len = buckets.cache_bucket(need, self.max_cache_len, self.min_cache_len)
    width = buckets.prompt_bucket(longest, cache_len)
    prompt = np.zeros((rows, width), np.int32)
    lens = np.ones((rows,), np.int32)
    budget = np.ones((rows,), np.int32)
    pad = np.ones((rows,), bool)
    temp_B = np.zeros((rows,), np.float32)
    top_p_B = np.ones((rows,), np.float32)
    for b, r in enumerate(valid):
      prompt[b, :len(r.prompt)] = r.prompt
      lens[b], budget[b], pad[b] = len(r.prompt), r.max_new, False
      temp_B[b], top_p_B[b] = temps[r.index], top_ps[r.index]
    slot_B = None
    if self.adapter_slots is not None:
      slot_B = np.zeros((rows,), np.int32)
      for b, r in enumerate(valid):
        slot_B[b] = 0 if slots is None else slots[r.index]

    dec = self.decoder
    cache = dec.init_cache(rows, cache_len, self.cache_dtype)
    put = jnp.asarray
    if self.mesh is not None:
      from medusa_jax.sharding import shard_batch, shard_cache
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
    # Dispatch step k+1 before reading step k's output, so the host read overlaps
    # device work; finished rows make the extra step a no-op. The per-step host
    # work is a few vectorised NumPy operations, whatever the batch size.
    for k in range(max(r.max_new for r in valid) + 1):
      state, nxt = dec.step(state, config=config)
      host = jax.device_get(pending)
      now = time.perf_counter()
      outputs.append(host)
      newly_done = host.done[:n] & np.isnan(finished)
      finished[newly_done] = now - t_start
      if k == 1:
        decode_t0 = now  # the first decode step paid for its compilation
      elif k > 1:
        decode_tokens += int(host.count[:n].sum())
      t_yield = time.perf_counter()
      yield StreamEvent(step=k, host=host, rows=rows_to_requests, num_requests=num_requests)
      if decode_t0 is not None:
        decode_t0 += time.perf_counter() - t_yield  # the consumer's time is not decoding
      if bool(np.all(host.done[:n])):
        break
      pending = nxt
    decode_s = (time.perf_counter() - decode_t0) if decode_t0 is not None else 0.0

    tokens_SxBxW = np.stack([np.pad(o.tokens[:n], ((0, 0), (0, config.width - o.tokens.shape[1])),
                                    constant_values=-1) for o in outputs])
    count_SxB = np.stack([o.count[:n] for o in outputs])
    active_SxB = np.stack([o.active[:n] for o in outputs])
    accept_SxB = np.stack([o.accept_len[:n] for o in outputs])
    outs = {}
    for b, r in enumerate(valid):
      emitted = [tokens_SxBxW[s, b, :count_SxB[s, b]] for s in range(len(outputs))]
      steps_b = active_SxB[1:, b]  # decode steps the row took part in
      hist = np.bincount(accept_SxB[1:, b][steps_b], minlength=config.width)
      outs[r.index] = dict(tokens=[int(t) for t in np.concatenate(emitted)],
                           steps=int(steps_b.sum()), hist=[int(h) for h in hist],
                           finished=None if np.isnan(finished[b]) else float(finished[b]))
    return outs, decode_s, decode_tokens, len(outputs) - 1

  @staticmethod
  def _row_stats(o: dict, config: StepConfig) -> RowStats:
    n_tok, steps = len(o["tokens"]), o["steps"]
    hist = tuple(o["hist"])
    heads = tuple(sum(hist[a] for a in range(k + 1, len(hist))) for k in range(len(hist) - 1))
    wall = o["finished"] or float("nan")
    return RowStats(new_tokens=n_tok, steps=steps,
                    tokens_per_step=(n_tok - 1) / steps if steps else 0.0,
                    accept_hist=hist, head_accepts=heads, wall_s=wall,
                    tokens_per_s=n_tok / wall if wall and wall > 0 else float("nan"))


def _read_choices(path: str) -> tuple[tuple[int, ...], ...]:
  """Reads a best-first list of tree paths (JSON list of lists of ranks)."""
  import json
  from medusa_jax.errors import ConfigError
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    return tuple(tuple(int(r) for r in p) for p in raw)
  except (OSError, ValueError, TypeError) as e:
    raise ConfigError(f"{path}: expected a JSON list of paths (lists of ranks): {e}") from None


def _load_tokenizer(model_dir):
  """The tokenizer and chat template beside a model (None for what is missing)."""
  from medusa_jax.errors import MedusaError
  from medusa_jax.models.chat import ChatTemplate
  from medusa_jax.models.tokenizer import Tokenizer
  tokenizer = template = None
  try:
    tokenizer = Tokenizer.from_file(model_dir)
  except MedusaError:
    pass
  try:
    template = ChatTemplate.from_file(model_dir)
  except MedusaError:
    pass
  return tokenizer, template
