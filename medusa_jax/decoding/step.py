"""The decode steps as pure functions: prefill, plain, speculative (tree or chain), LoRAX's I/O.

Each function takes the split model (``Graphs``, ``Params``: see state.py)
and returns new values; ``decoder.py`` jits them once, with the decode state
donated so the KV cache is updated in place. Static knobs (the tree, the
acceptance strategy, the EOS ids) live in one hashable :class:`StepConfig`
passed by name; a step compiles once per (batch bucket, cache bucket, config).

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
their lengths freeze and they emit nothing. A row whose base logits hold NaN
or inf emits nothing, stops, and is flagged in ``StepOutput.finite`` (read
with the step's one ``device_get``), so a corrupt model never passes for
"token 0 again and again".
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.decoding import cache_ops, verify
from medusa_jax.decoding.state import (EMPTY, DecodeState, Graphs, Params, StepConfig, StepOutput,
                                      StepsOutput)
from medusa_jax.decoding.verify import finish_walk, internal_nodes, tree_candidates, walk_tree
from medusa_jax.errors import ConfigError
from medusa_jax.heads.protocol import LinearLMHead

Array = jax.Array


def _lm_head(llama, params: Params):
  """The LM head ``[..., H] -> [..., V]`` float32 the steps use.

  A :class:`~medusa_jax.heads.protocol.LinearLMHead` computing what
  ``llama.lm_head`` computes, so that tensor-parallel V2 heads can fuse their
  all-gather into it (``heads.sharded.v2_heads_logits``). With
  ``params.lm_head_t`` the tied embedding is read in ``[H, V]`` layout:
  XLA:CPU runs ``[M, H] @ [H, V]`` for a few rows M at about the cost of one
  row, while ``[M, H] x [V, H]^T`` costs 2-3x more from M = 2 on, which made
  every verification step pay for its tree twice.
  """
  w_HxV = params.lm_head_t
  if w_HxV is not None:
    return LinearLMHead(weight=w_HxV, dtype=w_HxV.dtype)
  kernel = getattr(llama, "lm_head_kernel", False)
  if kernel is False:  # not a medusa_jax Llama: its own callable
    return llama.lm_head
  if kernel is None:
    return LinearLMHead(weight=llama.embed_tokens[...], transposed=True, dtype=llama.dtype)
  return LinearLMHead(weight=kernel[...], dtype=llama.dtype)


def _merge(graphdef, state):
  return None if graphdef is None else nnx.merge(graphdef, state)


def _all_finite(*logits: Array) -> Array:
  """[B] bool: every logit of the row is finite, over arrays [B, ..., V]."""
  ok_B = None
  for x in logits:
    row_B = jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)
    ok_B = row_B if ok_B is None else ok_B & row_B
  return ok_B


def _finish(state: DecodeState, emitted: Array, num_emitted: Array, eos_ids: tuple[int, ...],
            finite: Array):
  """Cuts each row's emitted tokens at EOS / its budget and updates the counters.

  Args:
    state: the state before the step.
    emitted: [B, W] int32 candidate emissions in order.
    num_emitted: [B] int32 valid prefix of ``emitted``.
    eos_ids: static EOS ids.
    finite: [B] bool rows whose logits were finite; the others emit nothing
      and stop (their tokens would be argmax of NaN: token 0 again and again).

  Returns:
    (out_tokens [B, W], count [B], generated [B], done [B], finite [B]) where
    the last is True for rows that were not active.
  """
  width = emitted.shape[1]
  k_W = jnp.arange(width, dtype=jnp.int32)
  budget_B = state.max_new - state.generated
  valid_BxW = ((k_W[None, :] < num_emitted[:, None]) & (k_W[None, :] < budget_B[:, None])
               & ~state.done[:, None] & finite[:, None])
  if eos_ids:
    is_eos_BxW = jnp.isin(emitted, jnp.asarray(eos_ids, jnp.int32)) & valid_BxW
    eos_before_BxW = jnp.cumsum(is_eos_BxW.astype(jnp.int32), axis=1) - is_eos_BxW
    valid_BxW = valid_BxW & (eos_before_BxW == 0)
    hit_eos_B = jnp.any(is_eos_BxW & valid_BxW, axis=1)
  else:
    hit_eos_B = jnp.zeros_like(state.done)
  count_B = jnp.sum(valid_BxW, axis=1, dtype=jnp.int32)
  generated_B = state.generated + count_B
  done_B = state.done | hit_eos_B | (generated_B >= state.max_new) | ~finite
  out_BxW = jnp.where(valid_BxW, emitted, EMPTY)
  return out_BxW, count_B, generated_B, done_B, finite | state.done


def _next_tokens(config: StepConfig, root: Array, draft_logits: Array | None) -> Array:
  """[B, T] inputs of the next step from the root [B] and the draft logits [B, D, V].

  T is the carried tree's size (``config.state_nodes``).
  """
  tree = config.state_tree
  if tree is None or draft_logits is None:
    return jnp.broadcast_to(root[:, None], (root.shape[0], config.state_nodes))
  return tree_candidates(tree, root, draft_logits).astype(jnp.int32)


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
    temperature: [B] float32 per-row temperatures (0 = greedy), or None for a
      greedy-only batch; traced, so every value shares one compilation.
    top_p: [B] float32 per-row nucleus mass (None: 1, no nucleus cut).
    adapter_slot: [B] int32 weight slot per row for ``BatchMedusaWeights``
      heads, or None.
    config: static knobs; ``config.strategy`` chooses the rule (greedy,
      sampling, typical).

  Returns:
    The decode state (``lengths = prompt_lens``) and the first emitted tokens.
  """
  llama = _merge(graphs.llama, params.llama)
  heads = _merge(graphs.heads, params.heads)
  lm_head = _lm_head(llama, params)
  batch = x.shape[0]
  zero_B = jnp.zeros((batch,), jnp.int32)
  drafting = config.state_tree
  if drafting is None:
    logits_BxV, draft = lm_head(x), None
  else:
    logits_BxV, draft = heads.logits_and_drafts(x, lm_head, drafting.depth,
                                                row_slot=adapter_slot)
  rng, key = jax.random.split(rng)
  if temperature is not None:
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = (jnp.ones_like(temperature) if top_p is None
             else jnp.asarray(top_p, jnp.float32))
  start = DecodeState(cache=cache, lengths=prompt_lens.astype(jnp.int32),
                      tokens=jnp.zeros((batch, config.state_nodes), jnp.int32),
                      generated=zero_B, max_new=max_new.astype(jnp.int32), done=done, rng=rng,
                      temperature=temperature, top_p=top_p, adapter_slot=adapter_slot)
  root_B = config.strategy.choose(logits_BxV, key, start.rows).astype(jnp.int32)
  out, count, generated, new_done, finite_B = _finish(
      start, root_B[:, None], jnp.ones_like(zero_B), config.eos_ids, _all_finite(logits_BxV))
  state = start.replace(tokens=_next_tokens(config, root_B, draft), generated=generated,
                        done=new_done)
  return state, StepOutput(tokens=out, count=count, accept_len=zero_B, active=~done,
                           done=new_done, finite=finite_B)


