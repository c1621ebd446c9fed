"""Replacing the bundled heads with a new training run's, only when they are better.

A run directory (``scripts/train_heads_gpu.sh`` output) holds ``heads/`` (the
exported adapter with its ``recipe.json``), ``eval.json`` (MT-bench of the new
heads) and, optionally, ``eval_baseline.json`` (the same evaluation of the
heads installed now, in the same run). ``compare`` puts the numbers side by
side; ``install`` swaps the new adapter into the bundled directory (one atomic
directory replacement: a crash leaves the old heads or the new ones, whole)
when the new heads win on validation head-1 top-1 AND on tree tokens per step,
both overall and on the held-out coding questions.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from medusa_jax import _atomic
from medusa_jax.adapters.io import adapter_entry
from medusa_jax.errors import ConfigError

ADAPTER_FILES = ("config.json", "model.safetensors", "medusa_choices.json")
HELD_OUT = "coding"  # the MT-bench category whose tokens per step are the target


def _read(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path}: not found") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None


def tree_tokens_per_step(report: dict[str, Any]) -> dict[str, float]:
  """{"turn1", "turn2", "mean", "coding"} tree tokens per step of an eval.json.

  ``mean`` averages the two turns; ``coding`` averages the coding category
  over the turns that have it.

  Raises:
    ConfigError: the report has no tree mode.
  """
  out: dict[str, float] = {}
  coding = []
  for name, entry in report.get("turns", {}).items():
    tree = entry.get("tree")
    if tree is None:
      continue
    out[name] = float(tree["tokens_per_step"])
    by = tree.get("tokens_per_step_by_category", {})
    if HELD_OUT in by:
      coding.append(float(by[HELD_OUT]))
  if not out:
    raise ConfigError("eval.json: expected a 'tree' entry under turns (run the evaluation"
                      " with --modes tree)")
  out["mean"] = sum(out.values()) / len(out)
  if coding:
    out[HELD_OUT] = sum(coding) / len(coding)
  return out


def compare(run_dir: str, current_dir: str, *, baseline_eval: str | None = None
            ) -> dict[str, Any]:
  """New vs current heads: validation top-1 per head and tree tokens per step.

  Args:
    run_dir: the training run's output (``heads/``, ``eval.json``).
    current_dir: the installed adapter (its ``recipe.json``).
    baseline_eval: eval.json of the current heads (default:
      ``run_dir/eval_baseline.json``).

  Returns:
    {"val_top1": {"new", "old"}, "tree_tokens_per_step": {"new", "old"},
     "better": bool, "reasons": [...]} ; ``better`` needs head-1 top-1 and
    tree tokens per step (mean and coding) all higher.
  """
  new_recipe = _read(os.path.join(run_dir, "heads", "recipe.json"))
  old_recipe = _read(os.path.join(current_dir, "recipe.json"))
  new_top1 = (new_recipe.get("val_accuracy") or {}).get("top1")
  old_top1 = (old_recipe.get("val_accuracy") or {}).get("top1")
  if not new_top1 or not old_top1:
    raise ConfigError("recipe.json: expected val_accuracy.top1 in both the new and the"
                      " current heads' recipes")
  new_tps = tree_tokens_per_step(_read(os.path.join(run_dir, "eval.json")))
  old_tps = tree_tokens_per_step(_read(baseline_eval
                                       or os.path.join(run_dir, "eval_baseline.json")))
  reasons = []
  if not new_top1[0] > old_top1[0]:
    reasons.append(f"val head-1 top-1 {new_top1[0]:.4f} <= {old_top1[0]:.4f}")
  for key in ("mean", HELD_OUT):
    if key not in new_tps or key not in old_tps:
      reasons.append(f"tree tokens per step: no '{key}' in both evaluations")
    elif not new_tps[key] > old_tps[key]:
      reasons.append(f"tree tokens per step ({key}) {new_tps[key]:.3f} <= {old_tps[key]:.3f}")
  return {"val_top1": {"new": new_top1, "old": old_top1},
          "tree_tokens_per_step": {"new": new_tps, "old": old_tps},
          "better": not reasons, "reasons": reasons}


def readme(recipe: dict[str, Any], tps: dict[str, float]) -> str:
  """The bundled directory's README.md, from the recipe and the tree tokens per step."""
  cfg, data, acc = recipe["config"], recipe["data"], recipe["val_accuracy"]
  n = cfg["num_heads"]
  bench = recipe.get("mtbench") or {}
  loss = ("KL divergence from the base model's top-"
          f"{cfg.get('teacher_topk')} next-token distribution (Medusa-2 self-distillation)"
          if cfg.get("loss") == "kl" else "cross-entropy on the base model's greedy tokens")
  turns = ("every user turn with the conversation before it (the dataset's answers)"
           if cfg.get("prompt_turns") == "all" else "first user turns")
  head_cols = " | ".join(str(k + 1) for k in range(n))
  files = [
      f"| `config.json` | `medusa_num_heads: {n}`, `medusa_num_layers: 1`, `version: 2.0` |",
      ("| `model.safetensors` | `{i}.0.linear.weight` [576, 576] and `{i}.0.linear.bias`"
       " [576], float32, torch `[out, in]` layout |"),
      (f"| `medusa_choices.json` | a {cfg['tree_nodes']}-node tree (best-first list of paths)"
       " built from the heads' measured rank accuracies (`tree_from_accuracies`) |"),
      ("| `recipe.json` | the training config, data sizes, device, timings, validation"
       " accuracies and MT-bench tokens per step |"),
  ]
  data_line = (f"Data: ShareGPT, {turns}: {data.get('examples', data['prompts']):,} prompts"
               f" answered greedily by the base model ({data['answer_tokens']:,} answer"
               f" tokens). Loss: {loss}, head k weighted {cfg['loss_decay']}^k.")
  val_line = (f"Validation accuracy ({data.get('examples_val', 0):,} held-out conversations'"
              f" turns, {acc['count'][0]:,} positions):")
  coding = (f"; the held-out coding questions: {tps[HELD_OUT]:.2f}." if HELD_OUT in tps
            else ".")
  bench_line = (f"MT-bench ({bench.get('questions', 80)} questions, both turns, greedy,"
                f" {bench.get('max_new_tokens', 256)} new tokens), this tree:"
                f" {tps['turn1']:.2f} / {tps.get('turn2', float('nan')):.2f} tokens per step"
                + coding)
  lines = [
      "# Medusa heads for SmolLM2-135M-Instruct", "",
      f"{n} V2 Medusa heads (one ResBlock each, sharing the base `lm_head`), trained by",
      "self-distillation with `medusa_jax.training`. This directory is a LoRAX Medusa",
      "adapter:", "",
      "| file | content |", "|---|---|", *files, "",
      "Head k (0-based) at position t predicts token t+k+2; the base `lm_head` predicts t+1.",
      "", data_line, "", val_line, "",
      f"| head | {head_cols} |", "|---|" + "---|" * n,
      "| top-1 | " + " | ".join(f"{x:.3f}" for x in acc["top1"]) + " |",
      "| top-5 | " + " | ".join(f"{x:.3f}" for x in acc["top5"]) + " |", "",
      bench_line, "",
      "Reproduce: `medusa-jax train --config configs/train_smollm2_v3.json --out DIR` (see",
      "`docs/results.md` for the data, the device and the wall times).", ""]
  return "\n".join(lines)


