"""The jitted decode steps: prefill, plain, speculative (tree or chain), and LoRAX's I/O step.

Every step is one ``jax.jit`` call over the split model state (``nnx.split``
once, outside the loop) with the decode state donated, so the KV cache is
updated in place. Static knobs (the tree, the acceptance strategy, the EOS ids)
live in one hashable :class:`StepConfig` passed by name; a step compiles once
per (batch bucket, cache bucket, config).

State between steps (per row b):

* ``lengths[b]`` tokens are committed in the cache (their K/V are written);
* ``tokens[b, 0]`` is the pending root: chosen and already emitted, not yet in
  the cache; ``tokens[b, 1:]`` are the draft candidates of the next tree,
  built from the Medusa heads at the last committed position.

A speculative step runs, in one call:

1. one forward of the T tree tokens at positions ``lengths + depth`` with the
   tree mask over the committed prefix (their K/V land at ``lengths + t``);
2. the base LM head over the tree's internal nodes and the acceptance walk
   (``walk_tree``): the accepted path ``c_0..c_a``;
3. one LM-head call at the accepted node for its own logits and the Medusa
   heads' drafts: the bonus token (``finish_walk``) and the next tree's
   top-k tokens; the bonus becomes the next root;
4. KV compaction: the path's K/V move to ``lengths + 0..a``; ``lengths += a+1``.

A step emits ``c_1..c_a`` and the bonus (``a + 1`` tokens), cut at the first
EOS or at the row's ``max_new``; finished rows (and padding rows) are masked:
their lengths freeze and they emit nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.decoding import cache_ops
from medusa_jax.heads import MedusaModel, MedusaV2

Array = jax.Array

EMPTY = -1
"""Token id written in output slots that carry no token."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StepConfig:
  """Static knobs of a step; hashable, one compilation per value.

  Attributes:
    tree: the candidate tree (``TreeBuffers``); None = plain decoding.
    strategy: the acceptance / sampling strategy (``Greedy()``, ``Typical``,
      ``Sampling``), also used to choose the root.
    eos_ids: ids that end a row (the EOS itself is emitted).
  """
  tree: Any = None
  strategy: Any
  eos_ids: tuple[int, ...] = ()

  @property
  def num_nodes(self) -> int:
    """T: tokens fed per step (1 for plain decoding)."""
    return 1 if self.tree is None else int(self.tree.num_nodes)

  @property
  def width(self) -> int:
    """Most tokens a step can emit: tree depth + 1."""
    return 1 if self.tree is None else int(self.tree.depth) + 1


@flax.struct.dataclass
class DecodeState:
  """Device state of a batch between steps (donated to every step).

  Attributes:
    cache: the ``KVCache`` ([B, L, G, D] per layer).
    lengths: [B] int32 committed tokens per row.
    tokens: [B, T] int32 inputs of the next step; column 0 is the pending
      root, columns 1.. the draft candidates of the tree (T = 1 when plain).
    generated: [B] int32 tokens emitted so far.
    max_new: [B] int32 per-row budget of new tokens.
    done: [B] bool; finished and padding rows.
    rng: PRNG key, split once per step.
    temperature: [B] float32 per-row temperature (0 = greedy), or None for
      the strategy's own.
    top_p: [B] float32 per-row nucleus mass, or None for the strategy's own.
    adapter_slot: [B] int32 per-row weight slot of ``BatchMedusaWeights``
      heads (traced: the batch's adapter mix never recompiles), or None.
  """
  cache: Any
  lengths: Array
  tokens: Array
  generated: Array
  max_new: Array
  done: Array
  rng: Array
  temperature: Array | None = None
  top_p: Array | None = None
  adapter_slot: Array | None = None


def _route(heads, adapter_slot: Array | None):
  """Heads routed per row: ``BatchMedusaWeights`` gets the rows' weight slots [B]."""
  if adapter_slot is None or not hasattr(heads, "row_slot"):
    return heads
  return heads.replace(row_slot=adapter_slot.astype(jnp.int32))


def _row_params(state: DecodeState):
  """The state's per-row sampling options, or None (the strategy's own apply)."""
  if state.temperature is None:
    return None
  from medusa_jax.decoding.verify import RowParams
  return RowParams(temperature=state.temperature, top_p=state.top_p)


