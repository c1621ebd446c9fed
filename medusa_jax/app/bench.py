"""``medusa-jax bench``: end-to-end tokens/s, tokens per step and speed-up, plain vs Medusa."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

from tqdm.auto import tqdm

from medusa_jax.app._flags import SPECULATE_CHOICES, add_engine_flags, load_engine, stderr
from medusa_jax.assets import cache as assets
from medusa_jax.assets.datasets import load_mtbench
from medusa_jax.errors import RequestError

HELP = "tokens/s, tokens per step and speed-up of plain vs Medusa decoding"
EPILOG = """\
examples:
  medusa-jax bench                                   # batch 1, none/chain/tree, MT-bench prompts
  medusa-jax bench --batch-sizes 1 4 16 --max-new-tokens 128 --json > bench.json
  medusa-jax bench --model-dir ~/llama --adapter ~/my-medusa --modes none tree

For step-level timings (random weights of SmolLM2's shape, HF generate, memory
floor) run scripts/bench_decode.py from a checkout.
"""

_BENCH_PROMPTS = (
    "Explain speculative decoding to a new engineer.",
    "Write a short poem about the sea.",
    "List three uses of a hash map and explain each.",
    "What are the main causes of inflation?",
)


def run_bench(engine, prompts: Sequence[str], *, modes: Sequence[str] = SPECULATE_CHOICES,
              batch_sizes: Sequence[int] = (1,), max_new_tokens: int = 32,
              progress: bool = True) -> dict[str, Any]:
  """End-to-end ``Engine.generate`` throughput of each mode at each batch size.

  Greedy decoding on chat-templated prompts (repeated to fill a batch).
  Throughput leaves out the first decode step, which pays for compilation.

  Returns:
    ``{"backend": str, "devices": [str], "heads_notice": str | None,
    "rows": [{"batch", "mode", "tree_nodes", "tokens_per_s", "tokens_per_step",
    "speedup", "same_as_plain", "speculation_skipped"}]}``; speed-up and
    same_as_plain compare with "none" at the same batch size (None without it).
  """
  import jax

  from medusa_jax.decoding.requests import Speculate
  if not prompts:
    raise RequestError("bench: expected at least one prompt")
  modes = [Speculate.parse(m).value for m in modes]
  for b in batch_sizes:
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
      raise RequestError(f"batch size {b!r}: expected an integer >= 1")
  order = sorted(modes, key=lambda m: m != "none")  # the baseline first
  runs = [(b, m) for b in batch_sizes for m in order]
  bar = _progress(len(runs), "medusa-jax bench", progress)
  rows, plain = [], {}
  try:
    for b, mode in runs:
      batch = [prompts[i % len(prompts)] for i in range(b)]
      if bar is not None:
        bar.set_postfix_str(f"batch {b}, {mode}")
      res = engine.generate(batch, max_new_tokens, speculate=mode, chat=True)
      if mode == "none":
        plain[b] = res
      base = plain.get(b)
      speedup = None
      if base is not None and base.tokens_per_s > 0:
        speedup = res.tokens_per_s / base.tokens_per_s
      rows.append({
          "batch": b, "mode": mode, "tree_nodes": res.tree_nodes,
          "tokens_per_s": _finite(res.tokens_per_s, 2),
          "tokens_per_step": _finite(res.tokens_per_step, 3),
          "speedup": _finite(speedup, 3),
          "same_as_plain": None if base is None else res.tokens == base.tokens,
          "speculation_skipped": res.speculation_skipped})
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "max_new_tokens": max_new_tokens, "heads_notice": engine.heads_notice, "rows": rows}


def format_bench(report: dict[str, Any]) -> str:
  """The table :func:`run_bench`'s report prints as."""
  lines = [f"backend {report['backend']}, {report['max_new_tokens']} new tokens per prompt",
           f"{'batch':>5s} {'mode':6s} {'nodes':>5s} {'tokens/s':>9s} {'tok/step':>8s}"
           f" {'speed-up':>8s} {'same as plain':>13s}"]
  def num(x, fmt):
    return "-" if x is None else format(x, fmt)

  for r in report["rows"]:
    speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    same = "-" if r["same_as_plain"] is None else ("yes" if r["same_as_plain"] else "NO")
    lines.append(f"{r['batch']:5d} {r['mode']:6s} {r['tree_nodes']:5d}"
                 f" {num(r['tokens_per_s'], '9.1f'):>9s} {num(r['tokens_per_step'], '8.2f'):>8s}"
                 f" {speed:>8s} {same:>13s}")
  return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modes", nargs="+", default=list(SPECULATE_CHOICES), choices=SPECULATE_CHOICES)
  p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--prompts", nargs="+", help="prompts (default: MT-bench first turns when"
                 " fetched, else a built-in set)")
  add_engine_flags(p)
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.add_argument("--no-progress", action="store_true")


def run(ns: argparse.Namespace) -> int:
  if ns.max_new_tokens < 1:
    raise RequestError(f"--max-new-tokens={ns.max_new_tokens}; expected >= 1")
  engine = load_engine(ns, lambda m: stderr(f"note: {m}"))
  prompts = ns.prompts or _default_prompts(ns.model_dir)
  report = run_bench(engine, prompts, modes=ns.modes, batch_sizes=ns.batch_sizes,
                     max_new_tokens=ns.max_new_tokens, progress=not ns.no_progress)
  print(json.dumps(report, indent=1) if ns.json else format_bench(report))
  return 0


def _finite(x: float | None, digits: int) -> float | None:
  """Rounded, or None for a value JSON cannot carry (NaN: no steady-state steps ran)."""
  return round(x, digits) if x is not None and math.isfinite(x) else None


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False)


def _default_prompts(model_dir: str | None) -> list[str]:
  """MT-bench first turns when they are cached (and the model is SmolLM2), else a fixed set."""
  if model_dir is None:
    path = assets.asset_paths().mtbench_jsonl
    if path.exists():
      return [q["turns"][0] for q in load_mtbench(path)]
  return list(_BENCH_PROMPTS)