def install(run_dir: str, dest: str, *, baseline_eval: str | None = None,
            force: bool = False) -> dict[str, Any]:
  """Replaces the adapter in ``dest`` with ``run_dir/heads`` when it is better.

  The new ``recipe.json`` gains the MT-bench tree tokens per step; README.md
  is rewritten from it. Nothing is written unless ``compare(...)["better"]``
  or ``force``.

  Returns:
    the comparison, with "installed": bool.

  Raises:
    ConfigError: a missing or malformed input file.
    WriteError: the replacement failed (``dest`` is left as it was).
  """
  result = compare(run_dir, dest, baseline_eval=baseline_eval)
  result["installed"] = False
  if not (result["better"] or force):
    return result
  heads = os.path.join(run_dir, "heads")
  recipe = _read(os.path.join(heads, "recipe.json"))
  report = _read(os.path.join(run_dir, "eval.json"))
  tps = result["tree_tokens_per_step"]["new"]
  recipe["mtbench"] = {"device": report.get("device"), "jax": report.get("jax"),
                       "questions": report.get("questions"),
                       "max_new_tokens": report.get("max_new_tokens"),
                       "tree_tokens_per_step": tps,
                       "head_top1": (report.get("head_accuracy") or {}).get("top1"),
                       "baseline_tree_tokens_per_step": result["tree_tokens_per_step"]["old"]}
  with _atomic.replace_dir(dest, overwrite=True, what="the bundled Medusa heads",
                           belongs=adapter_entry) as tmp:
    for name in ADAPTER_FILES:
      shutil.copyfile(os.path.join(heads, name), os.path.join(tmp, name))
    _atomic.write_json(os.path.join(tmp, "recipe.json"), recipe, indent=1)
    _atomic.write_text(os.path.join(tmp, "README.md"), readme(recipe, tps))
  result["installed"] = True
  return result