def plain_step(graphs: Graphs, params: Params, state: DecodeState, *, config: StepConfig
               ) -> tuple[DecodeState, StepOutput]:
  """One token per row: commit the root, choose the next one. DONATES state."""
  llama = _merge(graphs.llama, params.llama)
  cache = state.cache
  mask = cache_ops.tree_attention_mask(state.lengths, jnp.ones((1, 1), bool), cache.length)
  hidden_Bx1xH, cache = llama(state.tokens[:, :1], state.lengths[:, None], cache,
                              state.lengths, mask)
  logits_BxV = _lm_head(llama, params)(hidden_Bx1xH[:, 0])
  rng, key = jax.random.split(state.rng)
  next_B = config.strategy.choose(logits_BxV, key, state.rows).astype(jnp.int32)
  active_B = ~state.done
  out, count, generated, done, finite_B = _finish(
      state, next_B[:, None], jnp.ones_like(state.lengths), config.eos_ids,
      _all_finite(logits_BxV))
  lengths = jnp.where(active_B, state.lengths + 1, state.lengths)
  tokens = jnp.where(active_B[:, None], next_B[:, None], state.tokens)
  new_state = state.replace(cache=cache, lengths=lengths, tokens=tokens, generated=generated,
                            done=done, rng=rng)
  return new_state, StepOutput(tokens=out, count=count, accept_len=jnp.zeros_like(count),
                               active=active_B, done=done, finite=finite_B)