@flax.struct.dataclass
class StepOutput:
  """What the host reads after a step (one ``jax.device_get``).

  Attributes:
    tokens: [B, W] int32 emitted tokens, ``EMPTY`` after ``count``.
    count: [B] int32 tokens emitted this step (0 for finished rows).
    accept_len: [B] int32 draft tokens accepted (0..D; 0 when plain).
    active: [B] bool rows that took part in this step (not done before it).
    done: [B] bool rows finished after this step.
  """
  tokens: Array
  count: Array
  accept_len: Array
  active: Array
  done: Array


@dataclasses.dataclass(frozen=True)
class Graphs:
  """The static halves of ``nnx.split``: base model and heads (or None)."""
  llama: Any
  heads: Any


@flax.struct.dataclass
class Params:
  """The array halves of ``nnx.split``: base model and heads state (or None).

  Attributes:
    llama: the base model's state.
    heads: the heads' state, or None.
    lm_head_t: [H, V] a transposed copy of a tied embedding, or None (see
      :class:`Decoder`).
  """
  llama: Any
  heads: Any
  lm_head_t: Any = None


def _lm_head(llama, params: Params):
  """The LM head ``[..., H] -> [..., V]`` float32 the steps use.

  With ``params.lm_head_t`` the tied embedding is read in ``[H, V]`` layout:
  XLA:CPU runs ``[M, H] @ [H, V]`` for a few rows M at about the cost of one
  row, while ``[M, H] x [V, H]^T`` costs 2-3x more from M = 2 on, which made
  every verification step pay for its tree twice.
  """
  w_HxV = params.lm_head_t
  if w_HxV is None:
    return llama.lm_head

  def lm_head(h: Array) -> Array:
    return jnp.einsum("...h,hv->...v", h.astype(w_HxV.dtype), w_HxV,
                      preferred_element_type=jnp.float32)
  return lm_head


# ----------------------------------------------------------------------------- heads


_PYTREE = "pytree"
"""Graph marker of heads that are already a pytree (``BatchMedusaWeights``)."""


def _split(module):
  """(graphdef, state) of an NNX module; a pytree passes whole as its own state."""
  if module is None:
    return None, None
  if isinstance(module, nnx.Module):
    return nnx.split(module)
  return _PYTREE, module


def _merge(graphdef, state):
  if graphdef is None:
    return None
  if isinstance(graphdef, str) and graphdef == _PYTREE:
    return state
  return nnx.merge(graphdef, state)


def _v2(heads):
  """The V2 heads behind ``heads`` (``MedusaV2``, or a V2 ``BatchMedusaWeights``), or None.

  Both expose ``heads_hidden(x) -> [N, n, H]``, which always drafts.
  """
  v2 = heads.medusa if isinstance(heads, MedusaModel) and heads.is_v2 else heads
  if isinstance(v2, MedusaV2):
    return v2
  from medusa_jax.batching import BatchMedusaWeights
  return v2 if isinstance(v2, BatchMedusaWeights) and v2.is_v2 else None


def base_and_draft(heads, x: Array, lm_head, num_drafts: int | None = None
                   ) -> tuple[Array, Array]:
  """Base and draft logits at the given rows, always drafting.

  The speculation max-batch guard is a policy that the engine applies once per
  batch (see engine.py); here V2 heads are called below the guard so that the
  adaptive tree policy can speculate at any batch size.

  Args:
    heads: ``MedusaModel`` / ``MedusaV2`` / any callable ``(x, lm_head)``.
    x: [N, H] hidden states after the final norm.
    lm_head: [..., H] -> [..., V] float32.
    num_drafts: D <= n, the heads the tree uses (None: all); V2 heads beyond
      it skip the LM head.

  Returns:
    logits [N, V] float32, draft logits [N, D, V] float32.
  """
  v2 = _v2(heads)
  if v2 is not None:
    h_NxDxH = v2.heads_hidden(x)[:, :num_drafts].astype(x.dtype)
    logits3 = lm_head(jnp.concatenate([x[:, None, :], h_NxDxH], axis=1))
    return logits3[:, 0], logits3[:, 1:]
  logits, spec = heads(x, lm_head)
  if spec is None:
    raise ValueError("heads returned no draft logits; the engine must not speculate here")
  return logits, spec[:, :num_drafts]


