"""Benchmark: sharded Medusa decoding end to end, a Llama-3-8B-shaped model on device meshes.

The model: Llama-3-8B's shape (H 4096, 32 layers, 32 query / 8 kv heads of
D 128, F 14336, V 128256, untied LM head), random bf16 weights made on the
devices already sharded by the Megatron rules (``llama_rules``), and 4
random V2 heads in LoRAX's tensor-parallel layout meeting the LM head by the
RING collective matmul (``--lm-head-collective``). Random weights make the
drafts near-useless (tokens per step ~1): this measures the machinery, not
acceptance.

For every mesh ``DxM`` of ``--meshes`` that fits the devices (D on ``data``,
M on ``model``), every batch B of ``--batches`` and every mode of
``--modes`` (``none`` = plain, ``tree``, ``chain``):

* ``engine``: ``Engine.generate`` of B prompts of ``--prompt-len`` random ids,
  ``--new-tokens`` each, called twice; the second call is reported.
* ``serving`` (``--serving``): the serving core (``SlotCore(mesh=)``) with B
  slots: B prefills and inserts, then ``generate`` calls of K steps until
  every slot is done; the calls after the first are timed.

Reported per row:

* ``tok/s``: steady-state tokens per second over the batch (engine:
  ``GenerationResult.tokens_per_s``, decode calls after the first, which may
  compile; serving: the timed ``generate`` calls).
* ``tok/step``: mean tokens a request gets per decode step.
* ``step ms``: time of one decode step over the batch, ``B * tok/step /
  tok/s`` (every row active; the last steps of a batch may be partial).
* ``eff``: scaling efficiency against the 1x1 run of the same kind, mode and
  batch, ``tok/s / (devices * tok/s at 1x1)``: 1.0 is perfect scaling, 1/W
  no gain from W devices.

A config starts only while ``--time-budget`` seconds have not passed since
the first one began. The JSON (``$OUT/bench_mesh.json``) holds every row plus
the card, date and JAX version.

  PYTHONPATH=. python3 scripts/bench_mesh.py --out $OUT --meshes 1x1,1x2 --batches 1,8,32
  python scripts/bench_mesh.py --quick --cpu-devices 8                  # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import sys
import time


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--meshes", default="1x1,1x2,2x1,1x4,2x2",
                 help="DATAxMODEL meshes; those needing more devices than exist are skipped")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--modes", default="none,tree", help="none (plain), tree, chain")
  p.add_argument("--serving", action="store_true", help="also run the serving core (SlotCore)")
  p.add_argument("--no-engine", action="store_true", help="skip the Engine runs")
  p.add_argument("--hidden", type=int, default=4096)
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--q-heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--intermediate", type=int, default=14336)
  p.add_argument("--vocab", type=int, default=128256)
  p.add_argument("--medusa-heads", type=int, default=4)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--max-tree-rows", type=int, default=None, help="None: the platform's")
  p.add_argument("--steps-per-call", type=int, default=None, help="None: the platform's")
  p.add_argument("--lm-head-collective", default="ring", help="ring or all_gather")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--time-budget", type=float, default=1e9,
                 help="seconds after which no new config starts")
  p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
  p.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices (before JAX starts)")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  a = p.parse_args(argv)
  if a.quick:  # tiny values for the flags left at their defaults
    tiny = dict(hidden=64, layers=2, q_heads=8, kv_heads=4, head_dim=8, intermediate=128,
                vocab=512, prompt_len=8, new_tokens=8, max_tree_rows=16, steps_per_call=2,
                batches="2", meshes="1x1,2x2")
    for name, value in tiny.items():
      if getattr(a, name) == p.get_default(name):
        setattr(a, name, value)
  return a


def _meshes(spec: str, n_devices: int) -> list[tuple[int, int]]:
  out = []
  for item in spec.split(","):
    data, model = (int(v) for v in item.lower().split("x"))
    if data * model <= n_devices:
      out.append((data, model))
    else:
      print(f"skip mesh {data}x{model}: needs {data * model} devices, {n_devices} here")
  return out


@functools.lru_cache(maxsize=None)
def _maker(mesh, shape, spec, dtype):
  """One jitted maker per (shape, spec): the 32 layers share their compilations."""
  import jax
  from jax.sharding import NamedSharding
  return jax.jit(lambda k, scale: (jax.random.normal(k, shape, jax.numpy.float32)
                                   * scale).astype(dtype),
                 out_shardings=NamedSharding(mesh, spec))


def _random(mesh, shape, spec, dtype, seed, scale):
  """A random array placed by ``spec``: made on the devices, already sharded,
  when large (no host copy of 8B parameters); from the host when small (no
  compilation per shape)."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  if np.prod(shape) < (1 << 22):
    host = np.random.default_rng(seed).standard_normal(shape, np.float32) * scale
    return jax.device_put(host.astype(dtype), NamedSharding(mesh, spec))
  return _maker(mesh, tuple(shape), spec, dtype)(jax.random.PRNGKey(seed), scale)


