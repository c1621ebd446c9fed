"""Benchmark: tensor-parallel V2 heads + lm_head, and a sharded decode step.

Part 1, V2 heads + vocabulary-split lm_head (LoRAX's layout, sharding.py) at
H=4096, V=128256, n=4, bf16, B in {1, 8, 32} rows, on 1, 2 (, 4) GPUs:

* ``1gpu``: the unsharded ``MedusaV2`` + a plain ``[H, V]`` lm_head.
* ``tp{W}``: ``ShardedMedusaV2`` + ``vocab_parallel_lm_head`` on a 1 x W mesh;
  logits stay split over V (``+argmax`` variants also pick each row's token,
  which adds a small cross-device reduction). The heads meet the LM head by
  the RING collective matmul (``tp{W}``) and, with ``--collectives``, by
  LoRAX's all-gather (``tp{W}-ag``). ``--dump-hlo`` writes each variant's
  optimized HLO to ``$OUT/hlo_{variant}.txt`` and prints what it holds:
  async collectives, and fusions that copy a block of the LM-head weight
  (``[H/W, V/W]``: the ring should read it in place).

Part 2, one LoRAX-style decode step (1 token per row, heads + lm_head) of a
Llama-3-8B-shaped model with random weights and fewer layers, on 1 and W GPUs.

Timing: jitted calls in a loop, ``jax.block_until_ready`` at the end, the
median over repeats. The floor is the bytes each device must read (its share
of the weights) over the copy bandwidth measured in the same run.

  PYTHONPATH=. python3 scripts/bench_sharded.py --out $OUT
  python scripts/bench_sharded.py --quick --cpu-devices 8     # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hidden", type=int, default=4096)
  p.add_argument("--vocab", type=int, default=128256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--widths", default="1,2,4", help="model-axis sizes to try (those that fit)")
  p.add_argument("--calls", type=int, default=50, help="calls per timed repeat")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--llama-layers", type=int, default=8)
  p.add_argument("--llama-batch", type=int, default=8)
  p.add_argument("--cache-len", type=int, default=1024)
  p.add_argument("--skip-llama", action="store_true")
  p.add_argument("--in-graph", type=int, default=20,
                 help="also time R forwards (+argmax) inside one jitted fori_loop, as in a"
                      " decode step (no per-call dispatch); 0 = off")
  p.add_argument("--collectives", default="ring,all_gather",
                 help="how sharded heads meet the LM head: ring (tp{W}), all_gather (tp{W}-ag)")
  p.add_argument("--dump-hlo", action="store_true",
                 help="write each sharded variant's optimized HLO and summarise it")
  p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
  p.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices (before JAX starts)")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  a = p.parse_args(argv)
  if a.quick:
    a.hidden, a.vocab, a.heads, a.batches = 64, 512, 4, "1,8"
    a.calls, a.repeats, a.llama_layers, a.llama_batch, a.cache_len = 3, 2, 2, 8, 64
    a.in_graph = min(a.in_graph, 3)
  return a


def _time(fn, *args, calls, repeats):
  """Median seconds per call: ``calls`` back-to-back calls per repeat."""
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times), times


def _hlo_summary(text, block, vocab_shard):
  """Counts, in an optimized HLO text, the collectives (sync and async starts)
  and the non-dot fusions whose output is a ``[block, vocab_shard]`` array: a
  copy of one block of the LM-head weight, which the ring means to read in place."""
  import collections
  import re
  ops = collections.Counter(re.findall(
      r"= [^=]*? (all-gather-start|all-gather|collective-permute-start|collective-permute|"
      r"all-reduce-start|all-reduce|reduce-scatter)\(", text))
  copies = [line.strip()[:120] for line in text.splitlines()
            if re.search(rf"= \w+\[{block},{vocab_shard}\]", line)
            and re.search(r" (fusion|copy|dynamic-slice)\(", line)
            and "dot" not in line.split("calls=")[0] and "gemm" not in line]
  return f"collectives {dict(ops)}; weight-block copies {len(copies)} {copies[:2]}"


def _copy_bandwidth(device):
  """Memory bandwidth of ``device``: the best of an elementwise pass over 1 GiB
  (bytes read + written) and a reduction of it (bytes read; weight reads are
  read-only, like a reduction)."""
  import jax
  import jax.numpy as jnp
  n = (1 << 30) // 2 if device.platform == "gpu" else (1 << 24)
  a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16), device)
  t_copy, _ = _time(jax.jit(lambda a: a + jnp.bfloat16(1)), a, calls=10, repeats=5)
  t_read, _ = _time(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), a, calls=10, repeats=5)
  return max(2 * n * 2 / t_copy, n * 2 / t_read)


def _random(mesh, shape, spec, dtype, seed, scale):
  """A random array made on the devices, already sharded (no host copy)."""
  import jax
  from jax.sharding import NamedSharding
  make = jax.jit(lambda k: (jax.random.normal(k, shape, jax.numpy.float32) * scale).astype(dtype),
                 out_shardings=NamedSharding(mesh, spec))
  return make(jax.random.PRNGKey(seed))


def bench_heads(a, devices, widths, bw):
  """V2 heads + lm_head: unsharded baseline vs tensor-parallel widths."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from medusa_jax.config import MedusaConfig
  from medusa_jax.heads.modules import MedusaModel
  from medusa_jax.heads.sharded import vocab_parallel_lm_head
  from medusa_jax.parallel.mesh import make_mesh, place

  H, V, n, dt = a.hidden, a.vocab, a.heads, jnp.bfloat16
  cfg = MedusaConfig(base_model_name_or_path="bench", medusa_num_heads=n, medusa_num_layers=1,
                     version=2.0)
  weight_bytes = (H * n * H + n * H + H * V) * 2
  rows, results = [], {}
  ref_out = {}
  for width in widths:
    mesh = make_mesh(1, width, devices=devices[:width])
    kernel = _random(mesh, (H, n, H), P(None, None, "model"), dt, 1, H ** -0.5)
    bias = _random(mesh, (n, H), P(None, "model"), dt, 2, 0.1)
    lm_w = _random(mesh, (H, V), P(None, "model"), dt, 3, H ** -0.5)
    variants = {}
    heads = MedusaModel(cfg, H, rngs=nnx.Rngs(0), param_dtype=dt, max_batch_size=1 << 20)
    heads.medusa.kernel.set_value(kernel)
    heads.medusa.bias.set_value(bias)
    if width == 1:
      variants["1gpu"] = heads
    else:
      for coll in a.collectives.split(","):
        name = f"tp{width}" if coll == "ring" else f"tp{width}-ag"
        variants[name] = heads.shard(mesh, lm_head_collective=coll)
    for name, model in variants.items():
      graphdef, state = nnx.split(model)

      def logits_fn(state, w, x, graphdef=graphdef):
        return nnx.merge(graphdef, state)(x, vocab_parallel_lm_head(w))

      def argmax_fn(state, w, x, graphdef=graphdef):
        logits, spec = logits_fn(state, w, x)
        return jnp.argmax(logits, -1), jnp.argmax(spec, -1)

      def looped_fn(state, w, x, reps=a.in_graph):
        def body(i, acc):
          # A distinct input per iteration keeps XLA from hoisting the forward.
          xi = x + (i.astype(jnp.float32) * 1e-3).astype(x.dtype)
          toks = argmax_fn(state, w, xi)
          return acc + toks[0].sum() + toks[1].sum()
        return jax.lax.fori_loop(0, reps, body, jnp.int32(0))

      for b in [int(s) for s in a.batches.split(",")]:
        x = place(np.random.default_rng(b).standard_normal((b, H)).astype(np.float32),
                     P(), mesh, dtype=dt)
        f_logits, f_argmax = jax.jit(logits_fn), jax.jit(argmax_fn)
        logits, spec = f_logits(state, lm_w, x)
        toks = f_argmax(state, lm_w, x)
        host = np.asarray(jax.device_get(spec), np.float32)
        if name == "1gpu":
          ref_out[b] = (host, np.asarray(jax.device_get(toks[1])))
          err, agree = 0.0, 1.0
        else:
          want, want_tok = ref_out[b]
          err = float(np.linalg.norm(host - want) / np.linalg.norm(want))
          agree = float(np.mean(np.asarray(jax.device_get(toks[1])) == want_tok))
        if not np.isfinite(host).all():
          raise SystemExit(f"{name} B={b}: non-finite logits")
        if a.dump_hlo and width > 1 and b == max(int(s) for s in a.batches.split(",")):
          text = f_argmax.lower(state, lm_w, x).compile().as_text()
          with open(os.path.join(a.out, f"hlo_{name}.txt"), "w") as f:
            f.write(text)
          print(f"  {name} B={b} HLO: {_hlo_summary(text, H // width, V // width)}", flush=True)
        kinds = [("logits", f_logits), ("+argmax", f_argmax)]
        if a.in_graph:
          kinds.append(("in-graph", jax.jit(looped_fn)))
        for kind, f in kinds:
          t, all_t = _time(f, state, lm_w, x, calls=a.calls, repeats=a.repeats)
          if kind == "in-graph":
            t, all_t = t / a.in_graph, [v / a.in_graph for v in all_t]
          floor = weight_bytes / width / bw
          key = f"{name}/{kind}/B{b}"
          results[key] = dict(variant=name, width=width, kind=kind, batch=b, seconds=t,
                              repeats=all_t, floor_s=floor, rel_err_vs_1gpu=err,
                              draft_argmax_agreement=agree,
                              logits_sharding=str(getattr(logits.sharding, "spec", "")))
          rows.append(key)
          print(f"  {key}: {t * 1e6:.1f} us (floor {floor * 1e6:.1f}), err {err:.1e}", flush=True)
  for key in rows:
    r = results[key]
    base = results.get(f"1gpu/{r['kind']}/B{r['batch']}")
    r["ratio_vs_1gpu"] = r["seconds"] / base["seconds"] if base else None
  return results