def draft_only(heads, x: Array, lm_head, num_drafts: int | None = None) -> Array:
  """Draft logits [N, D, V] float32 (no base logits): see :func:`base_and_draft`."""
  v2 = _v2(heads)
  if v2 is not None:
    return lm_head(v2.heads_hidden(x)[:, :num_drafts].astype(x.dtype))
  return base_and_draft(heads, x, lm_head, num_drafts)[1]


def _finish(state: DecodeState, emitted: Array, num_emitted: Array, eos_ids: tuple[int, ...]):
  """Cuts each row's emitted tokens at EOS / its budget and updates the counters.

  Args:
    state: the state before the step.
    emitted: [B, W] int32 candidate emissions in order.
    num_emitted: [B] int32 valid prefix of ``emitted``.
    eos_ids: static EOS ids.

  Returns:
    (out_tokens [B, W], count [B], generated [B], done [B]).
  """
  width = emitted.shape[1]
  k_W = jnp.arange(width, dtype=jnp.int32)
  budget_B = state.max_new - state.generated
  valid_BxW = ((k_W[None, :] < num_emitted[:, None]) & (k_W[None, :] < budget_B[:, None])
               & ~state.done[:, None])
  if eos_ids:
    is_eos_BxW = jnp.isin(emitted, jnp.asarray(eos_ids, jnp.int32)) & valid_BxW
    eos_before_BxW = jnp.cumsum(is_eos_BxW.astype(jnp.int32), axis=1) - is_eos_BxW
    valid_BxW = valid_BxW & (eos_before_BxW == 0)
    hit_eos_B = jnp.any(is_eos_BxW & valid_BxW, axis=1)
  else:
    hit_eos_B = jnp.zeros_like(state.done)
  count_B = jnp.sum(valid_BxW, axis=1, dtype=jnp.int32)
  generated_B = state.generated + count_B
  done_B = state.done | hit_eos_B | (generated_B >= state.max_new)
  out_BxW = jnp.where(valid_BxW, emitted, EMPTY)
  return out_BxW, count_B, generated_B, done_B


def _next_tokens(config: StepConfig, root: Array, draft_logits: Array | None) -> Array:
  """[B, T] inputs of the next step from the root [B] and the draft logits [B, D, V]."""
  if config.tree is None:
    return root[:, None]
  from medusa_jax.decoding.verify import tree_candidates
  return tree_candidates(config.tree, root, draft_logits).astype(jnp.int32)


# ----------------------------------------------------------------------------- steps


def prefill_forward(graphs: Graphs, params: Params, cache, prompt: Array, prompt_lens: Array
                    ) -> tuple[Any, Array]:
  """Runs the prompts into an empty cache. DONATES cache.

  Independent of the step config, so one compilation serves every mode.

  Args:
    graphs, params: the split base model and heads.
    cache: an empty ``KVCache`` of B rows.
    prompt: [B, P] int32 prompts left-aligned, padded to the bucket P.
    prompt_lens: [B] int32 real lengths (>= 1).

  Returns:
    The cache and the hidden state of each row's last prompt token [B, H].
  """
  llama = _merge(graphs.llama, params.llama)
  batch, width = prompt.shape
  positions_BxP = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (batch, width))
  zero_B = jnp.zeros((batch,), jnp.int32)
  mask = cache_ops.prefill_attention_mask(prompt_lens, width, cache.length)
  hidden_BxPxH, cache = llama(prompt, positions_BxP, cache, zero_B, mask)
  last_B = jnp.clip(prompt_lens - 1, 0, width - 1)
  x_BxH = jnp.take_along_axis(hidden_BxPxH, last_B[:, None, None], axis=1)[:, 0]
  return cache, x_BxH


