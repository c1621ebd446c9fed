"""Generation requests: the sampling parameters, and the one validator.

Every request option is checked here, on the host, before any device work;
the engine, the text layer (``text.py``) and the command line all go
through it, so an option has one check and one message wherever it comes
from. Messages name the field, or the request (``request 3: token 1 = 8``),
and say what was expected.

* :class:`SamplingParams`: the options of one call (frozen, validated on
  construction): speculation mode, temperature, top-p, typical acceptance,
  token budget, seed, tree. Temperature, top-p and the budget take one value
  or one per prompt.
* :func:`validate`: a batch of prompts under a :class:`SamplingParams`,
  checked against what the engine serves (:class:`RequestContext`), giving a
  :class:`Batch` of :class:`Request` rows (or per-request errors) and the
  step config, whose tree :func:`choose_tree` picks.

Speculation policy, chosen once per call (never per step, so it never
oscillates):

* ``tree`` (the adaptive policy): the tree comes from ``tree_for_batch`` --
  large at batch 1, smaller as the batch grows, at least LoRAX's chain -- so
  large batches still speculate. The speculation max-batch guard does not
  apply.
  With a measured policy (``Engine.use_policy``) the tree is instead the one
  with the most expected tokens per second at this batch size on this
  device, or none (plain decoding, ``speculation_skipped``).
* ``chain`` (LoRAX's scheme: argmax per head, prefix match, one bonus token):
  LoRAX's guard is honoured. LoRAX's V2 heads skip drafting when the rows
  entering the LM head, ``B * (n + 1)`` in a verifying step, exceed the
  speculation max batch size (32, or ``LORAX_SPECULATION_MAX_BATCH_SIZE``);
  there it alternates between drafting and plain steps. Here the same test
  is made once per call: if ``B * (n + 1)`` exceeds the limit, the whole call
  decodes plainly and ``speculation_skipped`` says so. ``adaptive=True``
  lifts the guard.
* ``none``: plain decoding, one token per step.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real
from typing import Any, Mapping, Sequence

import numpy as np

from medusa_jax.decoding import tree as tree_mod
from medusa_jax.decoding.state import StepConfig
from medusa_jax.decoding.strategies import Greedy, Sampling, Strategy, Typical
from medusa_jax.errors import RequestError
from medusa_jax.models import chat as chat_mod
from medusa_jax.options import Option


class Speculate(Option):
  """How drafts are made and verified."""
  __error__ = RequestError
  NONE = "none"
  CHAIN = "chain"
  TREE = "tree"


class OnError(Option):
  """What a call does with a bad request."""
  __option__ = "on_error"
  __error__ = RequestError
  RAISE = "raise"
  SKIP = "skip"


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
  """The options of one generation call, validated on construction.

  Attributes:
    speculate: "none", "chain" (LoRAX) or "tree" (Medusa); parsed to
      :class:`Speculate`.
    temperature: 0 = greedy; > 0 samples (lossless: each emitted token is a
      sample of the warped target distribution). One value, or one per
      prompt: the values are traced per row, so changing them never
      recompiles and greedy and sampled rows share a batch.
    top_p: nucleus mass in (0, 1]; one value or one per prompt.
    typical: Medusa's typical acceptance instead of exact sampling (for the
      rows at temperature > 0).
    max_new_tokens: the token budget (>= 1); one, or one per prompt (a bad
      per-prompt budget fails its request alone).
    seed: PRNG seed.
    tree: for "tree": Medusa choices (a list of paths) or ``TreeBuffers``;
      None = the adaptive policy (``tree_for_batch``).
    adaptive: lift LoRAX's guard for "chain" (None: False).
  """

  speculate: Speculate = Speculate.NONE
  temperature: float | tuple[float, ...] = 0.0
  top_p: float | tuple[float, ...] = 1.0
  typical: bool = False
  max_new_tokens: int | tuple[int, ...] = 64
  seed: int = 0
  tree: tree_mod.TreeBuffers | None = None
  adaptive: bool | None = None

  def __post_init__(self):
    put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    put("speculate", Speculate.parse(self.speculate))
    put("temperature", _each(self.temperature, _check_temperature))
    put("top_p", _each(self.top_p, _check_top_p))
    if not isinstance(self.typical, bool):
      raise RequestError(f"typical={self.typical!r}: expected a bool")
    budget = self.max_new_tokens
    if _is_sequence(budget):
      put("max_new_tokens", tuple(budget))  # checked per request by validate()
    else:
      put("max_new_tokens", check_budget(budget))
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise RequestError(f"seed={self.seed!r}: expected an integer")
    put("seed", int(self.seed))
    if self.tree is not None and not isinstance(self.tree, tree_mod.TreeBuffers):
      put("tree", tree_mod.build_tree(self.tree))
    if self.adaptive is not None and not isinstance(self.adaptive, bool):
      raise RequestError(f"adaptive={self.adaptive!r}: expected a bool or None")

  @classmethod
  def make(cls, params: "SamplingParams | None" = None, **options) -> "SamplingParams":
    """``params`` (default: the defaults) with ``options`` replacing its fields.

    Raises:
      RequestError: an unknown option, or a bad value.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
      if key not in names:
        raise RequestError(f"{key}: unknown option; expected one of {', '.join(names)}")
    if params is None:
      return cls(**options)
    if not isinstance(params, cls):
      raise RequestError(f"params: expected SamplingParams, got {type(params).__name__}")
    return dataclasses.replace(params, **options) if options else params

  def per_prompt(self, name: str, count: int) -> list:
    """The values of ``name`` (temperature, top_p, max_new_tokens) for ``count`` prompts."""
    value = getattr(self, name)
    if not isinstance(value, tuple):
      return [value] * count
    if len(value) != count:
      what = "budget" if name == "max_new_tokens" else "value"
      raise RequestError(f"{name}: expected one {what} per prompt ({count}), got {len(value)}")
    return list(value)

  @property
  def strategy(self) -> Strategy:
    """The static rule of the call: Greedy when every temperature is 0."""
    temps = self.temperature if isinstance(self.temperature, tuple) else (self.temperature,)
    if all(t == 0 for t in temps):
      return Greedy()
    return Typical() if self.typical else Sampling()


