"""Decode benchmark: plain, chain and tree steps of the jitted engine, and HF generate.

Random weights of the exact SmolLM2-135M shape (step times do not depend on
the weights; acceptance does: ``--real-model`` measures it end to end). The
base model is timed with fused projections (``Llama.fuse_projections``);
``--compare-unfused`` also times the unfused layout at the first batch size,
in the same process. For each batch size it reports:

* step times (device time per call, from a loop of dispatched calls ended by one
  ``block_until_ready``; and in-graph, ``fori_loop`` over the step, which
  removes per-call dispatch) for plain decoding, LoRAX's chain (n = 4) and the
  adaptive Medusa tree; the kernels of the compiled plain step;
* the break-even tokens per step of each speculative mode (its step time over
  the plain step time): speculation wins when the heads beat it;
* the forward-only cost of verifying T tree nodes against a one-token forward;
* with ``--stages B ...``, the tree step in-graph stage by stage at those batch sizes
  (:func:`_time_stages`: forward, LM head, walk, heads, verdict, compaction, the rest), and
  the forward-only timing with the cache filled to the prompt, empty and random;
* end-to-end tokens/s through ``Engine.generate`` (host loop, one device_get
  per step) -- with random heads drafts are almost never accepted, so these
  numbers show the overhead of speculating, not its gain;
* Hugging Face transformers ``generate`` (eager, same shape, same dtype);
* the memory floor of a plain step from a copy bandwidth measured in the run.

With ``--real-model DIR --questions FILE`` it instead runs the real model
(bf16, fused projections) and Medusa heads through ``Engine.generate`` on
MT-bench first turns, greedy: tokens/s of plain, chain and tree decoding per
batch size, tokens per step, speed-up, and whether each output equals plain
decoding (also in f32 at batch 1, where equality must hold).

Usage (GPU): ``PYTHONPATH=. python3 scripts/bench_decode.py --out $OUT``
Quick CPU check: ``python scripts/bench_decode.py --tiny --batches 1 2 --steps 4 --no-hf``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


ATTENTION_METHODS = ("grouped", "flat", "pallas", "pallas_fused")
"""The AttentionScores values a step can be timed with (AUTO resolves to one of them)."""


def _smollm2_config(tiny: bool):
  from medusa_jax.models.llama import LlamaConfig
  if tiny:
    return LlamaConfig.tiny(vocab_size=512, eos_token_ids=())
  return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
                     eos_token_ids=(), pad_token_id=2)


def _build(cfg, dtype, num_heads, seed=0, fused=True, attention="grouped", row_kernels=None,
           compact_kernel=None, kernel_layout=None, row_kernel_rows=1):
  import jax
  from flax import nnx

  from medusa_jax.config import MedusaConfig
  from medusa_jax.models.llama import Llama
  from medusa_jax.adapters.weights import MedusaWeights
  llama = Llama(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype,
                fused_projections=fused, attention_scores=attention, row_kernels=row_kernels,
                row_kernel_rows=row_kernel_rows, compact_kernel=compact_kernel).with_kernel_layout(kernel_layout)
  mc = MedusaConfig(base_model_name_or_path="smollm2-shape", medusa_num_heads=num_heads,
                    medusa_num_layers=1, version=2.0)
  medusa = MedusaWeights.init(mc, cfg.hidden_size, seed=seed + 1, dtype=dtype)
  k = medusa.model.medusa.kernel
  k[...] = (0.02 * jax.random.normal(jax.random.PRNGKey(seed + 2), k[...].shape)).astype(dtype)
  return llama, medusa


def _copy_bandwidth():
  """(device-timed, host-timed) copy bandwidth in bytes/s (read + written; scripts/bandwidth.py)."""
  bandwidth = _sibling("bandwidth")
  return bandwidth.device_copy_bandwidth(), bandwidth.host_copy_bandwidth()


def _start_state(dec, cfg, batch, cache_len, prompt_len, config, dtype, seed):
  """A decode state after a ``prompt_len``-token prompt, without a prefill compile.

  The cache holds random values (never zeros) and every row has ``prompt_len``
  committed tokens; step times do not depend on what the cache holds.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from medusa_jax.decoding.state import DecodeState
  from medusa_jax.models.llama import KVCache
  shape = (batch, cache_len, cfg.num_key_value_heads, cfg.head_dim)
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * cfg.num_hidden_layers)
  fill = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype))
  n = cfg.num_hidden_layers
  cache = KVCache(k=tuple(fill(keys[i]) for i in range(n)),
                  v=tuple(fill(keys[n + i]) for i in range(n)))
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(batch, config.num_nodes)), jnp.int32)
  return DecodeState(cache=cache, lengths=jnp.full((batch,), prompt_len, jnp.int32),
                     tokens=tokens, generated=jnp.zeros((batch,), jnp.int32),
                     max_new=jnp.full((batch,), 1 << 30, jnp.int32),
                     done=jnp.zeros((batch,), bool), rng=jax.random.PRNGKey(seed))


def _time_steps(dec, state, config, steps, warmup=3):
  """(ms per dispatched step, final state). Steps are chained through the donated state."""
  import jax
  for _ in range(warmup):
    state, out = dec.step(state, config=config)
  jax.block_until_ready((state, out))
  t = time.perf_counter()
  for _ in range(steps):
    state, out = dec.step(state, config=config)
  jax.block_until_ready((state, out))
  return 1e3 * (time.perf_counter() - t) / steps, state


