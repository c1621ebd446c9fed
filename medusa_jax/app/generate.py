"""The ``medusa-jax generate``, ``chat`` and ``bench`` commands.

Each parses its flags into ``SamplingParams`` / ``EngineConfig`` fields and
calls the library: the text layer ``medusa_jax.decoding.text`` (streamed text
over ``Engine.stream``), a multi-turn :class:`ChatSession` and the end-to-end
benchmark :func:`run_bench`. JAX is imported inside the commands, so
``--help`` loads none.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

from medusa_jax.errors import RequestError

SPECULATE_CHOICES = ("none", "chain", "tree")


def load_engine(model_dir: str | None = None, adapter: str | None = None, **kwargs):
  """``Engine.load(model_dir, adapter, **kwargs)``, importing JAX only when called."""
  from medusa_jax.decoding.engine import Engine
  return Engine.load(model_dir, adapter, **kwargs)


class ChatSession:
  """A multi-turn ChatML conversation; old turns are dropped when the cache is full."""

  def __init__(self, engine, params, *, system: str | None = None):
    """Args:
      engine: an ``Engine`` with a tokenizer.
      params: the ``SamplingParams`` of every answer.
      system: a system message.
    """
    self.engine = engine
    self.params = params
    self.system = system
    self.turns: list[dict[str, str]] = []

  def reset(self) -> None:
    self.turns = []

  def messages(self, user: str) -> list[dict[str, str]]:
    head = [{"role": "system", "content": self.system}] if self.system else []
    return head + self.turns + [{"role": "user", "content": user}]

  def reply(self, user: str, on_text: Callable[[str], None] | None = None):
    """Answers ``user`` in the context of the earlier turns, and records both.

    Returns:
      (answer, ``text.StreamStats``).
    """
    from medusa_jax.decoding.text import chat_ids, generate_text
    budget = self.engine.max_cache_len - self.params.max_new_tokens - 64  # 64: tree nodes
    messages = self.messages(user)
    while len(chat_ids(self.engine, messages)) > budget and self.turns:
      self.turns = self.turns[2:]  # the oldest user/assistant pair
      messages = self.messages(user)
    answer, stats = generate_text(self.engine, messages, self.params, on_text=on_text)
    self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return answer, stats


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


# ----------------------------------------------------------------------------- helpers


def _finite(x: float | None, digits: int) -> float | None:
  """Rounded, or None for a value JSON cannot carry (NaN: no steady-state steps ran)."""
  import math
  return round(x, digits) if x is not None and math.isfinite(x) else None


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False)


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _stats_line(stats) -> str:
  heads = ""
  if stats.speculate != "none" and stats.steps:
    rates = ", ".join(f"{a / stats.steps:.2f}" for a in stats.head_accepts)
    heads = f"; head acceptance {rates}"
  return (f"[{stats.new_tokens} tokens in {stats.steps} steps, {stats.tokens_per_step:.2f}"
          f" tokens/step, {stats.tokens_per_s:.1f} tokens/s ({stats.wall_s:.1f} s with"
          f" compilation), speculate={stats.speculate}, T={stats.tree_nodes}{heads}]")


# ----------------------------------------------------------------------------- commands


def _engine_flags(p) -> None:
  p.add_argument("--model-dir", help="Hugging Face Llama directory (default: the fetched"
                 " SmolLM2-135M-Instruct; fetched on first use)")
  p.add_argument("--adapter", help="Medusa adapter directory, LoRAX layout (default: the"
                 " bundled SmolLM2 heads; see `medusa-jax convert` for other formats)")
  p.add_argument("--max-cache-len", type=int, default=2048, help="KV cache slots (default 2048)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--max-tree-rows", type=int, default=None,
                 help="B*T budget of the adaptive tree (default: per platform,"
                 " medusa_jax.config.TREE_ROWS: 3 on CPU, 64 on GPU/TPU)")


def _request_flags(p, *, max_new: int) -> None:
  p.add_argument("--speculate", default="tree", choices=SPECULATE_CHOICES,
                 help="none: plain decoding; chain: LoRAX's one draft per head; tree: Medusa's"
                 " candidate tree (default)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
  p.add_argument("--typical", action="store_true",
                 help="Medusa's typical acceptance (with --temperature > 0)")
  p.add_argument("--max-new-tokens", type=int, default=max_new)
  p.add_argument("--seed", type=int, default=0)


def _engine(ns, notice):
  return load_engine(ns.model_dir, ns.adapter, max_cache_len=ns.max_cache_len, dtype=ns.dtype,
                     max_tree_rows=ns.max_tree_rows, notice=notice)


def _params(ns):
  """The request flags as ``SamplingParams`` (validated: a bad value fails before loading)."""
  from medusa_jax.decoding.requests import SamplingParams
  return SamplingParams(speculate=ns.speculate, temperature=ns.temperature, top_p=ns.top_p,
                        typical=ns.typical, max_new_tokens=ns.max_new_tokens, seed=ns.seed)


_GENERATE_EPILOG = """\
examples:
  medusa-jax generate "Explain speculative decoding in two sentences."
  medusa-jax generate "Hi" --speculate none --max-new-tokens 32
  medusa-jax generate "Tell a story" --temperature 0.7 --top-p 0.9
  medusa-jax generate "Hello" --model-dir ~/llama --adapter ~/my-medusa --json
  echo "What is JAX?" | medusa-jax generate -
