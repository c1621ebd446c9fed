"""Variants: several head fits on one self-distillation run's rows.

Generation dominates a training run's cost, and the rows it produces do not
depend on the optimiser or the head architecture; so variants of a config
(another learning rate, more steps, the other loss, V1 heads of more layers)
train on the same rows and are compared on the same validation rows, beside
any adapters already on disk (``compare``: e.g. the heads shipped today).

Each variant trains in ``workdir/variants/NAME`` (its own checkpoints, so it
resumes alone) and exports to ``out_dir/NAME``; ``out_dir/sweep.json`` holds the
comparison: per-head validation top-1/top-5 and CE, and the expected tokens per
step of the best-first trees built from each one's rank accuracies
(:func:`medusa_jax.decoding.policy.expected_tokens`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from medusa_jax import _atomic
from medusa_jax.adapters.weights import load_medusa_adapter
from medusa_jax.decoding.policy import expected_tokens
from medusa_jax.decoding.tree import build_tree, tree_from_accuracies
from medusa_jax.errors import ConfigError
from medusa_jax.training.config import DATA_FIELDS, LossKind, TrainConfig
from medusa_jax.training.distill import lm_head_weight
from medusa_jax.training.pipeline import Distilled, Sources, fit_and_export, prepare
from medusa_jax.training.train import NO_GUARD, evaluate

TREE_SIZES = (4, 16, 64)
"""Tree sizes (nodes with the root) whose expected tokens per step the comparison lists."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
  """``"NAME"`` or ``"NAME:key=value,key=value"`` -> (NAME, overrides).

  Values are read as JSON where they parse (``3e-3``, ``true``), else kept as
  strings (``head_kind=v1``).

  Raises:
    ConfigError: a bad name, an item without ``=``, or a key given twice.
  """
  name, _, rest = text.partition(":")
  if not _NAME.fullmatch(name):
    raise ConfigError(f"variant {text!r}: expected NAME[:key=value,...] with NAME of letters,"
                      " digits, '_', '.', '-' (at most 64, not starting with '.', '_', '-')")
  overrides: dict[str, Any] = {}
  for item in filter(None, (x.strip() for x in rest.split(","))):
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
      raise ConfigError(f"variant {name}: {item!r}: expected key=value")
    if key in overrides:
      raise ConfigError(f"variant {name}: {key} given twice")
    try:
      overrides[key] = json.loads(raw)
    except ValueError:
      overrides[key] = raw.strip()
  return name, overrides


def variant_configs(cfg: TrainConfig, variants: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, TrainConfig]:
  """The config of each variant: ``cfg`` with its overrides, validated.

  Raises:
    ConfigError: no variants, an override of a data field (:data:`DATA_FIELDS`:
      the rows are shared), the kl loss on rows without teacher distributions,
      an unknown key, or an invalid value; the message names the variant.
  """
  if not variants:
    raise ConfigError("variants: expected at least one")
  out = {}
  for name, overrides in variants.items():
    if not _NAME.fullmatch(name):
      raise ConfigError(f"variant {name!r}: not a valid variant name")
    shared = sorted(set(overrides) & DATA_FIELDS)
    if shared:
      raise ConfigError(f"variant {name}: {', '.join(shared)} shape the shared rows; a variant"
                        f" may not change {sorted(DATA_FIELDS)}")
    vcfg = cfg.with_overrides(overrides, source=f"variant {name}")
    if vcfg.loss is LossKind.KL and cfg.loss is not LossKind.KL:
      raise ConfigError(f"variant {name}: loss kl needs the teacher top-K in the rows, and"
                        f" the base config's loss {cfg.loss.value} stores none; make the base"
                        " config's loss kl (a variant may then train with ce)")
    out[name] = vcfg
  return out


def tree_expectations(rank_acc, sizes: Sequence[int] = TREE_SIZES) -> dict[str, float]:
  """{nodes: expected tokens per step} of the best-first tree of each size
  built from ``rank_acc`` [n, K] (sizes count the root)."""
  acc = np.asarray(rank_acc, np.float64)
  return {str(t): round(expected_tokens(build_tree(tree_from_accuracies(acc, t),
                                                   topk=acc.shape[1]), acc), 4)
          for t in sizes}


def _entry(summary: dict[str, Any], head_ce, **extra) -> dict[str, Any]:
  return {**extra, "top1": summary["top1"], "top5": summary["top5"],
          "head_ce": [round(float(c), 5) for c in head_ce],
          "expected_tokens": tree_expectations(summary["rank_acc"]),
          "rank_acc": summary["rank_acc"]}


