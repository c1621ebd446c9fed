"""Benchmark (and check) segmented_matmul backends at decode sizes.

Grid: K=4096, M=4*4096, bf16; rows {1, 8, 32, 128, 256} x loaded adapters
{1, 4, 8, 32} x active adapters {all, a quarter, one}. Rows are assigned to
the active adapters at random (unsorted) and passed as one single-row segment
per row, as BatchMedusaWeights does.

Per point and backend: median over repeats of (a loop of calls, rotating
activation sets, timed around ``jax.block_until_ready``) / calls. The floor
is (active weight bytes + activation bytes in and out) / the device copy
bandwidth measured in the same run. Before timing, every backend is checked
against a float64 NumPy reference on small random layouts, and against the
reference backend at every benchmark point.

Usage: python scripts/bench_segmented_matmul.py [--out DIR] [--quick] [--tune]
Prints a table; writes segmented_matmul.json to DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.pallas import gpu as pallas_gpu
from medusa_jax.pallas import segmented_matmul
from medusa_jax.heads.routed import row_segments

K, M = 4096, 4 * 4096
ROWS = (1, 8, 32, 128, 256)
LOADED = (1, 4, 8, 32)
BACKENDS = ("ragged_dot", "pallas_gpu", "reference")


def _timeit(fn, arg_sets, *, calls=20, repeats=7, warmup=3):
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for i in range(calls):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / calls)
  return statistics.median(samples), samples


def copy_bandwidth() -> float:
  """Bytes (read + written) per second of a 1 GiB device copy."""
  n = 1 << 29  # bf16 elements: 1 GiB
  srcs = [jax.random.normal(jax.random.key(i), (n,), jnp.bfloat16) for i in range(2)]
  copy = jax.jit(lambda a: a * jnp.bfloat16(-1))
  t, _ = _timeit(copy, [(s,) for s in srcs], calls=10, repeats=5)
  return 2 * n * 2 / t


def read_bandwidth() -> float:
  """Bytes read per second by a sum over 1 GiB (a pure read stream, like weight streaming)."""
  n = 1 << 29
  srcs = [jax.random.normal(jax.random.key(10 + i), (n,), jnp.bfloat16) for i in range(2)]
  total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  t, _ = _timeit(total, [(s,) for s in srcs], calls=10, repeats=5)
  return n * 2 / t


def _in_graph(fn, xs, rest, iters=64, repeats=5):
  """Per-call time with the calls inside one jitted fori_loop (no host dispatch per call)."""
  xs_stack = jnp.stack(xs)

  @jax.jit
  def loop(xs_stack, *rest):
    def body(i, acc):
      y = fn(xs_stack[i % xs_stack.shape[0]], *rest)
      return acc + y[0, 0].astype(jnp.float32)
    return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

  jax.block_until_ready(loop(xs_stack, *rest))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(xs_stack, *rest))
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples)


IN_GRAPH_POINTS = ((1, 1, 1), (1, 32, 1), (8, 8, 8), (8, 32, 1), (32, 1, 1), (32, 32, 8),
                   (256, 1, 1), (256, 32, 32))


def in_graph(rng, copy_bw) -> list[dict]:
  """Small points timed in-graph, to separate GPU time from per-call host dispatch."""
  out = []
  for n_rows, num_adapters, active in IN_GRAPH_POINTS:
    w = _weights(num_adapters, seed=11)
    row_adapter, active = _layout(rng, n_rows, num_adapters, active)
    segs = tuple(row_segments(jnp.asarray(row_adapter)))
    xs = [jax.random.normal(jax.random.key(400 + i), (n_rows, K), jnp.bfloat16)
          for i in range(4)]
    rec = dict(rows=n_rows, loaded=num_adapters, active=active,
               floor_us=(active * K * M * 2 + n_rows * (K + M) * 2) / copy_bw * 1e6, t_us={})
    for backend in ("ragged_dot", "pallas_gpu"):
      fn = lambda x, w, a, b_, c, backend=backend: segmented_matmul(x, w, None, a, b_, c,
                                                                    backend=backend)
      try:
        rec["t_us"][backend] = _in_graph(fn, xs, (w,) + segs) * 1e6
      except Exception as e:
        rec["t_us"][backend] = None
        print("in-graph failed", backend, repr(e)[:300], flush=True)
    if num_adapters == 1:
      dense = lambda x, w: jnp.matmul(x, w[0], preferred_element_type=jnp.float32).astype(x.dtype)
      rec["t_us"]["xla_dense"] = _in_graph(dense, xs, (w,)) * 1e6
    print("in-graph", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items()
                       if k != "t_us"}, {k: v and round(v, 1) for k, v in rec["t_us"].items()},
          flush=True)
    out.append(rec)
    del w
  return out


def _np_reference(x, w, b, s_start, s_end, seg_weight, resblock):
  n_rows, k = x.shape
  num_adapters, _, m = w.shape
  y = np.zeros((n_rows, m))
  taken = np.zeros(n_rows, bool)
  for s in range(len(s_start)):
    if not 0 <= seg_weight[s] < num_adapters:
      continue
    for r in range(max(0, s_start[s]), min(n_rows, s_end[s])):
      if taken[r]:
        continue
      taken[r] = True
      v = x[r].astype(np.float64) @ w[seg_weight[s]].astype(np.float64)
      if b is not None:
        v = v + b[seg_weight[s]].astype(np.float64)
      if resblock:
        v = np.tile(x[r].astype(np.float64), m // k) + v / (1 + np.exp(-v))
      y[r] = v
  return y


def check_small(backends, seed=0) -> list[dict]:
  """Every backend against float64 NumPy on small random layouts."""
  rng = np.random.default_rng(seed)
  results = []
  for case in range(12):
    n_rows = int(rng.choice([1, 5, 16, 37, 64]))
    num_adapters = int(rng.integers(1, 5))
    k = int(rng.choice([16, 32, 64]))
    m = k * int(rng.integers(1, 4))
    dtype = (jnp.float32, jnp.bfloat16)[case % 2]
    resblock = case % 3 == 0
    has_bias = case % 4 != 1
    row_adapter = rng.integers(-1, num_adapters, n_rows)  # -1: in no segment
    x = rng.standard_normal((n_rows, k)).astype(np.float32)
    w = (rng.standard_normal((num_adapters, k, m)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal((num_adapters, m)).astype(np.float32) if has_bias else None
    xd, wd = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    bd = None if b is None else jnp.asarray(b, dtype)
    xr, wr = np.asarray(xd.astype(jnp.float32)), np.asarray(wd.astype(jnp.float32))
    br = None if bd is None else np.asarray(bd.astype(jnp.float32))
    s_start, s_end, seg_weight = (np.asarray(a) for a in row_segments(jnp.asarray(row_adapter)))
    keep = row_adapter >= 0
    s_start, s_end, seg_weight = s_start[keep], s_end[keep], seg_weight[keep]
    ref = _np_reference(xr, wr, br, s_start, s_end, seg_weight, resblock)
    for backend in backends:
      try:
        out = segmented_matmul(xd, wd, bd, s_start, s_end, seg_weight, backend=backend,
                               epilogue="resblock" if resblock else "none")
        out = np.asarray(out.astype(jnp.float32), np.float64)
        err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
        tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3  # GPU f32 dots may run as tf32
        ok = bool(np.isfinite(out).all() and err <= tol)
      except Exception as e:  # record and go on: one broken backend must not stop the run
        err, ok = repr(e)[:300], False
      results.append(dict(case=case, backend=backend, n=n_rows, a=num_adapters, k=k, m=m,
                          dtype=jnp.dtype(dtype).name, resblock=resblock, bias=has_bias,
                          rel_err=err, ok=ok))
  return results


def _points(quick: bool):
  rows = (8, 256) if quick else ROWS
  loaded = (1, 32) if quick else LOADED
  for n_rows in rows:
    for num_adapters in loaded:
      actives = sorted({min(a, n_rows) for a in (num_adapters, max(1, num_adapters // 4), 1)},
                       reverse=True)
      for active in actives:
        yield n_rows, num_adapters, active


def _weights(num_adapters: int, seed: int):
  """[A, K, M] bf16 random weights, made one adapter at a time (no 2**31-element draw)."""
  keys = jax.random.split(jax.random.key(seed), num_adapters)
  return jnp.stack([jax.random.normal(k, (K, M), jnp.bfloat16) for k in keys])


def _layout(rng, n_rows, num_adapters, active):
  """Random unsorted rows over ``active`` adapters chosen among the loaded ones."""
  chosen = rng.choice(num_adapters, size=min(active, n_rows), replace=False)
  row_adapter = chosen[np.arange(n_rows) % len(chosen)]
  rng.shuffle(row_adapter)
  return row_adapter.astype(np.int32), len(chosen)


def bench(args) -> dict:
  device = jax.devices()[0]
  info = dict(card=device.device_kind, platform=device.platform, jax=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              k=K, m=M, dtype="bfloat16", timing="median of repeats of (loop of calls)/calls,"
              " block_until_ready around the loop, 4 rotating activation sets")
  print(json.dumps(info), flush=True)
  info["copy_bw"] = copy_bandwidth()
  info["read_bw"] = read_bandwidth()
  if args.in_graph_only:
    info["in_graph"] = in_graph(np.random.default_rng(2), info["copy_bw"])
    _dump(args.out, info, [])
    return info
  print(f"copy bandwidth: {info['copy_bw'] / 1e12:.3f} TB/s, read bandwidth:"
        f" {info['read_bw'] / 1e12:.3f} TB/s", flush=True)
  info["small_checks"] = check_small(BACKENDS + ("pallas_tpu",))
  bad = [r for r in info["small_checks"] if not r["ok"]]
  print(f"small checks: {len(info['small_checks']) - len(bad)} ok, {len(bad)} failed", flush=True)
  for r in bad[:8]:
    print("  FAILED", r, flush=True)
  rng = np.random.default_rng(1)
  rows_out = []
  weights = {}
  for n_rows, num_adapters, active in _points(args.quick):
    if num_adapters not in weights:
      weights.clear()
      weights[num_adapters] = _weights(num_adapters, seed=num_adapters)
    w = weights[num_adapters]
    row_adapter, active = _layout(rng, n_rows, num_adapters, active)
    segs = row_segments(jnp.asarray(row_adapter))
    xs = [jax.random.normal(jax.random.key(100 + i), (n_rows, K), jnp.bfloat16)
          for i in range(4)]
    floor_bytes = active * K * M * 2 + n_rows * (K + M) * 2
    floor = floor_bytes / info["copy_bw"]
    rec = dict(rows=n_rows, loaded=num_adapters, active=active, floor_us=floor * 1e6,
               floor_read_us=floor_bytes / info["read_bw"] * 1e6, t_us={}, err={})
    ref = None
    for backend in BACKENDS:
      if backend == "reference" and not args.time_reference:
        ref = jax.jit(lambda x, w, a, b_, c: segmented_matmul(
            x, w, None, a, b_, c, backend="reference"))(xs[0], w, *segs)
        continue
      fn = jax.jit(lambda x, w, a, b_, c, backend=backend: segmented_matmul(
          x, w, None, a, b_, c, backend=backend))
      try:
        out = fn(xs[0], w, *segs)
        if backend == "reference":
          ref = out
        t, _ = _timeit(fn, [(x, w) + tuple(segs) for x in xs], calls=args.calls)
        rec["t_us"][backend] = t * 1e6
        rec.setdefault("_outs", {})[backend] = out
      except Exception as e:
        rec["t_us"][backend] = None
        rec["err"][backend] = repr(e)[:300]
        traceback.print_exc()
    outs = rec.pop("_outs", {})
    if ref is not None:
      ref32 = ref.astype(jnp.float32)
      for backend, out in outs.items():
        diff = jnp.linalg.norm(out.astype(jnp.float32) - ref32) / jnp.linalg.norm(ref32)
        rec["err"].setdefault(backend, float(diff))
    rows_out.append(rec)
    times = " ".join(f"{b}={v:8.1f}" if v else f"{b}=  failed" for b, v in rec["t_us"].items())
    print(f"rows={n_rows:3d} loaded={num_adapters:2d} active={active:2d} floor={floor*1e6:7.1f}us"
          f" {times}", flush=True)
    _dump(args.out, info, rows_out)
  info["points"] = rows_out
  if args.tune:
    info["tuning"] = tune(rng, info["copy_bw"], args)
  info["resblock"] = resblock_vs_dense(info["copy_bw"], args)
  _dump(args.out, info, rows_out)
  return info


TUNE_CONFIGS = (
    pallas_gpu.BlockSizes(block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=4),
    pallas_gpu.BlockSizes(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
    pallas_gpu.BlockSizes(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    pallas_gpu.BlockSizes(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4),
    pallas_gpu.BlockSizes(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4),
    pallas_gpu.BlockSizes(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    pallas_gpu.BlockSizes(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4),
    pallas_gpu.BlockSizes(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4,
                          pairwise_schedule=False),
)
TUNE_POINTS = ((1, 1, 1), (8, 32, 1), (32, 8, 8), (256, 1, 1), (256, 32, 8), (128, 8, 1))


def tune(rng, copy_bw, args) -> list[dict]:
  out = []
  for n_rows, num_adapters, active in TUNE_POINTS:
    w = _weights(num_adapters, seed=7)
    row_adapter, active = _layout(rng, n_rows, num_adapters, active)
    segs = row_segments(jnp.asarray(row_adapter))
    xs = [jax.random.normal(jax.random.key(200 + i), (n_rows, K), jnp.bfloat16)
          for i in range(4)]
    floor = (active * K * M * 2 + n_rows * (K + M) * 2) / copy_bw
    for cfg in TUNE_CONFIGS:
      fn = jax.jit(lambda x, w, a, b_, c, cfg=cfg: segmented_matmul(
          x, w, None, a, b_, c, backend="pallas_gpu", block_sizes=cfg))
      try:
        t, _ = _timeit(fn, [(x, w) + tuple(segs) for x in xs], calls=args.calls)
        t_us = t * 1e6
      except Exception as e:
        t_us = None
        print("tune failed", cfg, repr(e)[:200], flush=True)
      out.append(dict(rows=n_rows, loaded=num_adapters, active=active, floor_us=floor * 1e6,
                      config=dataclasses.asdict(cfg), t_us=t_us))
      print(f"tune rows={n_rows} loaded={num_adapters} active={active} {cfg}: "
            f"{t_us if t_us is None else round(t_us, 1)} us (floor {floor * 1e6:.1f})",
            flush=True)
    del w
  return out


def resblock_vs_dense(copy_bw, args) -> list[dict]:
  """One adapter, fused V2 ResBlock: XLA dense path vs the kernel epilogue."""
  out = []
  w = jax.random.normal(jax.random.key(3), (1, K, M), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(4), (1, M), jnp.bfloat16)

  def dense(x, w, b):
    y = jnp.matmul(x, w[0], preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    return (jnp.tile(x.astype(jnp.float32), (1, M // K)) + jax.nn.silu(y)).astype(x.dtype)

  for n_rows in (1, 8, 32, 1, 8, 32):  # twice: the spread is part of the result
    xs = [jax.random.normal(jax.random.key(300 + i), (n_rows, K), jnp.bfloat16)
          for i in range(4)]
    segs = row_segments(jnp.zeros((n_rows,), jnp.int32))
    kern = jax.jit(lambda x, w, b, s0, s1, s2: segmented_matmul(
        x, w, b, s0, s1, s2, backend="pallas_gpu", epilogue="resblock"))
    dense_j = jax.jit(dense)
    rec = dict(rows=n_rows, floor_us=(K * M * 2 + n_rows * (K + M) * 2) / copy_bw * 1e6)
    try:
      rec["dense_us"] = _timeit(dense_j, [(x, w, b) for x in xs], calls=args.calls)[0] * 1e6
      rec["kernel_us"] = _timeit(kern, [(x, w, b) + tuple(segs) for x in xs],
                                 calls=args.calls)[0] * 1e6
      d = dense_j(xs[0], w, b).astype(jnp.float32)
      k_ = kern(xs[0], w, b, *segs).astype(jnp.float32)
      rec["rel_err"] = float(jnp.linalg.norm(d - k_) / jnp.linalg.norm(d))
    except Exception as e:
      rec["error"] = repr(e)[:300]
    print("resblock", rec, flush=True)
    out.append(rec)
  return out


def _dump(out_dir, info, rows_out):
  if not out_dir:
    return
  os.makedirs(out_dir, exist_ok=True)
  data = dict(info, points=rows_out)
  with open(os.path.join(out_dir, "segmented_matmul.json"), "w") as f:
    json.dump(data, f, indent=1, default=str)


def print_table(info) -> None:
  backends = [b for b in BACKENDS if any(p["t_us"].get(b) for p in info["points"])]
  print(f"\n{info['card']} | JAX {info['jax']} | {info['date']} | K={K} M={M} bf16 |"
        f" copy {info['copy_bw'] / 1e12:.2f} TB/s | read {info['read_bw'] / 1e12:.2f} TB/s")
  print("x = time / floor(copy bw); xr = time / floor(read bw)")
  head = "rows loaded active floor_us " + " ".join(f"{b:>11s} {'x':>5s} {'xr':>5s}"
                                                   for b in backends)
  print(head + "  rd/pallas")
  for p in info["points"]:
    cells = []
    for b in backends:
      t = p["t_us"].get(b)
      cells.append(f"{t:11.1f} {t / p['floor_us']:5.2f} {t / p['floor_read_us']:5.2f}" if t
                   else f"{'-':>11s} {'':5s} {'':5s}")
    rd, pg = p["t_us"].get("ragged_dot"), p["t_us"].get("pallas_gpu")
    ratio = f"{rd / pg:9.2f}" if rd and pg else "        -"
    print(f"{p['rows']:4d} {p['loaded']:6d} {p['active']:6d} {p['floor_us']:8.1f} "
          + " ".join(cells) + "  " + ratio)


def plot(info, png_path: str) -> None:
  """time / floor (copy bandwidth) per loaded-adapter count, one panel each."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  points = info["points"]
  loaded = sorted({p["loaded"] for p in points})
  fig, axes = plt.subplots(1, len(loaded), figsize=(4 * len(loaded), 3.6), sharey=True)
  axes = np.atleast_1d(axes)
  styles = {"all": "-", "quarter": "--", "one": ":"}
  colors = {"ragged_dot": "tab:red", "pallas_gpu": "tab:blue", "reference": "tab:gray"}
  for ax, a in zip(axes, loaded):
    for which in ("all", "quarter", "one"):
      want = {"all": a, "quarter": max(1, a // 4), "one": 1}[which]
      if which != "all" and want == a:
        continue
      for backend, color in colors.items():
        sel = [p for p in points if p["loaded"] == a and p["t_us"].get(backend)
               and p["active"] == min(want, p["rows"])]
        if not sel:
          continue
        ax.plot([p["rows"] for p in sel], [p["t_us"][backend] / p["floor_us"] for p in sel],
                styles[which], color=color, marker="o", ms=3,
                label=f"{backend}, {which} active")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"{a} adapter(s) loaded")
    ax.set_xlabel("rows")
  axes[0].set_ylabel("time / floor (copy bandwidth)")
  axes[-1].legend(fontsize=6, loc="upper left")
  fig.suptitle(f"segmented_matmul K={K} M={M} bf16, {info['card']}, JAX {info['jax']},"
               f" {info['date'][:10]}", fontsize=9)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--quick", action="store_true", help="a 2x2 corner of the grid")
  parser.add_argument("--tune", action="store_true", help="sweep pallas_gpu block sizes")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--no-reference-timing", dest="time_reference", action="store_false",
                      help="compute the reference backend for checks but do not time it")
  parser.add_argument("--k", type=int, default=K, help="contraction size (smoke tests)")
  parser.add_argument("--m", type=int, default=M, help="output size (smoke tests)")
  parser.add_argument("--in-graph-only", action="store_true",
                      help="only time a few small points inside one jitted loop")
  parser.add_argument("--plot-from", help="only plot this JSON (of an earlier run) to --png")
  parser.add_argument("--png", default="segmented_matmul.png")
  args = parser.parse_args(argv)
  globals().update(K=args.k, M=args.m)
  if args.plot_from:
    with open(args.plot_from) as f:
      plot(json.load(f), args.png)
    return 0
  info = bench(args)
  if not args.in_graph_only:
    print_table(info)
  return 0


if __name__ == "__main__":
  sys.exit(main())