"""


def generate_main(argv: Sequence[str] | None = None) -> int:
  """``medusa-jax generate PROMPT... [--speculate ...] [--json]``."""
  from medusa_jax.app.main import ArgumentParser
  p = ArgumentParser(prog="medusa-jax generate", epilog=_GENERATE_EPILOG,
                     description="Generate answers to prompts, streaming the text as it is"
                                 " decoded; statistics go to stderr.")
  p.add_argument("prompts", nargs="+", metavar="PROMPT", help="a prompt, or - to read stdin")
  _request_flags(p, max_new=256)
  _engine_flags(p)
  p.add_argument("--raw", action="store_true", help="no chat template: continue the text")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object per prompt (text, token ids, stats), no streaming")
  p.add_argument("--quiet", action="store_true", help="no statistics on stderr")
  ns = p.parse_args(argv)
  params = _params(ns)
  prompts = [sys.stdin.read() if x == "-" else x for x in ns.prompts]
  engine = _engine(ns, None if ns.quiet else (lambda m: _stderr(f"note: {m}")))
  from medusa_jax.decoding.text import chat_ids, stream_text, text_ids
  for prompt in prompts:
    ids = text_ids(engine, prompt) if ns.raw else chat_ids(engine, prompt)
    if ns.json:
      tokens, pieces, stats = [], [], None
      for chunk in stream_text(engine, ids, params):
        tokens += chunk.tokens
        pieces.append(chunk.text)
        stats = chunk.stats or stats
      print(json.dumps({"prompt": prompt, "text": "".join(pieces), "tokens": tokens,
                        "stats": stats.to_json()}), flush=True)
      continue
    stats = None
    for chunk in stream_text(engine, ids, params):
      sys.stdout.write(chunk.text)
      sys.stdout.flush()
      stats = chunk.stats or stats
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not ns.quiet:
      _stderr(_stats_line(stats))
  return 0


_CHAT_EPILOG = """\
examples:
  medusa-jax chat                                    # type, Enter; Ctrl-D ends
  printf 'Hi!\\nWhat did I just say?\\n' | medusa-jax chat --max-new-tokens 64
  medusa-jax chat --system "You answer in French." --speculate chain

commands inside the chat: /reset (forget the conversation), /exit
"""


def chat_main(argv: Sequence[str] | None = None, *, stdin=None) -> int:
  """``medusa-jax chat [--system TEXT] [...]``: one user turn per stdin line, until EOF."""
  from medusa_jax.app.main import ArgumentParser
  from medusa_jax.errors import MedusaError
  p = ArgumentParser(prog="medusa-jax chat", epilog=_CHAT_EPILOG,
                     description="Chat with the model in its chat template (ChatML for"
                                 " SmolLM2); each line of stdin is a user turn.")
  _request_flags(p, max_new=256)
  _engine_flags(p)
  p.add_argument("--system", help="a system message")
  p.add_argument("--stats", action="store_true", help="statistics after each answer (stderr)")
  ns = p.parse_args(argv)
  params = _params(ns)
  stdin = sys.stdin if stdin is None else stdin
  interactive = stdin.isatty()
  engine = _engine(ns, lambda m: _stderr(f"note: {m}"))
  session = ChatSession(engine, params, system=ns.system)
  if interactive:
    _stderr("chat: type a message and press Enter; /reset forgets, Ctrl-D or /exit ends")
  while True:
    if interactive:
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = stdin.readline()
    if not line:  # EOF
      break
    user = line.strip()
    if not user:
      continue
    if user in ("/exit", "/quit"):
      break
    if user == "/reset":
      session.reset()
      continue
    try:
      _, stats = session.reply(user, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    except MedusaError as e:  # a bad turn fails alone; the chat goes on
      _stderr(f"medusa-jax chat: error: {e}")
      continue
    sys.stdout.write("\n")
    sys.stdout.flush()
    if ns.stats:
      _stderr(_stats_line(stats))
  return 0


_BENCH_EPILOG = """\
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


def bench_main(argv: Sequence[str] | None = None) -> int:
  """``medusa-jax bench [--batch-sizes ...] [--modes ...] [--json]``."""
  from medusa_jax.app.main import ArgumentParser
  p = ArgumentParser(prog="medusa-jax bench", epilog=_BENCH_EPILOG,
                     description="End-to-end generation throughput: plain vs Medusa decoding"
                                 " (tokens/s, tokens per step, speed-up, losslessness).")
  p.add_argument("--modes", nargs="+", default=list(SPECULATE_CHOICES), choices=SPECULATE_CHOICES)
  p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--prompts", nargs="+", help="prompts (default: MT-bench first turns when"
                 " fetched, else a built-in set)")
  _engine_flags(p)
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.add_argument("--no-progress", action="store_true")
  ns = p.parse_args(argv)
  if ns.max_new_tokens < 1:
    raise RequestError(f"--max-new-tokens={ns.max_new_tokens}; expected >= 1")
  engine = _engine(ns, lambda m: _stderr(f"note: {m}"))
  prompts = ns.prompts or _default_prompts(ns.model_dir)
  report = run_bench(engine, prompts, modes=ns.modes, batch_sizes=ns.batch_sizes,
                     max_new_tokens=ns.max_new_tokens, progress=not ns.no_progress)
  print(json.dumps(report, indent=1) if ns.json else format_bench(report))
  return 0


def _default_prompts(model_dir: str | None) -> list[str]:
  """MT-bench first turns when they are cached (and the model is SmolLM2), else a fixed set."""
  if model_dir is None:
    from medusa_jax.assets import cache as assets
    from medusa_jax.assets.datasets import load_mtbench
    path = assets.asset_paths().mtbench_jsonl
    if path.exists():
      return [q["turns"][0] for q in load_mtbench(path)]
  return list(_BENCH_PROMPTS)

