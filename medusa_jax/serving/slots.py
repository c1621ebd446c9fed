"""The slot-based decode core: ``prefill`` a request, ``insert`` it into a slot, ``generate`` K steps.

The serving loop's device side, in the shape JAX serving engines use
(JetStream / MaxText): a fixed number S of slots and a fixed cache length L,
so every shape is static and nothing recompiles as requests come and go.

* :meth:`SlotCore.prefill` runs one prompt (padded to a power-of-two bucket)
  into a one-row cache and chooses its first token and first drafts: a
  :class:`Prefix`.
* :meth:`SlotCore.insert` writes a prefix into slot ``s`` of the running
  :class:`~medusa_jax.decoding.state.DecodeState` (the slot index is traced:
  one compilation per prompt bucket).
* :meth:`SlotCore.generate` runs up to K decode steps over all S slots in one
  device loop (``decoding.step.multi_step``) and returns their tokens
  together; free and finished slots are masked rows.
* :meth:`SlotCore.release` ends slots (cancellation) on the device.

Per slot the state holds its length, pending root and draft candidates,
budget, done flag, temperature, top-p and adapter weight slot. Greedy and
sampled requests share the state: a call whose active slots are all greedy
runs the greedy rule, any other the lossless sampling rule (at temperature 0
it takes the greedy limit), both compiled at warm-up.

Speculation follows occupancy step by step: every step the device counts the
active slots and runs the step config chosen for that count
(:class:`SpeculationTable`), all of them sub-trees of one carried tree, so
plain, chain and tree steps follow one another on one state. ``speculate``:

* ``"tree"``: for ``a`` active slots, the adaptive tree of
  ``tree.tree_for_batch(a, ...)`` (large when few slots are busy, smaller as
  they fill), or a measured :class:`~medusa_jax.decoding.policy` table;
* ``"chain"``: LoRAX's chain of n drafts, and plain steps whenever
  ``a * (n + 1)`` exceeds the speculation max batch size, as LoRAX's heads do;
* ``"none"``: plain decoding.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medusa_jax.decoding import tree as tree_mod
from medusa_jax.decoding.decoder import Decoder
from medusa_jax.decoding.requests import Speculate
from medusa_jax.decoding.state import DecodeState, StepConfig, StepOutput, StepsOutput
from medusa_jax.decoding.strategies import Greedy, Sampling
from medusa_jax.errors import ConfigError
from medusa_jax.models.llama import KVCache
from medusa_jax.models.llama_sharding import cache_spec, partitionable, shard_cache
from medusa_jax.parallel.mesh import rows_axis

Array = jax.Array

MIN_PROMPT_BUCKET = 16


@flax.struct.dataclass
class Prefix:
  """One prefilled request, ready for :meth:`SlotCore.insert`.

  Attributes:
    state: a one-row ``DecodeState`` whose cache holds the prompt's K/V in
      ``[1, P, G, D]`` per layer (P = the prompt bucket).
    first: the prefill's ``StepOutput`` (the request's first token).
  """
  state: DecodeState
  first: StepOutput


@dataclasses.dataclass(frozen=True)
class SpeculationTable:
  """The step configs of a core and which one runs for each count of active slots.

  Attributes:
    carrier: the tree whose candidates the state carries (None: plain only).
    trees: per config, its tree (None: a plain step); all sub-trees of ``carrier``.
    branch_of_active: [S + 1] index into ``trees`` for 0..S active slots.
  """
  carrier: Any
  trees: tuple[Any, ...]
  branch_of_active: tuple[int, ...]

  def tree_for(self, active: int):
    """The tree (or None) a step with ``active`` busy slots runs."""
    return self.trees[self.branch_of_active[active]]

  def describe(self) -> str:
    """One line: nodes per step for each range of busy slots."""
    parts = []
    for branch, group in itertools.groupby(range(1, len(self.branch_of_active)),
                                           key=self.branch_of_active.__getitem__):
      busy = list(group)
      tree = self.trees[branch]
      nodes = "plain" if tree is None else f"{tree.num_nodes} nodes"
      span = f"{busy[0]}-{busy[-1]}" if len(busy) > 1 else f"{busy[0]}"
      parts.append(f"{span} busy: {nodes}")
    return "; ".join(parts)


def speculation_table(speculate: Speculate | str, num_slots: int, num_heads: int | None, *,
                      max_tree_rows: int, tree_choices=None, max_batch_size: int = 32,
                      tree_for: Callable[[int], Any] | None = None) -> SpeculationTable:
  """The per-occupancy step configs of ``speculate`` (see the module docstring).

  Args:
    speculate: "tree", "chain" or "none".
    num_slots: S.
    num_heads: n Medusa heads (None: no heads, plain only).
    max_tree_rows: the adaptive tree's budget of verified rows (``EngineConfig``).
    tree_choices: best-first paths (or a tree name) trees are cut from.
    max_batch_size: LoRAX's speculation guard, for "chain".
    tree_for: for "tree", a measured choice ``active -> TreeBuffers | None``
      replacing the row-budget policy.

  Raises:
    ConfigError: speculation asked without heads.
  """
  speculate = Speculate.parse(speculate)
  plain = SpeculationTable(carrier=None, trees=(None,), branch_of_active=(0,) * (num_slots + 1))
  if speculate is Speculate.NONE:
    return plain
  if num_heads is None:
    raise ConfigError(f"speculate={speculate.value!r}: the model has no Medusa heads")
  if speculate is Speculate.CHAIN:
    chain = tree_mod.build_tree(tree_mod.chain_choices(num_heads))
    per_active = tuple(chain if a * (num_heads + 1) <= max_batch_size else None
                       for a in range(num_slots + 1))
  else:
    def budget(active: int):
      return tree_mod.tree_for_batch(active, num_heads, max_tree_rows=max_tree_rows,
                                     choices=tree_choices)
    pick = tree_for or budget
    per_active = (None,) + tuple(pick(a) for a in range(1, num_slots + 1))
  per_active = tuple(None if t is not None and t.depth == 0 else t for t in per_active)
  if all(t is None for t in per_active):
    return plain
  # Row 0 (no active slot) runs nothing: give it the config of one busy slot.
  per_active = (per_active[1],) + per_active[1:]
  topk = max(t.topk for t in per_active if t is not None)
  per_active = tuple(None if t is None else tree_mod.build_tree(t.choices, topk)
                     for t in per_active)
  trees = tuple(dict.fromkeys(per_active))
  paths = {p for t in trees if t is not None for p in t.choices}
  carrier = tree_mod.build_tree(sorted(paths, key=lambda p: (len(p), p)), topk)
  index = {t: i for i, t in enumerate(trees)}
  branch = tuple(index[t] for t in per_active)
  return SpeculationTable(carrier=carrier, trees=trees, branch_of_active=branch)


class SlotCore:
  """Fixed decode slots over one model: prefill, insert, generate, release.

  Example::

    core = SlotCore(llama, heads, num_slots=8, cache_len=1024, steps_per_call=4,
                    table=speculation_table("tree", 8, heads.num_heads, max_tree_rows=64))
    state = core.init_state()
    prefix = core.prefill(prompt_ids, max_new=64, temperature=0.0)
    state = core.insert(prefix, state, slot=3)
    state, out = core.generate(state, greedy=True)     # out: StepsOutput [K, S, W]

  ``trace_counts`` counts traces of every jitted function; after
  :meth:`warmup` it no longer grows, whatever requests come and go.
  """

  def __init__(self, llama, heads=None, *, num_slots: int, cache_len: int, steps_per_call: int,
               table: SpeculationTable, eos_ids: Sequence[int] = (), cache_dtype=None,
               transpose_lm_head: bool | None = None, seed: int = 0, mesh: Mesh | None = None):
    """Args:
      llama: the base ``Llama``.
      heads: heads of the heads protocol, routed per row by ``adapter_slot``
        (``BatchMedusaWeights``) or not (``MedusaModel``), or None.
      num_slots: S, requests decoded together.
      cache_len: L, cache slots per request (prompt + new tokens + tree).
      steps_per_call: K, decode steps per :meth:`generate` call.
      table: the speculation configs (:func:`speculation_table`).
      eos_ids: ids that end a request.
      cache_dtype: KV cache dtype (None: the model's).
      transpose_lm_head: see :class:`~medusa_jax.decoding.decoder.Decoder`.
      seed: the PRNG seed of the sampled rows.
      mesh: the ``('data', 'model')`` mesh ``llama`` and ``heads`` are placed on
        (``Engine.mesh``), or None. The slots' KV cache is then split like
        the engine's (rows over ``data`` when S divides it, kv heads over
        ``model``), and the per-slot rows over ``data``.
    """
    for name, value in (("num_slots", num_slots), ("cache_len", cache_len),
                        ("steps_per_call", steps_per_call)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    if table.carrier is not None and heads is None:
      raise ConfigError("SlotCore: a speculation table needs Medusa heads")
    self.num_slots, self.cache_len, self.steps_per_call = num_slots, cache_len, steps_per_call
    self.table = table
    self.cfg = llama.cfg
    self.routed = heads is not None and hasattr(heads, "adapter_ids")
    self.decoder = Decoder(partitionable(llama, mesh), heads, transpose_lm_head=transpose_lm_head)
    self.cache_dtype = cache_dtype or getattr(llama, "dtype", jnp.float32)
    eos = tuple(int(e) for e in eos_ids)
    self.eos_ids = eos
    self.seed = seed
    self.mesh = mesh

    def configs(strategy):
      return tuple(StepConfig(tree=t, strategy=strategy, eos_ids=eos, carrier=table.carrier)
                   for t in table.trees)
    self._configs = {True: configs(Greedy()), False: configs(Sampling())}
    # The prefill drafts the whole carried tree. One rule for every request:
    # sampling takes the greedy limit at temperature 0, and a single rule
    # halves the prefill compilations (one per prompt bucket).
    self._prefill_config = StepConfig(tree=table.carrier, strategy=Sampling(), eos_ids=eos)
    self.nodes = 1 if table.carrier is None else table.carrier.num_nodes
    count = self.trace_counts = self.decoder.trace_counts

    def insert(prefix, state, slot):
      count["insert"] += 1
      return _insert(prefix, state, slot)

    def release(state, mask_S):
      count["release"] += 1
      return _release(state, mask_S)
    self._insert = jax.jit(insert, donate_argnames="state")
    # One dispatch for a prefill's empty cache (not one per layer and buffer),
    # made where the prefill reads it.
    placed = {} if mesh is None else dict(
        out_shardings=NamedSharding(mesh, cache_spec(self.cfg, 1, mesh)))
    self._empty_cache = jax.jit(
        lambda width: KVCache.init(self.cfg, 1, width, self.cache_dtype), static_argnums=0,
        **placed)
    self._release = jax.jit(release, donate_argnames="state")

  # -- sizes --------------------------------------------------------------------------------

  @property
  def width(self) -> int:
    """W: most tokens one step emits per slot."""
    return max(c.width for c in self._configs[True])

  def prompt_buckets(self) -> list[int]:
    """The padded prompt widths prefill compiles for."""
    out, p = [], MIN_PROMPT_BUCKET
    while p < self.cache_len:
      out.append(p)
      p *= 2
    return out + [self.cache_len]

  def max_new_tokens(self, prompt_len: int) -> int:
    """The most new tokens a prompt of ``prompt_len`` tokens can get (<= 0: does not fit)."""
    return self.cache_len - prompt_len - self.nodes

  # -- the core -----------------------------------------------------------------------------

  def init_state(self) -> DecodeState:
    """A state of S free slots (every row done)."""
    s = self.num_slots
    cache = KVCache.init(self.cfg, s, self.cache_len, self.cache_dtype)
    def zero_S():  # a fresh buffer per field: the state is donated
      return jnp.zeros((s,), jnp.int32)
    state = DecodeState(cache=cache, lengths=zero_S(),
                        tokens=jnp.zeros((s, self.nodes), jnp.int32), generated=zero_S(),
                        max_new=zero_S(), done=jnp.ones((s,), bool),
                        rng=jax.random.PRNGKey(self.seed),
                        temperature=jnp.zeros((s,), jnp.float32),
                        top_p=jnp.ones((s,), jnp.float32),
                        adapter_slot=zero_S() if self.routed else None)
    return state if self.mesh is None else self._place(state)

  def _place(self, state: DecodeState) -> DecodeState:
    """``state`` on the mesh: the cache by ``shard_cache``, the [S, ...] rows
    over ``data`` when S divides it (else replicated), the key replicated."""
    mesh, rows = self.mesh, rows_axis(self.num_slots, self.mesh)

    def put_rows(a):
      return None if a is None else jax.device_put(
          a, NamedSharding(mesh, P(rows, *([None] * (a.ndim - 1)))))
    fields = {f: put_rows(getattr(state, f)) for f in
              ("lengths", "tokens", "generated", "max_new", "done", "temperature", "top_p",
               "adapter_slot")}
    return state.replace(cache=shard_cache(state.cache, self.cfg, mesh),
                         rng=jax.device_put(state.rng, NamedSharding(mesh, P())), **fields)

  def prefill(self, prompt: Sequence[int], *, max_new: int, temperature: float = 0.0,
              top_p: float = 1.0, adapter_slot: int = 0, rng: Array | None = None) -> Prefix:
    """Runs one prompt and chooses its first token and drafts.

    Args:
      prompt: [P] token ids, 1 <= P and P + max_new + T <= L.
      max_new: the request's budget (>= 1).
      temperature, top_p: its sampling options.
      adapter_slot: the weight slot of its adapter.
      rng: the key of its first token (None: one derived from the core's seed).

    Raises:
      ConfigError: the prompt and budget do not fit the cache.
    """
    n = len(prompt)
    if n < 1 or max_new < 1 or n + max_new + self.nodes > self.cache_len:
      raise ConfigError(f"prefill: prompt ({n}) + max_new ({max_new}) + tree ({self.nodes})"
                        f" must fit cache_len={self.cache_len}")
    width = next(p for p in self.prompt_buckets() if p >= n)
    ids = np.zeros((1, width), np.int32)
    ids[0, :n] = prompt
    one = lambda v, dt: jnp.asarray(np.asarray([v], dt))
    if rng is None:
      rng = jax.random.PRNGKey(self.seed)
    dec = self.decoder
    state, first = dec.prefill(
        self._empty_cache(width), jnp.asarray(ids),
        one(n, np.int32), one(max_new, np.int32), one(False, bool), rng,
        config=self._prefill_config, temperature=one(temperature, np.float32),
        top_p=one(top_p, np.float32),
        adapter_slot=one(adapter_slot, np.int32) if self.routed else None)
    return Prefix(state=state, first=first)

  def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
    """``state`` with ``prefix`` in slot ``slot`` (its old request dropped). DONATES state."""
    if not 0 <= slot < self.num_slots:
      raise ConfigError(f"insert: slot {slot} out of range [0, {self.num_slots})")
    return self._insert(prefix.state, state, jnp.int32(slot))

  def release(self, state: DecodeState, slots: Sequence[int]) -> DecodeState:
    """``state`` with ``slots`` ended (their rows masked from the next step). DONATES state."""
    mask = np.zeros((self.num_slots,), bool)
    mask[list(slots)] = True
    return self._release(state, jnp.asarray(mask))

  def generate(self, state: DecodeState, *, greedy: bool) -> tuple[DecodeState, StepsOutput]:
    """Up to K steps over every slot. DONATES state.

    Args:
      state: the running state.
      greedy: every active slot is at temperature 0 (the greedy rule; else
        the sampling rule, which takes the greedy limit at temperature 0).

    Returns:
      The new state and the steps' outputs ([K, S, W] tokens, per-step counts;
      ``steps`` tells how many ran).
    """
    return self.decoder.steps(state, configs=self._configs[bool(greedy)],
                              num_steps=self.steps_per_call,
                              branch_of_active=self.table.branch_of_active)

  def warmup(self, progress: Callable[[str], None] | None = None) -> None:
    """Compiles every function the serving loop calls (prefill and insert per bucket, both rules).

    On the CPU this takes seconds per prompt bucket and decode rule; a
    persistent compilation cache (``jax_compilation_cache_dir``) makes later
    starts fast.

    Afterwards ``decoder.trace_counts`` stays fixed as requests come and go.
    """
    state = self.init_state()
    for width in self.prompt_buckets():
      n = min(width, self.cache_len - self.nodes - 1)
      if n < 1:
        continue
      state = self.insert(self.prefill([1] * n, max_new=1), state, 0)
      if progress:
        progress(f"compiled prefill for prompts up to {width} tokens")
    for greedy in (True, False):
      state = self.release(state, [0])
      state, out = self.generate(state, greedy=greedy)
      jax.block_until_ready(out)
    if progress:
      progress("compiled the decode loop")


def _insert(prefix: DecodeState, state: DecodeState, slot: Array) -> DecodeState:
  """Writes a one-row prefix state into row ``slot`` of ``state`` (see :meth:`SlotCore.insert`)."""
  def put_row(full, row):
    start = (slot,) + (0,) * (full.ndim - 1)
    return jax.lax.dynamic_update_slice(full, row.astype(full.dtype), start)

  cache = jax.tree.map(put_row, state.cache, prefix.cache)
  fields = {}
  for name in ("lengths", "tokens", "generated", "max_new", "done", "temperature", "top_p",
               "adapter_slot"):
    full, row = getattr(state, name), getattr(prefix, name)
    if full is not None:
      fields[name] = put_row(full, row)
  return state.replace(cache=cache, **fields)


def _release(state: DecodeState, mask_S: Array) -> DecodeState:
  return state.replace(done=state.done | mask_S)