def bench_llama(a, devices, widths, bw):
  """A LoRAX-style decode step (1 token per row + V2 heads) of a Llama-3-8B-shaped model."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from medusa_jax.config import MedusaConfig
  from medusa_jax.decoding.decoder import Decoder
  from medusa_jax.heads.modules import MedusaModel
  from medusa_jax.models.llama_sharding import llama_rules, shard_cache
  from medusa_jax.parallel.mesh import make_mesh, path_str
  from medusa_jax.decoding.state import DecodeState
  from medusa_jax.models.llama import KVCache, Llama, LlamaConfig

  if a.quick:
    lcfg = LlamaConfig.tiny(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=128,
                            num_hidden_layers=a.llama_layers, num_attention_heads=8,
                            num_key_value_heads=8, head_dim=8)
  else:
    lcfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=14336,
                       num_hidden_layers=a.llama_layers, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=8192)
  n, dt, B = a.heads, jnp.bfloat16, a.llama_batch
  mcfg = MedusaConfig(base_model_name_or_path="bench", medusa_num_heads=n, medusa_num_layers=1,
                      version=2.0)
  results = {}
  for width in [w for w in widths if w in (1, max(widths))]:
    mesh = make_mesh(1, width, devices=devices[:width])
    rules = llama_rules(lcfg, mesh)
    abstract = nnx.eval_shape(lambda: Llama(lcfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
    graphdef, state = nnx.split(abstract)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    values = []
    for i, (path, leaf) in enumerate(leaves):
      name = path_str(path)
      scale = 1.0 if name.endswith("weight") else leaf.shape[0] ** -0.5
      values.append(_random(mesh, leaf.shape, rules.spec(name), dt, 100 + i, scale))
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), values)
    llama = nnx.merge(graphdef, state)
    H = lcfg.hidden_size
    kernel = _random(mesh, (H, n, H), P(None, None, "model"), dt, 7, H ** -0.5)
    bias = _random(mesh, (n, H), P(None, "model"), dt, 8, 0.1)
    heads = nnx.eval_shape(lambda: MedusaModel(mcfg, H, rngs=nnx.Rngs(0), param_dtype=dt,
                                               max_batch_size=1 << 20))
    heads.medusa.kernel.set_value(kernel)
    heads.medusa.bias.set_value(bias)
    heads = heads.shard(mesh)
    dec = Decoder(llama, heads)
    cache = shard_cache(KVCache.init(lcfg, B, a.cache_len, dt), lcfg, mesh)
    rng = np.random.default_rng(5)
    rep = NamedSharding(mesh, P())
    put = lambda v: jax.device_put(v, rep)
    st = DecodeState(cache=cache, lengths=put(np.full((B,), a.cache_len // 2, np.int32)),
                     tokens=put(rng.integers(0, lcfg.vocab_size, (B, 1)).astype(np.int32)),
                     generated=put(np.zeros((B,), np.int32)),
                     max_new=put(np.full((B,), 1 << 20, np.int32)),
                     done=put(np.zeros((B,), bool)), rng=jax.random.PRNGKey(0))
    box = [st]

    def step():
      logits, draft, box[0] = dec.decode_step(box[0])
      return logits, draft

    t0 = time.perf_counter()
    jax.block_until_ready(step())
    compile_s = time.perf_counter() - t0
    per_call, all_t = _time(lambda: step(), calls=max(1, min(a.calls, 40)),
                            repeats=max(2, min(a.repeats, 5)))
    params = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(state))
    weight_bytes = (params + H * n * H) * 2
    results[f"decode/tp{width}"] = dict(width=width, batch=B, layers=lcfg.num_hidden_layers,
                                        seconds=per_call, repeats=all_t,
                                        floor_s=weight_bytes / width / bw,
                                        compile_s=compile_s, params=params,
                                        traces=dict(dec.trace_counts))
    print(f"  decode/tp{width}: {per_call * 1e3:.3f} ms, compile {compile_s:.1f} s", flush=True)
  base = results.get("decode/tp1")
  for r in results.values():
    r["ratio_vs_1gpu"] = r["seconds"] / base["seconds"] if base else None
  return results


def main(argv=None):
  a = _args(argv)
  if a.cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  devices = jax.devices()
  widths = [w for w in (int(s) for s in a.widths.split(",")) if w <= len(devices)]
  bw = _copy_bandwidth(devices[0])
  print(f"devices: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
  heads = bench_heads(a, devices, widths, bw)
  llama = {} if a.skip_llama else bench_llama(a, devices, widths, bw)

  print(f"\nV2 heads + lm_head, H={a.hidden} V={a.vocab} n={a.heads} bf16 (median of "
        f"{a.repeats} x {a.calls} calls)")
  print(f"{'variant':<22}{'B':>4}{'us':>10}{'floor us':>10}{'x floor':>9}{'vs 1gpu':>9}"
        f"{'rel err':>10}{'argmax=':>9}")
  for key, r in heads.items():
    print(f"{r['variant'] + ' ' + r['kind']:<22}{r['batch']:>4}{r['seconds'] * 1e6:>10.1f}"
          f"{r['floor_s'] * 1e6:>10.1f}{r['seconds'] / r['floor_s']:>9.2f}"
          f"{r['ratio_vs_1gpu']:>9.3f}{r['rel_err_vs_1gpu']:>10.1e}"
          f"{r['draft_argmax_agreement']:>9.3f}")
  if llama:
    print(f"\nDecode step (1 token/row + heads + lm_head), Llama-3-8B shape, "
          f"{a.llama_layers} layers, B={a.llama_batch}, cache {a.cache_len}")
    for key, r in llama.items():
      print(f"{key:<22}{r['seconds'] * 1e3:>10.3f} ms  floor {r['floor_s'] * 1e3:.3f} ms"
            f"  vs 1gpu {r['ratio_vs_1gpu']:.3f}  compile {r['compile_s']:.1f} s")
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              jax=jax.__version__, device_kind=devices[0].device_kind, devices=len(devices),
              copy_bandwidth_Bps=bw, args=vars(a))
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "bench_sharded.json")
  with open(path, "w") as f:
    json.dump(dict(meta=meta, heads=heads, decode=llama), f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