def prefill_start(graphs: Graphs, params: Params, cache, x: Array, prompt_lens: Array,
                  max_new: Array, done: Array, rng: Array, temperature: Array | None = None,
                  top_p: Array | None = None, adapter_slot: Array | None = None, *,
                  config: StepConfig
                  ) -> tuple[DecodeState, StepOutput]:
  """Chooses each row's first token and its first drafts. DONATES cache.

  Args:
    graphs, params: the split base model and heads.
    cache: the cache after :func:`prefill_forward`.
    x: [B, H] hidden state of the last prompt token.
    prompt_lens: [B] int32.
    max_new: [B] int32 budgets (>= 1).
    done: [B] bool; True for padding rows.
    rng: PRNG key.
    temperature: [B] float32 per-row temperatures (0 = greedy), or None for
      the strategy's own; traced, so every value shares one compilation.
    top_p: [B] float32 per-row nucleus mass (with ``temperature``).
    adapter_slot: [B] int32 weight slot per row for ``BatchMedusaWeights``
      heads, or None.
    config: static knobs; ``config.strategy`` chooses the rule (greedy,
      sampling, typical).

  Returns:
    The decode state (``lengths = prompt_lens``) and the first emitted tokens.
  """
  llama = _merge(graphs.llama, params.llama)
  heads = _route(_merge(graphs.heads, params.heads), adapter_slot)
  lm_head = _lm_head(llama, params)
  batch = x.shape[0]
  zero_B = jnp.zeros((batch,), jnp.int32)
  if config.tree is None:
    logits_BxV, draft = lm_head(x), None
  else:
    logits_BxV, draft = base_and_draft(heads, x, lm_head, config.tree.depth)
  from medusa_jax.decoding.verify import choose_root
  rng, key = jax.random.split(rng)
  if temperature is not None:
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = (jnp.ones_like(temperature) if top_p is None
             else jnp.asarray(top_p, jnp.float32))
  start = DecodeState(cache=cache, lengths=prompt_lens.astype(jnp.int32),
                      tokens=jnp.zeros((batch, config.num_nodes), jnp.int32),
                      generated=zero_B, max_new=max_new.astype(jnp.int32), done=done, rng=rng,
                      temperature=temperature, top_p=top_p, adapter_slot=adapter_slot)
  root_B = choose_root(logits_BxV, config.strategy, key, _row_params(start)).astype(jnp.int32)
  out, count, generated, new_done = _finish(start, root_B[:, None], jnp.ones_like(zero_B),
                                            config.eos_ids)
  state = start.replace(tokens=_next_tokens(config, root_B, draft), generated=generated,
                        done=new_done)
  return state, StepOutput(tokens=out, count=count, accept_len=zero_B, active=~done,
                           done=new_done)


def plain_step(graphs: Graphs, params: Params, state: DecodeState, *, config: StepConfig
               ) -> tuple[DecodeState, StepOutput]:
  """One token per row: commit the root, choose the next one. DONATES state."""
  llama = _merge(graphs.llama, params.llama)
  cache = state.cache
  mask = cache_ops.tree_attention_mask(state.lengths, jnp.ones((1, 1), bool), cache.length)
  hidden_Bx1xH, cache = llama(state.tokens[:, :1], state.lengths[:, None], cache,
                              state.lengths, mask)
  logits_BxV = _lm_head(llama, params)(hidden_Bx1xH[:, 0])
  from medusa_jax.decoding.verify import choose_root
  rng, key = jax.random.split(state.rng)
  next_B = choose_root(logits_BxV, config.strategy, key, _row_params(state)).astype(jnp.int32)
  active_B = ~state.done
  out, count, generated, done = _finish(state, next_B[:, None], jnp.ones_like(state.lengths),
                                        config.eos_ids)
  lengths = jnp.where(active_B, state.lengths + 1, state.lengths)
  tokens = jnp.where(active_B[:, None], next_B[:, None], state.tokens)
  new_state = state.replace(cache=cache, lengths=lengths, tokens=tokens, generated=generated,
                            done=done, rng=rng)
  return new_state, StepOutput(tokens=out, count=count, accept_len=jnp.zeros_like(count),
                               active=active_B, done=done)