def speculative_step(graphs: Graphs, params: Params, state: DecodeState, *,
                     config: StepConfig) -> tuple[DecodeState, StepOutput]:
  """Verify the tree, compact the cache, draft the next tree: one call. DONATES state.

  See the module docstring for the algorithm. ``config.tree`` must be set.
  """
  tree = config.tree
  llama = _merge(graphs.llama, params.llama)
  heads = _merge(graphs.heads, params.heads)
  cache = state.cache
  index_T = config.tree_index
  tokens_BxT = state.tokens if index_T is None else state.tokens[:, index_T]
  depth_T = jnp.asarray(tree.node_depth, jnp.int32)
  positions_BxT = state.lengths[:, None] + depth_T[None, :]
  mask = cache_ops.tree_attention_mask(state.lengths, jnp.asarray(tree.attn_mask, bool),
                                       cache.length)
  hidden_BxTxH, cache = llama(tokens_BxT, positions_BxT, cache, state.lengths, mask)
  lm_head = _lm_head(llama, params)
  rng, key = jax.random.split(state.rng)
  rows = state.rows
  internal = internal_nodes(tree)
  batch, num_nodes, hidden = hidden_BxTxH.shape
  draft_depth = config.state_tree.depth  # drafts for the carried tree
  if batch * num_nodes * (1 + draft_depth) <= verify.SHARED_HEAD_MAX_ROWS:
    # Small trees: the LM head and the heads run once, over every node, before
    # the walk: B*T*(1+D) rows in one pass cost less than reading the LM head
    # twice (the walk's I rows, then the accepted node's 1 + D rows).
    slot_N = (None if state.adapter_slot is None
              else jnp.repeat(state.adapter_slot, num_nodes))
    logits_NxV, draft_NxDxV = heads.logits_and_drafts(
        hidden_BxTxH.reshape(batch * num_nodes, hidden), lm_head, draft_depth, row_slot=slot_N)
    logits_BxTxV = logits_NxV.reshape(batch, num_nodes, -1)
    logits_BxIxV = logits_BxTxV[:, internal]
    walk = walk_tree(tree, tokens_BxT, logits_BxIxV, config.strategy, key, rows)
    best_B = walk.best_node.astype(jnp.int32)
    logits_best_BxV = jnp.take_along_axis(logits_BxTxV, best_B[:, None, None], axis=1)[:, 0]
    draft_BxTxDxV = draft_NxDxV.reshape(batch, num_nodes, *draft_NxDxV.shape[1:])
    draft_BxDxV = jnp.take_along_axis(draft_BxTxDxV, best_B[:, None, None, None], axis=1)[:, 0]
  else:
    # The walk reads the logits of internal nodes only; the accepted node's own
    # logits (for the bonus) come with its drafts from one more LM-head call, so
    # the LM head runs over I + 1 + D rows instead of T + D.
    logits_BxIxV = lm_head(hidden_BxTxH[:, internal])
    walk = walk_tree(tree, tokens_BxT, logits_BxIxV, config.strategy, key, rows)
    best_B = walk.best_node.astype(jnp.int32)
    x_BxH = jnp.take_along_axis(hidden_BxTxH, best_B[:, None, None], axis=1)[:, 0]
    logits_best_BxV, draft_BxDxV = heads.logits_and_drafts(x_BxH, lm_head, draft_depth,
                                                           row_slot=state.adapter_slot)
  verdict = finish_walk(tree, tokens_BxT, walk, logits_best_BxV, config.strategy, key, rows)
  path_BxP = verdict.path_nodes.astype(jnp.int32)
  cache = cache_ops.compact_cache(cache, state.lengths, path_BxP, kernel=llama.compact_kernel)
  next_root_B = verdict.next_root.astype(jnp.int32)
  active_B = ~state.done
  accept_B = verdict.accept_len.astype(jnp.int32)
  out, count, generated, done, finite_B = _finish(
      state, verdict.emitted.astype(jnp.int32), verdict.num_emitted.astype(jnp.int32),
      config.eos_ids, _all_finite(logits_BxIxV, logits_best_BxV))
  lengths = jnp.where(active_B, state.lengths + accept_B + 1, state.lengths)
  tokens = jnp.where(active_B[:, None], _next_tokens(config, next_root_B, draft_BxDxV),
                     state.tokens)
  new_state = state.replace(cache=cache, lengths=lengths, tokens=tokens, generated=generated,
                            done=done, rng=rng)
  return new_state, StepOutput(tokens=out, count=count,
                               accept_len=jnp.where(active_B, accept_B, 0),
                               active=active_B, done=done, finite=finite_B)


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
  lm_head = _lm_head(llama, params)
  if heads is None:
    logits, draft = lm_head(x_BxH), None
  else:
    logits, draft = heads(x_BxH, lm_head, row_slot=state.adapter_slot)
  lengths = jnp.where(state.done, state.lengths, state.lengths + 1)
  return logits, draft, state.replace(cache=cache, lengths=lengths)


