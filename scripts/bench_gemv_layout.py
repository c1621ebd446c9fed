"""How a decode step's projections run on XLA: the weight layout, at batch 1, 16 and 64.

A plain decode step at batch 1 is 30 layers of vector-matrix products. XLA:GPU
strength-reduces a small dot (``(M + N) * K`` under ten million) into a
multiply and a reduce; with the weight held ``[K, N]`` (``[in, out]``) that
reduce runs over the weight's major dimension. This script times the 30
layers' projections of the SmolLM2-135M shape (H 576, q/k/v 960, F 1536), the
norms, SwiGLU and residuals included, attention left out, for each layout:

* ``kn``: ``w [K, N]``, ``x @ w`` (the model's ``Linear`` in the ``in_out`` layout);
* ``nk``: ``w [N, K]``, ``einsum('bk,nk->bn')`` (contraction over both minor dimensions:
  PyTorch's and GGUF's layout);
* ``nk_sum``: ``w [N, K]``, the product and the sum written out in f32;
* ``row``: ``w [K, N]`` through the Pallas ``row_projection`` kernels, each with the norm
  before it or the SwiGLU before and the residual after (GPU only; one row in elementwise
  tiles, up to 64 in tensor-core dots);
* ``row_nk``: the same kernels over ``w [N, K]`` (``transposed``: contiguous tiles along K).

Each variant runs S steps in one jitted ``fori_loop`` (one dispatch); the table
gives ms per step, the kernels of one step compiled alone, and the floor: the
weights' bytes over a copy bandwidth timed on the device in the same run.
Every variant's output is checked against a float64 NumPy reference.

Usage: ``PYTHONPATH=. python3 scripts/bench_gemv_layout.py --out $OUT``
(CPU check: ``--layers 2 --steps 2 --batches 1``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bandwidth import device_copy_bandwidth  # noqa: E402  (scripts/bandwidth.py)
from bench_decode import hlo_kernels  # noqa: E402

from medusa_jax.pallas.row_projection import MAX_ROWS, MMA_ROWS, row_projection  # noqa: E402

H, QKV, F = 576, 960, 1536
EPS = 1e-5


def _weights(layers: int, seed: int, dtype) -> list[dict[str, np.ndarray]]:
  """Per layer ``[in, out]`` float32 weights (the reference's) and norm gains."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(layers):
    w = lambda k, n: (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)  # noqa: E731
    out.append(dict(qkv=w(H, QKV), o=w(H, H), gu=w(H, 2 * F), d=w(F, H),
                    g1=(1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
                    g2=(1 + 0.1 * rng.standard_normal(H)).astype(np.float32)))
  return out


def _reference(x: np.ndarray, layers: list[dict[str, np.ndarray]]) -> np.ndarray:
  """float64 NumPy: the layers' projections, norms, SwiGLU and residuals."""
  x = x.astype(np.float64)
  rms = lambda v, g: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + EPS) * g  # noqa: E731
  for p in layers:
    qkv = rms(x, p["g1"]) @ p["qkv"]
    x = x + qkv[:, :H] @ p["o"]
    gu = rms(x, p["g2"]) @ p["gu"]
    g, u = gu[:, :F], gu[:, F:]
    x = x + (g / (1 + np.exp(-g)) * u) @ p["d"]
  return x


def _dense(layout: str):
  """x [B, K] (dtype) and w (its layout) -> [B, N] float32."""
  if layout == "kn":
    return lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)
  if layout == "nk":
    return lambda x, w: jnp.einsum("bk,nk->bn", x, w, preferred_element_type=jnp.float32)
  if layout == "nk_sum":
    return lambda x, w: jnp.sum(x.astype(jnp.float32)[:, None, :] * w.astype(jnp.float32), -1)
  raise ValueError(layout)


def _step(layout: str, dtype, blocks: dict | None = None):
  """One step: all layers, x [B, H] -> [B, H] (dtype); ``blocks``: the row kernels'
  launch parameters (block_k, block_n, num_warps, num_stages; default: the kernel's)."""
  if layout in ("row", "row_nk"):
    rp = functools.partial(row_projection, transposed=layout == "row_nk", **(blocks or {}))

    def layer(x, p):
      rows = x.reshape(-1) if x.shape[0] == 1 else x  # one row: the elementwise kernels
      qkv = rp(rows, p["qkv"], norm_K=p["g1"], eps=EPS)
      rows = rp(qkv[..., :H], p["o"], residual_N=rows)
      gu = rp(rows, p["gu"], norm_K=p["g2"], eps=EPS)
      return rp(gu, p["d"], gated=True, residual_N=rows).reshape(x.shape)
  else:
    dense = _dense(layout)

    def rms(v, g):
      v32 = v.astype(jnp.float32)
      y = v32 * jax.lax.rsqrt(jnp.mean(v32 * v32, -1, keepdims=True) + EPS)
      return y.astype(dtype) * g.astype(dtype)

    def layer(x, p):
      qkv = dense(rms(x, p["g1"]), p["qkv"]).astype(dtype)
      x = x + dense(qkv[:, :H], p["o"]).astype(dtype)
      gu = dense(rms(x, p["g2"]), p["gu"]).astype(dtype)
      m = (jax.nn.silu(gu[:, :F]) * gu[:, F:]).astype(dtype)
      return x + dense(m, p["d"]).astype(dtype)

  def step(x, params):
    for p in params:
      x = layer(x, p)
    return x
  return step


