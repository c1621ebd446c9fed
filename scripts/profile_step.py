"""Per-stage timings of one decode step: where a speculative step's time goes.

Loads the cached SmolLM2-135M-Instruct with the bundled heads
(``Engine.load()``) and times, at each batch size, separately jitted pieces
of a step and then the whole steps as :class:`~medusa_jax.decoding.decoder.Decoder`
jits them:

* ``forward T=t``: the base model over t tokens per row with a tree mask over
  a cache of ``--cache`` slots (cache donated, as in a step);
* ``lm_head M=m [H,V]`` / ``[V,H]^T``: the LM head over m rows per batch
  row, with the transposed copy (``step._lm_head``) and with the tied
  embedding as stored;
* ``top_k k=..`` / ``argmax``: over the vocabulary of D draft heads (what
  ``verify.tree_candidates`` runs), against a plain argmax;
* ``heads``: the MedusaV2 fused matmul (``heads_hidden``);
* ``compact``: ``cache_ops.compact_cache`` of a D+1 path (cache donated);
* ``walk``: the greedy walk over the internal nodes' logits;
* ``plain_step`` / ``speculative_step``: ``Decoder.step`` with the engine's
  tree for the batch size (or ``--tree-nodes``).

Every time is the median over ``--repeats`` calls, each ended by
``block_until_ready`` (so dispatch is included, as in the engine's loop),
after warm-up calls, and the minimum (on a shared machine other processes
only add time). Prints a table and writes JSON (``--out``).

Usage: ``python scripts/profile_step.py --batches 1 4 --out docs/data/profile-step-cpu-DATE.json``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def _time(fn, *args, repeats: int, warmup: int = 3, carry: int | None = None):
  """Median seconds of ``fn(*args)``.

  ``carry``: the index of a donated argument, fed back from the same index of
  the output; then returns (seconds, its last value) so the caller can go on.
  """
  import jax
  args = list(args)
  out = None
  times = []
  for i in range(warmup + repeats):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t)
    if carry is not None:
      args[carry] = out[carry] if isinstance(out, tuple) else out
  _time.last_min = min(times)
  median = statistics.median(times)
  return median if carry is None else (median, args[carry])


def _random_cache(cfg, batch, cache_len, seed):
  import jax
  import jax.numpy as jnp

  from medusa_jax.models.llama import KVCache
  shape = (batch, cache_len, cfg.num_key_value_heads, cfg.head_dim)
  n = cfg.num_hidden_layers
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * n)
  fill = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32))
  return KVCache(k=tuple(fill(keys[i]) for i in range(n)),
                 v=tuple(fill(keys[n + i]) for i in range(n)))


def _start_state(cfg, batch, cache_len, prompt_len, num_nodes, seed):
  """A decode state with ``prompt_len`` committed tokens and a random cache."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from medusa_jax.decoding.state import DecodeState
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(batch, num_nodes)), jnp.int32)
  return DecodeState(cache=_random_cache(cfg, batch, cache_len, seed),
                     lengths=jnp.full((batch,), prompt_len, jnp.int32), tokens=tokens,
                     generated=jnp.zeros((batch,), jnp.int32),
                     max_new=jnp.full((batch,), 1 << 30, jnp.int32),
                     done=jnp.zeros((batch,), bool), rng=jax.random.PRNGKey(seed))


