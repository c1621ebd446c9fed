"""Decode benchmark: plain, chain and tree steps of the jitted engine, and HF generate.

Random weights of the exact SmolLM2-135M shape (step times do not depend on
the weights; acceptance does, and is measured with trained heads on the real
model elsewhere). For each batch size it reports:

* step times (device time per call, from a loop of dispatched calls ended by one
  ``block_until_ready``; and in-graph, ``fori_loop`` over the step, which
  removes per-call dispatch) for plain decoding, LoRAX's chain (n = 4) and the
  adaptive Medusa tree;
* the break-even tokens per step of each speculative mode (its step time over
  the plain step time): speculation wins when the heads beat it;
* the forward-only cost of verifying T tree nodes against a one-token forward;
* end-to-end tokens/s through ``Engine.generate`` (host loop, one device_get
  per step) -- with random heads drafts are almost never accepted, so these
  numbers show the overhead of speculating, not its gain;
* Hugging Face transformers ``generate`` (eager, same shape, same dtype);
* the memory floor of a plain step from a copy bandwidth measured in the run.

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


def _smollm2_config(tiny: bool):
  from medusa_jax.models.llama import LlamaConfig
  if tiny:
    return LlamaConfig.tiny(vocab_size=512, eos_token_ids=())
  return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
                     eos_token_ids=(), pad_token_id=2)


def _build(cfg, dtype, num_heads, seed=0):
  import jax
  from flax import nnx

  from medusa_jax.config import MedusaConfig
  from medusa_jax.models.llama import Llama
  from medusa_jax.weights import MedusaWeights
  llama = Llama(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype)
  mc = MedusaConfig(base_model_name_or_path="smollm2-shape", medusa_num_heads=num_heads,
                    medusa_num_layers=1, version=2.0)
  medusa = MedusaWeights.init(mc, cfg.hidden_size, seed=seed + 1, dtype=dtype)
  k = medusa.model.medusa.kernel
  k[...] = (0.02 * jax.random.normal(jax.random.PRNGKey(seed + 2), k[...].shape)).astype(dtype)
  return llama, medusa


def _copy_bandwidth():
  """Device copy bandwidth in bytes/s (read + write), median of 10."""
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.PRNGKey(0), (256 * 1024 * 1024 // 4,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  f(x).block_until_ready()
  times = []
  for _ in range(10):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  times.sort()
  return 2 * x.nbytes / times[len(times) // 2]


def _start_state(dec, cfg, batch, cache_len, prompt_len, config, dtype, seed):
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(batch, prompt_len)), jnp.int32)
  lens = jnp.full((batch,), prompt_len, jnp.int32)
  cache = dec.init_cache(batch, cache_len, dtype)
  state, _ = dec.prefill(cache, prompt, lens, jnp.full((batch,), 1 << 30, jnp.int32),
                         jnp.zeros((batch,), bool), jax.random.PRNGKey(seed), config=config)
  return state


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


def _time_in_graph(dec, state, config, steps):
  """ms per step with ``steps`` steps inside one jitted fori_loop (no dispatch)."""
  import functools

  import jax

  from medusa_jax.decoding import step as step_mod
  fn = step_mod.plain_step if config.tree is None else step_mod.speculative_step
  body = functools.partial(fn, dec.graphs)

  @functools.partial(jax.jit, donate_argnums=1)
  def many(params, state):
    return jax.lax.fori_loop(0, steps, lambda i, s: body(params, s, config=config)[0], state)

  state = many(dec.params, state)  # compile + warm
  jax.block_until_ready(state)
  t = time.perf_counter()
  state = many(dec.params, state)
  jax.block_until_ready(state)
  return 1e3 * (time.perf_counter() - t) / steps, state


def _time_forward(dec, cfg, batch, num_nodes, cache_len, dtype, reps):
  """ms of one base forward of ``num_nodes`` tokens per row + LM head (tree mask, mid cache)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from medusa_jax.decoding import cache_ops
  from medusa_jax.decoding.tree import tree_for_batch
  graphs = dec.graphs

  @jax.jit
  def fwd(params, cache, tokens, lengths, tree_mask, depth):
    llama = nnx.merge(graphs.llama, params.llama)
    mask = cache_ops.tree_attention_mask(lengths, tree_mask, cache.length)
    pos = lengths[:, None] + depth[None, :]
    hidden, cache = llama(tokens, pos, cache, lengths, mask)
    return llama.lm_head(hidden).max(axis=-1), cache

  if num_nodes == 1:
    tree_mask, depth = np.ones((1, 1), bool), np.zeros((1,), np.int32)
  else:
    tree = tree_for_batch(1, 4, max_tree_rows=num_nodes)  # the same node count, at batch 1
    tree_mask, depth = tree.attn_mask, tree.node_depth
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(batch, len(depth))), jnp.int32)
  lengths = jnp.full((batch,), cache_len // 2, jnp.int32)
  cache = dec.init_cache(batch, cache_len, dtype)
  args = (jnp.asarray(tree_mask), jnp.asarray(depth))
  out, cache = fwd(dec.params, cache, tokens, lengths, *args)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(reps):
    out, cache = fwd(dec.params, cache, tokens, lengths, *args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - t) / reps, len(depth)


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


def bench_jax(args) -> dict:
  import jax
  import jax.numpy as jnp

  from medusa_jax.decoding.engine import Engine
  from medusa_jax.decoding.step import StepConfig
  from medusa_jax.decoding.tree import build_tree, chain_choices, tree_for_batch
  from medusa_jax.decoding.verify import Greedy

  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  cfg = _smollm2_config(args.tiny)
  llama, medusa = _build(cfg, dtype, args.heads)
  # One cache bucket for the step timings and the engine, so they share compilations.
  engine = Engine(llama, None, medusa, max_cache_len=args.cache_len, cache_dtype=dtype,
                  min_cache_len=args.cache_len, max_tree_rows=args.max_tree_rows)
  dec = engine.decoder
  n_params = sum(x.size for x in jax.tree.leaves(dec.params.llama))
  weight_bytes = n_params * jnp.dtype(dtype).itemsize
  bw = _copy_bandwidth()
  out = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
             jax=jax.__version__, dtype=args.dtype, cache_len=args.cache_len,
             prompt_len=args.prompt_len, params=int(n_params), copy_bw_tb_s=bw / 1e12,
             xla_flags=os.environ.get("XLA_FLAGS", ""), rows=[])
  kv_row_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
                  * jnp.dtype(dtype).itemsize)
  t_start = time.time()
  for i, batch in enumerate(args.batches):
    if time.time() - t_start > args.time_budget:
      out["skipped_batches"] = args.batches[i:]
      break
    row = dict(batch=batch)
    floor_ms = 1e3 * (weight_bytes + batch * args.prompt_len * kv_row_bytes) / bw
    row["plain_floor_ms"] = floor_ms
    modes = {"plain": None, "chain": build_tree(chain_choices(args.heads)),
             "tree": tree_for_batch(batch, args.heads, max_tree_rows=args.max_tree_rows)}
    for name, tree in modes.items():
      if args.only_plain and name == "chain":
        continue
      config = StepConfig(tree=tree, strategy=Greedy(), eos_ids=())
      state = _start_state(dec, cfg, batch, args.cache_len, args.prompt_len, config, dtype, 0)
      ms, state = _time_steps(dec, state, config, args.steps)
      row[f"{name}_step_ms"] = ms
      row[f"{name}_nodes"] = 1 if tree is None else tree.num_nodes
      if args.in_graph and tree is None and not args.only_plain:
        state = _start_state(dec, cfg, batch, args.cache_len, args.prompt_len, config, dtype, 1)
        row[f"{name}_step_in_graph_ms"], _ = _time_in_graph(dec, state, config, args.steps)
      del state
    for name in ("chain", "tree"):
      if f"{name}_step_ms" in row:
        row[f"{name}_break_even_tokens_per_step"] = row[f"{name}_step_ms"] / row["plain_step_ms"]
    if i == 0 and not args.only_plain:  # the forward-only verify cost at the first batch size
      fwd1, _ = _time_forward(dec, cfg, batch, 1, args.cache_len, dtype, args.steps)
      fwdT, t_nodes = _time_forward(dec, cfg, batch, row["tree_nodes"], args.cache_len, dtype,
                                    args.steps)
      row.update(forward_1_ms=fwd1, forward_tree_ms=fwdT, forward_tree_nodes=t_nodes,
                 verify_cost_ratio=fwdT / fwd1)
    if not args.only_plain and args.engine:
      for name, mode in (("plain", "none"), ("chain", "chain"), ("tree", "tree")):
        row[f"engine_{name}"] = _engine_tokens_per_s(engine, cfg, batch, args.prompt_len,
                                                     args.new_tokens, mode)
    out["rows"].append(row)
    out["trace_counts"] = dict(dec.trace_counts)
    print(json.dumps(row), flush=True)
    _save(args, out)
  return out


