"""``medusa-jax train``: train Medusa heads by self-distillation (optax, orbax)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

HELP = "train Medusa heads (optax, orbax)"
EPILOG = """\
examples:
  medusa-jax train --config configs/train_smollm2_v2.json
  medusa-jax train --config configs/tiny.json --steps 20 --out /tmp/heads
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="training config JSON (configs/*.json)")
  p.add_argument("--workdir", help="caches and checkpoints (default:"
                 " $MEDUSA_JAX_HOME/training/<name>)")
  p.add_argument("--out", help="adapter output directory (default: <workdir>/heads)")
  p.add_argument("--model-dir", help="base model (HF Llama dir); default: the fetched SmolLM2")
  p.add_argument("--gguf", help="a Llama GGUF to convert instead of --model-dir")
  p.add_argument("--prompts", help="a ready prompts.jsonl (skips ShareGPT)")
  p.add_argument("--sharegpt", help="ShareGPT JSON (default: the fetched package)")
  p.add_argument("--mtbench", help="MT-bench question.jsonl (excluded from training)")
  p.add_argument("--steps", type=int, help="override the config's steps")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--no-row-cache", action="store_true",
                 help="keep the token rows in memory (no rows_*.npz in the workdir)")
  p.add_argument("--generate-budget", type=float, metavar="SECONDS",
                 help="no new generation batch starts after SECONDS (batches in a seeded"
                 " random order; the prompts done are the data)")


def run(ns: argparse.Namespace) -> int:
  # CLI dispatch: the library (and JAX) loads here.
  from medusa_jax.assets.cache import default_home
  from medusa_jax.training.config import TrainConfig
  from medusa_jax.training.pipeline import Sources, run as run_pipeline
  cfg = TrainConfig.from_file(ns.config)
  if ns.steps is not None:
    cfg = dataclasses.replace(cfg, steps=ns.steps)
  workdir = ns.workdir or os.path.join(default_home(), "training", cfg.name)
  out = ns.out or os.path.join(workdir, "heads")
  src = Sources(model_dir=ns.model_dir, gguf=ns.gguf, prompts=ns.prompts,
                sharegpt_json=ns.sharegpt, mtbench_jsonl=ns.mtbench)
  recipe = run_pipeline(cfg, workdir, out, src, progress=not ns.no_progress,
                        cache_rows=not ns.no_row_cache,
                        generate_budget_s=ns.generate_budget)
  print(json.dumps({"out": out, "val_accuracy": recipe["val_accuracy"],
                    "timings_s": recipe["timings_s"]}))
  return 0