def profile(batches, cache_len, repeats, tree_nodes, prompt_len=64, log=print) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from medusa_jax.decoding import cache_ops
  from medusa_jax.decoding import tree as tree_lib
  from medusa_jax.decoding.engine import Engine
  from medusa_jax.decoding.state import StepConfig
  from medusa_jax.decoding.strategies import Greedy
  from medusa_jax.decoding.verify import internal_nodes

  eng = Engine.load(max_cache_len=max(1024, cache_len))
  dec, cfg = eng.decoder, eng.cfg
  H, V = cfg.hidden_size, cfg.vocab_size
  llama_def, llama_state = nnx.split(eng.llama)
  leaves, llama_tree = jax.tree.flatten(llama_state)
  leaves = tuple(leaves)
  heads = eng.heads.medusa if hasattr(eng.heads, "medusa") else eng.heads
  heads_def, heads_state = nnx.split(heads)
  w_VxH = eng.llama.embed_tokens[...]
  w_HxV = dec.params.lm_head_t if dec.params.lm_head_t is not None else jnp.array(w_VxH.T)
  choices = tuple(tuple(p) for p in (eng.tree_choices or tree_lib.MC_SIM_7B_63))
  n = eng.num_heads
  strategy = Greedy()
  rows = []

  def add(batch, piece, seconds, **extra):
    # The minimum too: on a shared machine other processes only ever add time.
    rows.append({"batch": batch, "piece": piece, "ms": seconds * 1e3,
                 "min_ms": _time.last_min * 1e3, **extra})
    log(f"  B={batch:<3d} {piece:<34s} {seconds * 1e3:8.2f} ms (min {_time.last_min * 1e3:.2f})")

  def fwd(leaves, cache, tokens, positions, lengths, mask):
    llama = nnx.merge(llama_def, jax.tree.unflatten(llama_tree, leaves))
    return llama(tokens, positions, cache, lengths, mask)
  fwd_jit = jax.jit(fwd, donate_argnums=(1,))

  for batch in batches:
    key = jax.random.PRNGKey(batch)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    cache = _random_cache(cfg, batch, cache_len, batch)
    # 1. the base forward over T tokens with the tree mask.
    for t in (1, 2, 3, 4):
      tr = tree_lib.build_tree(tree_lib._closed_prefix(choices, t - 1)) if t > 1 else None
      mask_TxT = np.ones((1, 1), bool) if tr is None else tr.attn_mask
      depth = np.zeros(1, np.int32) if tr is None else tr.node_depth
      mask = cache_ops.tree_attention_mask(lengths, jnp.asarray(mask_TxT), cache_len)
      tokens = jax.random.randint(key, (batch, t), 3, V, jnp.int32)
      positions = lengths[:, None] + jnp.asarray(depth)[None, :]

      def run(cache, tokens=tokens, positions=positions, mask=mask, lengths=lengths):
        h, c = fwd_jit(leaves, cache, tokens, positions, lengths, mask)
        return c, h
      sec, cache = _time(run, cache, repeats=repeats, carry=0)
      add(batch, f"forward T={t}", sec)
    # 2. the LM head over M rows per batch row, both layouts.
    lm_t = jax.jit(lambda h, w: jnp.einsum("...h,hv->...v", h, w,
                                           preferred_element_type=jnp.float32))
    lm_e = jax.jit(lambda h, w: jnp.einsum("...h,vh->...v", h, w,
                                           preferred_element_type=jnp.float32))
    for m in range(1, 9):
      h = jax.random.normal(key, (batch, m, H), jnp.float32)
      add(batch, f"lm_head M={m} [H,V]", _time(lm_t, h, w_HxV, repeats=repeats), rows=batch * m)
      add(batch, f"lm_head M={m} [V,H]^T", _time(lm_e, h, w_VxH, repeats=repeats),
          rows=batch * m)
    # 3. top-k over the vocabulary per head vs argmax.
    for d in (1, n):
      x = jax.random.normal(key, (batch, d, V), jnp.float32)
      for k in (2, 10):
        topk = jax.jit(lambda x, k=k: jax.lax.top_k(x, k)[1])
        add(batch, f"top_k k={k} D={d}", _time(topk, x, repeats=repeats))
      add(batch, f"argmax D={d}", _time(jax.jit(lambda x: jnp.argmax(x, -1)), x,
                                          repeats=repeats))
    # 4. the heads' fused matmul.
    x = jax.random.normal(key, (batch, H), jnp.float32)
    heads_fn = jax.jit(lambda s, x: nnx.merge(heads_def, s).heads_hidden(x))
    add(batch, "heads (MedusaV2 fused matmul)", _time(heads_fn, heads_state, x, repeats=repeats))
    # 5. the KV compaction of a D+1 path.
    for d in (1, n):
      path = jnp.broadcast_to(jnp.arange(d + 1, dtype=jnp.int32)[None] * 2, (batch, d + 1))
      compact = jax.jit(lambda c, p, n: cache_ops.compact_cache(c, n, p), donate_argnums=(0,))
      sec, cache = _time(lambda c, p=path, n=lengths, f=compact: (f(c, p, n),), cache,
                         repeats=repeats, carry=0)
      add(batch, f"compact_cache D={d}", sec)
    del cache
    # 6. the greedy walk over the internal nodes' logits.
    tr = tree_lib.tree_for_batch(batch, n, max_tree_rows=eng.max_tree_rows, choices=choices) \
        if tree_nodes is None else tree_lib.build_tree(tree_lib._closed_prefix(choices,
                                                                               tree_nodes - 1))
    i = len(internal_nodes(tr))
    tokens = jax.random.randint(key, (batch, tr.num_nodes), 3, V, jnp.int32)
    logits = jax.random.normal(key, (batch, i, V), jnp.float32)
    walk = jax.jit(lambda tok, lg, tr=tr: strategy.walk(tr, tok, lg).best_node)
    add(batch, f"walk (T={tr.num_nodes}, I={i})", _time(walk, tokens, logits, repeats=repeats))
    # 7. the whole steps, as the Decoder jits them.
    for name, t in (("plain_step", None), (f"speculative_step T={tr.num_nodes}", tr)):
      config = StepConfig(tree=t, strategy=strategy, eos_ids=())
      state = _start_state(cfg, batch, cache_len, prompt_len, config.num_nodes, batch)

      def run(state, config=config):
        return dec.step(state, config=config)
      # Rows stay well inside the cache: repeats * (depth + 1) < cache_len - prompt_len.
      add(batch, name, _time(run, state, repeats=repeats, carry=0)[0],
          tree_nodes=config.num_nodes)
  return {"jax": jax.__version__, "cpu": _cpu_model(), "machine": platform.machine(),
          "cache_len": cache_len, "repeats": repeats, "rows": rows}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
  p.add_argument("--cache", type=int, default=512, help="cache length L (default 512)")
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--tree-nodes", type=int, default=None,
                 help="T of the speculative step (default: the engine's tree per batch)")
  p.add_argument("--out", default=None, help="write the JSON here")
  args = p.parse_args(argv)
  result = profile(args.batches, args.cache, args.repeats, args.tree_nodes)
  print(f"\nJAX {result['jax']}, {result['cpu']}, cache {args.cache}, median of"
        f" {args.repeats} calls (block_until_ready each)")
  print("| B | piece | median ms | min ms |\n|---:|---|---:|---:|")
  for r in result["rows"]:
    print(f"| {r['batch']} | {r['piece']} | {r['ms']:.2f} | {r['min_ms']:.2f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
