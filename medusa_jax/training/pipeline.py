"""The whole head-training run: prompts -> self-distilled data -> rows -> fit -> export.

Every stage caches its output in the work directory, so a rerun (or a resumed
run) skips what is done:

  prompts.jsonl     tokenised ShareGPT user turns (first turns, or every turn
                    with its context; train/val split by conversation)
  examples.jsonl    prompt + greedy answer of the base model (token ids)
  rows_train.npz    hidden states [R, H] float16 + targets [R, n] (+ the
  rows_val.npz      teacher top-K [R, n, K] of the ``kl`` loss); kept in
                    memory instead with ``cache_rows=False``

Generation and rows come from one pass (``distill.generate_rows``) when
neither is cached; rows of cached examples come from a second forward
(``distill.hidden_rows``).
  checkpoints/      orbax (resume)
  metrics.jsonl     training loss and validation accuracy records

The exported adapter directory holds ``config.json`` + ``model.safetensors``
(LoRAX V2 layout), ``medusa_choices.json`` (a tree built from the measured
per-head rank accuracies) and ``recipe.json`` (config, data sizes, timings,
accuracies).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
from flax import nnx

from medusa_jax import _atomic
from medusa_jax.adapters.io import adapter_entry, write_choices
from medusa_jax.adapters.weights import MedusaWeights
from medusa_jax.assets import cache as assets
from medusa_jax.decoding.tree import tree_from_accuracies
from medusa_jax.decoding.loading import load_tokenizer
from medusa_jax.models.chat import chat_ids
from medusa_jax.models.gguf import convert_gguf
from medusa_jax.models.llama_weights import load_llama
from medusa_jax.training import data as D
from medusa_jax.training.config import HeadKind, LossKind, PromptTurns, TrainConfig
from medusa_jax.training.distill import (generate_rows, greedy_generate, hidden_rows,
                                         lm_head_weight, make_examples)
from medusa_jax.training.train import TokenRows, fit, medusa_config

def _log(msg: str) -> None:
  print(f"[train] {msg}", file=sys.stderr, flush=True)


def mtbench_turns(path: str | os.PathLike) -> list[str]:
  """Every turn of every MT-bench question (question.jsonl)."""
  turns = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        turns.extend(t for t in json.loads(line)["turns"] if isinstance(t, str))
  return turns


def chat_encoder(tokenizer, template):
  """messages -> ids of the chat prompt with the assistant generation prompt.

  The same ids the engine feeds for a chat prompt (``models.chat.chat_ids``):
  the base model's own template and BOS rule, so the heads train on the
  prompts they will serve.
  """

  def encode(messages):
    return chat_ids(tokenizer, template, messages)

  return encode


def build_prompts(cfg: TrainConfig, *, sharegpt_json: str, mtbench_jsonl: str, tokenizer,
                  template=None) -> list[D.Prompt]:
  """ShareGPT user turns (``cfg.prompt_turns``), rendered in ``template`` and split,
  never overlapping MT-bench."""
  t0 = time.perf_counter()
  conversations = D.load_sharegpt_conversations(sharegpt_json)
  build = (D.user_turn_prompts if cfg.prompt_turns is PromptTurns.ALL
           else D.first_user_prompts)
  prompts = build(
      conversations, encode_chat=chat_encoder(tokenizer, template),
      exclude=mtbench_turns(mtbench_jsonl),
      max_prompts=cfg.num_prompts, max_prompt_tokens=cfg.max_prompt_tokens,
      val_fraction=cfg.val_fraction)
  _log(f"{len(prompts)} prompts from {len(conversations)} conversations"
       f" ({time.perf_counter() - t0:.1f} s)")
  return prompts


def _bar(total: int, desc: str):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)


def distill(cfg: TrainConfig, llama, prompts: Sequence[D.Prompt]) -> list[D.Example]:
  """Greedy answers of the base model for every prompt (self-distillation)."""
  eos = tuple(llama.cfg.eos_token_ids)
  pad = llama.cfg.pad_token_id if llama.cfg.pad_token_id is not None else eos[0]
  with _bar(len(prompts), "generate") as bar:
    answers = greedy_generate(llama, [p.ids for p in prompts], max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.gen_batch_size, eos_ids=eos, pad_id=pad,
                              progress=bar.update, length_bucket=cfg.length_bucket)
  return make_examples(prompts, answers)


def teacher_topk(cfg: TrainConfig) -> int:
  """K of the stored teacher distributions: ``cfg.teacher_topk`` for the kl loss, else 0."""
  return cfg.teacher_topk if cfg.loss is LossKind.KL else 0


def distill_rows(cfg: TrainConfig, llama, prompts: Sequence[D.Prompt],
                 time_budget_s: float | None = None
                 ) -> tuple[list[D.Example], dict[str, TokenRows]]:
  """Greedy answers and their token rows in one generation pass (``time_budget_s``:
  see ``distill.generate_rows``)."""
  eos = tuple(llama.cfg.eos_token_ids)
  pad = llama.cfg.pad_token_id if llama.cfg.pad_token_id is not None else eos[0]
  with _bar(len(prompts), "generate + rows") as bar:
    answers, out = generate_rows(llama, prompts, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.gen_batch_size, eos_ids=eos,
                                 num_heads=cfg.num_heads, teacher_topk=teacher_topk(cfg),
                                 pad_id=pad, length_bucket=cfg.length_bucket,
                                 time_budget_s=time_budget_s, seed=cfg.seed,
                                 progress=bar.update)
  return make_examples(prompts, answers), out


def rows(cfg: TrainConfig, llama, examples: Sequence[D.Example]):
  """(train TokenRows, val TokenRows) of the examples."""
  pad = llama.cfg.pad_token_id if llama.cfg.pad_token_id is not None else 0
  out = []
  for split in ("train", "val"):
    part = [e for e in examples if e.split == split]
    with _bar(len(part), f"hidden {split}") as bar:
      out.append(hidden_rows(llama, part, num_heads=cfg.num_heads,
                             batch_size=cfg.hidden_batch_size, pad_id=pad,
                             progress=bar.update, length_bucket=cfg.length_bucket,
                             teacher_topk=teacher_topk(cfg)))
  return tuple(out)


def export(cfg: TrainConfig, model, out_dir: str, *, accuracy, recipe: dict[str, Any]) -> str:
  """Writes the adapter: LoRAX files, the tree built from ``accuracy``, the recipe."""


  hidden = model.medusa.hidden if model.is_v2 else model.medusa.heads[0].blocks[0].kernel.shape[0]
  vocab = None if model.is_v2 else model.medusa.heads[0].out.shape[1]
  weights = MedusaWeights.init(medusa_config(cfg), hidden, vocab,
                               per_head_lm_head=cfg.head_kind is HeadKind.V1)
  nnx.update(weights.model, nnx.state(model, nnx.Param))
  choices = tree_from_accuracies(accuracy.rank_acc, cfg.tree_nodes + 1)
  # One atomic directory: a crash leaves the previous export or this one, whole.
  # A rerun replaces its own export; a directory of other files is refused.
  with _atomic.replace_dir(out_dir, overwrite=True, what="a Medusa adapter",
                           belongs=adapter_entry) as tmp:
    weights.save(tmp)
    write_choices(tmp, choices)
    _atomic.write_json(os.path.join(tmp, "recipe.json"), recipe, indent=1)
  return out_dir


def _turn_counts(prompts: Sequence[D.Prompt], done: set) -> dict[str, int]:
  """Examples per user-turn index ("1", "2", ...); ``done`` holds the
  (conv_id, prompt ids) of the prompts that became examples."""
  counts: dict[str, int] = {}
  for p in prompts:
    if (p.conv_id, tuple(p.ids)) in done:
      counts[str(p.turn + 1)] = counts.get(str(p.turn + 1), 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Sources:
  """Where the base model and data come from.

  Attributes:
    model_dir: Hugging Face Llama directory (None: ``assets.fetch()``).
    gguf: a GGUF file to convert into ``workdir/model`` instead.
    prompts: a ready prompts.jsonl (skips ShareGPT and the tokenizer).
    sharegpt_json, mtbench_jsonl: data files (None: ``assets.fetch()``).
    chat_template: the chat format of the prompts (a built-in name, one of
      the model's templates, a file or Jinja text); None: the model's own.
  """
  model_dir: str | None = None
  gguf: str | None = None
  prompts: str | None = None
  sharegpt_json: str | None = None
  mtbench_jsonl: str | None = None
  chat_template: str | None = None


def base_model_dir(src: Sources, workdir: str) -> str:
  """The base model's HF directory: ``src.model_dir``, the GGUF converted into
  ``workdir/model`` (once), or the fetched SmolLM2."""
  if src.model_dir:
    return src.model_dir
  if src.gguf:
    out = os.path.join(workdir, "model")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
      convert_gguf(src.gguf, out, overwrite=True)  # atomic: never half a checkpoint
    return out
  return assets.fetch().model_dir


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Distilled:
  """The data stages' output: what every fit on one run's rows shares.

  Attributes:
    llama: the base model.
    prompts: the prompts read (``cfg.num_prompts`` of them at most).
    examples: prompt + greedy answer of each prompt generated.
    train, val: token rows of the train and validation examples.
    timings: seconds of each stage (``load_s``, ``generate_s``, ``hidden_s``).
  """
  llama: Any
  prompts: list
  examples: list
  train: TokenRows
  val: TokenRows
  timings: dict


def prepare(cfg: TrainConfig, workdir: str, src: Sources = Sources(), *,
            cache_rows: bool = True, generate_budget_s: float | None = None) -> Distilled:
  """Runs (or reads from ``workdir``) every stage before the fit: the base model,
  the prompts, the self-distilled answers and their token rows.

  ``cache_rows=False`` keeps freshly computed token rows in memory only
  (they are the largest cache: about 2 KB per row with the teacher top-K).
  ``generate_budget_s`` bounds the one-pass generation: no new batch starts
  after that many seconds, and the prompts done (a seeded random sample of
  whole batches) are the data; the recipe counts them.
  """
  os.makedirs(workdir, exist_ok=True)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  base_dir = base_model_dir(src, workdir)
  llama = load_llama(base_dir)
  timings["load_s"] = time.perf_counter() - t0

  prompts_path = src.prompts or os.path.join(workdir, "prompts.jsonl")
  if not os.path.exists(prompts_path):
    write_prompts(cfg, prompts_path, src, base_dir)
  prompts = D.read_prompts(prompts_path)[: cfg.num_prompts]

  examples_path = os.path.join(workdir, "examples.jsonl")
  paths = {s: os.path.join(workdir, f"rows_{s}.npz") for s in ("train", "val")}
  have_rows = all(os.path.exists(p) for p in paths.values())
  fresh: dict[str, TokenRows] | None = None
  t = time.perf_counter()
  if not os.path.exists(examples_path):
    examples, fresh = distill_rows(cfg, llama, prompts, generate_budget_s)
    D.write_jsonl(examples_path, examples)
  examples = D.read_examples(examples_path)
  timings["generate_s"] = time.perf_counter() - t

  t = time.perf_counter()
  if fresh is None and not have_rows:
    fresh = dict(zip(("train", "val"), rows(cfg, llama, examples)))
  if fresh is not None:
    if cache_rows:
      for split, r in fresh.items():
        r.save(paths[split])
    train_rows, val_rows = fresh["train"], fresh["val"]
  else:
    train_rows, val_rows = TokenRows.load(paths["train"]), TokenRows.load(paths["val"])
  timings["hidden_s"] = time.perf_counter() - t
  _log(f"rows: train {train_rows.num_rows}, val {val_rows.num_rows}")
  return Distilled(llama=llama, prompts=prompts, examples=examples, train=train_rows,
                   val=val_rows, timings=timings)


def write_prompts(cfg: TrainConfig, path: str, src: Sources, model_dir: str) -> int:
  """Writes the tokenised prompts of ``cfg`` (ShareGPT in ``model_dir``'s tokenizer and
  chat template, or ``src.chat_template``) to ``path``; returns their number."""
  sharegpt, mtbench = src.sharegpt_json, src.mtbench_jsonl
  if sharegpt is None or mtbench is None:
    paths = assets.fetch()
    sharegpt, mtbench = sharegpt or paths.sharegpt_json, mtbench or paths.mtbench_jsonl
  tokenizer, template = load_tokenizer(model_dir, chat_template=src.chat_template)
  prompts = build_prompts(cfg, sharegpt_json=sharegpt, mtbench_jsonl=mtbench,
                          tokenizer=tokenizer, template=template)
  D.write_jsonl(path, prompts)
  return len(prompts)


def _recipe(cfg: TrainConfig, data: Distilled, result, timings: dict[str, float]
            ) -> dict[str, Any]:
  examples = data.examples
  n_train = sum(e.split == "train" for e in examples)
  return {
      "config": cfg.to_dict(),
      "data": {"prompts": len(data.prompts), "examples": len(examples),
               "examples_train": n_train, "examples_val": len(examples) - n_train,
               "answer_tokens": int(sum(len(e.ids) - e.prompt_len for e in examples)),
               "prompt_tokens": int(sum(e.prompt_len for e in examples)),
               "conversations": len({e.conv_id for e in examples}),
               "turns": _turn_counts(data.prompts, {(e.conv_id, e.ids[:e.prompt_len])
                                                    for e in examples}),
               "rows_train": data.train.num_rows, "rows_val": data.val.num_rows},
      "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})",
      "jax": jax.__version__,
      "timings_s": {k: round(v, 1) for k, v in timings.items()},
      "resumed_from_step": result.start_step,
      "val_accuracy": result.accuracy.summary() if result.accuracy else None,
      "val_ce": ([round(float(c), 5) for c in result.val_ce]
                 if result.val_ce is not None else None),
  }


def fit_and_export(cfg: TrainConfig, data: Distilled, workdir: str, out_dir: str, *,
                   progress: bool = True) -> dict[str, Any]:
  """Fits heads of ``cfg`` on ``data``'s rows (checkpoints and metrics in
  ``workdir``), exports them to ``out_dir`` when there are validation rows;
  returns the recipe."""
  val = data.val if data.val.num_rows else None
  result = fit(cfg, data.train, val, lm_head_weight(data.llama), workdir,
               progress=progress, log=_log)
  timings = {**data.timings, "train_s": result.seconds,
             "total_s": sum(data.timings.values()) + result.seconds}
  recipe = _recipe(cfg, data, result, timings)
  if result.accuracy is not None:
    export(cfg, result.model, out_dir, accuracy=result.accuracy, recipe=recipe)
    _log(f"heads written to {out_dir}; val top1 {recipe['val_accuracy']['top1']}")
  return recipe


def run(cfg: TrainConfig, workdir: str, out_dir: str, src: Sources = Sources(), *,
        progress: bool = True, cache_rows: bool = True,
        generate_budget_s: float | None = None) -> dict[str, Any]:
  """Runs (or resumes) every stage and exports the heads; returns the recipe
  (``cache_rows``, ``generate_budget_s``: see :func:`prepare`)."""
  data = prepare(cfg, workdir, src, cache_rows=cache_rows, generate_budget_s=generate_budget_s)
  return fit_and_export(cfg, data, workdir, out_dir, progress=progress)
