"""Which Hugging Face decoder configs run here, field by field (an allow-list).

A ``config.json`` runs only if its ``model_type`` is one of :class:`Family` and
every field it holds is known: either implemented (it changes the math and
:class:`~medusa_jax.models.llama.Llama` computes it), inert at inference
(``initializer_range``, ``use_cache``, dropouts, legacy generation defaults), or
accepted only at its neutral value (``is_encoder_decoder=false``). Anything
else -- an unknown ``model_type``, an unknown field, a RoPE type or attention
variant that is not implemented -- raises :class:`UnsupportedModelError` naming
the field and its value, so a model is never run with different math.

Families and what they add to the shared Llama decoder (pre-norm, RMSNorm,
rotate-half RoPE, SiLU-gated MLP, GQA):

* ``llama`` (Llama 1/2/3/3.1, Vicuna, SmolLM2, ...): ``attention_bias`` (q/k/v
  and o biases), ``mlp_bias``, ``rope_scaling`` of type linear/dynamic/llama3.
* ``mistral`` (Mistral, Zephyr): ``sliding_window`` attention in every layer.
* ``qwen2``: q/k/v biases always; ``use_sliding_window`` with
  ``max_window_layers`` (or an explicit ``layer_types``).

Missing fields take transformers' defaults for the family (``FAMILY_DEFAULTS``),
so a config means here what it means to ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping

from medusa_jax.errors import UnsupportedModelError


class Family(enum.Enum):
  """A supported ``model_type``."""
  LLAMA = "llama"
  MISTRAL = "mistral"
  QWEN2 = "qwen2"

  @property
  def architecture(self) -> str:
    """The ``architectures`` entry of its causal-LM class."""
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[self.value]


class LayerType(enum.Enum):
  """Attention of one layer (Hugging Face ``layer_types``)."""
  FULL = "full_attention"
  SLIDING = "sliding_attention"


# transformers' defaults of the fields a config.json may leave out (5.x config classes).
FAMILY_DEFAULTS: dict[Family, dict[str, Any]] = {
    Family.LLAMA: dict(hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                       mlp_bias=False, bos_token_id=1, eos_token_id=2),
    Family.MISTRAL: dict(hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096,
                         bos_token_id=1, eos_token_id=2),
    Family.QWEN2: dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
                       sliding_window=4096, max_window_layers=28),
}

# Fields every family implements (read by LlamaConfig.from_hf).
_SHAPE_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id"})

IMPLEMENTED: dict[Family, frozenset[str]] = {
    Family.LLAMA: _SHAPE_FIELDS | {"attention_bias", "mlp_bias"},
    Family.MISTRAL: _SHAPE_FIELDS | {"sliding_window"},
    Family.QWEN2: _SHAPE_FIELDS | {"use_sliding_window", "sliding_window", "max_window_layers",
                                   "layer_types"},
}
"""Per family, the fields that change the math and are implemented."""

INERT = frozenset({
    # bookkeeping
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path",
    "torch_dtype", "dtype", "use_cache", "initializer_range", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "chunk_size_feed_forward", "id2label", "label2id", "num_labels",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "max_sequence_length",
    # training only: no effect in eval mode
    "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
    # tensor-parallel matmul split at pre-training; the same function (transformers 5 ignores it)
    "pretraining_tp",
    # legacy generation defaults (generation_config.json is what generation reads)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
"""Fields that do not change inference math."""

NEUTRAL: dict[str, Any] = {
    "is_encoder_decoder": False, "is_decoder": None, "add_cross_attention": False,
    "tie_encoder_decoder": False, "cross_attention_hidden_size": None, "pruned_heads": None,
}
"""Fields accepted only at this value (None: also empty or false)."""

_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "low_freq_factor",
                        "high_freq_factor", "original_max_position_embeddings"})
_ROPE_NEUTRAL = {"partial_rotary_factor": 1.0, "attention_factor": 1.0}


def family_of(d: Mapping[str, Any], where: str) -> Family:
  """The :class:`Family` of a parsed ``config.json``.

  ``model_type`` decides; without one, a single known ``architectures`` entry.

  Raises:
    UnsupportedModelError: unknown, missing or contradicting model type.
  """
  known = ", ".join(f.value for f in Family)
  mt = d.get("model_type")
  archs = d.get("architectures") or []
  if not isinstance(archs, list):
    archs = [archs]
  by_arch = {f.architecture: f for f in Family}
  if mt is None:
    found = {by_arch[a] for a in archs if a in by_arch}
    if len(found) != 1 or len(archs) != 1:
      raise UnsupportedModelError(f"{where}: missing model_type (architectures={archs!r});"
                                  f" expected one of {known}")
    return found.pop()
  try:
    family = Family(mt)
  except ValueError:
    raise UnsupportedModelError(f"{where}: model_type={mt!r} is not supported; expected one of"
                                f" {known}") from None
  for a in archs:
    if a != family.architecture:
      raise UnsupportedModelError(
          f"{where}: architectures={archs!r}; expected [{family.architecture!r}] for"
          f" model_type={mt!r} (a causal-LM head: other heads compute something else)")
  return family


def check_fields(d: Mapping[str, Any], family: Family, where: str) -> None:
  """Refuses every field of ``d`` that is not implemented, inert or neutral.

  Raises:
    UnsupportedModelError: naming the first such field and its value.
  """
  for key, value in d.items():
    if key in IMPLEMENTED[family] or key in INERT:
      continue
    if key in NEUTRAL:
      neutral = NEUTRAL[key]
      if value == neutral or (neutral is None and not value):
        continue
      raise UnsupportedModelError(f"{where}: {key}={value!r} is not supported; expected"
                                  f" {neutral!r}" + (" (or empty)" if neutral is None else ""))
    if key == "quantization_config":
      raise UnsupportedModelError(f"{where}: quantization_config={_short(value)} is not"
                                  " supported; expected unquantised float weights")
    if key == "auto_map":
      raise UnsupportedModelError(f"{where}: auto_map={_short(value)}: custom modelling code"
                                  " is not supported")
    raise UnsupportedModelError(
        f"{where}: field {key}={_short(value)} is not known for model_type={family.value!r};"
        " refused rather than guessing whether it changes the math (the supported fields are"
        " listed in docs/guide_bring_your_own.md)")


def check_rope(spec: Mapping[str, Any], where: str) -> None:
  """Refuses RoPE parameters that are not implemented (partial rotary, attention factor ...).

  Raises:
    UnsupportedModelError: naming the field and its value.
  """
  for key, value in spec.items():
    if key in _ROPE_KEYS:
      continue
    if key in _ROPE_NEUTRAL:
      if value is None or value == _ROPE_NEUTRAL[key]:
        continue
      raise UnsupportedModelError(f"{where}: {key}={value!r} is not supported; expected"
                                  f" {_ROPE_NEUTRAL[key]!r}")
    raise UnsupportedModelError(f"{where}: field {key}={_short(value)} is not supported")


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."
