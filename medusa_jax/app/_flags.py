"""Flags and helpers shared by the commands that load an engine (generate, chat, bench).

Light at import: the engine is loaded inside :func:`load_engine`, so building
the parser never imports JAX.
"""

from __future__ import annotations

import argparse
import sys

SPECULATE_CHOICES = ("none", "chain", "tree")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
  """Which model and heads, and the engine knobs (``EngineConfig`` fields)."""
  p.add_argument("--model-dir", help="Hugging Face Llama/Mistral/Qwen2 directory, or an id"
                 " (org/name) in the local Hugging Face cache (default: the fetched"
                 " SmolLM2-135M-Instruct; fetched on first use)")
  p.add_argument("--adapter", help="Medusa adapter directory or Hugging Face id, LoRAX layout"
                 " (default: the bundled SmolLM2 heads for SmolLM2; see `medusa-jax convert`"
                 " for other formats)")
  p.add_argument("--max-cache-len", type=int, default=2048, help="KV cache slots (default 2048)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--chat-template", default=None, metavar="NAME|FILE|JINJA",
                 help="the chat format: a built-in name (vicuna_v1.1, chatml, smollm2, llama2,"
                 " llama3, mistral), one of the model's named templates, a .jinja file or"
                 " Jinja text (default: the model's own template)")
  p.add_argument("--max-tree-rows", type=int, default=None,
                 help="B*T budget of the adaptive tree (default: per platform,"
                 " medusa_jax.config.TREE_ROWS: 3 on CPU, 64 on GPU/TPU)")


def add_request_flags(p: argparse.ArgumentParser, *, max_new: int) -> None:
  """The ``SamplingParams`` of the requests."""
  p.add_argument("--speculate", default="tree", choices=SPECULATE_CHOICES,
                 help="none: plain decoding; chain: LoRAX's one draft per head; tree: Medusa's"
                 " candidate tree (default)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
  p.add_argument("--typical", action="store_true",
                 help="Medusa's typical acceptance (with --temperature > 0)")
  p.add_argument("--max-new-tokens", type=int, default=max_new)
  p.add_argument("--seed", type=int, default=0)


def load_engine(ns: argparse.Namespace, notice=None):
  """``Engine.load`` from the engine flags; ``notice`` gets a message about the heads."""
  from medusa_jax.decoding.engine import Engine  # CLI dispatch: JAX loads here
  return Engine.load(ns.model_dir, ns.adapter, max_cache_len=ns.max_cache_len, dtype=ns.dtype,
                     max_tree_rows=ns.max_tree_rows, notice=notice,
                     chat_template=getattr(ns, "chat_template", None))


def sampling_params(ns: argparse.Namespace):
  """The request flags as ``SamplingParams`` (validated: a bad value fails before loading)."""
  from medusa_jax.decoding.requests import SamplingParams
  return SamplingParams(speculate=ns.speculate, temperature=ns.temperature, top_p=ns.top_p,
                        typical=ns.typical, max_new_tokens=ns.max_new_tokens, seed=ns.seed)


def stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def stats_line(stats) -> str:
  """One line of ``text.StreamStats`` for stderr."""
  heads = ""
  if stats.speculate != "none" and stats.steps:
    rates = ", ".join(f"{a / stats.steps:.2f}" for a in stats.head_accepts)
    heads = f"; head acceptance {rates}"
  return (f"[{stats.new_tokens} tokens in {stats.steps} steps, {stats.tokens_per_step:.2f}"
          f" tokens/step, {stats.tokens_per_s:.1f} tokens/s ({stats.wall_s:.1f} s with"
          f" compilation), speculate={stats.speculate}, T={stats.tree_nodes}{heads}]")
