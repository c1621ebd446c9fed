"""MT-bench evaluation of Medusa heads: tokens per step, accuracy, speed-up.

For the 80 MT-bench questions (first turns, then second turns continuing the
conversation with the base model's own first answer), through the Engine:

* tokens per decode step and the acceptance-length histogram, for ``chain``
  and ``tree`` speculation (greedy), plus whether their outputs equal plain
  greedy decoding token for token;
* per-head top-1 / top-5 accuracy of the heads on the base model's answers
  (teacher-forced, the same measurement as training validation);
* tokens/s and speed-up over plain decoding, batched and (optionally) at
  batch size 1 on a subset, on the current device.

Writes ``eval.json`` and PNG plots to the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from medusa_jax import _atomic
from medusa_jax.adapters.io import CHOICES_NAME, read_choices
from medusa_jax.assets import cache as assets
from medusa_jax.bundled import SMOLLM2_HEADS
from medusa_jax.decoding.engine import Engine
from medusa_jax.decoding.loading import load_tokenizer
from medusa_jax.errors import ConfigError
from medusa_jax.models.chat import chat_ids
from medusa_jax.training.config import TrainConfig
from medusa_jax.training.data import Example
from medusa_jax.training.distill import hidden_rows, lm_head_weight
from medusa_jax.training.train import evaluate

_ANSWER = "\x00MEDUSA_JAX_ANSWER\x00"  # stands for the first answer while rendering turn 2


def _log(msg: str) -> None:
  print(f"[eval] {msg}", file=sys.stderr, flush=True)


def turn2_suffix(tokenizer, template, turn1: str, turn2: str) -> list[int]:
  """The ids that follow the first answer and its EOS to open the second turn.

  The conversation ``[user turn1, assistant ANSWER, user turn2]`` is rendered
  in the model's template (the prompt code of generation); what follows the
  answer, after the turn-closing EOS that :func:`second_turn` adds as an id,
  is encoded behind that EOS (so a tokenizer that marks word starts sees the
  same boundary as in the whole conversation).

  Raises:
    RequestError: no template; ConfigError: a template that does not put the
      answer text where an answer goes.
  """
  messages = [{"role": "user", "content": turn1}, {"role": "assistant", "content": _ANSWER},
              {"role": "user", "content": turn2}]
  special = tokenizer.special_tokens() if hasattr(tokenizer, "special_tokens") else {}
  if template is None:
    chat_ids(tokenizer, template, messages)  # raises: no template
  text = template.render(messages, add_generation_prompt=True, **special)
  if text.count(_ANSWER) != 1:
    raise ConfigError("chat template: a second turn cannot be rendered after the first answer"
                      " (the answer text is not kept as it is)")
  suffix = text.split(_ANSWER, 1)[1]
  eos = getattr(tokenizer, "eos_token", None)
  head, sep, rest = suffix.partition(eos) if eos else ("", "", "")
  if sep and not head.strip():  # Llama 2 writes " </s>": the space is the template's, not the answer's
    return list(tokenizer.encode(eos + rest))[1:]  # behind the EOS that second_turn adds
  return list(tokenizer.encode(suffix))


def prepare_questions(mtbench_jsonl: str, tokenizer, template=None) -> list[dict[str, Any]]:
  """MT-bench questions as token ids: the first-turn chat prompt, and the ids
  that follow the first answer to open the second turn, both in the model's
  chat template (``template``) with the engine's prompt code."""
  out = []
  with open(mtbench_jsonl, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      q = json.loads(line)
      turn1 = chat_ids(tokenizer, template, [{"role": "user", "content": q["turns"][0]}])
      suffix = (turn2_suffix(tokenizer, template, q["turns"][0], q["turns"][1])
                if len(q["turns"]) > 1 else [])
      out.append({"question_id": q["question_id"], "category": q.get("category", ""),
                  "turn1_ids": turn1, "turn2_suffix_ids": suffix})
  return out


def second_turn(q: dict[str, Any], answer1: Sequence[int], eos_id: int) -> list[int]:
  """Turn-2 prompt: turn-1 prompt + the first answer (closed by eos) + the next user turn."""
  answer = list(answer1)
  if not answer or answer[-1] != eos_id:
    answer.append(eos_id)
  return list(q["turn1_ids"]) + answer + list(q["turn2_suffix_ids"])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvalOptions:
  """Attributes:
    max_new_tokens: answer budget per turn.
    num_questions: first N questions (0 = all 80).
    bs1_questions: questions also timed one at a time (0 = none).
    modes: speculation modes besides plain.
    max_cache_len: engine KV cache bound.
  """
  max_new_tokens: int = 256
  num_questions: int = 0
  bs1_questions: int = 0
  modes: tuple[str, ...] = ("chain", "tree")
  max_cache_len: int = 2048


def tokens_per_step_by(res, groups: Sequence[str]) -> dict[str, float]:
  """Tokens per decode step of each group of prompts (e.g. MT-bench categories).

  Args:
    res: a GenerateResult whose ``stats[i]`` belongs to prompt i.
    groups: one group name per prompt.

  Returns:
    {group: emitted tokens / decode steps over the group's prompts}, sorted by
    name; groups without a decode step are left out.
  """
  tokens: dict[str, float] = {}
  steps: dict[str, int] = {}
  for g, st in zip(groups, res.stats):
    if st is None or not st.steps:
      continue
    tokens[g] = tokens.get(g, 0.0) + st.tokens_per_step * st.steps
    steps[g] = steps.get(g, 0) + st.steps
  return {g: tokens[g] / steps[g] for g in sorted(steps)}


def _mode_summary(res, plain_tokens) -> dict[str, Any]:
  hist = None
  for s in res.stats:
    if s is None:
      continue
    h = np.asarray(s.accept_hist)
    hist = h if hist is None else hist + h
  same = sum(a == b for a, b in zip(res.tokens, plain_tokens))
  return {"tokens_per_step": float(res.tokens_per_step),
          "tokens_per_s": float(res.tokens_per_s), "wall_s": round(res.wall_s, 2),
          "tree_nodes": int(res.tree_nodes),
          "accept_hist": [] if hist is None else [int(x) for x in hist],
          "matches_plain": f"{same}/{len(plain_tokens)}"}


def run_eval(engine, questions: list[dict[str, Any]], heads_choices, opts: EvalOptions
             ) -> dict[str, Any]:
  """Evaluates the engine's heads on the questions (see module docstring)."""


  eos = int(engine.eos_ids[0])  # the turn-closing EOS (the tokenizer's first)
  n = int(engine.num_heads)
  qs = questions[: opts.num_questions or len(questions)]
  report: dict[str, Any] = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
                            "jax": jax.__version__, "questions": len(qs),
                            "max_new_tokens": opts.max_new_tokens, "turns": {}}
  turns = {"turn1": [list(q["turn1_ids"]) for q in qs]}
  categories = {"turn1": [q.get("category", "") for q in qs],
                "turn2": [q.get("category", "") for q in qs if q["turn2_suffix_ids"]]}
  answers: dict[str, list[list[int]]] = {}
  for name in ("turn1", "turn2"):
    if name == "turn2":
      turns["turn2"] = [second_turn(q, a, eos) for q, a in zip(qs, answers["turn1"])
                        if q["turn2_suffix_ids"]]
    prompts = turns[name]
    t = time.perf_counter()
    plain = engine.generate(prompts, opts.max_new_tokens, speculate="none")
    answers[name] = plain.tokens
    entry = {"plain": {"tokens_per_s": float(plain.tokens_per_s),
                       "wall_s": round(plain.wall_s, 2),
                       "new_tokens": int(sum(len(a) for a in plain.tokens))}}
    for mode in opts.modes:
      res = engine.generate(prompts, opts.max_new_tokens, speculate=mode,
                            tree=heads_choices if mode == "tree" else None, adaptive=True)
      entry[mode] = _mode_summary(res, plain.tokens)
      entry[mode]["tokens_per_step_by_category"] = tokens_per_step_by(res, categories[name])
      entry[mode]["speedup"] = entry[mode]["tokens_per_s"] / entry["plain"]["tokens_per_s"]
      _log(f"{name} {mode}: {entry[mode]['tokens_per_step']:.3f} tokens/step,"
           f" speed-up {entry[mode]['speedup']:.2f}x (batch {len(prompts)})")
    report["turns"][name] = entry
    _log(f"{name} done in {time.perf_counter() - t:.1f} s")

  # Teacher-forced head accuracy on the base model's own MT-bench answers.
  examples = [Example(conv_id=str(i), split="val", ids=tuple(p) + tuple(a), prompt_len=len(p))
              for name in turns for i, (p, a) in enumerate(zip(turns[name], answers[name]))
              if a]
  cfg = TrainConfig(num_heads=n, batch_rows=1024)
  rows = hidden_rows(engine.llama, examples, num_heads=n, batch_size=32, pad_id=eos,
                     length_bucket=512)
  acc, _ = evaluate(engine.heads, rows, lm_head_weight(engine.llama), cfg)
  report["head_accuracy"] = acc.summary()
  _log(f"head accuracy top1 {report['head_accuracy']['top1']}"
       f" top5 {report['head_accuracy']['top5']}")

  if opts.bs1_questions:
    sub = turns["turn1"][: opts.bs1_questions]
    timing: dict[str, Any] = {}
    for mode in ("none",) + tuple(opts.modes):
      engine.generate(sub[:1], opts.max_new_tokens, speculate=mode,  # compile first
                      tree=heads_choices if mode == "tree" else None, adaptive=True)
      tokens, secs, steps, dec_tokens, dec_s = 0, 0.0, 0, 0, 0.0
      for p in sub:
        r = engine.generate([p], opts.max_new_tokens, speculate=mode,
                            tree=heads_choices if mode == "tree" else None, adaptive=True)
        tokens += len(r.tokens[0])
        secs += r.wall_s
        steps += r.steps[0]
        dec_tokens += r.decode_tokens
        dec_s += r.decode_s
      # decode-only throughput excludes prefill (and any compile in the first step)
      timing[mode] = {"tokens_per_s": dec_tokens / dec_s if dec_s else float("nan"),
                      "e2e_tokens_per_s": tokens / secs, "tokens": tokens, "steps": steps}
    for mode in opts.modes:
      timing[mode]["speedup"] = timing[mode]["tokens_per_s"] / timing["none"]["tokens_per_s"]
      timing[mode]["e2e_speedup"] = (timing[mode]["e2e_tokens_per_s"]
                                     / timing["none"]["e2e_tokens_per_s"])
    report["batch1"] = {"questions": len(sub), **timing}
    _log(f"batch 1: {json.dumps(timing)}")
  return report