def compare_adapter(path: str, cfg: TrainConfig, data: Distilled) -> dict[str, Any]:
  """Validation accuracy and CE of an adapter on disk, on ``data``'s validation rows.

  Raises:
    ConfigError: no validation rows, or the adapter's heads do not match the
      rows or the base model (head count, hidden size, V1 vocabulary).
  """
  if not data.val.num_rows:
    raise ConfigError("compare: the run has no validation rows (val_fraction 0?)")
  weights = load_medusa_adapter(path, max_batch_size=NO_GUARD)
  if weights.config.medusa_num_heads != cfg.num_heads:
    raise ConfigError(f"compare {path}: {weights.config.medusa_num_heads} heads; the rows"
                      f" have targets for {cfg.num_heads} (num_heads)")
  if weights.hidden_size != data.val.hidden.shape[1]:
    raise ConfigError(f"compare {path}: hidden size {weights.hidden_size}; the rows have"
                      f" {data.val.hidden.shape[1]}")
  lm_head = lm_head_weight(data.llama)
  if weights.vocab_size is not None and weights.vocab_size != lm_head.shape[0]:
    raise ConfigError(f"compare {path}: its heads' vocabulary has {weights.vocab_size} tokens;"
                      f" the base model's has {lm_head.shape[0]}")
  acc, ce = evaluate(weights.model, data.val, lm_head, cfg)
  return _entry(acc.summary(), ce, path=os.path.abspath(path))


def _print_table(result: dict[str, Any], file=sys.stderr) -> None:
  rows = list(result["variants"].items())
  rows += [(f"[{os.path.basename(v['path'].rstrip('/'))}]", v)
           for v in result["compare"].values()]
  sizes = list(TREE_SIZES)
  head = (f"{'variant':<24} {'top1 per head':<36} {'head-1 top5':>11} "
          + " ".join(f"{'E@' + str(t):>6}" for t in sizes) + f" {'train s':>8}")
  print(head, file=file)
  for name, v in rows:
    top1 = " ".join(f"{x:.3f}" for x in v["top1"])
    exp = " ".join(f"{v['expected_tokens'][str(t)]:>6.3f}" for t in sizes)
    secs = v.get("train_s")
    print(f"{name:<24} {top1:<36} {v['top5'][0]:>11.3f} {exp} "
          f"{'' if secs is None else f'{secs:8.1f}'}", file=file)


def run_variants(cfg: TrainConfig, variants: Mapping[str, Mapping[str, Any]], workdir: str,
                 out_dir: str, src: Sources = Sources(), *, compare: Sequence[str] = (),
                 progress: bool = True, cache_rows: bool = True,
                 generate_budget_s: float | None = None) -> dict[str, Any]:
  """Prepares ``cfg``'s rows once, fits every variant on them, compares.

  Args:
    cfg: the base config (its data fields make the rows).
    variants: {NAME: overrides of ``cfg``}; ``{}`` overrides is ``cfg`` itself.
    workdir: the data caches (shared) and ``variants/NAME`` (each fit's own).
    out_dir: ``NAME/`` per variant (the adapter) and ``sweep.json``.
    src: where the model and data come from (see :class:`pipeline.Sources`).
    compare: adapter directories to evaluate on the same validation rows.
    progress, cache_rows, generate_budget_s: see :func:`pipeline.prepare`.

  Returns:
    The comparison written to ``out_dir/sweep.json``.

  Raises:
    ConfigError: a bad variant (see :func:`variant_configs`) or compare
      adapter, found before any work starts where it can be.
  """
  configs = variant_configs(cfg, variants)
  for path in compare:
    if not os.path.isdir(path):
      raise ConfigError(f"compare {path}: not an adapter directory")
  data = prepare(cfg, workdir, src, cache_rows=cache_rows, generate_budget_s=generate_budget_s)
  result: dict[str, Any] = {
      "base": cfg.to_dict(), "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
      "jax": jax.__version__,
      "data": {"prompts": len(data.prompts), "examples": len(data.examples),
               "rows_train": data.train.num_rows, "rows_val": data.val.num_rows},
      "timings_s": {k: round(v, 1) for k, v in data.timings.items()},
      "variants": {}, "compare": {}}
  os.makedirs(out_dir, exist_ok=True)
  sweep_json = os.path.join(out_dir, "sweep.json")
  for name, vcfg in configs.items():
    recipe = fit_and_export(vcfg, data, os.path.join(workdir, "variants", name),
                            os.path.join(out_dir, name), progress=progress)
    acc = recipe["val_accuracy"]
    if acc is not None:
      result["variants"][name] = _entry(acc, recipe["val_ce"], overrides=dict(variants[name]),
                                        train_s=round(recipe["timings_s"]["train_s"], 1))
    _atomic.write_json(sweep_json, result, indent=1, overwrite=True)  # kept as each ends
  for path in compare:
    result["compare"][path] = compare_adapter(path, cfg, data)
  _atomic.write_json(sweep_json, result, indent=1, overwrite=True)
  _print_table(result)
  return result