def build(a, mesh, dtype):
  """(llama, heads) with random weights, placed on ``mesh`` shard by shard."""
  import jax
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from medusa_jax.config import MedusaConfig
  from medusa_jax.heads.modules import MedusaModel
  from medusa_jax.models.llama import Llama, LlamaConfig
  from medusa_jax.models.llama_sharding import llama_rules
  from medusa_jax.parallel.mesh import path_str

  cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                    num_hidden_layers=a.layers, num_attention_heads=a.q_heads,
                    num_key_value_heads=a.kv_heads, head_dim=a.head_dim, rope_theta=500000.0,
                    max_position_embeddings=8192, tie_word_embeddings=False, eos_token_ids=())
  rules = llama_rules(cfg, mesh)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
  graphdef, state = nnx.split(abstract)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  values = []
  for i, (path, leaf) in enumerate(leaves):
    name = path_str(path)
    scale = 1.0 if name.endswith("weight") else leaf.shape[0] ** -0.5  # norms at 1
    values.append(_random(mesh, leaf.shape, rules.spec(name), dtype, 100 + i, scale))
  llama = nnx.merge(graphdef, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state),
                                                           values))
  H, n = a.hidden, a.medusa_heads
  mcfg = MedusaConfig(base_model_name_or_path="bench", medusa_num_heads=n, medusa_num_layers=1,
                      version=2.0)
  heads = nnx.eval_shape(lambda: MedusaModel(mcfg, H, rngs=nnx.Rngs(0), param_dtype=dtype,
                                             max_batch_size=1 << 20))
  heads.medusa.kernel.set_value(_random(mesh, (H, n, H), P(None, None, "model"), dtype, 7,
                                        H ** -0.5))
  heads.medusa.bias.set_value(_random(mesh, (n, H), P(None, "model"), dtype, 8, 0.1))
  return llama, heads.shard(mesh, lm_head_collective=a.lm_head_collective)


def _prompts(a, batch, seed):
  import numpy as np
  rng = np.random.default_rng(seed)
  return [rng.integers(3, a.vocab, a.prompt_len).tolist() for _ in range(batch)]


def run_engine(a, llama, heads, mesh, batch, mode):
  from medusa_jax.decoding.engine import Engine
  eng = Engine(llama, None, heads, mesh=mesh, max_cache_len=_cache_len(a),
               max_tree_rows=a.max_tree_rows, steps_per_call=a.steps_per_call)
  prompts = _prompts(a, batch, 1)
  t0 = time.perf_counter()
  eng.generate(prompts, max_new_tokens=a.new_tokens, speculate=mode)
  first_s = time.perf_counter() - t0
  res = eng.generate(_prompts(a, batch, 2), max_new_tokens=a.new_tokens, speculate=mode)
  bad = [str(e) for e in res.errors if e is not None]
  return dict(tokens_per_s=res.tokens_per_s, tokens_per_step=res.tokens_per_step,
              tree_nodes=res.tree_nodes, wall_s=res.wall_s, first_call_s=first_s,
              decode_s=res.decode_s, decode_tokens=res.decode_tokens, errors=bad)


def _cache_len(a):
  need = a.prompt_len + a.new_tokens + 128  # + the largest tree
  return 1 << (need - 1).bit_length()


def run_serving(a, llama, heads, mesh, batch, mode):
  """B slots: B prefills and inserts, then generate calls until every slot is done."""
  import jax
  import numpy as np

  from medusa_jax.config import EngineConfig
  from medusa_jax.serving.slots import SlotCore, speculation_table
  cfg = EngineConfig(max_tree_rows=a.max_tree_rows, steps_per_call=a.steps_per_call)
  table = speculation_table(mode, batch, heads.num_heads, max_tree_rows=cfg.max_tree_rows,
                            max_batch_size=1 << 20)
  core = SlotCore(llama, heads, num_slots=batch, cache_len=_cache_len(a),
                  steps_per_call=cfg.steps_per_call, table=table, mesh=mesh)
  out = {}
  for rep in range(2):  # the first compiles
    t0 = time.perf_counter()
    state = core.init_state()
    for slot, p in enumerate(_prompts(a, batch, 3 + rep)):
      state = core.insert(core.prefill(p, max_new=a.new_tokens), state, slot)
    jax.block_until_ready(state)
    prefill_s = time.perf_counter() - t0
    tokens = steps = calls = 0
    timed_s = timed_tokens = 0.0
    while True:
      t1 = time.perf_counter()
      state, res = core.generate(state, greedy=True)
      host = jax.device_get(res)
      dt = time.perf_counter() - t1
      emitted, ran = int(np.sum(host.count)), int(host.steps)
      tokens, steps, calls = tokens + emitted, steps + ran, calls + 1
      if calls > 1:  # the first call may compile
        timed_s, timed_tokens = timed_s + dt, timed_tokens + emitted
      if ran == 0 or bool(np.all(host.done[ran - 1])):
        break
    out = dict(tokens_per_s=timed_tokens / timed_s if timed_s else float("nan"),
               tokens_per_step=tokens / max(steps, 1) / batch, prefill_insert_s=prefill_s,
               decode_s=timed_s, decode_tokens=timed_tokens, steps=steps,
               trees=len(table.trees), errors=[])
  return out


