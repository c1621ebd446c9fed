"""``medusa-jax demo``: MT-bench questions on SmolLM2, plain vs Medusa decoding.

Loads the cached SmolLM2-135M-Instruct with the bundled Medusa heads (or
freshly initialised heads, with a notice), answers the first turn of a few
MT-bench questions in the ChatML template with each decoding mode, and prints
tokens/s, tokens per step and the speed-up over plain decoding, then one
sample answer.

Throughput counts decode steps after the first one, so compilation is left
out; each mode compiles once for the batch and cache buckets in use.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from medusa_jax.app._args import non_negative_int, positive_int
from medusa_jax.assets import cache as assets
from medusa_jax.assets.datasets import load_mtbench
from medusa_jax.config import Platform
from medusa_jax.errors import ConfigError

HELP = "MT-bench prompts: plain vs Medusa decoding on SmolLM2"
EPILOG = """\
examples:
  medusa-jax demo                                   # 4 questions, batch 1, none vs tree
  medusa-jax demo --prompts 8 --speculate none chain tree --json
"""

DEFAULT_MODES = ("none", "tree")


def run_demo(num_prompts: int = 4, max_new_tokens: int = 32, batch_size: int | None = 1,
             speculate: Sequence[str] = DEFAULT_MODES, *, engine=None,
             max_tree_rows: int | None = None, temperature: float = 0.0, seed: int = 0,
             policy: str | None = None, log=print) -> dict:
  """Runs the demo and returns its numbers.

  Args:
    num_prompts: MT-bench questions (first turns), spread over the categories.
    max_new_tokens: answer budget per question.
    batch_size: questions decoded together (default 1, Medusa's setting;
      None = all at once).
    speculate: modes to compare; "none" is the baseline of the speed-up.
    engine: an :class:`~medusa_jax.decoding.engine.Engine` (default:
      ``Engine.load()``: SmolLM2 + bundled heads).
    max_tree_rows: B * T budget of the adaptive tree (default: the
      platform's, ``medusa_jax.config.TREE_ROWS``: 3 on CPU, where every
      verified row costs compute, 64 on GPU/TPU).
    temperature: 0 = greedy (speculation is then lossless: same answers).
    seed: sampling seed.
    policy: how "tree" picks its tree: "measured" (time the candidate trees
      on this device first, cached for later runs, and let the most expected
      tokens per second win, plain decoding included), "budget" (the row
      budget), or None (the engine's ``EngineConfig.tree_policy``: measured
      unless ``$MEDUSA_JAX_TREE_POLICY`` says otherwise). When the measured
      policy picks plain decoding, "tree" is plain decoding: its row repeats
      the "none" run rather than timing the same thing twice, and says so.
    log: where lines go (``print``; None = silent).

  Returns:
    ``{"heads": str, "notice": str | None, "modes": {mode: {...}}, "sample": {...}}``.
  """
  import jax

  from medusa_jax.decoding.engine import Engine
  from medusa_jax.decoding.requests import Speculate

  log = log or (lambda *a, **k: None)
  if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
    raise ConfigError(f"num_prompts={num_prompts!r}: expected an integer >= 1")
  modes = [Speculate.parse(m) for m in speculate]
  if policy not in (None, "budget", "measured"):
    raise ConfigError(f"policy={policy!r}: expected budget or measured")
  if engine is None:
    engine = Engine.load(max_cache_len=1024, max_tree_rows=max_tree_rows, tree_policy=policy)
  elif policy is not None:
    engine.use_policy(None if policy == "budget" else policy)
  if engine.heads_notice:
    log(f"NOTE: {engine.heads_notice}")
  plain_tree = False
  if Speculate.TREE in modes and engine.context.tree_policy is not None:
    rows = batch_size or num_prompts
    if engine.config.tree_policy == "measured" and rows not in engine.measured:
      log(f"the measured tree policy at batch {rows}: timing the candidate trees on this device"
          " (once; later runs read $MEDUSA_JAX_HOME/policy) ...")
    tree = engine.context.tree_policy(rows)
    plain_tree = tree is None
    log("measured policy: " + ("plain decoding pays best on this device, so 'tree' is plain"
                                " decoding" if plain_tree else f"a {tree.num_nodes}-node tree"))
  paths = assets.asset_paths()
  questions = load_mtbench(paths.mtbench_jsonl)
  step = max(1, len(questions) // max(num_prompts, 1))
  chosen = questions[::step][:num_prompts]
  prompts = [q["turns"][0] for q in chosen]
  batch_size = batch_size or len(prompts)

  results = {}
  for mode in modes:
    if mode is Speculate.TREE and plain_tree and "none" in results:
      results["tree"] = dict(results["none"], repeats="none")
      continue
    tokens, texts, decode_s, decode_tok, steps, emitted, nodes = [], [], 0.0, 0, 0, 0, 1
    for start in range(0, len(prompts), batch_size):
      res = engine.generate(prompts[start:start + batch_size], max_new_tokens,
                            speculate=mode, temperature=temperature, seed=seed, chat=True)
      tokens += res.tokens
      texts += res.texts or [""] * len(res.tokens)
      decode_s += res.decode_s
      decode_tok += res.decode_tokens
      steps += sum(s.steps for s in res.stats)
      emitted += sum(s.new_tokens - 1 for s in res.stats)
      nodes = res.tree_nodes
    results[mode.value] = dict(
        tokens_per_s=decode_tok / decode_s if decode_s > 0 else float("nan"),
        tokens_per_step=emitted / steps if steps else float("nan"),
        tree_nodes=nodes, new_tokens=sum(len(t) for t in tokens), tokens=tokens, texts=texts)

  base = results.get("none", {}).get("tokens_per_s")
  for r in results.values():
    r["speedup"] = r["tokens_per_s"] / base if base else float("nan")
  same = None
  if "none" in results and temperature == 0:
    same = {m: r["tokens"] == results["none"]["tokens"] for m, r in results.items()}

  log(f"\nSmolLM2-135M-Instruct, {len(prompts)} MT-bench questions, batch {batch_size}, "
      f"{max_new_tokens} new tokens, backend {jax.default_backend()}")
  log(f"{'mode':<8}{'tree nodes':>11}{'tokens/s':>11}{'tokens/step':>13}{'speed-up':>10}")
  for name, r in results.items():
    log(f"{name:<8}{r['tree_nodes']:>11}{r['tokens_per_s']:>11.1f}{r['tokens_per_step']:>13.2f}"
        f"{r['speedup']:>9.2f}x" + ("  (plain decoding: the measured policy's choice; the"
                                   " 'none' run)" if r.get("repeats") else ""))
  if same is not None:
    log("greedy answers identical to plain decoding: "
        + ", ".join(f"{m}={'yes' if ok else 'NO'}" for m, ok in same.items()))
  if Platform.current() is Platform.CPU and len(results) > 1:
    log("(on a CPU every verified tree row costs compute: a speculative step costs ~1.5 plain"
        " steps here, about what the heads gain, so the measured policy picks a small tree or"
        " none; on a GPU the extra rows are nearly free: see docs/perf_decode.md)")
  last = list(results)[-1]
  sample = dict(question=prompts[0], answer=results[last]["texts"][0], mode=last)
  log(f"\nQ: {sample['question']}\nA ({last}): {sample['answer']}")
  for r in results.values():
    r.pop("tokens", None), r.pop("texts", None)
  return dict(heads="bundled" if engine.heads_notice is None else "freshly initialised",
              notice=engine.heads_notice, questions=[q["question_id"] for q in chosen],
              modes=results, identical_to_plain=same, sample=sample)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--prompts", type=positive_int, default=4, help="MT-bench questions (default 4)")
  p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer budget (default 32)")
  p.add_argument("--batch-size", type=non_negative_int, default=1,
                 help="questions decoded together (default 1; 0 = all at once)")
  p.add_argument("--speculate", nargs="+", default=list(DEFAULT_MODES),
                 help="modes to compare: none chain tree (default: none tree)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--max-tree-rows", type=int, default=None,
                 help="B*T budget of the adaptive tree (default: per platform,"
                 " medusa_jax.config.TREE_ROWS: 3 on CPU, 64 on GPU/TPU)")
  p.add_argument("--policy", choices=("budget", "measured"), default=None,
                 help="how 'tree' picks its tree: measured step times on this device (a minute"
                 " the first time, then cached) or the row budget; default:"
                 " $MEDUSA_JAX_TREE_POLICY, else measured")
  p.add_argument("--json", action="store_true", help="print the results as JSON as well")


def run(ns: argparse.Namespace) -> int:
  out = run_demo(ns.prompts, ns.max_new_tokens, ns.batch_size or None, ns.speculate,
                 max_tree_rows=ns.max_tree_rows, temperature=ns.temperature, policy=ns.policy)
  if ns.json:
    print(json.dumps(out, indent=2))
  return 0
