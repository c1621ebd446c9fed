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
  medusa-jax train --config configs/train_smollm2_v4.json --out sweep/ \
      --variant base --variant long:steps=8000 --variant ce:loss=ce \
      --compare medusa_jax/bundled/heads/smollm2-135m-instruct
  medusa-jax train --config configs/train_smollm2_v4.json --prompts-only --workdir w/
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
  p.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                 help="train this variant of the config on the same rows (repeatable): each"
                 " goes to OUT/NAME, the comparison to OUT/sweep.json; data fields"
                 " (prompts, generation, num_heads, teacher_topk) cannot vary")
  p.add_argument("--compare", action="append", default=[], metavar="ADAPTER_DIR",
                 help="with --variant: also evaluate this adapter on the validation rows")
  p.add_argument("--prompts-only", action="store_true",
                 help="write WORKDIR/prompts.jsonl (tokenised ShareGPT turns) and stop:"
                 " the input of a run on a machine without network")


def run(ns: argparse.Namespace) -> int:
  # CLI dispatch: the library (and JAX) loads here.
  from medusa_jax.assets.cache import default_home
  from medusa_jax.errors import ConfigError
  from medusa_jax.training import pipeline, sweep
  from medusa_jax.training.config import TrainConfig
  cfg = TrainConfig.from_file(ns.config)
  if ns.compare and not ns.variant:
    raise ConfigError("--compare: needs --variant (it compares on the variants' rows)")
  if ns.steps is not None:
    cfg = dataclasses.replace(cfg, steps=ns.steps)
  workdir = ns.workdir or os.path.join(default_home(), "training", cfg.name)
  out = ns.out or os.path.join(workdir, "heads")
  src = pipeline.Sources(model_dir=ns.model_dir, gguf=ns.gguf, prompts=ns.prompts,
                         sharegpt_json=ns.sharegpt, mtbench_jsonl=ns.mtbench)
  if ns.prompts_only:
    path = os.path.join(workdir, "prompts.jsonl")
    os.makedirs(workdir, exist_ok=True)
    count = pipeline.write_prompts(cfg, path, src, pipeline.base_model_dir(src, workdir))
    print(json.dumps({"prompts": path, "count": count}))
    return 0
  if ns.variant:
    variants = dict(sweep.parse_variant(v) for v in ns.variant)
    if len(variants) != len(ns.variant):
      raise ConfigError("--variant: each NAME once")
    result = sweep.run_variants(cfg, variants, workdir, out, src, compare=ns.compare,
                                progress=not ns.no_progress, cache_rows=not ns.no_row_cache,
                                generate_budget_s=ns.generate_budget)
    print(json.dumps({"out": out, "variants": {k: v["top1"]
                                               for k, v in result["variants"].items()}}))
    return 0
  recipe = pipeline.run(cfg, workdir, out, src, progress=not ns.no_progress,
                        cache_rows=not ns.no_row_cache, generate_budget_s=ns.generate_budget)
  print(json.dumps({"out": out, "val_accuracy": recipe["val_accuracy"],
                    "timings_s": recipe["timings_s"]}))
  return 0
