"""Loading what an engine runs: base model, tokenizer, chat template, heads, tree choices.

:func:`load_model` is what ``Engine.load`` does before building the engine:
it resolves the base model (a directory, a Hugging Face id in the local hub
cache, or the cached SmolLM2-135M-Instruct) and the adapter the same way,
checks everything it can before reading any weight -- the base's
``config.json`` against the supported families, the adapter's hidden size,
vocabulary and dtype against the base (:func:`check_adapter`), its
``base_model_name_or_path`` against the base's name (a warning) -- and then
reads the base model, its tokenizer and chat template, and the Medusa heads
(an adapter directory, the bundled SmolLM2 heads for SmolLM2, or freshly
initialised V2 heads with a notice), plus the adapter's ``medusa_choices.json``
for the adaptive tree policy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import warnings
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from medusa_jax.adapters.files import open_adapter_files, weight_files
from medusa_jax.adapters.io import adapter_choices
from medusa_jax.adapters.layout import (AdapterLayout, block_weight_key, canonical_key,
                                        is_medusa_key)
from medusa_jax.assets import cache as assets
from medusa_jax.bundled import SMOLLM2_HEADS
from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
from medusa_jax.config import MedusaConfig
from medusa_jax.errors import AdapterMismatchError, ConfigError, CorruptWeightsError
from medusa_jax.models import hub
from medusa_jax.models.chat import ChatTemplate, load_chat_templates, resolve_chat_template
from medusa_jax.models.llama_config import LlamaConfig
from medusa_jax.models.llama_sharding import load_llama_sharded
from medusa_jax.models.llama_weights import load_llama
from medusa_jax.models.tokenizer import Tokenizer

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The name of the default base model (what its heads' ``base_model_name_or_path`` says)."""

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

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
    name: the base model's name (its Hugging Face id, ``_name_or_path`` or path).
    eos_ids: the ids that end a generation: the tokenizer's EOS,
      ``generation_config.json``'s and ``config.json``'s ``eos_token_id``.
  """
  llama: Any
  tokenizer: Any
  chat_template: Any
  medusa: Any
  tree_choices: tuple[tuple[int, ...], ...] | None
  notice: str | None
  name: str = ""
  eos_ids: tuple[int, ...] = ()


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
               notice: Callable[[str], None] | None = None,
               chat_template: ChatTemplate | str | os.PathLike | None = None) -> LoadedModel:
  """Loads a base model and heads, after checking that they fit.

  Args:
    base: a Hugging Face Llama/Mistral/Qwen2 directory or id (``org/name``,
      found in the local hub cache, else downloaded when possible); None =
      the cached SmolLM2-135M-Instruct (fetched by
      ``medusa_jax.assets.cache.fetch``).
    medusa: an adapter directory or id, a ``MedusaWeights``, or None = the
      bundled SmolLM2 heads for the default base (or a base of the same
      name), else freshly initialised V2 heads (with a notice: they draft the
      base model's next token, not later ones). An adapter directory's
      ``medusa_choices.json`` (best-first paths) feeds the adaptive tree
      policy.
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
    notice: called with notices (freshly initialised heads, a chosen chat
      format, an adapter trained for another base); None: ``UserWarning``.
    chat_template: override the model's chat template: a built-in name
      (``vicuna_v1.1``, ``chatml``, ``llama3``, ...), one of the model's named
      templates, a ``.jinja`` file, Jinja text or a ``ChatTemplate``.

  Raises:
    ModelNotFoundError: the base or the adapter cannot be found.
    UnsupportedModelError: the base model's config is not supported.
    AdapterMismatchError: the adapter does not fit the base model (raised
      before any weight is read).
    ConfigError: an unknown dtype name or chat template, or a bad
      ``medusa_choices.json``.
  """
  dtype = parse_dtype(dtype)

  def say(message: str) -> None:
    if notice is None:
      warnings.warn(message, stacklevel=3)
    else:
      notice(message)

  if base is None:
    base, name = assets.fetch().model_dir, SMOLLM2_NAME
  else:
    given = os.fspath(base)
    base = hub.resolve(given, what="base model")
    name = given if hub.is_repo_id(given) else model_name(base)
  cfg = LlamaConfig.from_hf(base)  # refuses what is not supported before any weight is read
  if medusa is None and os.path.exists(os.path.join(SMOLLM2_HEADS, "config.json")) and (
      same_model(name, SMOLLM2_NAME)):
    medusa = SMOLLM2_HEADS
  adapter_base = None
  if isinstance(medusa, (str, os.PathLike)):
    medusa = hub.resolve(medusa, what="adapter", allow_patterns=None)
    adapter_base = check_adapter(medusa, cfg, name, warn=say)
  elif isinstance(medusa, MedusaWeights):
    _check_sizes(f"adapter {medusa.config.base_model_name_or_path!r}", medusa.hidden_size,
                 medusa.vocab_size, "", cfg, name)
  tokenizer, template = load_tokenizer(base, chat_template=chat_template,
                                       names=(name, adapter_base), notice=say)

  if mesh is None:
    llama = load_llama(base, dtype=dtype)
    if fuse_projections:
      llama = llama.fuse_projections()
    llama = llama.with_kernel_layout(None)  # the faster layout where it was measured
  else:
    llama = load_llama_sharded(base, mesh, dtype=dtype)
  message = choices = None
  loaded_on_mesh = False
  if isinstance(medusa, (str, os.PathLike)):
    choices = adapter_choices(medusa)
    medusa = load_medusa_adapter(medusa, dtype=dtype, mesh=mesh)
    loaded_on_mesh = True
  elif medusa is None:
    config = MedusaConfig(base_model_name_or_path=name, medusa_num_heads=num_heads,
                          medusa_num_layers=1, version=2.0)
    medusa = MedusaWeights.init(config, llama.cfg.hidden_size, seed=seed, dtype=dtype)
    message = (f"no trained Medusa heads for {name} (the bundled ones at {SMOLLM2_HEADS} are"
               f" SmolLM2's): using {num_heads} freshly initialised heads (identity ResBlocks),"
               " so drafts are rarely accepted and speculation shows its overhead, not its"
               " speed-up; pass an adapter (--adapter) trained for this base")
    say(message)
  if mesh is not None and not loaded_on_mesh and hasattr(medusa, "shard"):
    medusa = medusa.shard(mesh)
  eos = list(tokenizer.eos_ids) if tokenizer is not None else []
  eos += [i for i in cfg.eos_token_ids if i not in eos]
  return LoadedModel(llama=llama, tokenizer=tokenizer, chat_template=template,
                     medusa=medusa, tree_choices=choices, notice=message, name=name,
                     eos_ids=tuple(eos))


def model_name(model_dir: str | os.PathLike) -> str:
  """A model directory's name: its ``config.json`` ``_name_or_path``, else the path.

  A snapshot in the Hugging Face cache is named by its id (``org/name``).
  """
  path = os.path.abspath(os.fspath(model_dir))
  parts = path.split(os.sep)
  if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
    return parts[-3][len("models--"):].replace("--", "/")
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      given = json.load(f).get("_name_or_path")
  except (OSError, ValueError, AttributeError):
    given = None
  return given if isinstance(given, str) and given.strip() else os.fspath(model_dir)


def same_model(a: str | None, b: str | None) -> bool:
  """Whether two model names (ids or paths) name the same model: their last
  component, case-insensitively (``HuggingFaceTB/SmolLM2-135M-Instruct`` is a
  directory ``.../smollm2-135m-instruct``)."""
  if not a or not b:
    return False
  last = lambda s: os.path.basename(os.path.normpath(str(s))).lower()  # noqa: E731
  return last(a) == last(b)


def check_adapter(adapter_dir: str | os.PathLike, cfg: LlamaConfig, base_name: str, *,
                  warn: Callable[[str], None] | None = None) -> str:
  """Checks that an adapter fits its base model, reading only headers.

  Compares the heads' hidden size (``0.0.linear.weight``) and, for V1 heads,
  their vocabulary (``0.{L}.weight``) with the base config, checks that the
  head tensors of safetensors files are floating point, and warns when the
  adapter's ``base_model_name_or_path`` names another model.

  Args:
    adapter_dir: the adapter directory.
    cfg: the base model's config.
    base_name: the base model's name (see :func:`model_name`).
    warn: called with the name warning (None: ``UserWarning``).

  Returns:
    The adapter's ``base_model_name_or_path``.

  Raises:
    AdapterMismatchError: a size or dtype does not fit (one line, naming
      the tensor, both sizes and both models).
    ConfigError, WeightsError: the adapter's config or files are unreadable.
  """
  adapter_dir = os.fspath(adapter_dir)
  config = MedusaConfig.from_pretrained(adapter_dir)
  with open_adapter_files(adapter_dir) as index:
    layout = AdapterLayout.infer(config, index)
    key = block_weight_key(0, 0)
    where = f"{index.file_of(key)}: {key} {list(index.shape(key))}"
  _check_sizes(f"adapter {adapter_dir}", layout.hidden, layout.vocab, where, cfg, base_name,
               trained_for=config.base_model_name_or_path)
  for path in weight_files(adapter_dir):
    if path.endswith(".safetensors"):
      for tensor, dtype in _safetensors_dtypes(path).items():
        if _is_head_key(tensor) and dtype not in _FLOAT_DTYPES:
          raise AdapterMismatchError(
              f"adapter {adapter_dir}: {path}: tensor {tensor} has dtype {dtype}; expected"
              f" floating point ({', '.join(_FLOAT_DTYPES)}) Medusa heads")
  trained_for = config.base_model_name_or_path
  if trained_for and not same_model(trained_for, base_name):
    message = (f"adapter {adapter_dir} was trained for {trained_for!r}"
               f" (base_model_name_or_path), but the base model is {base_name!r}; its drafts"
               " may rarely be accepted (the output is still the base model's)")
    if warn is None:
      warnings.warn(message, stacklevel=2)
    else:
      warn(message)
  return trained_for


def _check_sizes(what: str, hidden: int, vocab: int | None, where: str, cfg: LlamaConfig,
                 base_name: str, trained_for: str | None = None) -> None:
  origin = f" ({where})" if where else ""
  trained = f"; it was trained for {trained_for!r}" if trained_for else ""
  if hidden != cfg.hidden_size:
    raise AdapterMismatchError(
        f"{what}: hidden size {hidden}{origin} does not match the base model {base_name}:"
        f" hidden_size={cfg.hidden_size}{trained}")
  if vocab is not None and vocab != cfg.vocab_size:
    raise AdapterMismatchError(
        f"{what}: per-head vocabulary {vocab} does not match the base model {base_name}:"
        f" vocab_size={cfg.vocab_size}{trained}")


def _is_head_key(name: str) -> bool:
  return is_medusa_key(canonical_key(name)[0])


def _safetensors_dtypes(path: str) -> dict[str, str]:
  """Tensor name -> safetensors dtype ("F32", "BF16", "I8", ...), from the header only."""
  try:
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(size))
  except (OSError, struct.error, ValueError) as e:
    raise CorruptWeightsError(f"{path}: not a readable safetensors file ({e})") from None
  return {k: v.get("dtype", "?") for k, v in header.items()
          if k != "__metadata__" and isinstance(v, dict)}


def load_tokenizer(model_dir, *, chat_template: ChatTemplate | str | os.PathLike | None = None,
                   names: Sequence[str | None] = (),
                   notice: Callable[[str], None] | None = None
                   ) -> tuple[Tokenizer | None, ChatTemplate | None]:
  """The tokenizer and chat template of a model directory (None for what is missing).

  The template is ``chat_template`` when given (resolved among the model's
  named templates and the built-in formats), else the model's default
  (``medusa_jax.models.chat.load_chat_templates``); a model without one whose
  name (or its adapter's ``base_model_name_or_path``, in ``names``) says
  Vicuna gets the ``vicuna_v1.1`` format, with a notice.

  Raises:
    ConfigError: an unknown ``chat_template``, a malformed template file.
  """
  tokenizer = None
  folder = os.fspath(model_dir)
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    tokenizer = Tokenizer.from_file(model_dir)
  elif os.path.isfile(os.path.join(folder, "tokenizer.model")) and notice is not None:
    try:
      Tokenizer.from_file(model_dir)
    except CorruptWeightsError as e:  # says how to write the tokenizer.json
      notice(f"{e}; until then only token-id prompts work")
  available = load_chat_templates(model_dir)
  template = resolve_chat_template(chat_template, available, where=os.fspath(model_dir))
  if template is None and any(n and "vicuna" in str(n).lower() for n in names):
    template = ChatTemplate.builtin("vicuna_v1.1")
    if notice is not None:
      notice(f"{model_dir} has no chat template; using vicuna_v1.1 (FastChat's format of"
             " Vicuna bases); pass --chat-template to choose another")
  return tokenizer, template