def speculative_step(graphs: Graphs, params: Params, state: DecodeState, *,
                     config: StepConfig) -> tuple[DecodeState, StepOutput]:
  """Verify the tree, compact the cache, draft the next tree: one call. DONATES state.

  See the module docstring for the algorithm. ``config.tree`` must be set.
  """
  from medusa_jax.decoding.verify import finish_walk, internal_nodes, walk_tree
  tree = config.tree
  llama = _merge(graphs.llama, params.llama)
  heads = _route(_merge(graphs.heads, params.heads), state.adapter_slot)
  cache = state.cache
  depth_T = jnp.asarray(tree.node_depth, jnp.int32)
  positions_BxT = state.lengths[:, None] + depth_T[None, :]
  mask = cache_ops.tree_attention_mask(state.lengths, jnp.asarray(tree.attn_mask, bool),
                                       cache.length)
  hidden_BxTxH, cache = llama(state.tokens, positions_BxT, cache, state.lengths, mask)
  lm_head = _lm_head(llama, params)
  # The walk reads the logits of internal nodes only; the accepted node's own
  # logits (for the bonus) come with its drafts from one more LM-head call, so
  # the LM head runs over I + 1 + D rows instead of T + D.
  logits_BxIxV = lm_head(hidden_BxTxH[:, internal_nodes(tree)])
  rng, key = jax.random.split(state.rng)
  row_params = _row_params(state)
  walk = walk_tree(tree, state.tokens, logits_BxIxV, config.strategy, key, row_params)
  best_B = walk.best_node.astype(jnp.int32)
  x_BxH = jnp.take_along_axis(hidden_BxTxH, best_B[:, None, None], axis=1)[:, 0]
  logits_best_BxV, draft_BxDxV = base_and_draft(heads, x_BxH, lm_head, tree.depth)
  verdict = finish_walk(tree, state.tokens, walk, logits_best_BxV, config.strategy, key,
                        row_params)
  path_BxP = verdict.path_nodes.astype(jnp.int32)
  cache = cache_ops.compact_cache(cache, state.lengths, path_BxP)
  next_root_B = verdict.next_root.astype(jnp.int32)
  active_B = ~state.done
  accept_B = verdict.accept_len.astype(jnp.int32)
  out, count, generated, done = _finish(state, verdict.emitted.astype(jnp.int32),
                                        verdict.num_emitted.astype(jnp.int32), config.eos_ids)
  lengths = jnp.where(active_B, state.lengths + accept_B + 1, state.lengths)
  tokens = jnp.where(active_B[:, None], _next_tokens(config, next_root_B, draft_BxDxV),
                     state.tokens)
  new_state = state.replace(cache=cache, lengths=lengths, tokens=tokens, generated=generated,
                            done=done, rng=rng)
  return new_state, StepOutput(tokens=out, count=count,
                               accept_len=jnp.where(active_B, accept_B, 0),
                               active=active_B, done=done)


def decode_step(graphs: Graphs, params: Params, state: DecodeState
                ) -> tuple[Array, Array | None, DecodeState]:
  """LoRAX's I/O contract: one token per row in, base and draft logits out. DONATES state.

  Feeds ``state.tokens[:, 0]`` at position ``lengths`` (committing it: active
  rows get ``lengths + 1``) and runs the heads exactly as given, guard
  included: ``heads(x, lm_head)`` with x the new hidden states [B, H].
  The caller chooses the next token and puts it in ``tokens[:, 0]``.

  Returns:
    logits [B, V] float32; draft logits [B, n, V] float32, or None when the
    heads skip drafting (V2 with B above the speculation max batch size, or no
    heads); the new state.
  """
  llama = _merge(graphs.llama, params.llama)
  heads = _merge(graphs.heads, params.heads)
  cache = state.cache
  mask = cache_ops.tree_attention_mask(state.lengths, jnp.ones((1, 1), bool), cache.length)
  hidden_Bx1xH, cache = llama(state.tokens[:, :1], state.lengths[:, None], cache,
                              state.lengths, mask)
  x_BxH = hidden_Bx1xH[:, 0]
  if heads is None:
    logits, draft = llama.lm_head(x_BxH), None
  else:
    logits, draft = heads(x_BxH, llama.lm_head)
  lengths = jnp.where(state.done, state.lengths, state.lengths + 1)
  return logits, draft, state.replace(cache=cache, lengths=lengths)


# ----------------------------------------------------------------------------- jitted