def _time_multi(dec, state, config, steps, k, warmup=2, stop_when_done=None):
  """(ms per step, state) with ``k`` steps per dispatched call (``Decoder.steps``)."""
  import jax
  calls = max(1, steps // k)
  kw = dict(configs=config, num_steps=k, stop_when_done=stop_when_done)
  for _ in range(warmup):
    state, out = dec.steps(state, **kw)
  jax.block_until_ready((state, out))
  t = time.perf_counter()
  for _ in range(calls):
    state, out = dec.steps(state, **kw)
    jax.device_get(out.count)  # the host reads every call's tokens, as the engine does
  jax.block_until_ready(state)
  return 1e3 * (time.perf_counter() - t) / (calls * k), state


def _loop_copies(dec, state, config, k, min_bytes=1 << 20) -> dict:
  """Copies of at least ``min_bytes`` in the compiled K-step loop (``Decoder.steps``).

  A copy of the KV cache inside the loop body (buffer assignment failing to
  alias the donated cache through the while loop) would cost a full cache
  read and write per step; this counts them in the optimized HLO.
  """
  import re

  import numpy as np
  text = dec._multi.lower(dec.param_leaves, state, configs=(config,), branch_of_active=None,
                          num_steps=k, stop_when_done=dec.stop_when_done).compile().as_text()
  sizes = dict(f32=4, bf16=2, f16=2, s32=4, u32=4, pred=1, s8=1, u8=1)
  found = []
  for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\][^ ]* copy(?:-start)?\(", text):
    n = int(np.prod([int(d) for d in dims.split(",") if d])) * sizes.get(dtype, 4)
    if n >= min_bytes:
      found.append(f"{dtype}[{dims}]")
  return dict(count=len(found), shapes=sorted(set(found))[:8])


def _time_in_graph(dec, state, config, steps, repeats=2, traced: dict | None = None):
  """([ms per step] per repeat, state): ``steps`` steps inside one jitted fori_loop.

  No per-call dispatch: device time only. Every step stays in range of the
  cache because the loop rewinds ``lengths`` to where it started. ``traced``: see
  :func:`_loop_ms`.
  """
  import functools

  import jax

  from medusa_jax.decoding import step as step_mod
  fn = step_mod.plain_step if config.tree is None else step_mod.speculative_step
  body = functools.partial(fn, dec.graphs)

  @functools.partial(jax.jit, donate_argnums=1)
  def many(params, state):
    start = state.lengths
    state = jax.lax.fori_loop(0, steps, lambda i, s: body(params, s, config=config)[0], state)
    return state.replace(lengths=start)

  return _loop_ms(lambda s: many(dec.params, s), state, steps, repeats, traced)


def _loop_ms(many, state, steps, repeats, traced: dict | None = None):
  """([ms per step] per repeat, state): ``many(state) -> state``, one jitted loop of
  ``steps`` steps that donates its state, called once to compile and warm, then timed.
  ``traced``: a dict that gets the kernel-by-kernel summary of one more call, traced
  (``kernel_trace.trace``), after the timed ones."""
  import jax
  state = many(state)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state = many(state)
    jax.block_until_ready(state)
    times.append(1e3 * (time.perf_counter() - t) / steps)
  if traced is not None:
    box = [state]

    def run():
      box[0] = many(box[0])
      jax.block_until_ready(box[0])
    traced.update(_sibling("kernel_trace").trace(run, per=steps))
    state = box[0]
  return times, state


STAGES = ("forward", "lm_head", "walk", "heads", "verdict", "compact")
"""The speculative step's stages in its order (the two-pass path of ``step.speculative_step``):
the tree forward; the LM head over the internal nodes; the walk; the accepted node's logits and
drafts; the verdict; the cache compaction."""


def _stage_prefix(dec, config):
  """``prefix(params, state, upto) -> (cache, scalar)``: the speculative step's stages up
  to ``upto`` (one of ``STAGES``), the library's own pieces in the step's order (its
  two-pass path), and the sum of what they computed. Up to "compact", the cache is the
  one the step leaves (tests/scripts/test_bench_decode.py)."""
  import jax
  import jax.numpy as jnp

  from medusa_jax.decoding import cache_ops, verify
  from medusa_jax.decoding import step as step_mod
  tree = config.tree
  internal = verify.internal_nodes(tree)

  def total(*xs):
    return sum(jnp.sum(x.astype(jnp.float32)) for x in xs)

  def prefix(params, state, upto):
    llama = step_mod._merge(dec.graphs.llama, params.llama)
    heads = step_mod._merge(dec.graphs.heads, params.heads)
    tokens = state.tokens if config.tree_index is None else state.tokens[:, config.tree_index]
    depth = jnp.asarray(tree.node_depth, jnp.int32)
    mask = cache_ops.tree_attention_mask(state.lengths, jnp.asarray(tree.attn_mask, bool),
                                         state.cache.length)
    hidden, cache = llama(tokens, state.lengths[:, None] + depth[None], state.cache,
                          state.lengths, mask)
    acc = total(hidden)
    if upto == "forward":
      return cache, acc
    lm_head = step_mod._lm_head(llama, params)
    logits = lm_head(hidden[:, internal])
    acc += total(logits)
    if upto == "lm_head":
      return cache, acc
    key = jax.random.split(state.rng)[1]  # the step's key
    walk = verify.walk_tree(tree, tokens, logits, config.strategy, key, state.rows)
    best = walk.best_node.astype(jnp.int32)
    acc += total(best)
    if upto == "walk":
      return cache, acc
    x = jnp.take_along_axis(hidden, best[:, None, None], axis=1)[:, 0]
    logits_best, draft = heads.logits_and_drafts(x, lm_head, config.state_tree.depth,
                                                 row_slot=state.adapter_slot)
    acc += total(logits_best, draft)
    if upto == "heads":
      return cache, acc
    verdict = verify.finish_walk(tree, tokens, walk, logits_best, config.strategy, key,
                                 state.rows)
    path = verdict.path_nodes.astype(jnp.int32)
    acc += total(path, verdict.emitted)
    if upto == "verdict":
      return cache, acc
    cache = cache_ops.compact_cache(cache, state.lengths, path, kernel=llama.compact_kernel)
    return cache, acc

  return prefix


def _time_stages(dec, state, config, steps, repeats=2) -> dict:
  """In-graph ms per step of each cumulative prefix of the speculative step (``STAGES``,
  :func:`_stage_prefix`), and of the whole step ("step").

  Each prefix runs ``steps`` times in one fori_loop, the cache carried and what the prefix
  computed summed into a carried scalar (so nothing is dead code); a stage's cost is its
  prefix's time minus the one before it, and the whole step's time minus the last prefix's
  is the rest (the next tree's tokens, EOS bookkeeping). Trees on the one-pass path
  (``B * T * (1 + D) <= verify.SHARED_HEAD_MAX_ROWS``) are not split: returns {}.
  """
  import functools

  import jax
  import jax.numpy as jnp

  from medusa_jax.decoding import verify
  batch = state.lengths.shape[0]
  if batch * config.tree.num_nodes * (1 + config.state_tree.depth) <= verify.SHARED_HEAD_MAX_ROWS:
    return {}
  prefix = _stage_prefix(dec, config)

  @functools.partial(jax.jit, donate_argnums=1, static_argnames="upto")
  def many(params, state, upto):
    def body(i, carry):
      cache, acc = carry
      cache, a = prefix(params, state.replace(cache=cache), upto)
      return cache, acc + a
    # The scalar is an output of the same program: it is computed whenever the cache is.
    cache, acc = jax.lax.fori_loop(0, steps, body, (state.cache, jnp.zeros((), jnp.float32)))
    return state.replace(cache=cache), acc

  out = {}
  for upto in STAGES:
    times, state = _loop_ms(lambda s, upto=upto: many(dec.params, s, upto)[0], state, steps,
                            repeats)
    out[upto] = min(times)
  whole, _ = _time_in_graph(dec, state, config, steps, repeats)
  out["step"] = min(whole)
  return out


def _kernel_counts(dec, state, config, dump: str | None = None) -> dict:
  """Top-level kernels of the compiled step, plain or speculative (fusions, library calls,
  copies); ``dump``: a file to write the compiled HLO to."""
  step = dec._plain if config.tree is None else dec._spec
  compiled = step.lower(dec.param_leaves, state, config=config).compile()
  text = compiled.as_text()
  if dump:
    os.makedirs(os.path.dirname(dump) or ".", exist_ok=True)
    with open(dump, "w") as f:
      f.write(text)
  return hlo_kernels(text)


def hlo_kernels(text: str) -> dict:
  """Top-level kernels of a compiled HLO module's text by kind (fusions, library calls,
  copies, scatters, dots): instructions outside the bodies of fusions and reductions."""
  import re
  bodies = re.split(r"\n(?=\S)", text)  # one chunk per computation
  kinds = {"fusion": 0, "custom-call": 0, "copy": 0, "scatter": 0, "dot": 0, "other": 0}
  for body in bodies:
    head = body.split("\n", 1)[0]
    if "fused_computation" in head or "fusion" in head.split("(")[0] or "region" in head:
      continue  # bodies of fusions and reductions are not kernels of their own
    # An instruction's result type may be a tuple "(bf16[..], ..)" (a kernel with aliased
    # outputs): "= TYPE op(" with TYPE one token or one parenthesised list.
    for m in re.finditer(r"= (?:\([^()]*\)|\S+) ([a-z\-]+)\(", body):
      op = m.group(1)
      if op in kinds:
        kinds[op] += 1
  return kinds


def _check_compact_kernel(cfg, args, dtype) -> dict:
  """The compaction kernels against XLA's gather + scatter on this device, at every batch
  size benchmarked, on a tree-shaped path: whether every array comes out bit for bit."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from medusa_jax.decoding import cache_ops
  from medusa_jax.models.llama import KVCache
  n = cfg.num_hidden_layers
  result = {}
  for batch in args.batches:
    shape = (batch, args.cache_len, cfg.num_key_value_heads, cfg.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(batch), 2 * n)
    fill = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype))
    rng = np.random.default_rng(batch)
    lengths = jnp.asarray(rng.integers(0, args.cache_len - 8, size=batch), jnp.int32)
    path = jnp.asarray(np.sort(rng.integers(0, 64, size=(batch, args.heads + 1)), axis=1),
                       jnp.int32)
    outs = []
    for kernel in (False, True):
      cache = KVCache(k=tuple(fill(keys[i]) for i in range(n)),
                      v=tuple(fill(keys[n + i]) for i in range(n)))
      fn = jax.jit(lambda c, kernel=kernel: cache_ops.compact_cache(c, lengths, path,
                                                                    kernel=kernel),
                   donate_argnums=0)
      outs.append(jax.device_get(fn(cache)))
    result[str(batch)] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                             zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))
  return result


def _time_forward(dec, cfg, batch, num_nodes, cache_len, dtype, steps, repeats=2, fill=None,
                  cache=None, traced: dict | None = None):
  """ms of one base forward of ``num_nodes`` tokens per row + LM head, in-graph.

  A fori_loop of ``steps`` forwards (tree mask, ``fill`` slots of the cache in use:
  default half of it); the cache is carried through the loop so that its writes are
  not dead code. ``cache``: the cache to start from (DONATED; default an empty one).
  ``traced``: see :func:`_loop_ms`.
  """
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from medusa_jax.decoding import cache_ops
  from medusa_jax.decoding.tree import tree_for_batch
  graphs = dec.graphs

  if num_nodes == 1:
    tree_mask, depth = np.ones((1, 1), bool), np.zeros((1,), np.int32)
  else:
    tree = tree_for_batch(1, 5, max_tree_rows=num_nodes)  # the same node count, at batch 1
    tree_mask, depth = tree.attn_mask, tree.node_depth

  @functools.partial(jax.jit, donate_argnums=1)
  def many(params, cache, tokens, lengths, tree_mask, depth):
    llama = nnx.merge(graphs.llama, params.llama)
    mask = cache_ops.tree_attention_mask(lengths, tree_mask, cache.length)
    pos = lengths[:, None] + depth[None, :]

    def body(i, carry):
      cache, acc = carry
      hidden, cache = llama(tokens, pos, cache, lengths, mask)
      return cache, acc + llama.lm_head(hidden).max(axis=-1)
    return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros(tokens.shape, jnp.float32)))

  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(batch, len(depth))), jnp.int32)
  lengths = jnp.full((batch,), cache_len // 2 if fill is None else fill, jnp.int32)
  if cache is None:
    cache = dec.init_cache(batch, cache_len, dtype)
  args = (tokens, lengths, jnp.asarray(tree_mask), jnp.asarray(depth))
  times, _ = _loop_ms(lambda c: many(dec.params, c, *args)[0], cache, steps, repeats, traced)
  return times, len(depth)


def _engine_tokens_per_s(engine, cfg, batch, prompt_len, new_tokens, mode, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(3, cfg.vocab_size, size=prompt_len)) for _ in range(batch)]
  engine.generate(prompts, new_tokens, speculate=mode, adaptive=True)  # compile
  t = time.perf_counter()
  res = engine.generate(prompts, new_tokens, speculate=mode, adaptive=True)
  wall = time.perf_counter() - t
  return dict(tokens_per_s=sum(len(x) for x in res.tokens) / wall,
              tokens_per_step=res.tokens_per_step, tree_nodes=res.tree_nodes, wall_s=wall)


def _time_plain(dec, cfg, args, batch, dtype, in_graph: bool, kernels: bool,
                dispatched: bool = True, tag: str = "") -> dict:
  """Plain step of ``dec`` at one batch size: dispatched, in-graph, kernel counts (and with
  ``--dump-hlo DIR`` the compiled step in ``DIR/plain-{tag}-b{batch}.hlo.txt``)."""
  from medusa_jax.decoding.state import StepConfig
  from medusa_jax.decoding.strategies import Greedy
  config = StepConfig(tree=None, strategy=Greedy(), eos_ids=())
  state = _start_state(dec, cfg, batch, args.cache_len, args.prompt_len, config, dtype, 0)
  dump = getattr(args, "dump_hlo", None)
  dump = dump and os.path.join(dump, f"plain-{tag or 'main'}-b{batch}.hlo.txt")
  row = {"kernels": _kernel_counts(dec, state, config, dump)} if kernels else {}
  if dispatched:
    row["step_ms"], state = _time_steps(dec, state, config, args.steps)
    for k in getattr(args, "steps_per_call", None) or ():
      row[f"k{k}_step_ms"], state = _time_multi(dec, state, config, args.steps, k)
    if getattr(args, "steps_per_call", None):
      # The other loop form at the largest K (leaving early when every row is
      # done, or running all K iterations), for the platform's choice.
      k, stop = max(args.steps_per_call), not dec.stop_when_done
      row[f"k{k}_{'stop' if stop else 'fixed'}_step_ms"], state = _time_multi(
          dec, state, config, args.steps, k, stop_when_done=stop)
  if in_graph:
    traced = {} if batch in (getattr(args, "kernel_trace", None) or ()) else None
    # The dispatched timings above have advanced the rows: the in-graph loop starts here.
    row["in_graph_fill"] = int(state.lengths[0])
    row["in_graph_ms"], state = _time_in_graph(dec, state, config, args.steps, traced=traced)
    if traced is not None:
      row["kernel_trace"] = traced
  return row


def bench_jax(args) -> dict:
  import jax
  import jax.numpy as jnp

  from medusa_jax.decoding.engine import Engine
  from medusa_jax.decoding.decoder import Decoder
  from medusa_jax.decoding.state import StepConfig
  from medusa_jax.decoding.tree import build_tree, chain_choices, tree_for_batch
  from medusa_jax.decoding.strategies import Greedy

  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  cfg = _smollm2_config(args.tiny)
  llama, medusa = _build(cfg, dtype, args.heads, fused=args.fused, attention=args.attention,
                         row_kernels=args.row_kernels, compact_kernel=args.compact_kernel,
                         kernel_layout=args.kernel_layout, row_kernel_rows=args.row_kernel_rows)
  # One cache bucket for the step timings and the engine, so they share compilations.
  engine = Engine(llama, None, medusa, max_cache_len=args.cache_len, cache_dtype=dtype,
                  min_cache_len=args.cache_len, max_tree_rows=args.max_tree_rows)
  dec = engine.decoder
  n_params = sum(x.size for x in jax.tree.leaves(dec.params.llama))
  weight_bytes = n_params * jnp.dtype(dtype).itemsize
  bw, host_bw = _copy_bandwidth()
  out = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
             jax=jax.__version__, dtype=args.dtype, cache_len=args.cache_len,
             prompt_len=args.prompt_len, params=int(n_params), copy_bw_tb_s=bw / 1e12,
             copy_bw_host_timed_tb_s=host_bw / 1e12,
             fused_projections=args.fused, attention=args.attention, steps=args.steps,
             row_kernels=llama.row_kernels, row_kernel_rows=llama.row_kernel_rows,
             compact_kernel=llama.compact_kernel,
             kernel_layout=llama.kernel_layout, xla_flags=os.environ.get("XLA_FLAGS", ""), rows=[])
  if llama.compact_kernel:
    out["compact_kernel_check"] = _check_compact_kernel(cfg, args, dtype)
    print(json.dumps(dict(compact_kernel_check=out["compact_kernel_check"])), flush=True)
  kv_row_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
                  * jnp.dtype(dtype).itemsize)
  t_start = time.time()
  for i, batch in enumerate(args.batches):
    if time.time() - t_start > args.time_budget:
      out["skipped_batches"] = args.batches[i:]
      break
    row = dict(batch=batch)
    # Floor: weights once and the KV entries in use once, at the copy bandwidth.
    floor_ms = 1e3 * (weight_bytes + batch * args.prompt_len * kv_row_bytes) / bw
    row["plain_floor_ms"] = floor_ms
    plain = _time_plain(dec, cfg, args, batch, dtype, args.in_graph, kernels=i == 0,
                        tag=args.attention)
    row.update(plain_step_ms=plain["step_ms"], plain_kernels=plain.get("kernels", {}),
               plain_nodes=1)
    if "in_graph_fill" in plain:
      row["plain_in_graph_fill"] = plain["in_graph_fill"]
    traces = row["kernel_trace"] = {"plain_step": plain["kernel_trace"]} if (
        "kernel_trace" in plain) else {}
    row.update({f"plain_{key}": v for key, v in plain.items() if key.startswith("k")
                and key.endswith("_step_ms")})
    if "in_graph_ms" in plain:
      row["plain_step_in_graph_ms"] = min(plain["in_graph_ms"])
      row["plain_step_in_graph_repeats_ms"] = plain["in_graph_ms"]
    if i == 0 and args.compare_unfused and args.fused:
      # The same weights in the checkpoint layout: the before/after of fusing.
      unfused = _unfused_copy(llama, cfg, dtype)
      udec = Decoder(unfused, medusa.model)
      u = _time_plain(udec, cfg, args, batch, dtype, args.in_graph, kernels=True)
      row.update(unfused_plain_step_ms=u["step_ms"], unfused_plain_kernels=u["kernels"])
      if "in_graph_ms" in u:
        row["unfused_plain_step_in_graph_ms"] = min(u["in_graph_ms"])
        row["unfused_plain_step_in_graph_repeats_ms"] = u["in_graph_ms"]
      del udec, unfused
    if batch in (args.compare_attention or ()):
      # The other ways of computing attention, same weights (in-graph only): the plain
      # step and, where this batch times one, the row-budget tree step.
      for other in args.compare_methods or ATTENTION_METHODS:
        if other == args.attention:
          continue
        odec = Decoder(llama.with_attention_scores(other), medusa.model)
        o = _time_plain(odec, cfg, args, batch, dtype, True, kernels=True, dispatched=False,
                        tag=other)
        row[f"{other}_plain_step_in_graph_ms"] = min(o["in_graph_ms"])
        row[f"{other}_plain_step_in_graph_repeats_ms"] = o["in_graph_ms"]
        row[f"{other}_plain_kernels"] = o["kernels"]
        if args.tree_batches is None or batch in args.tree_batches:
          tree = tree_for_batch(batch, args.heads, max_tree_rows=args.max_tree_rows)
          config = StepConfig(tree=tree, strategy=Greedy(), eos_ids=())
          state = _start_state(odec, cfg, batch, args.cache_len, args.prompt_len, config, dtype, 0)
          times, _ = _time_in_graph(odec, state, config, args.steps)
          row[f"{other}_tree_step_in_graph_ms"] = min(times)
          row[f"{other}_tree_nodes"] = tree.num_nodes
          del state
        del odec
    modes = {}
    if not args.only_plain:
      modes["chain"] = build_tree(chain_choices(args.heads))
    if args.tree_batches is None or batch in args.tree_batches:
      modes["tree"] = tree_for_batch(batch, args.heads, max_tree_rows=args.max_tree_rows)
    for name, tree in modes.items():
      config = StepConfig(tree=tree, strategy=Greedy(), eos_ids=())
      state = _start_state(dec, cfg, batch, args.cache_len, args.prompt_len, config, dtype, 0)
      ms, state = _time_steps(dec, state, config, args.steps)
      row[f"{name}_step_ms"] = ms
      for k in args.tree_steps_per_call:
        row[f"{name}_k{k}_step_ms"], state = _time_multi(dec, state, config, args.steps, k)
        stop = not dec.stop_when_done
        row[f"{name}_k{k}_{'stop' if stop else 'fixed'}_step_ms"], state = _time_multi(
            dec, state, config, args.steps, k, stop_when_done=stop)
        row[f"{name}_k{k}_loop_copies"] = _loop_copies(dec, state, config, k)
      row[f"{name}_nodes"] = tree.num_nodes
      if i == 0:
        row[f"{name}_kernels"] = _kernel_counts(dec, state, config)
      row[f"{name}_break_even_tokens_per_step"] = ms / row["plain_step_ms"]
      if args.in_graph:
        traced = {} if name == "tree" and traces else None
        row[f"{name}_in_graph_fill"] = int(state.lengths[0])  # where the stages run too
        times, state = _time_in_graph(dec, state, config, args.steps, traced=traced)
        if traced is not None:
          traces["tree_step"] = traced
        row[f"{name}_step_in_graph_ms"] = min(times)
        row[f"{name}_in_graph_over_plain"] = min(times) / row["plain_step_in_graph_ms"]
        if name == "tree" and batch in (args.stages or ()):
          row["tree_stages_in_graph_ms"] = _time_stages(dec, state, config, args.steps)
          # The forward-only timing (verify_cost_ratio's) moved towards the step's setting:
          # the cache filled to the prompt, then also random rather than empty.
          for key, cache in (("empty", None), ("random", _start_state(
              dec, cfg, batch, args.cache_len, args.prompt_len, config, dtype, 1).cache)):
            traced = {} if key == "random" and traces else None
            fwd, _ = _time_forward(dec, cfg, batch, tree.num_nodes, args.cache_len, dtype,
                                   args.steps, fill=args.prompt_len, cache=cache, traced=traced)
            row[f"forward_tree_at_prompt_{key}_cache_ms"] = min(fwd)
            if traced is not None:
              traces["forward_tree"] = traced
          if traces:
            traced = {}
            fwd, _ = _time_forward(dec, cfg, batch, 1, args.cache_len, dtype, args.steps,
                                   fill=args.prompt_len, traced=traced)
            row["forward_1_at_prompt_ms"], traces["forward_1"] = min(fwd), traced
      del state
    if i == 0 and "tree" in modes and args.in_graph:
      # Forward-only verify cost: T tree nodes vs one token, same batch, in-graph.
      fwd1, _ = _time_forward(dec, cfg, batch, 1, args.cache_len, dtype, args.steps)
      fwdT, t_nodes = _time_forward(dec, cfg, batch, row["tree_nodes"], args.cache_len, dtype,
                                    args.steps)
      row.update(forward_1_ms=min(fwd1), forward_tree_ms=min(fwdT), forward_tree_nodes=t_nodes,
                 verify_cost_ratio=min(fwdT) / min(fwd1))
    if not args.only_plain and args.engine:
      for name, mode in (("plain", "none"), ("chain", "chain"), ("tree", "tree")):
        row[f"engine_{name}"] = _engine_tokens_per_s(engine, cfg, batch, args.prompt_len,
                                                     args.new_tokens, mode)
    if not row["kernel_trace"]:
      del row["kernel_trace"]
    out["rows"].append(row)
    out["trace_counts"] = dict(dec.trace_counts)
    print(json.dumps(row), flush=True)
    _save(args, out)
  return out


def _unfused_copy(fused_llama, cfg, dtype):
  """An unfused :class:`Llama` holding the same weights as a fused one (split back), in
  the same kernel layout."""
  from flax import nnx

  from medusa_jax.models.llama import Llama
  layout = fused_llama.kernel_layout
  fused_llama = fused_llama.with_kernel_layout("in_out")
  Q, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  F = cfg.intermediate_size
  m = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                   attention_scores=fused_llama.attention_scores))
  m.embed_tokens.set_value(fused_llama.embed_tokens.get_value())
  m.norm.weight.set_value(fused_llama.norm.weight.get_value())
  if fused_llama.lm_head_kernel is not None:
    m.lm_head_kernel.set_value(fused_llama.lm_head_kernel.get_value())
  for src, dst in zip(fused_llama.layers, m.layers):
    qkv = src.self_attn.qkv_proj.kernel.get_value()
    dst.self_attn.q_proj.kernel.set_value(qkv[:, :Q * D])
    dst.self_attn.k_proj.kernel.set_value(qkv[:, Q * D:(Q + G) * D])
    dst.self_attn.v_proj.kernel.set_value(qkv[:, (Q + G) * D:])
    dst.self_attn.o_proj.kernel.set_value(src.self_attn.o_proj.kernel.get_value())
    gu = src.mlp.gate_up_proj.kernel.get_value()
    dst.mlp.gate_proj.kernel.set_value(gu[:, :F])
    dst.mlp.up_proj.kernel.set_value(gu[:, F:])
    dst.mlp.down_proj.kernel.set_value(src.mlp.down_proj.kernel.get_value())
    for norm in ("input_layernorm", "post_attention_layernorm"):
      getattr(dst, norm).weight.set_value(getattr(src, norm).weight.get_value())
  return m.with_kernel_layout(layout)


def _prompt_sets(prompts: list, batch: int, bs1_prompts: int) -> list:
  """The prompt sets run at batch size ``batch``, each set at once: the first ``batch``
  prompts, or at B = 1 the first ``bs1_prompts`` one at a time."""
  if batch == 1:
    return [[p] for p in prompts[:bs1_prompts]]
  return [prompts[:batch]]


def _sibling(name: str):
  """scripts/<name>.py, a module beside this one (on the path when this runs as a script)."""
  import importlib
  here = os.path.dirname(os.path.abspath(__file__))
  if here not in sys.path:
    sys.path.insert(0, here)
  return importlib.import_module(name)


def _bench_hf():
  return _sibling("bench_hf")


def _hf_real(args, prompts: list, eos_ids: tuple, steps_per_call: int, plain: dict) -> list:
  """transformers generate on the medusa_jax rows' checkpoint and prompts (``--hf-real``).

  Args:
    prompts: the questions' turn-1 token ids, in order.
    eos_ids: the engine's EOS ids (the rows stop where the engine's stop).
    steps_per_call: the engine's K: the decode steps its tokens/s leaves out.
    plain: batch size -> the bf16 plain rows' tokens, for ``matches_reference``.
  """
  bs1 = args.hf_real_prompts if args.hf_real_prompts is not None else args.e2e_bs1_questions
  sets = {b: _prompt_sets(prompts, b, bs1) for b in args.hf_real_batches}
  # The plain tokens are the reference only where both ran the same prompts.
  reference = {b: plain[b] for b in sets if b in plain
               and len(plain[b]) == sum(len(s) for s in sets[b])}
  return _bench_hf().bench_hf_real(
      args.real_model, sets, args.new_tokens, dtype="bf16", modes=args.hf_real_modes,
      eos_token_ids=eos_ids, skip_decode_steps=steps_per_call,
      time_budget_s=args.hf_real_time_budget, reference=reference,
      log=lambda line: print(line, flush=True))


def bench_real(args) -> dict:
  """The real model and trained heads through ``Engine.generate`` on MT-bench first turns.

  Per batch size B: the first B questions at once (B = 1: the first
  ``--e2e-bs1-questions`` one at a time), greedy, ``--new-tokens`` each; plain,
  chain and tree with the engine's own adaptive policy. Each generate runs
  twice with the same shapes and the second is timed (no compilation in it).
  With ``--hf-real``, transformers ``generate`` follows on the same checkpoint,
  prompts and card (:func:`_hf_real`, ``scripts/bench_hf.py``: eager, and a
  static cache + ``torch.compile``), after every medusa_jax row, so a torch
  failure loses none of them; the table sets medusa_jax against its best.
  """
  import jax
  import jax.numpy as jnp

  from medusa_jax.bundled import SMOLLM2_HEADS as BUNDLED_HEADS
  from medusa_jax.decoding.engine import Engine

  heads = args.heads_dir or BUNDLED_HEADS
  with open(args.questions, encoding="utf-8") as f:
    questions = json.load(f)
  prompts = [list(q["turn1_ids"]) for q in questions]
  out = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
             jax=jax.__version__, model=args.real_model, heads=os.path.basename(heads.rstrip("/")),
             new_tokens=args.new_tokens, fused_projections=args.fused,
             attention=args.attention, runs=[])
  t0 = time.time()

  def engine_for(dtype):
    base = Engine.load(args.real_model, heads, dtype=dtype, max_cache_len=args.cache_len,
                       min_cache_len=args.e2e_min_cache_len, fuse_projections=args.fused)
    llama = base.llama.with_kernel_layout(args.kernel_layout).with_attention_scores(
        args.attention).with_row_kernels(args.row_kernels).with_row_kernel_rows(
            args.row_kernel_rows)
    if args.compact_kernel is not None:
      llama = llama.with_compact_kernel(args.compact_kernel)
    if llama is base.llama:
      return base
    return Engine(llama, base.tokenizer, base.medusa, max_cache_len=args.cache_len,
                  min_cache_len=args.e2e_min_cache_len, tree_choices=base.tree_choices,
                  chat_template=base.chat_template)

  def run(engine, batch_prompts, mode):
    # "tree" follows the engine's tree policy (measured by default: timed on
    # first use of a batch bucket, inside the untimed first call);
    # "tree-budget" the row budget.
    budget = mode == "tree-budget"
    mode = "tree" if budget else mode
    kw = {} if mode == "none" else {"adaptive": True}
    if budget:
      engine.use_policy(None)
    try:
      engine.generate(batch_prompts, args.new_tokens, speculate=mode, **kw)  # compile
      return engine.generate(batch_prompts, args.new_tokens, speculate=mode, **kw)
    finally:
      if budget and engine.config.tree_policy == "measured":
        engine.use_policy("measured")

  plain_bf16 = {}  # batch -> the plain rows' tokens (the transformers rows' reference)

  def one_config(engine, dtype_name, batch):
    sets = _prompt_sets(prompts, batch, args.e2e_bs1_questions)
    entry = dict(dtype=dtype_name, batch=batch, prompts=sum(len(s) for s in sets))
    plain_tokens = None
    for mode in args.e2e_modes:
      t_mode = time.time()
      res = [run(engine, s, mode) for s in sets]
      toks = [t for r in res for t in r.tokens]
      steps = sum(sum(r.steps) for r in res)
      dec_tokens = sum(r.decode_tokens for r in res)
      dec_s = sum(r.decode_s for r in res)
      wall = sum(r.wall_s for r in res)
      m = dict(tokens_per_s=dec_tokens / dec_s if dec_s else float("nan"),
               e2e_tokens_per_s=sum(len(t) for t in toks) / wall,
               tokens_per_step=(sum(len(t) - 1 for t in toks) / steps) if steps else 0.0,
               tree_nodes=res[0].tree_nodes,
               skipped=bool(getattr(res[0], "speculation_skipped", False)),
               mode_s=time.time() - t_mode)
      rows = 1 << (len(sets[0]) - 1).bit_length()
      if mode == "tree" and rows in getattr(engine, "measured", {}):
        m["policy"] = engine.measured[rows].table(static=True)
      if mode == "none":
        plain_tokens = toks
        if dtype_name == "bf16":
          plain_bf16[batch] = toks
      else:
        same = sum(a == b for a, b in zip(toks, plain_tokens))
        m["matches_plain"] = f"{same}/{len(toks)}"
        m["speedup"] = m["tokens_per_s"] / entry["none"]["tokens_per_s"]
        m["e2e_speedup"] = m["e2e_tokens_per_s"] / entry["none"]["e2e_tokens_per_s"]
      entry[mode] = m
    print(json.dumps(entry), flush=True)
    return entry

  engine = engine_for(jnp.bfloat16)
  out["kernel_layout"] = engine.llama.kernel_layout
  out["load_s"] = time.time() - t0
  for batch in args.batches:
    if time.time() - t0 > args.time_budget:
      out.setdefault("skipped", []).append(f"bf16 B={batch}")
      continue
    out["runs"].append(one_config(engine, "bf16", batch))
    _save(args, out, "bench_e2e.json")
  eos_ids, steps_per_call = tuple(engine.eos_ids), engine.config.steps_per_call
  del engine
  if args.e2e_f32 and time.time() - t0 < args.time_budget:
    out["runs"].append(one_config(engine_for(jnp.float32), "f32", 1))
  elif args.e2e_f32:
    out.setdefault("skipped", []).append("f32 B=1")
  if args.hf_real:
    _save(args, out, "bench_e2e.json")
    t_hf = time.time()
    try:
      out["hf_real"] = _hf_real(args, prompts, eos_ids, steps_per_call, plain_bf16)
    except Exception as e:  # a missing or broken torch must not lose the JAX rows
      out["hf_real_error"] = f"{type(e).__name__}: {e}"
    out["hf_real_s"] = time.time() - t_hf
  out["total_s"] = time.time() - t0
  return out


def _e2e_table(res: dict) -> str:
  hf_rows = res.get("hf_real", [])
  hf_best = _bench_hf().best_by_batch(hf_rows) if hf_rows else {}
  lines = [f"{res['device']} ({res['backend']}), JAX {res['jax']}, heads {res['heads']}, "
           f"{res['new_tokens']} new tokens, MT-bench turn 1, greedy, decode-only tokens/s",
           f"{'dtype':>5} {'B':>3} {'plain':>7} {'chain':>7} {'x':>5} {'tok/st':>6} {'T':>3} "
           f"{'=plain':>7} {'tree':>7} {'x':>5} {'tok/st':>6} {'T':>3} {'=plain':>7}"]
  nan = float("nan")
  empty = dict(tokens_per_s=nan, speedup=nan, tokens_per_step=nan, tree_nodes=0,
               matches_plain="-")
  for r in res["runs"]:
    c, t = r.get("chain", empty), r.get("tree", empty)
    lines.append(
        f"{r['dtype']:>5} {r['batch']:>3} {r['none']['tokens_per_s']:>7.0f} "
        f"{c['tokens_per_s']:>7.0f} {c['speedup']:>5.2f} {c['tokens_per_step']:>6.2f} "
        f"{c['tree_nodes']:>3} {c['matches_plain']:>7} {t['tokens_per_s']:>7.0f} "
        f"{t['speedup']:>5.2f} {t['tokens_per_step']:>6.2f} {t['tree_nodes']:>3} "
        f"{t['matches_plain']:>7}")
    if "tree-budget" in r:
      b = r["tree-budget"]
      lines.append(f"      row-budget tree: {b['tokens_per_s']:.0f} tok/s ({b['speedup']:.2f}x,"
                   f" {b['tokens_per_step']:.2f} tok/step, T={b['tree_nodes']})")
    if r["dtype"] == "bf16" and r["batch"] in hf_best:
      h = hf_best.pop(r["batch"])
      plain_x, tree_x = (m["tokens_per_s"] / h["tokens_per_s"] for m in (r["none"], t))
      lines.append(f"      transformers {h['mode']} {h['tokens_per_s']:.0f} tok/s"
                   f"{_hf_others(hf_rows, h)}: plain {plain_x:.2f}x, tree {tree_x:.2f}x of it"
                   f" (its tokens = plain's: {h.get('matches_reference', '-')})")
  lines += _hf_lines(res, hf_rows, hf_best)
  return "\n".join(lines)


def _hf_others(hf_rows: list, best: dict) -> str:
  """The other modes' tokens/s at the best row's batch size, e.g. " (eager 41)"."""
  others = [f"{r['mode']} {r['tokens_per_s']:.0f}" for r in hf_rows
            if r["batch"] == best["batch"] and r is not best and "tokens_per_s" in r]
  return f" ({', '.join(others)})" if others else ""


def _hf_lines(res: dict, hf_rows: list, unmatched: dict) -> list:
  """Table lines of the transformers rows with no medusa_jax bf16 row, errors and skips."""
  lines = []
  if hf_rows:
    r = hf_rows[0]
    lines.append(f"transformers {r.get('transformers', '?')}, torch {r.get('torch', '?')}:"
                 " best generate per batch, decode-only tokens/s as above (same prompts and EOS)")
  for b, h in sorted(unmatched.items()):
    lines.append(f"transformers B={b}: {h['mode']} {h['tokens_per_s']:.0f} tok/s"
                 f"{_hf_others(hf_rows, h)}")
  for r in hf_rows:
    if "error" in r:
      lines.append(f"transformers {r['mode']} B={r['batch']}: error {r['error'][:200]}")
    elif "skipped" in r:
      lines.append(f"transformers {r['mode']} B={r['batch']}: skipped ({r['skipped']})")
  if "hf_real_error" in res:
    lines.append(f"transformers: error {res['hf_real_error'][:200]}")
  return lines


def _save(args, res, name="bench_decode.json") -> None:
  """Writes the results so far (a run cut short keeps what it measured)."""
  if args.out and not args.json_line:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
      json.dump(res, f, indent=1)


def bench_hf(args) -> list:
  """HF transformers generate, eager, random weights of the same shape."""
  import torch
  from transformers import LlamaConfig as HFConfig
  from transformers import LlamaForCausalLM
  cfg = _smollm2_config(args.tiny)
  hf_cfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                    intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_hidden_layers,
                    num_attention_heads=cfg.num_attention_heads,
                    num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                    rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                    tie_word_embeddings=cfg.tie_word_embeddings,
                    max_position_embeddings=cfg.max_position_embeddings,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
  torch.manual_seed(0)
  model = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
  rows = []
  for batch in args.batches:
    ids = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), device=device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
      model.generate(ids, **kw)
      if device == "cuda":
        torch.cuda.synchronize()
      t = time.perf_counter()
      model.generate(ids, **kw)
      if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    rows.append(dict(batch=batch, tokens_per_s=batch * args.new_tokens / wall,
                     ms_per_step=1e3 * wall / args.new_tokens))
    print(json.dumps(dict(hf=rows[-1])), flush=True)
  return rows


def _attention_sweep(args) -> list:
  """One layer's attention alone, in-graph: the Pallas kernel's block sizes and cache splits
  against XLA's FLAT and GROUPED attention, SmolLM2's heads, at (batch, new tokens) decode
  and tree sizes, each at every fill of ``--sweep-fills`` (committed slots).

  Each call's output is the next call's query (a dependency chain of ``steps``
  calls in one fori_loop), so nothing is hoisted; the fill (``kv_len``) and the mask
  are arguments, so one compilation serves every fill. Also checks the kernel
  against the XLA attention on the same inputs (max abs difference, at the first fill).
  """
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from medusa_jax.models.llama import AttentionScores, causal_mask
  from medusa_jax.pallas.decode_attention import (decode_attention, default_block_m,
                                                  default_blocks, default_splits)

  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  cfg = _smollm2_config(args.tiny)
  llama, _ = _build(cfg, dtype, 1, attention="flat")
  flat_attn = llama.layers[0].self_attn
  grouped_attn = llama.with_attention_scores(AttentionScores.GROUPED).layers[0].self_attn
  Q, G, D, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, args.cache_len
  fills = args.sweep_fills or [args.prompt_len]
  results = []
  for B, T in ((1, 1), (1, 16), (1, 64), (16, 1), (16, 4), (64, 1)):
    key = jax.random.split(jax.random.PRNGKey(B * 100 + T), 3)
    q = jax.random.normal(key[0], (B, T, Q, D), jnp.float32).astype(dtype)
    k = jax.random.normal(key[1], (B, L, G, D), jnp.float32).astype(dtype)
    v = jax.random.normal(key[2], (B, L, G, D), jnp.float32).astype(dtype)
    at = {}
    for fill in fills:
      idx = jnp.full((B,), min(fill, L - T), jnp.int32)
      at[fill] = (causal_mask(idx, T, L), idx + T)

    def chain(fn):
      """{fill: us per call} of ``fn(x, mask, kv_len)``, one compilation."""
      @jax.jit
      def run(q, mask, kv_len):
        return jax.lax.fori_loop(0, args.steps,
                                 lambda i, x: fn(x, mask, kv_len).astype(dtype), q)
      out = {}
      for fill, (mask, kv_len) in at.items():
        run(q, mask, kv_len).block_until_ready()
        best = float("inf")
        for _ in range(3):
          t = time.perf_counter()
          run(q, mask, kv_len).block_until_ready()
          best = min(best, (time.perf_counter() - t) / args.steps)
        out[fill] = 1e6 * best
      return out

    def xla(attn, x, mask, kv_len):
      return attn(x, k_BxLxGxD=k, v_BxLxGxD=v, mask_Bx1x1xTxL=mask[:, None, None])

    row = dict(batch=B, tokens=T, fills=fills, cache_len=L)
    for name, attn in (("flat", flat_attn._flat), ("grouped", grouped_attn._grouped)):
      row[f"{name}_us"] = chain(functools.partial(xla, attn))
    mask0, len0 = at[fills[0]]
    ref = np.asarray(xla(flat_attn._flat, q, mask0, len0), np.float32)
    for bk in (64, 128, 256):
      for warps in (4, 8):
        for splits in (1, 2, 4, 8):
          tag = f"pallas_k{bk}_w{warps}_s{splits}"

          def fn(x, mask, kv_len, bk=bk, warps=warps, splits=splits):
            return decode_attention(x, k, v, mask, kv_len, block_k=bk, num_warps=warps,
                                    splits=splits)
          try:
            got = np.asarray(fn(q, mask0, len0), np.float32)
            row[f"{tag}_us"] = chain(fn)
            row[f"{tag}_max_abs_err"] = float(np.abs(got - ref).max())
          except Exception as e:  # a block shape Triton rejects must not lose the others
            row[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    results.append(row)
    # The library's choices for this shape: one split, and the GPU default (default_splits).
    rows = (Q // G) * T
    splits = default_splits(B * G * -(-rows // default_block_m(rows)), L)
    one = "pallas_k{}_w{}_s1_us".format(*default_blocks(B, rows))
    default = "pallas_k{}_w{}_s{}_us".format(*default_blocks(B, rows, splits), splits)
    for fill in fills:
      timed = [(v[fill], k[:-3]) for k, v in row.items()
               if k.startswith("pallas") and k.endswith("_us")]
      best = min(timed)
      print(f"attention B={B:>2} T={T:>2} fill {fill:>4}: flat {row['flat_us'][fill]:.1f} us,"
            f" grouped {row['grouped_us'][fill]:.1f} us, pallas one split"
            f" {row.get(one, {}).get(fill, float('nan')):.1f} us, default"
            f" {row.get(default, {}).get(fill, float('nan')):.1f} us, best {best[0]:.1f} us"
            f" ({best[1]})", flush=True)
    print(json.dumps(dict(attention_sweep=row)), flush=True)
  return results


def _flag_variants(args) -> list:
  """Re-runs the plain/tree step at batch 1 under other XLA flags or bench options (new
  processes; ``arg:`` variants add options, the others XLA flags)."""
  variants = {
      # (--xla_gpu_graph_min_graph_size=1 alone and WHILE/CONDITIONAL command buffers:
      # measured before, docs/perf_decode.md and docs/perf.md.)
      # XLA's layers for the batch-1 step (a reduce per projection, the norms, RoPE, the
      # cache writes, the splits' combine, the SwiGLU and the residuals as kernels of
      # their own) instead of the GPU default's five kernels per layer.
      "xla_rows": "arg:--no-row-kernels",
      # The row kernels for the tree's verify step too (up to 64 tokens in a call, in
      # tensor-core dots) instead of XLA's layers there.
      "row_kernel_rows_64": "arg:--row-kernel-rows 64",
      # The tree step's KV compaction as XLA's gather and scatter per cache array (60
      # for SmolLM2) instead of the two Pallas kernels of the GPU's default.
      "xla_compaction": "arg:--no-compact-kernel",
      # The projections' kernels [in, out] (the layout before out_in became the GPU's).
      "in_out_kernels": "arg:--kernel-layout in_out",
  }
  results = []
  for name, flags in variants.items():
    extra = flags[4:].split() if flags.startswith("arg:") else []
    env = dict(os.environ) if extra else dict(
        os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    cmd = [sys.executable, __file__, "--only-plain", "--no-hf", "--no-flags", "--no-engine",
           "--batches", "1", "--steps", str(args.steps), "--cache-len", str(args.cache_len),
           "--dtype", args.dtype, "--attention", args.attention, "--json-line",
           "--tree-batches", *map(str, args.variant_tree_batches), *extra]
    if args.kernel_layout and "--kernel-layout" not in extra:
      cmd += ["--kernel-layout", args.kernel_layout]  # the parent row's
    if args.compare_methods:
      cmd += ["--compare-attention", "1", "--compare-methods", *args.compare_methods]
    if args.tiny:
      cmd.append("--tiny")
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=args.flag_timeout)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      row = json.loads(lines[-1][7:])["rows"][0] if lines else dict(error=proc.stderr[-800:])
    except subprocess.TimeoutExpired:
      row = dict(error="timeout")
    row["variant"], row["flags"] = name, flags
    results.append(row)
    print(json.dumps(dict(flags=row)), flush=True)
  return results


def _table(res: dict) -> str:
  nan = float("nan")
  lines = [f"{res['device']} ({res['backend']}), JAX {res['jax']}, {res['dtype']}, cache "
           f"{res['cache_len']}, prompt {res['prompt_len']}, copy {res['copy_bw_tb_s']:.2f} TB/s, "
           f"fused projections {res.get('fused_projections')}",
           f"{'B':>3} {'plain ms':>9} {'in-graph':>9} {'floor':>7} {'kernels':>7} {'chain ms':>9} "
           f"{'tree ms':>8} {'T':>3} {'tree/plain':>10} {'in-graph':>8} {'verify T/1':>10} "
           f"{'eng plain':>10} {'eng tree':>9} {'HF tok/s':>9}"]
  hf = {r["batch"]: r for r in res.get("hf", [])}
  for r in res["rows"]:
    b = r["batch"]
    eng_p = r.get("engine_plain", {}).get("tokens_per_s", nan)
    eng_t = r.get("engine_tree", {}).get("tokens_per_s", nan)
    kernels = sum(r.get("plain_kernels", {}).values()) or "-"
    lines.append(
        f"{b:>3} {r['plain_step_ms']:>9.3f} {r.get('plain_step_in_graph_ms', nan):>9.3f} "
        f"{r['plain_floor_ms']:>7.3f} {kernels:>7} {r.get('chain_step_ms', nan):>9.3f} "
        f"{r.get('tree_step_ms', nan):>8.3f} {r.get('tree_nodes', 0):>3} "
        f"{r.get('tree_step_ms', nan) / r['plain_step_ms']:>10.2f} "
        f"{r.get('tree_in_graph_over_plain', nan):>8.2f} {r.get('verify_cost_ratio', nan):>10.2f} "
        f"{eng_p:>10.0f} {eng_t:>9.0f} {hf.get(b, {}).get('tokens_per_s', nan):>9.0f}")
    if r.get("tree_stages_in_graph_ms"):
      st, prev, parts = r["tree_stages_in_graph_ms"], 0.0, []
      for k in (*STAGES, "step"):
        parts.append(f"{k} {st[k] - prev:+.3f}")
        prev = st[k]
      lines.append(f"    tree step in-graph by stage (ms): {', '.join(parts)} = {st['step']:.3f}")
      if "forward_tree_at_prompt_empty_cache_ms" in r:
        lines.append(f"    tree forward + LM head alone, cache filled to the prompt: empty"
                     f" {r['forward_tree_at_prompt_empty_cache_ms']:.3f} ms, random"
                     f" {r['forward_tree_at_prompt_random_cache_ms']:.3f} ms")
    for what, t in r.get("kernel_trace", {}).items():
      if "error" in t:
        lines.append(f"    trace {what}: {t['error']}")
        continue
      names = ", ".join(f"{k} {n:g}x {us:.1f}" for k, (n, us) in list(t["names"].items())[:10])
      lines.append(f"    trace {what}: {t['kernels']:g} kernels, busy {t['busy_us']:.1f} us,"
                   f" span {t['span_us']:.1f} us per step; us by kernel: {names}")
    if "tree_kernels" in r:
      lines.append(f"    tree step: {sum(r['tree_kernels'].values())} kernels ({r['tree_kernels']})")
    if "unfused_plain_step_ms" in r:
      lines.append(f"    unfused (checkpoint layout): {r['unfused_plain_step_ms']:.3f} ms dispatched,"
                   f" {r.get('unfused_plain_step_in_graph_ms', nan):.3f} ms in-graph,"
                   f" {sum(r['unfused_plain_kernels'].values())} kernels")
    for other in ATTENTION_METHODS:
      if f"{other}_plain_step_in_graph_ms" in r:
        tree_ms = r.get(f"{other}_tree_step_in_graph_ms")
        lines.append(f"    {other} attention: plain {r[f'{other}_plain_step_in_graph_ms']:.3f} ms"
                     f" in-graph, {sum(r.get(f'{other}_plain_kernels', {}).values()) or '-'} kernels"
                     + (f"; tree {tree_ms:.3f} ms in-graph ({r[f'{other}_tree_nodes']} nodes)"
                        if tree_ms is not None else ""))
  for v in res.get("flags", []):
    if "error" in v:
      lines.append(f"flags {v['variant']}: error {v['error'][-200:]}")
    else:
      lines.append(f"flags {v['variant']} ({v['flags']}): plain B=1 {v['plain_step_ms']:.3f} ms"
                   f" dispatched, {v.get('plain_k16_step_ms', nan):.3f} ms at K=16,"
                   f" {v.get('plain_step_in_graph_ms', nan):.3f} ms in-graph,"
                   f" {sum(v.get('plain_kernels', {}).values()) or '-'} kernels;"
                   f" tree {v.get('tree_step_ms', nan):.3f} ms (T={v.get('tree_nodes', 0)})")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
  p.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
  p.add_argument("--steps-per-call", type=int, nargs="*", default=[1, 4, 8, 16],
                 help="K values: plain steps timed with K steps per dispatched call")
  p.add_argument("--tree-steps-per-call", type=int, nargs="*", default=[16],
                 help="K values: tree steps timed with K steps per dispatched call (and the"
                 " large copies in that loop's HLO counted)")
  p.add_argument("--cache-len", type=int, default=1024)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64, help="engine / HF new tokens")
  p.add_argument("--heads", type=int, default=5, help="Medusa heads (the bundled SmolLM2 adapter has 5)")
  p.add_argument("--max-tree-rows", type=int, default=64)
  p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
  p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
  p.add_argument("--only-plain", action="store_true", help="plain and tree steps only")
  p.add_argument("--no-fused", dest="fused", action="store_false",
                 help="time the unfused (checkpoint) layout of the base model")
  p.add_argument("--compare-unfused", action="store_true",
                 help="also time the unfused layout at the first batch size")
  p.add_argument("--attention", choices=ATTENTION_METHODS, default="grouped",
                 help="how the base model computes attention (AttentionScores)")
  p.add_argument("--row-kernels", action=argparse.BooleanOptionalAction, default=None,
                 help="batch-1 plain steps run the Pallas row-projection kernels"
                 " (Llama(row_kernels=...); default: the backend's, on for a CUDA GPU)")
  p.add_argument("--row-kernel-rows", type=int, default=1,
                 help="most tokens in a call that the row kernels take (Llama(row_kernel_rows"
                 "=...): 16 or 64 take the tree's verify step and batched decode steps too)")
  p.add_argument("--kernel-layout", choices=("in_out", "out_in"), default=None,
                 help="how the projections hold their kernels (Llama.with_kernel_layout;"
                 " default: the backend's, out_in on a CUDA GPU)")
  p.add_argument("--compact-kernel", action=argparse.BooleanOptionalAction, default=None,
                 help="the speculative step's KV compaction in two Pallas kernels, or"
                 " (--no-compact-kernel) XLA's gather and scatter; default: Llama's"
                 " (the kernels on a CUDA GPU)"),
  p.add_argument("--compare-attention", type=int, nargs="*", default=None,
                 help="batch sizes that also time the other --attention methods, in-graph"
                 " (plain step, and the tree step where --tree-batches has the batch)")
  p.add_argument("--compare-methods", nargs="*", choices=ATTENTION_METHODS, default=None,
                 help="the methods --compare-attention times (default: all others)")
  p.add_argument("--sweep-fills", type=int, nargs="*", default=None, metavar="SLOTS",
                 help="committed cache slots at which --attention-sweep times each variant"
                      " (default: --prompt-len)")
  p.add_argument("--attention-sweep", action="store_true",
                 help="first time one layer's attention alone: the Pallas kernel's block sizes"
                 " against XLA's flat and grouped attention")
  p.add_argument("--tree-batches", type=int, nargs="*", default=None,
                 help="batch sizes that time the tree step (default: all)")
  p.add_argument("--kernel-trace", type=int, nargs="*", default=None, metavar="B",
                 help="at these batch sizes, also trace the in-graph loops (plain step, tree"
                      " step and, with --stages, the forward-only loops) and sum their device"
                      " time kernel by kernel (scripts/kernel_trace.py)")
  p.add_argument("--stages", type=int, nargs="*", default=None,
                 help="batch sizes whose tree step is also timed in-graph stage by stage"
                 " (cumulative prefixes: forward, LM head, walk, heads, verdict, compaction)")
  p.add_argument("--real-model", help="a Hugging Face Llama dir: end-to-end mode (see above)")
  p.add_argument("--questions", help="pre-tokenised MT-bench questions (eval_mtbench.py"
                 " --write-questions)")
  p.add_argument("--heads-dir", help="Medusa adapter dir (default: the bundled heads)")
  p.add_argument("--e2e-bs1-questions", type=int, default=4,
                 help="questions run one at a time for batch 1")
  p.add_argument("--e2e-f32", action="store_true", help="also run f32 at batch 1")
  p.add_argument("--e2e-modes", nargs="+", default=["none", "chain", "tree", "tree-budget"],
                 choices=("none", "chain", "tree", "tree-budget"),
                 help="end-to-end modes (none first): tree = the engine's tree policy"
                 " (measured by default), tree-budget = the row budget")
  p.add_argument("--e2e-min-cache-len", type=int, default=512,
                 help="smallest cache bucket of the end-to-end engine (fewer compilations)")
  p.add_argument("--hf-real", action="store_true",
                 help="end-to-end mode: then run transformers generate on the same model and"
                 " prompts (scripts/bench_hf.py)")
  p.add_argument("--hf-real-batches", type=int, nargs="+", default=[1, 16])
  p.add_argument("--hf-real-modes", nargs="+", default=list(_bench_hf().HF_MODES),
                 choices=_bench_hf().HF_MODES)
  p.add_argument("--hf-real-prompts", type=int, default=None,
                 help="prompts run one at a time at batch 1 (default: --e2e-bs1-questions,"
                 " the medusa_jax rows' own)")
  p.add_argument("--hf-real-time-budget", type=float, default=300,
                 help="seconds after which no new transformers (mode, batch) is started")
  p.add_argument("--dump-hlo", metavar="DIR",
                 help="write each plain step's compiled HLO whose kernels are counted to DIR")
  p.add_argument("--no-hf", dest="hf", action="store_false")
  p.add_argument("--no-flags", dest="flags", action="store_false")
  p.add_argument("--no-engine", dest="engine", action="store_false")
  p.add_argument("--no-in-graph", dest="in_graph", action="store_false")
  p.add_argument("--time-budget", type=float, default=300,
                 help="seconds after which no new batch size is started")
  p.add_argument("--flags-before", type=float, default=330,
                 help="run the XLA-flag variants only if this many seconds have not passed")
  p.add_argument("--flag-timeout", type=float, default=100)
  p.add_argument("--variant-tree-batches", type=int, nargs="*", default=[1],
                 help="batch sizes whose tree step the flag variants time")
  p.add_argument("--json-line", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.environ.get("OUT"))
  args = p.parse_args(argv)
  t0 = time.time()
  if args.real_model:
    res = bench_real(args)
    res.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               python=platform.python_version())
    _save(args, res, "bench_e2e.json")
    print(_e2e_table(res))
    return 0
  sweep = _attention_sweep(args) if args.attention_sweep else None
  res = bench_jax(args)
  if sweep is not None:
    res["attention_sweep"] = sweep
  if args.hf:
    try:
      res["hf"] = bench_hf(args)
    except Exception as e:  # a missing or broken transformers must not lose the JAX numbers
      res["hf_error"] = f"{type(e).__name__}: {e}"
    _save(args, res)
  if args.flags and time.time() - t0 < args.flags_before:
    res["flags"] = _flag_variants(args)
  res.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), python=platform.python_version(),
             total_s=time.time() - t0)
  if args.json_line:
    print("RESULT " + json.dumps(res), flush=True)
    return 0
  _save(args, res)
  print(_table(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