def check_budget(value, where: str = "") -> int:
  """``value`` as a token budget (an integer >= 1), else RequestError naming ``where``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise RequestError(f"{where}max_new_tokens={value!r}; expected an integer >= 1")
  return int(value)


def _check_temperature(value) -> float:
  if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
    raise RequestError(f"temperature={value!r}: expected a finite number")
  if value < 0:
    raise RequestError(f"temperature={value!r}: expected >= 0 (0 = greedy)")
  return float(value)


def _check_top_p(value) -> float:
  if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
    raise RequestError(f"top_p={value!r}: expected a finite number")
  if not 0 < value <= 1:
    raise RequestError(f"top_p={value!r}: expected 0 < top_p <= 1")
  return float(value)


def _is_sequence(value) -> bool:
  return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def _each(value, check):
  """``check(value)``, or a tuple of ``check(v)`` for a per-prompt sequence."""
  if _is_sequence(value):
    return tuple(check(v) for v in value)
  return check(value)


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RequestContext:
  """What an engine serves, as the validator needs it.

  Attributes:
    vocab_size: V; token ids must lie in [0, V).
    max_cache_len: prompt + budget + tree nodes must fit it.
    num_heads: n Medusa heads, or None (plain decoding only).
    max_batch_size: LoRAX's speculation guard for "chain" (resolved).
    max_tree_rows: B * T budget of the adaptive tree.
    tree_choices: best-first paths (or a tree name) the adaptive tree is cut
      from; None: ``mc_sim_7b_63``.
    eos_ids: ids that end a request.
    adapter_slots: adapter id -> weight slot, for an engine with several
      adapters; None: one adapter (id 0).
    tokenizer: ``encode(str) -> ids``, or None (token-id prompts only).
    chat_template: a ``ChatTemplate`` for chat prompts; None: the model has
      none, and a chat prompt fails (saying how to pass one).
    tree_policy: for ``tree`` without a given tree, a measured choice
      ``batch -> TreeBuffers | None`` (``decoding.policy.SpeculationPolicy.tree_for``)
      replacing the row budget; None (plain) sets ``speculation_skipped``.
  """
  vocab_size: int
  max_cache_len: int
  num_heads: int | None
  max_batch_size: int
  max_tree_rows: int
  tree_choices: Any = None
  eos_ids: tuple[int, ...] = ()
  adapter_slots: Mapping[int, int] | None = None
  tokenizer: Any = None
  chat_template: Any = None
  tree_policy: Any = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Request:
  """One valid request, as the engine lays it into a batch row.

  Attributes:
    index: its position in the call.
    prompt: [P] token ids (P >= 1).
    max_new_tokens: its budget (>= 1).
    temperature: >= 0 (0 = greedy).
    top_p: in (0, 1].
    adapter_slot: weight slot of its adapter (0 for one-adapter engines).
  """
  index: int
  prompt: tuple[int, ...]
  max_new_tokens: int
  temperature: float
  top_p: float
  adapter_slot: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
  """A validated call.

  Attributes:
    params: its :class:`SamplingParams`.
    requests: per prompt, the :class:`Request`, or None where it failed.
    errors: per prompt, its RequestError, or None.
    config: the step config (tree, strategy, EOS ids) of the call.
    speculation_skipped: True when LoRAX's chain guard (or, for "tree", the
      measured policy) turned speculation off.
  """
  params: SamplingParams
  requests: tuple[Request | None, ...]
  errors: tuple[RequestError | None, ...]
  config: StepConfig
  speculation_skipped: bool

  @property
  def valid(self) -> list[Request]:
    """The requests that run, in order."""
    return [r for r in self.requests if r is not None]


def validate(prompts, params: SamplingParams, ctx: RequestContext, *,
             adapters: Sequence[int] | None = None, chat: bool = False,
             on_error: str | OnError = OnError.RAISE) -> Batch:
  """Checks a call on the host, before any device work.

  Args:
    prompts: token-id lists, or strings (tokenised; with ``chat=True`` each
      string is a user turn in the chat template).
    params: the call's options.
    ctx: what the engine serves.
    adapters: one adapter id per prompt (engines with several adapters);
      None: the default adapter (0) for every prompt.
    chat: apply the chat template to string prompts.
    on_error: "raise": the first bad request raises; "skip": bad requests
      get an error entry and the others run.

  Returns:
    The :class:`Batch`.

  Raises:
    RequestError: a bad call-level option (prompts not a list, per-prompt
      lists of the wrong length, an unknown adapter, speculation without
      heads, a tree that does not fit the heads or the vocabulary, a seed
      outside int64), or, with ``on_error="raise"``, the first bad request;
      any exception raised while preparing one request (the tokenizer's
      included) becomes that request's RequestError.
  """
  on_error = OnError.parse(on_error)
  if not isinstance(chat, bool):
    raise RequestError(f"chat={chat!r}: expected a bool")
  if not -2**63 <= params.seed < 2**63:  # what jax.random.PRNGKey takes
    raise RequestError(f"seed={params.seed!r}: expected an integer in [-2**63, 2**63)")
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
    raise RequestError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
  count = len(prompts)
  temps = params.per_prompt("temperature", count)
  top_ps = params.per_prompt("top_p", count)
  slots = _slots(adapters, count, ctx.adapter_slots)
  if params.speculate is not Speculate.NONE and ctx.num_heads is None:
    raise RequestError(f"speculate={params.speculate.value!r}: this engine has no Medusa heads")
  budgets = params.per_prompt("max_new_tokens", count)

  requests: list[Request | None] = [None] * count
  errors: list[RequestError | None] = [None] * count
  for i, prompt in enumerate(prompts):
    try:
      requests[i] = Request(index=i, prompt=encode_prompt(prompt, ctx, chat=chat, index=i),
                            max_new_tokens=check_budget(budgets[i], f"request {i}: "),
                            temperature=temps[i], top_p=top_ps[i], adapter_slot=slots[i])
    except RequestError as e:
      errors[i] = e
    except Exception as e:  # noqa: BLE001 - e.g. the tokenizer's TypeError on a lone surrogate
      # Whatever preparing one request raises fails that request alone.
      errors[i] = RequestError(f"request {i}: cannot prepare the prompt ({type(e).__name__}:"
                               f" {str(e)[:300]})")
      errors[i].__cause__ = e
  valid = [r for r in requests if r is not None]
  tree, skipped = choose_tree(params, ctx, max(len(valid), 1))
  if tree is not None and tree.depth == 0:
    tree = None  # a root-only tree (tree=[]) speculates nothing: plain decoding
  config = StepConfig(tree=tree, strategy=params.strategy, eos_ids=tuple(ctx.eos_ids))
  for r in valid:
    need = len(r.prompt) + r.max_new_tokens + config.num_nodes
    if need > ctx.max_cache_len:
      errors[r.index] = RequestError(
          f"request {r.index}: prompt ({len(r.prompt)} tokens) + max_new_tokens"
          f" ({r.max_new_tokens}) + tree nodes ({config.num_nodes}) = {need} exceeds"
          f" max_cache_len ({ctx.max_cache_len})")
      requests[r.index] = None
  if on_error is OnError.RAISE:
    first = next((e for e in errors if e is not None), None)
    if first is not None:
      raise first
  return Batch(params=params, requests=tuple(requests), errors=tuple(errors), config=config,
               speculation_skipped=skipped)


def choose_tree(params: SamplingParams, ctx: RequestContext, batch: int
                ) -> tuple[tree_mod.TreeBuffers | None, bool]:
  """(the call's tree or None, speculation_skipped) for ``batch`` valid requests.

  See the module docstring for the policy.

  Raises:
    RequestError: a given tree deeper than the heads, or using more ranks
      than the vocabulary has.
  """
  mode, n = params.speculate, ctx.num_heads
  if mode is Speculate.NONE:
    return None, False
  if n is None:
    raise RequestError(f"speculate={mode.value!r}: this engine has no Medusa heads")
  if mode is Speculate.CHAIN:
    if not params.adaptive and batch * (n + 1) > ctx.max_batch_size:
      return None, True
    return tree_mod.build_tree(tree_mod.chain_choices(n)), False
  if params.tree is None:
    if ctx.tree_policy is not None:
      tree = ctx.tree_policy(batch)  # the measured choice; None: plain pays best
      return tree, tree is None
    return tree_mod.tree_for_batch(batch, n, max_tree_rows=ctx.max_tree_rows,
                                   choices=ctx.tree_choices), False
  tree = params.tree
  if tree.depth > n:
    raise RequestError(f"tree: depth {tree.depth} exceeds the {n} Medusa heads")
  if tree.max_rank + 1 > ctx.vocab_size:
    raise RequestError(f"tree: uses top-{tree.max_rank + 1} ranks; expected at most the"
                       f" vocabulary size ({ctx.vocab_size})")
  return tree, False


def encode_prompt(prompt, ctx: RequestContext, *, chat: bool = False, index: int | None = 0
                  ) -> tuple[int, ...]:
  """A prompt's token ids -- exactly the ids the engine feeds -- checked against the vocabulary.

  A raw string gets what transformers' ``tokenizer(text)`` gives (BOS when the
  tokenizer adds it); a chat prompt what :func:`chat_prompt` gives.

  Args:
    prompt: token ids, or a string (with ``chat``: one user turn in the chat
      template), or with ``chat`` a list of ``{"role", "content"}`` messages.
    ctx: the engine's tokenizer, template and vocabulary size.
    chat: apply the chat template to a string.
    index: the request's position, named in errors (None: a lone request,
      errors name the prompt).

  Raises:
    RequestError: a string without a tokenizer, an empty prompt, an id that is
      not an integer in [0, V).
  """
  where = "prompt: " if index is None else f"request {index}: "
  is_messages = chat and isinstance(prompt, Sequence) and bool(prompt) and all(
      isinstance(m, Mapping) for m in prompt)
  if isinstance(prompt, str) or is_messages:
    if ctx.tokenizer is None:
      raise RequestError(f"{where}a string prompt needs a tokenizer; pass token ids")
    try:
      ids = chat_prompt(prompt, ctx) if chat else chat_mod.text_ids(ctx.tokenizer, prompt)
    except RequestError as e:
      raise RequestError(f"{where}{e}") from None
  else:
    ids = prompt
  if isinstance(ids, np.ndarray):
    ids = ids.tolist()
  if not isinstance(ids, Sequence) or isinstance(ids, bytes):
    raise RequestError(f"{where}expected a list of token ids or a string, got"
                       f" {type(prompt).__name__}")
  if len(ids) == 0:
    raise RequestError(f"{where}empty prompt; expected at least one token")
  vocab = ctx.vocab_size
  for j, t in enumerate(ids):
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
      raise RequestError(f"{where}token {j} = {t!r}; expected an integer id in [0, {vocab})")
  return tuple(int(t) for t in ids)


def chat_prompt(messages: str | Sequence[Mapping[str, str]], ctx: RequestContext) -> list[int]:
  """Token ids of a conversation in the chat template, ready for the answer.

  The one prompt code of generation, training and evaluation
  (:func:`medusa_jax.models.chat.chat_ids`): the template rendered with the
  tokenizer's special tokens, encoded as transformers'
  ``apply_chat_template`` encodes it, BOS first when the tokenizer adds it.

  Args:
    messages: one user message, or ``[{"role": ..., "content": ...}, ...]``.
    ctx: the engine's tokenizer and chat template.

  Raises:
    RequestError: no tokenizer, no chat template, a bad message.
  """
  return chat_mod.chat_ids(ctx.tokenizer, ctx.chat_template, messages)


def _slots(adapters, count: int, known: Mapping[int, int] | None) -> list[int]:
  """Weight slot per prompt from its adapter id (all 0 without ``adapters``)."""
  if adapters is None:
    return [0] * count
  if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or (
      len(adapters) != count):
    raise RequestError(f"adapters: expected one adapter id per prompt ({count}), got"
                       f" {adapters!r}")
  known = known or {0: 0}
  out = []
  for i, a in enumerate(adapters):
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or int(a) not in known:
      raise RequestError(f"request {i}: adapter {a!r}; expected one of {sorted(known)}")
    out.append(known[int(a)])
  return out
