"""Loading what an engine runs: base model, tokenizer, chat template, heads, tree choices.

:func:`load_model` is what ``Engine.load`` does before building the engine:
it reads a Hugging Face Llama directory (or the cached SmolLM2-135M-Instruct),
its tokenizer and chat template when present, and the Medusa heads (an
adapter directory, the bundled SmolLM2 heads, or freshly initialised V2 heads
with a notice), plus the adapter's ``medusa_choices.json`` for the adaptive
tree policy.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable

import jax.numpy as jnp

from medusa_jax.adapters.io import adapter_choices
from medusa_jax.assets import cache as assets
from medusa_jax.bundled import SMOLLM2_HEADS
from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
from medusa_jax.config import MedusaConfig
from medusa_jax.errors import ConfigError, MedusaError
from medusa_jax.models.chat import ChatTemplate
from medusa_jax.models.llama_sharding import load_llama_sharded
from medusa_jax.models.llama_weights import load_llama
from medusa_jax.models.tokenizer import Tokenizer

DEFAULT_NUM_HEADS = 4
"""Heads of freshly initialised heads."""

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""The compute dtypes a command line may name."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LoadedModel:
  """What :func:`load_model` read.

  Attributes:
    llama: the base ``Llama`` (on ``mesh`` when one was given).
    tokenizer: the ``Tokenizer`` beside the model, or None.
    chat_template: its ``ChatTemplate``, or None (ChatML).
    medusa: the ``MedusaWeights`` (or whatever heads were passed in).
    tree_choices: the adapter's ``medusa_choices.json`` paths, or None.
    notice: a message about the heads (e.g. freshly initialised), or None.
  """
  llama: Any
  tokenizer: Any
  chat_template: Any
  medusa: Any
  tree_choices: tuple[tuple[int, ...], ...] | None
  notice: str | None


def parse_dtype(dtype) -> Any:
  """A compute dtype from a name ("float32", "bfloat16") or a dtype."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ConfigError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
  return dtype


def load_model(base: str | os.PathLike | None = None, medusa: Any = None, *,
               dtype: Any = jnp.float32, num_heads: int = DEFAULT_NUM_HEADS, seed: int = 0,
               mesh=None, fuse_projections: bool = True,
               notice: Callable[[str], None] | None = None) -> LoadedModel:
  """Loads a base model and heads.

  Args:
    base: a Hugging Face Llama directory; None = the cached
      SmolLM2-135M-Instruct (fetched by ``medusa_jax.assets.cache.fetch``).
    medusa: an adapter directory, a ``MedusaWeights``, or None = the bundled
      SmolLM2 heads when shipped, else freshly initialised V2 heads (with a
      notice: they draft the base model's next token, not later ones). An
      adapter directory's ``medusa_choices.json`` (best-first paths) feeds
      the adaptive tree policy.
    dtype: compute and parameter dtype of the base model and heads (a dtype,
      or "float32" / "bfloat16").
    num_heads: heads of freshly initialised heads.
    seed: their initialisation seed.
    mesh: a ``('data', 'model')`` mesh (``medusa_jax.parallel.mesh.make_mesh``):
      the base model and the heads are read straight onto it, each device
      reading only its block of each tensor.
    fuse_projections: fuse q/k/v and gate/up into one matmul each
      (``Llama.fuse_projections``); on a mesh the Megatron layout keeps them
      apart.
    notice: called with the heads notice (freshly initialised heads); None:
      the notice is a ``UserWarning``.

  Raises:
    ConfigError: an unknown dtype name, or a bad ``medusa_choices.json``.
  """
  dtype = parse_dtype(dtype)
  if base is None:
    base = assets.fetch().model_dir
  if mesh is None:
    llama = load_llama(base, dtype=dtype)
    if fuse_projections:
      llama = llama.fuse_projections()
  else:
    llama = load_llama_sharded(base, mesh, dtype=dtype)
  tokenizer, chat_template = load_tokenizer(base)
  message = choices = None
  loaded_on_mesh = False
  if medusa is None and os.path.exists(os.path.join(SMOLLM2_HEADS, "config.json")):
    medusa = SMOLLM2_HEADS
  if isinstance(medusa, (str, os.PathLike)):
    choices = adapter_choices(medusa)
    medusa = load_medusa_adapter(medusa, dtype=dtype, mesh=mesh)
    loaded_on_mesh = True
  elif medusa is None:
    config = MedusaConfig(base_model_name_or_path=str(base), medusa_num_heads=num_heads,
                          medusa_num_layers=1, version=2.0)
    medusa = MedusaWeights.init(config, llama.cfg.hidden_size, seed=seed, dtype=dtype)
    message = (f"no trained Medusa heads found at {SMOLLM2_HEADS}: using {num_heads} freshly"
               " initialised heads (identity ResBlocks), so drafts are rarely accepted and"
               " speculation shows its overhead, not its speed-up")
    if notice is None:
      warnings.warn(message, stacklevel=3)
    else:
      notice(message)
  if mesh is not None and not loaded_on_mesh and hasattr(medusa, "shard"):
    medusa = medusa.shard(mesh)
  return LoadedModel(llama=llama, tokenizer=tokenizer, chat_template=chat_template,
                     medusa=medusa, tree_choices=choices, notice=message)


def load_tokenizer(model_dir) -> tuple[Tokenizer | None, ChatTemplate | None]:
  """The tokenizer and chat template beside a model (None for what is missing)."""
  tokenizer = template = None
  try:
    tokenizer = Tokenizer.from_file(model_dir)
  except MedusaError:
    pass
  try:
    template = ChatTemplate.from_file(model_dir)
  except MedusaError:
    pass
  return tokenizer, template