def add_efficiency(rows: list[dict]) -> None:
  """Sets each row's ``efficiency``: tok/s / (devices * tok/s of the 1-device row
  of the same kind, mode and batch); None without such a row."""
  base = {(r["kind"], r["mode"], r["batch"]): r for r in rows if r["devices"] == 1}
  for r in rows:
    b = base.get((r["kind"], r["mode"], r["batch"]))
    ok = b is not None and b["tokens_per_s"] > 0
    r["efficiency"] = r["tokens_per_s"] / (r["devices"] * b["tokens_per_s"]) if ok else None


def main(argv=None):
  a = _args(argv)
  if a.cpu_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.cpu_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp

  from medusa_jax.parallel.mesh import make_mesh
  devices = jax.devices()
  dtype = jnp.dtype(a.dtype)
  meshes = _meshes(a.meshes, len(devices))
  batches = [int(b) for b in a.batches.split(",")]
  modes = a.modes.split(",")
  kinds = ([] if a.no_engine else ["engine"]) + (["serving"] if a.serving else [])
  print(f"devices: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}; "
        f"H {a.hidden} L {a.layers} V {a.vocab} {a.dtype}", flush=True)
  rows, t_start, skipped = [], time.perf_counter(), []
  for data, model in meshes:
    if time.perf_counter() - t_start > a.time_budget:
      skipped.append(f"{data}x{model}")
      continue
    mesh = make_mesh(data, model, devices=devices[:data * model])
    t0 = time.perf_counter()
    llama, heads = build(a, mesh, dtype)
    jax.block_until_ready(jax.tree.leaves(llama))
    print(f"mesh {data}x{model}: weights placed in {time.perf_counter() - t0:.1f} s", flush=True)
    for kind in kinds:
      for mode in modes:
        for batch in batches:
          key = f"{kind}/{mode}/{data}x{model}/B{batch}"
          if time.perf_counter() - t_start > a.time_budget:
            skipped.append(key)
            continue
          fn = run_engine if kind == "engine" else run_serving
          try:
            r = fn(a, llama, heads, mesh, batch, mode)
          except Exception as e:  # noqa: BLE001  (one failing config must not lose the rest)
            r = dict(tokens_per_s=float("nan"), tokens_per_step=float("nan"),
                     errors=[f"{type(e).__name__}: {e}"])
          r.update(kind=kind, mode=mode, data=data, model=model, devices=data * model,
                   batch=batch, key=key)
          r["step_ms"] = 1e3 * batch * r["tokens_per_step"] / r["tokens_per_s"]
          rows.append(r)
          print(f"  {key}: {r['tokens_per_s']:.1f} tok/s, {r['tokens_per_step']:.2f} tok/step,"
                f" step {r['step_ms']:.2f} ms {r['errors'] or ''}", flush=True)
    del llama, heads
    _maker.cache_clear()
    gc.collect()
  add_efficiency(rows)
  print(f"\n{'kind':<8}{'mode':<6}{'mesh':>6}{'B':>4}{'tok/s':>10}{'tok/step':>9}"
        f"{'step ms':>9}{'eff':>7}")
  for r in rows:
    eff = "" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
    print(f"{r['kind']:<8}{r['mode']:<6}{r['data']}x{r['model']:<4}{r['batch']:>4}"
          f"{r['tokens_per_s']:>10.1f}{r['tokens_per_step']:>9.2f}{r['step_ms']:>9.2f}{eff:>7}")
  if skipped:
    print(f"time budget: skipped {', '.join(skipped)}")
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              jax=jax.__version__, device_kind=devices[0].device_kind, devices=len(devices),
              skipped=skipped, args=vars(a))
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "bench_mesh.json")
  with open(path, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
  sys.exit(0)
