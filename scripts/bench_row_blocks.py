"""The row kernels' tiles, one kernel at a time, timed in a whole decode step.

``Llama(row_kernel_blocks=...)`` sets the launch parameters of each row kernel of a layer
(q/k/v, o, gate/up, down). For each kernel and each candidate tile this script times the
step in-graph (a jitted loop of S steps, the cache filled to ``--fill`` slots) with that
kernel's tile changed and the others at their defaults, then the union of the winners.
The step is the plain batch-1 step, or with ``--nodes T`` a tree step of T nodes (the row
kernels taking it: ``row_kernel_rows``). Random weights of SmolLM2-135M's shape, bf16,
the attention kernel, ``out_in`` projections. Every variant's tokens after its timed loops
(the same steps from the same state) are checked against the defaults'.

A tile is ``BK,BN,WARPS[,STAGES[,BM]]`` (block_k, block_n, num_warps, num_stages,
block_m). The table prints ms per step per kernel and tile; the JSON (``--out``) keeps all
of them, the winners and the default's time, with the card, JAX and the date.

Usage: ``PYTHONPATH=. python3 scripts/bench_row_blocks.py --out $OUT [--nodes 16]``
(CPU check, interpreted: ``--tiny --steps 1 --tiles 16,4,4``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402  (scripts/bench_decode.py)
from bench_gemv_layout import _blocks_name, _parse_blocks  # noqa: E402

from medusa_jax.decoding.engine import Engine  # noqa: E402
from medusa_jax.decoding.state import StepConfig  # noqa: E402
from medusa_jax.decoding.strategies import Greedy  # noqa: E402
from medusa_jax.decoding.tree import tree_for_batch  # noqa: E402
from medusa_jax.errors import ConfigError  # noqa: E402
from medusa_jax.models.llama import ROW_KERNEL_KINDS  # noqa: E402

ONE_ROW_TILES = ["1024,4,8", "1024,2,8", "1024,8,8", "512,4,8", "2048,4,8", "1024,4,4",
                 "1024,4,16", "512,8,8"]
ROWS_TILES = ["256,16,4,2", "128,16,4,2", "512,16,8,2", "256,32,4,2", "128,32,4,2",
              "256,16,8,3"]


def _config(args):
  if not args.nodes:
    return StepConfig(tree=None, strategy=Greedy(), eos_ids=())
  tree = tree_for_batch(1, args.heads, max_tree_rows=args.nodes)
  return StepConfig(tree=tree, strategy=Greedy(), eos_ids=())


def _time(llama, medusa, cfg, config, args, dtype):
  """(ms per step over the repeats, the tokens the steps leave in the state) of a variant."""
  eng = Engine(llama, None, medusa, max_cache_len=args.cache_len, cache_dtype=dtype,
               min_cache_len=args.cache_len, max_tree_rows=max(1, args.nodes))
  dec = eng.decoder
  state = bd._start_state(dec, cfg, 1, args.cache_len, args.fill, config, dtype, 0)
  times, state = bd._time_in_graph(dec, state, config, args.steps, repeats=args.repeats)
  return times, np.asarray(state.tokens)


def run(args) -> dict:
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  cfg = bd._smollm2_config(args.tiny)
  rows = max(1, args.nodes)
  base, medusa = bd._build(cfg, dtype, args.heads, attention="pallas", row_kernels=True,
                           kernel_layout="out_in", row_kernel_rows=rows)
  config = _config(args)
  tiles = _parse_blocks(args.tiles or (ONE_ROW_TILES if rows == 1 else ROWS_TILES))
  t0 = time.time()
  default_ms, want = _time(base, medusa, cfg, config, args, dtype)
  print(f"defaults: {min(default_ms):.4f} ms/step ({rows} row(s))", flush=True)
  results, best = [], {}
  for kind in args.kinds:
    for blocks in tiles:
      if time.time() - t0 > args.time_budget:
        print("time budget spent: the remaining variants are not timed", flush=True)
        break
      name = _blocks_name(blocks)
      try:
        times, tokens = _time(base.with_row_kernel_blocks({kind: blocks}), medusa, cfg,
                              config, args, dtype)
      except ConfigError as e:  # not a tile for this many rows
        print(f"{kind:8s} {name:16s} refused: {e}", flush=True)
        continue
      same = bool(np.array_equal(tokens, want))
      ms = min(times)
      results.append(dict(kind=kind, blocks=blocks, ms_per_step=ms, repeats_ms=times,
                          same_tokens=same))
      # Tiles change the f32 sums' order, so bf16 tokens may drift apart over many steps
      # of random weights: reported, not disqualifying (the kernels' tests check every
      # tile against float64).
      if ms < best.get(kind, (np.inf,))[0]:
        best[kind] = (ms, blocks)
      print(f"{kind:8s} {name:16s} {ms:8.4f} ms/step  ({ms / min(default_ms):5.3f}x defaults)"
            f"{'' if same else '  (tokens differ from the defaults)'}", flush=True)
  union = {kind: blocks for kind, (ms, blocks) in best.items() if ms < min(default_ms)}
  union_ms = best[next(iter(union))][0] if len(union) == 1 else None
  if len(union) > 1:
    times, tokens = _time(base.with_row_kernel_blocks(union), medusa, cfg, config, args, dtype)
    union_ms = min(times)
    print(f"winners together {union}: {union_ms:.4f} ms/step "
          f"({union_ms / min(default_ms):.3f}x defaults; tokens "
          f"{'same' if np.array_equal(tokens, want) else 'DIFFER'})", flush=True)
  return dict(what=__doc__.splitlines()[0], device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              rows=rows, nodes=args.nodes, fill=args.fill, steps=args.steps,
              default_ms=default_ms, results=results, winners=union, winners_ms=union_ms)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None)
  p.add_argument("--nodes", type=int, default=0, help="time a tree step of this many nodes")
  p.add_argument("--kinds", nargs="+", default=list(ROW_KERNEL_KINDS), choices=ROW_KERNEL_KINDS)
  p.add_argument("--tiles", nargs="*", default=None, metavar="BK,BN,WARPS[,STAGES[,BM]]")
  p.add_argument("--heads", type=int, default=5)
  p.add_argument("--cache-len", type=int, default=1024)
  p.add_argument("--fill", type=int, default=490, help="committed slots (the attention's walk)")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--time-budget", type=float, default=240)
  p.add_argument("--tiny", action="store_true", help="a tiny f32 model (CPU smoke test)")
  args = p.parse_args(argv)
  if args.tiny:
    args.cache_len, args.fill = min(args.cache_len, 64), min(args.fill, 16)
  res = run(args)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_row_blocks.json"), "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
