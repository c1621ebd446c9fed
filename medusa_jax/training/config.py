"""TrainConfig: one frozen dataclass for a head-training run, read from JSON.

A config file (``configs/*.json``) holds a flat JSON object whose keys are
the fields below; unknown keys are an error, so a typo cannot pass silently.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax.numpy as jnp

from medusa_jax.errors import ConfigError
from medusa_jax.options import Option
from medusa_jax._validate import read_json_object, require_ints


class HeadKind(Option):
  """Head architecture: V2 shares the base lm_head (LoRAX V2); V1 owns one per head."""
  __option__ = "head_kind"
  __error__ = ConfigError
  V2 = "v2"
  V1 = "v1"


class ComputeDType(Option):
  """Dtype of the heads' and lm_head's matmul operands (accumulation is f32)."""
  __option__ = "compute_dtype"
  __error__ = ConfigError
  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"

  @property
  def jnp_dtype(self):
    return jnp.bfloat16 if self is ComputeDType.BFLOAT16 else jnp.float32


class LossKind(Option):
  """Head loss: CE on the greedy token, or KL from the base model's top-K distribution."""
  __option__ = "loss"
  __error__ = ConfigError
  CE = "ce"
  KL = "kl"


class PromptTurns(Option):
  """Which ShareGPT user turns become prompts: the first, or all (with their context)."""
  __option__ = "prompt_turns"
  __error__ = ConfigError
  FIRST = "first"
  ALL = "all"


DATA_FIELDS = frozenset({
    "base_model_name_or_path", "num_heads", "num_prompts", "prompt_turns", "val_fraction",
    "max_prompt_tokens", "max_new_tokens", "gen_batch_size", "hidden_batch_size",
    "length_bucket", "seq_bucket", "teacher_topk"})