class Decoder:
  """Splits the base model and heads once and holds the jitted steps.

  Example::

    dec = Decoder(llama, medusa_model)
    state, out = dec.prefill(cache, prompt, prompt_lens, max_new, done, key, config=cfg)
    state, out = dec.step(state, config=cfg)         # plain or speculative, by cfg.tree

  ``trace_counts`` counts traces per step kind; a second call with the same
  shapes and config does not grow it (no recompilation).
  """

  def __init__(self, llama, heads=None, *, transpose_lm_head: bool | None = None):
    """Args:
      llama: the base ``Llama``.
      heads: ``MedusaModel``, ``BatchMedusaWeights`` (per-row adapters; its
        rows must match the batch), or None.
      transpose_lm_head: keep a ``[H, V]`` copy of a tied embedding for the
        LM head (one more embedding in memory; see :func:`_lm_head`). None:
        on the CPU backend only, where it makes a tree step markedly cheaper.
    """
    llama_def, llama_state = nnx.split(llama)
    heads_def, heads_state = _split(heads)
    self.cfg = llama.cfg
    self.graphs = Graphs(llama=llama_def, heads=heads_def)
    if transpose_lm_head is None:
      transpose_lm_head = jax.default_backend() == "cpu"
    lm_head_t = None
    if transpose_lm_head and getattr(llama, "lm_head_kernel", None) is None:
      # A real copy (not a lazy transpose): the layout is the point.
      lm_head_t = jnp.array(llama.embed_tokens[...].astype(llama.dtype).T, copy=True)
    self.params = Params(llama=llama_state, heads=heads_state, lm_head_t=lm_head_t)
    # The jitted steps take the parameters as one flat tuple: flattening an
    # nnx.State costs Python time on every call (about 0.3-1 ms for a
    # 30-layer model), a tuple of arrays is flattened in C++.
    leaves, self._params_def = jax.tree.flatten(self.params)
    self.param_leaves = tuple(leaves)
    self.num_heads = None if heads is None else int(getattr(heads, "num_heads", 0)) or None
    self.trace_counts: collections.Counter = collections.Counter()
    self._prefill_forward = jax.jit(self._counted("prefill", prefill_forward),
                                    donate_argnames=("cache",))
    self._prefill_start = jax.jit(self._counted("prefill_start", prefill_start),
                                  static_argnames=("config",), donate_argnames=("cache",))
    self._plain = jax.jit(self._counted("plain", plain_step), static_argnames=("config",),
                          donate_argnames=("state",))
    self._spec = jax.jit(self._counted("speculative", speculative_step),
                         static_argnames=("config",), donate_argnames=("state",))
    self._lorax = jax.jit(self._counted("decode_step", decode_step),
                          donate_argnames=("state",))

  def _counted(self, name, fn):
    """``fn(graphs, params, ...)`` as ``f(param_leaves, ...)``, counting its traces."""
    counter = self.trace_counts
    graphs, params_def = self.graphs, self._params_def

    @functools.wraps(fn)
    def traced(param_leaves, *args, **kwargs):
      counter[name] += 1  # runs once per trace, never per call
      return fn(graphs, jax.tree.unflatten(params_def, param_leaves), *args, **kwargs)
    # jit reads the signature for donate/static names: fn's, minus ``graphs``.
    del traced.__wrapped__
    sig = inspect.signature(fn)
    rest = list(sig.parameters.values())[1:]
    rest[0] = rest[0].replace(name="param_leaves")
    traced.__signature__ = sig.replace(parameters=rest)
    return traced

  def init_cache(self, batch: int, length: int, dtype):
    """An empty ``KVCache`` of ``batch`` rows and ``length`` slots."""
    from medusa_jax.models.llama import KVCache
    return KVCache.init(self.cfg, batch, length, dtype)

  def prefill(self, cache, prompt, prompt_lens, max_new, done, rng, *, config: StepConfig,
              temperature=None, top_p=None, adapter_slot=None):
    """Prompt forward, then first tokens and drafts: two jitted calls. DONATES cache.

    Args and returns as :func:`prefill_forward` then :func:`prefill_start`.
    """
    cache, x = self._prefill_forward(self.param_leaves, cache, prompt, prompt_lens)
    return self._prefill_start(self.param_leaves, cache, x, prompt_lens, max_new, done, rng,
                               temperature, top_p, adapter_slot, config=config)

  def step(self, state: DecodeState, *, config: StepConfig):
    """A plain or speculative step, by ``config.tree``. DONATES state."""
    if config.tree is None:
      return self._plain(self.param_leaves, state, config=config)
    return self._spec(self.param_leaves, state, config=config)

  def decode_step(self, state: DecodeState):
    """See :func:`decode_step`. DONATES state."""
    return self._lorax(self.param_leaves, state)