def _device_params(ref: list[dict], layout: str, dtype) -> list[dict]:
  out = []
  for p in ref:
    q = {}
    for k, v in p.items():
      if v.ndim == 2 and layout in ("nk", "nk_sum", "row_nk"):
        v = v.T
      q[k] = jnp.asarray(np.ascontiguousarray(v), dtype)
    out.append(q)
  return out


_BLOCK_KEYS = ("block_k", "block_n", "num_warps", "num_stages", "block_m")


def _parse_blocks(specs: list[str]) -> list[dict]:
  """``"BK,BN,WARPS[,STAGES[,BM]]"`` strings as ``row_projection`` keyword dicts."""
  out = []
  for spec in specs:
    vals = [int(v) for v in spec.split(",")]
    if not 3 <= len(vals) <= 5:
      raise SystemExit(f"--row-nk-blocks {spec!r}: expected BK,BN,WARPS[,STAGES[,BM]]")
    out.append(dict(zip(_BLOCK_KEYS, vals)))
  return out


def _fits(blocks: dict, rows: int) -> bool:
  """Whether a tile suits ``rows`` rows: one row's elementwise tiles (block_m 1) or, for
  several, tensor-core dots (block_m and block_n >= 16)."""
  if rows == 1:
    return blocks.get("block_m", 1) == 1
  return blocks["block_n"] >= MMA_ROWS and blocks.get("block_m", MMA_ROWS) >= MMA_ROWS


def _blocks_name(blocks: dict) -> str:
  return "/".join(str(blocks[k]) for k in _BLOCK_KEYS if k in blocks)


def run(args) -> dict:
  dtype = jnp.dtype(args.dtype)
  ref = _weights(args.layers, args.seed, dtype)
  weight_bytes = sum(v.size for p in ref for v in p.values()) * dtype.itemsize
  bw = device_copy_bandwidth()
  gpu = jax.devices()[0].platform == "gpu"
  layouts = [v for v in args.variants if not v.startswith("row") or gpu or args.interpret_rows]
  rows = []
  for B in args.batches:
    x0 = np.random.default_rng(args.seed + B).standard_normal((B, H)).astype(np.float32)
    want = _reference(x0, ref)
    runs = [(layout, None) for layout in layouts]
    runs += [("row_nk", b) for b in _parse_blocks(args.row_nk_blocks)
             if gpu or args.interpret_rows]
    for layout, blocks in runs:
      if layout.startswith("row") and B > MAX_ROWS:
        continue
      if blocks is not None and not _fits(blocks, B):
        print(f"B {B:3d} {layout} {_blocks_name(blocks)}: not a tile for {B} rows, skipped")
        continue
      params = _device_params(ref, layout, dtype)
      step = _step(layout, dtype, blocks)
      loop = jax.jit(lambda x, p, step=step: jax.lax.fori_loop(
          0, args.steps, lambda i, v: step(v, p), x))
      one = jax.jit(step)
      x = jnp.asarray(x0, dtype)
      got = np.asarray(one(x, params), np.float64)
      err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))
      # Kernels of one step compiled alone: inside the loop a GPU runs the body as one
      # command buffer, which hides them.
      kinds = hlo_kernels(one.lower(x, params).compile().as_text())
      kernels = kinds["fusion"] + kinds["custom-call"] + kinds["copy"]
      loop(x, params).block_until_ready()
      best = float("inf")
      for _ in range(args.repeats):
        t = time.perf_counter()
        loop(x, params).block_until_ready()
        best = min(best, time.perf_counter() - t)
      ms = best / args.steps * 1e3
      floor_ms = weight_bytes / bw * 1e3
      rows.append(dict(batch=B, layout=layout, blocks=blocks, ms_per_step=ms, kernels=kernels,
                       floor_ms=floor_ms, x_floor=ms / floor_ms, max_rel_err=err))
      name = layout if blocks is None else f"{layout} {_blocks_name(blocks)}"
      print(f"B {B:3d} {name:20s} {ms:8.3f} ms/step  {kernels:5d} kernels  "
            f"{ms / floor_ms:6.1f}x floor  rel err {err:.2e}", flush=True)
  return dict(what=__doc__.splitlines()[0], device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              dtype=dtype.name, layers=args.layers, steps=args.steps,
              copy_bandwidth_Bps=bw, weight_bytes=weight_bytes, rows=rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
  p.add_argument("--variants", nargs="+", default=["kn", "nk", "nk_sum", "row", "row_nk"],
                 choices=["kn", "nk", "nk_sum", "row", "row_nk"])
  p.add_argument("--interpret-rows", action="store_true",
                 help="run the row variants off a GPU too (interpreted: a correctness check)")
  p.add_argument("--row-nk-blocks", nargs="*", default=[], metavar="BK,BN,WARPS[,STAGES]",
                 help="also time row_nk with these launch parameters (a sweep)")
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  res = run(args)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gemv_layout.json"), "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