def _save(args, res) -> None:
  """Writes the results so far (a run cut short keeps what it measured)."""
  if args.out and not args.json_line:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
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


def _flag_variants(args) -> list:
  """Re-runs the plain/tree step at batch 1 under other XLA flags (new processes)."""
  variants = {
      "command_buffers_off": "--xla_gpu_enable_command_buffer=",
      "graph_min_size_1": "--xla_gpu_graph_min_graph_size=1",
  }
  results = []
  for name, flags in variants.items():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    cmd = [sys.executable, __file__, "--only-plain", "--no-hf", "--no-flags", "--no-engine",
           "--batches", "1", "--steps", str(args.steps), "--cache-len", str(args.cache_len),
           "--dtype", args.dtype, "--json-line"]
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
  lines = [f"{res['device']} ({res['backend']}), JAX {res['jax']}, {res['dtype']}, cache "
           f"{res['cache_len']}, prompt {res['prompt_len']}, copy {res['copy_bw_tb_s']:.2f} TB/s",
           f"{'B':>3} {'plain ms':>9} {'in-graph':>9} {'floor':>7} {'chain ms':>9} "
           f"{'tree ms':>8} {'T':>3} {'tree/plain':>10} {'verify T/1':>10} "
           f"{'eng plain':>10} {'eng tree':>9} {'HF tok/s':>9}"]
  hf = {r["batch"]: r for r in res.get("hf", [])}
  for r in res["rows"]:
    b = r["batch"]
    eng_p = r.get("engine_plain", {}).get("tokens_per_s", float("nan"))
    eng_t = r.get("engine_tree", {}).get("tokens_per_s", float("nan"))
    lines.append(
        f"{b:>3} {r['plain_step_ms']:>9.3f} {r.get('plain_step_in_graph_ms', float('nan')):>9.3f} "
        f"{r['plain_floor_ms']:>7.3f} {r.get('chain_step_ms', float('nan')):>9.3f} "
        f"{r['tree_step_ms']:>8.3f} {r['tree_nodes']:>3} "
        f"{r['tree_step_ms'] / r['plain_step_ms']:>10.2f} {r.get('verify_cost_ratio', float('nan')):>10.2f} "
        f"{eng_p:>10.0f} {eng_t:>9.0f} {hf.get(b, {}).get('tokens_per_s', float('nan')):>9.0f}")
  for v in res.get("flags", []):
    if "error" in v:
      lines.append(f"flags {v['variant']}: error {v['error'][-200:]}")
    else:
      lines.append(f"flags {v['variant']} ({v['flags']}): plain B=1 {v['plain_step_ms']:.3f} ms,"
                   f" tree {v['tree_step_ms']:.3f} ms (T={v['tree_nodes']})")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
  p.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
  p.add_argument("--cache-len", type=int, default=1024)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64, help="engine / HF new tokens")
  p.add_argument("--heads", type=int, default=5, help="Medusa heads (the bundled SmolLM2 adapter has 5)")
  p.add_argument("--max-tree-rows", type=int, default=64)
  p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
  p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
  p.add_argument("--only-plain", action="store_true", help="plain and tree steps only")
  p.add_argument("--no-hf", dest="hf", action="store_false")
  p.add_argument("--no-flags", dest="flags", action="store_false")
  p.add_argument("--no-engine", dest="engine", action="store_false")
  p.add_argument("--no-in-graph", dest="in_graph", action="store_false")
  p.add_argument("--time-budget", type=float, default=300,
                 help="seconds after which no new batch size is started")
  p.add_argument("--flags-before", type=float, default=330,
                 help="run the XLA-flag variants only if this many seconds have not passed")
  p.add_argument("--flag-timeout", type=float, default=100)
  p.add_argument("--json-line", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.environ.get("OUT"))
  args = p.parse_args(argv)
  t0 = time.time()
  res = bench_jax(args)
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