def plot(report: dict[str, Any], out_dir: str) -> list[str]:
  """Acceptance histograms and per-head accuracy as PNGs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  fig, axes = plt.subplots(1, len(report["turns"]), figsize=(10, 3.5), squeeze=False)
  for ax, (name, entry) in zip(axes[0], report["turns"].items()):
    for j, mode in enumerate(m for m in entry if m != "plain"):
      hist = np.asarray(entry[mode]["accept_hist"], float)
      if hist.size:
        ax.bar(np.arange(hist.size) + 0.4 * j, hist / hist.sum(), width=0.4,
               label=f"{mode} ({entry[mode]['tokens_per_step']:.2f} tok/step)")
    ax.set_title(f"MT-bench {name}: accepted drafts per step")
    ax.set_xlabel("accepted drafts")
    ax.set_ylabel("fraction of steps")
    ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "accept_hist.png"))
  save_figure(fig, paths[-1], dpi=110)
  plt.close(fig)

  acc = report["head_accuracy"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  k = np.arange(len(acc["top1"]))
  ax.bar(k - 0.2, acc["top1"], width=0.4, label="top-1")
  ax.bar(k + 0.2, acc["top5"], width=0.4, label="top-5")
  ax.set_xticks(k, [f"head {i + 1}" for i in k])
  ax.set_ylim(0, 1)
  ax.set_title("Head accuracy on MT-bench answers")
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "head_accuracy.png"))
  save_figure(fig, paths[-1], dpi=110)
  plt.close(fig)
  return paths


def evaluate_heads(opts: EvalOptions, *, heads: str | None = None, model_dir: str | None = None,
                   mtbench: str | None = None, questions: str | None = None,
                   out_dir: str = "eval_out", plots: bool = True) -> dict[str, Any]:
  """``medusa-jax eval``: MT-bench over an adapter; writes ``out_dir/eval.json`` (+ plots).

  Args:
    opts: what to measure.
    heads: the adapter directory (None: the bundled SmolLM2 heads); its
      ``medusa_choices.json`` gives the trees.
    model_dir: the base model (None: the fetched SmolLM2).
    mtbench: ``question.jsonl`` (None: the fetched package).
    questions: pre-tokenised questions (from :func:`write_questions`) instead of ``mtbench``.
    out_dir: the report directory.
    plots: also write the figures.

  Returns:
    The report.
  """
  model_dir, mtbench = _sources(model_dir, mtbench, need_mtbench=questions is None)
  if questions:
    with open(questions, encoding="utf-8") as f:
      prepared = json.load(f)
  else:
    prepared = prepare_questions(mtbench, *load_tokenizer(model_dir))
  heads = heads or SMOLLM2_HEADS
  choices = read_choices(os.path.join(heads, CHOICES_NAME))
  engine = Engine.load(model_dir, heads, max_cache_len=2048)
  choices = [c for c in choices if len(c) <= engine.num_heads]
  report = run_eval(engine, prepared, choices, opts)
  report["heads"] = os.path.abspath(heads)
  with _atomic.writing(out_dir):
    os.makedirs(out_dir, exist_ok=True)
  # A report directory: each run replaces its files (each one atomically).
  _atomic.write_json(os.path.join(out_dir, "eval.json"), report, indent=1, overwrite=True)
  if plots:
    plot(report, out_dir)
  return report


def write_questions(path: str, *, model_dir: str | None = None, mtbench: str | None = None
                    ) -> None:
  """Writes MT-bench's questions, tokenised for the base model, to ``path`` (JSON)."""
  model_dir, mtbench = _sources(model_dir, mtbench, need_mtbench=True)
  _atomic.write_json(path, prepare_questions(mtbench, *load_tokenizer(model_dir)),
                     indent=None, overwrite=True)


def save_figure(fig, path: str, **kwargs) -> str:
  """``fig.savefig`` as PNG through a temporary sibling (atomic; replaces ``path``)."""
  def fill(tmp: str) -> None:
    with open(tmp, "xb") as f:
      fig.savefig(f, format="png", **kwargs)
  return _atomic.write_file(path, fill, overwrite=True)


def _sources(model_dir, mtbench, *, need_mtbench: bool) -> tuple[str, str | None]:
  """The base model and MT-bench paths, fetching the packages for what is not given."""
  if model_dir is None or (mtbench is None and need_mtbench):
    paths = assets.fetch()
    model_dir, mtbench = model_dir or paths.model_dir, mtbench or paths.mtbench_jsonl
  return model_dir, mtbench