def multi_step(graphs: Graphs, params: Params, state: DecodeState, *,
               configs: tuple[StepConfig, ...], branch_of_active: tuple[int, ...] | None = None,
               num_steps: int, stop_when_done: bool = True) -> tuple[DecodeState, StepsOutput]:
  """Up to ``num_steps`` decode steps in one device loop. DONATES state.

  With ``stop_when_done`` the loop stops on the device as soon as every row
  is done, so a call past the end of a batch costs one loop test. Without,
  it always runs K iterations (a finished row emits nothing, so the output
  is the same): a loop of known trip count, which XLA:GPU runs without
  reading a predicate back to the host every iteration (on an H200 about
  0.03 ms, 2.6 % of a SmolLM2 plain step at batch 1), at the price of at
  most K - 1 wasted iterations in a batch's last call. With several ``configs`` (plain
  and sub-trees of one carrier: see ``StepConfig.carrier``) each step picks
  its own, ``configs[branch_of_active[a]]`` for ``a`` rows still active, so
  the tree follows the batch's occupancy step by step without a host round
  trip.

  Args:
    graphs, params: the split base model and heads.
    state: the decode state; ``tokens`` has ``configs[i].state_nodes`` columns
      (the same for every config).
    configs: the step configs (static).
    branch_of_active: [B + 1] index into ``configs`` per count of active
      rows; None with a single config.
    num_steps: K, the most steps of the call (static).
    stop_when_done: leave the loop once every row is done (static).

  Returns:
    The new state and the K steps' outputs; steps past ``StepsOutput.steps``
    did not run (their ``count`` is 0 and ``active`` False).
  """
  batch = state.lengths.shape[0]
  width = max(c.width for c in configs)
  if len({c.state_nodes for c in configs}) != 1:
    raise ConfigError("multi_step: configs carry different trees; give them one carrier")
  if len(configs) > 1 and (branch_of_active is None or len(branch_of_active) != batch + 1):
    raise ConfigError(f"multi_step: branch_of_active needs {batch + 1} entries, one per count"
                     f" of active rows")

  def one(config: StepConfig, st: DecodeState) -> tuple[DecodeState, StepOutput]:
    fn = plain_step if config.tree is None else speculative_step
    st, out = fn(graphs, params, st, config=config)
    pad = width - out.tokens.shape[1]
    if pad:
      out = out.replace(tokens=jnp.pad(out.tokens, ((0, 0), (0, pad)), constant_values=EMPTY))
    return st, out

  branches = [functools.partial(one, c) for c in configs]
  table_A = None if len(configs) == 1 else jnp.asarray(branch_of_active, jnp.int32)

  def body(carry):
    k, st, buf = carry
    ran = jnp.any(~st.done)
    if table_A is None:
      st, out = branches[0](st)
      branch = jnp.int32(0)
    else:
      branch = table_A[jnp.sum(~st.done, dtype=jnp.int32)]
      st, out = jax.lax.switch(branch, branches, st)
    buf = jax.tree.map(lambda b, x: b.at[k].set(x), buf, (out, jnp.where(ran, branch, -1)))
    return k + 1, st, buf

  def cond(carry):
    k, st, _ = carry
    return (k < num_steps) & jnp.any(~st.done)

  zeros_KxB = jnp.zeros((num_steps, batch), jnp.int32)
  empty = StepOutput(tokens=jnp.full((num_steps, batch, width), EMPTY, jnp.int32),
                     count=zeros_KxB, accept_len=zeros_KxB,
                     active=jnp.zeros((num_steps, batch), bool),
                     done=jnp.broadcast_to(state.done, (num_steps, batch)),
                     finite=jnp.ones((num_steps, batch), bool))
  buf = (empty, jnp.full((num_steps,), -1, jnp.int32))
  if stop_when_done:
    k, state, (out, branch) = jax.lax.while_loop(cond, body, (jnp.int32(0), state, buf))
  else:
    _, state, (out, branch) = jax.lax.fori_loop(0, num_steps, lambda _, c: body(c),
                                                (jnp.int32(0), state, buf))
    k = jnp.sum(branch >= 0, dtype=jnp.int32)  # once every row is done, nothing runs
  return state, StepsOutput(tokens=out.tokens, count=out.count, accept_len=out.accept_len,
                            active=out.active, done=out.done, finite=out.finite, steps=k,
                            branch=branch)