"""Fields that shape the self-distilled data and token rows. Variants trained on one
run's rows (``sweep.run_variants``) may change every other field, not these."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
  """A Medusa head-training run.

  Attributes:
    name: run name (work-directory and adapter name).
    base_model_name_or_path: written into the adapter's config.json.
    num_heads: n, Medusa heads (head k predicts token t+k+2).
    num_layers: ResBlocks per head (V2 needs 1).
    head_kind: "v2" (default, fused, shared lm_head) or "v1".
    num_prompts: ShareGPT prompts (user turns) to self-distil.
    prompt_turns: "first" (each conversation's first user turn) or "all"
      (every user turn, with the conversation before it as context:
      ``data.user_turn_prompts``).
    val_fraction: fraction of conversations held out for validation.
    max_prompt_tokens: longer chat prompts are dropped.
    max_new_tokens: answer length limit in self-distillation.
    gen_batch_size: prompts per batched greedy generation call.
    hidden_batch_size: sequences per hidden-state forward.
    length_bucket: prompt lengths in generation are padded to a multiple of
      this (larger = fewer compiles, more padding).
    seq_bucket: the same for whole sequences in the hidden-state forward.
    batch_rows: token rows (positions) per optimiser step; must divide by the
      number of devices (data parallel).
    steps: optimiser steps.
    learning_rate: peak AdamW learning rate.
    warmup_steps: linear warm-up steps before cosine decay to ``end_lr_ratio``.
    end_lr_ratio: final learning rate as a fraction of the peak.
    weight_decay: AdamW weight decay.
    grad_clip: global-norm gradient clip (0 = off).
    loss_decay: head k's loss weighs ``loss_decay**k``.
    loss: "ce" (cross-entropy on the greedy token) or "kl" (Medusa-2
      self-distillation: KL from the base model's top-``teacher_topk``
      next-token distribution).
    teacher_topk: K, teacher ids and log-probs stored per head and row
      (``kl`` only; ``ce`` stores none).
    compute_dtype: "float32" or "bfloat16" matmul operands.
    eval_every: steps between validation passes (and JSONL records).
    log_every: steps between training-loss records.
    checkpoint_every: steps between orbax checkpoints.
    max_to_keep: checkpoints kept.
    eval_max_rows: validation rows used per pass (0 = all).
    max_rank: ranks counted for rank-exact accuracies (tree construction).
    tree_nodes: nodes (without the root) of the shipped medusa_choices tree.
    seed: initialisation and data-order seed.
  """
  name: str = "smollm2-135m-instruct"
  base_model_name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
  num_heads: int = 4
  num_layers: int = 1
  head_kind: HeadKind = HeadKind.V2
  num_prompts: int = 4000
  prompt_turns: PromptTurns = PromptTurns.FIRST
  val_fraction: float = 0.05
  max_prompt_tokens: int = 256
  max_new_tokens: int = 256
  gen_batch_size: int = 256
  hidden_batch_size: int = 64
  length_bucket: int = 64
  seq_bucket: int = 64
  batch_rows: int = 2048
  steps: int = 3000
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  end_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  loss_decay: float = 0.8
  loss: LossKind = LossKind.CE
  teacher_topk: int = 32
  compute_dtype: ComputeDType = ComputeDType.FLOAT32
  eval_every: int = 500
  log_every: int = 50
  checkpoint_every: int = 500
  max_to_keep: int = 2
  eval_max_rows: int = 0
  max_rank: int = 10
  tree_nodes: int = 63
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "head_kind", HeadKind.parse(self.head_kind))
    object.__setattr__(self, "compute_dtype", ComputeDType.parse(self.compute_dtype))
    object.__setattr__(self, "loss", LossKind.parse(self.loss))
    object.__setattr__(self, "prompt_turns", PromptTurns.parse(self.prompt_turns))
    require_ints(self, ("num_heads", "num_layers", "num_prompts", "max_prompt_tokens",
                        "max_new_tokens", "gen_batch_size", "hidden_batch_size", "length_bucket",
                        "seq_bucket", "batch_rows", "steps", "eval_every", "log_every",
                        "checkpoint_every", "max_to_keep", "max_rank", "tree_nodes", "teacher_topk"),
                 minimum=1)
    require_ints(self, ("warmup_steps", "eval_max_rows", "seed"), minimum=0)
    if self.warmup_steps >= self.steps:
      raise ConfigError(f"warmup_steps={self.warmup_steps}: expected fewer than"
                        f" steps={self.steps}")
    if not 0.0 <= self.val_fraction < 1.0:
      raise ConfigError(f"val_fraction: expected a value in [0, 1), got {self.val_fraction!r}")
    for name in ("learning_rate", "loss_decay"):
      if not getattr(self, name) > 0.0:
        raise ConfigError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
    for name in ("end_lr_ratio", "weight_decay", "grad_clip"):
      if not getattr(self, name) >= 0.0:
        raise ConfigError(f"{name}: expected a non-negative number, got {getattr(self, name)!r}")
    if self.head_kind is HeadKind.V2 and self.num_layers != 1:
      raise ConfigError(f"num_layers={self.num_layers}: head_kind v2 needs exactly 1")

  @classmethod
  def load(cls, raw: Mapping[str, Any], *, source: str | None = None) -> "TrainConfig":
    """Builds a config from a JSON object; unknown keys raise ConfigError."""
    where = f" in {source}" if source else ""
    if not isinstance(raw, Mapping):
      raise ConfigError(f"training config{where}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
      raise ConfigError(f"training config{where}: unknown keys {unknown}; expected keys"
                        f" among {sorted(names)}")
    return cls(**dict(raw))

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
    """Reads a JSON config file."""
    path = os.fspath(path)
    return cls.load(read_json_object(path, what="training config file"), source=path)

  def with_overrides(self, overrides: Mapping[str, Any], *, source: str | None = None
                     ) -> "TrainConfig":
    """This config with some fields replaced, validated like a file (unknown keys raise)."""
    where = f" in {source}" if source else ""
    if not isinstance(overrides, Mapping):
      raise ConfigError(f"training config overrides{where}: expected a mapping")
    return type(self).load({**self.to_dict(), **overrides}, source=source)

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["head_kind"] = self.head_kind.value
    d["compute_dtype"] = self.compute_dtype.value
    d["loss"] = self.loss.value
    d["prompt_turns"] = self.prompt_turns.value
    return d
