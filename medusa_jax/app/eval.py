"""``medusa-jax eval``: MT-bench tokens per step, head accuracy and speed-up of an adapter."""

from __future__ import annotations

import argparse
import json

from medusa_jax.app._args import non_negative_int, positive_int

HELP = "MT-bench: tokens per step, head accuracy, speed-up"
EPILOG = """\
examples:
  medusa-jax eval                                   # the bundled heads on SmolLM2
  medusa-jax eval --heads my-adapter/ --num-questions 10 --no-plots
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--heads", help="adapter dir (default: the bundled SmolLM2 heads)")
  p.add_argument("--model-dir", help="base model dir (default: the fetched SmolLM2)")
  p.add_argument("--mtbench", help="question.jsonl (default: the fetched package)")
  p.add_argument("--questions", help="pre-tokenised questions JSON (from --write-questions)")
  p.add_argument("--write-questions", help="write pre-tokenised questions here and exit")
  p.add_argument("--out", default="eval_out", help="output directory")
  p.add_argument("--max-new-tokens", type=positive_int, default=256)
  p.add_argument("--num-questions", type=non_negative_int, default=0,
                 help="first N questions (0 = all)")
  p.add_argument("--bs1", type=non_negative_int, default=0, help="also time N questions at batch size 1")
  p.add_argument("--modes", default="chain,tree")
  p.add_argument("--no-plots", action="store_true", help="write eval.json only")


def run(ns: argparse.Namespace) -> int:
  from medusa_jax.training import evaluate  # CLI dispatch: the library (and JAX) loads here
  if ns.write_questions:
    evaluate.write_questions(ns.write_questions, model_dir=ns.model_dir, mtbench=ns.mtbench)
    return 0
  opts = evaluate.EvalOptions(max_new_tokens=ns.max_new_tokens, num_questions=ns.num_questions,
                              bs1_questions=ns.bs1,
                              modes=tuple(m for m in ns.modes.split(",") if m))
  report = evaluate.evaluate_heads(opts, heads=ns.heads, model_dir=ns.model_dir,
                                   mtbench=ns.mtbench, questions=ns.questions, out_dir=ns.out,
                                   plots=not ns.no_plots)
  print(json.dumps({k: report[k] for k in ("turns", "head_accuracy")}, indent=1))
  return 0
