"""The Decoder: the model split once, the steps jitted once, the state donated.

``nnx.split`` runs once, in the constructor; every call passes the parameter
arrays as one flat tuple (flattening an ``nnx.State`` costs Python time on
every call, about 0.3-1 ms for a 30-layer model; a tuple of arrays is
flattened in C++). Each jitted function is an explicit wrapper whose real
signature names its arguments, so ``jax.jit`` resolves ``static_argnames``
and ``donate_argnames`` from it.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.config import STOP_WHEN_DONE, Platform
from medusa_jax.errors import ConfigError
from medusa_jax.decoding import step
from medusa_jax.decoding.state import DecodeState, Graphs, Params, StepConfig
from medusa_jax.models.llama import KVCache


class Decoder:
  """Splits the base model and heads once and holds the jitted steps.

  Example::

    dec = Decoder(llama, medusa_model)
    state, out = dec.prefill(cache, prompt, prompt_lens, max_new, done, key, config=cfg)
    state, out = dec.step(state, config=cfg)         # plain or speculative, by cfg.tree

  ``trace_counts`` counts traces per step kind; a second call with the same
  shapes and config does not grow it (no recompilation).
  """

  def __init__(self, llama, heads=None, *, transpose_lm_head: bool | None = None,
               stop_when_done: bool | None = None):
    """Args:
      llama: the base ``Llama``.
      heads: any heads of the heads protocol (``MedusaModel``, ``MedusaV1``,
        ``MedusaV2``, ``BatchMedusaWeights``, routed per row by the state's
        ``adapter_slot``), or None.
      transpose_lm_head: keep a ``[H, V]`` copy of a tied embedding for the
        LM head (one more embedding in memory; see ``step._lm_head``). None:
        on a CPU only (``Platform.current()``), where it makes a tree step
        markedly cheaper.
      stop_when_done: whether :meth:`steps` leaves its device loop once every
        row is done (``step.multi_step``); None: the platform's
        :data:`~medusa_jax.config.STOP_WHEN_DONE`.
    """
    llama_def, llama_state = nnx.split(llama)
    heads_def, heads_state = (None, None) if heads is None else nnx.split(heads)
    self.cfg = llama.cfg
    self.graphs = Graphs(llama=llama_def, heads=heads_def)
    if transpose_lm_head is None:
      transpose_lm_head = Platform.current() is Platform.CPU
    self.stop_when_done = (STOP_WHEN_DONE[Platform.current()] if stop_when_done is None
                           else bool(stop_when_done))
    lm_head_t = None
    if transpose_lm_head and getattr(llama, "lm_head_kernel", None) is None:
      # A real copy (not a lazy transpose): the layout is the point.
      lm_head_t = jnp.array(llama.embed_tokens[...].astype(llama.dtype).T, copy=True)
    self.params = Params(llama=llama_state, heads=heads_state, lm_head_t=lm_head_t)
    leaves, params_def = jax.tree.flatten(self.params)
    self.param_leaves = tuple(leaves)
    self.num_heads = None if heads is None else heads.num_heads
    self.trace_counts: collections.Counter = collections.Counter()
    graphs, count = self.graphs, self.trace_counts

    def unflat(param_leaves) -> Params:
      return jax.tree.unflatten(params_def, param_leaves)

    # Each wrapper body runs once per trace, never per call: it counts traces.
    def prefill_forward(param_leaves, cache, prompt, prompt_lens):
      count["prefill"] += 1
      return step.prefill_forward(graphs, unflat(param_leaves), cache, prompt, prompt_lens)

    def prefill_start(param_leaves, cache, x, prompt_lens, max_new, done, rng, temperature,
                      top_p, adapter_slot, *, config):
      count["prefill_start"] += 1
      return step.prefill_start(graphs, unflat(param_leaves), cache, x, prompt_lens, max_new,
                                done, rng, temperature, top_p, adapter_slot, config=config)

    def plain_step(param_leaves, state, *, config):
      count["plain"] += 1
      return step.plain_step(graphs, unflat(param_leaves), state, config=config)

    def speculative_step(param_leaves, state, *, config):
      count["speculative"] += 1
      return step.speculative_step(graphs, unflat(param_leaves), state, config=config)

    def multi_step(param_leaves, state, *, configs, branch_of_active, num_steps,
                   stop_when_done):
      count["multi_step"] += 1
      return step.multi_step(graphs, unflat(param_leaves), state, configs=configs,
                             branch_of_active=branch_of_active, num_steps=num_steps,
                             stop_when_done=stop_when_done)

    def decode_step(param_leaves, state):
      count["decode_step"] += 1
      return step.decode_step(graphs, unflat(param_leaves), state)

    self._prefill_forward = jax.jit(prefill_forward, donate_argnames="cache")
    self._prefill_start = jax.jit(prefill_start, static_argnames="config",
                                  donate_argnames="cache")
    self._plain = jax.jit(plain_step, static_argnames="config", donate_argnames="state")
    self._spec = jax.jit(speculative_step, static_argnames="config", donate_argnames="state")
    self._lorax = jax.jit(decode_step, donate_argnames="state")
    self._multi = jax.jit(multi_step, static_argnames=("configs", "branch_of_active", "num_steps",
                                                       "stop_when_done"),
                          donate_argnames="state")
    self._params_def = params_def

  def init_cache(self, batch: int, length: int, dtype) -> KVCache:
    """An empty ``KVCache`` of ``batch`` rows and ``length`` slots."""
    return KVCache.init(self.cfg, batch, length, dtype)

  def prefill(self, cache, prompt, prompt_lens, max_new, done, rng, *, config: StepConfig,
              temperature=None, top_p=None, adapter_slot=None):
    """Prompt forward, then first tokens and drafts: two jitted calls. DONATES cache.

    Args and returns as ``step.prefill_forward`` then ``step.prefill_start``.
    """
    cache, x = self._prefill_forward(self.param_leaves, cache, prompt, prompt_lens)
    return self._prefill_start(self.param_leaves, cache, x, prompt_lens, max_new, done, rng,
                               temperature, top_p, adapter_slot, config=config)

  def step(self, state: DecodeState, *, config: StepConfig):
    """A plain or speculative step, by ``config.tree``. DONATES state."""
    if config.tree is None:
      return self._plain(self.param_leaves, state, config=config)
    return self._spec(self.param_leaves, state, config=config)

  def steps(self, state: DecodeState, *, configs: StepConfig | tuple[StepConfig, ...],
            num_steps: int, branch_of_active: tuple[int, ...] | None = None,
            stop_when_done: bool | None = None):
    """Up to ``num_steps`` steps in one device loop (``step.multi_step``). DONATES state.

    ``stop_when_done``: None = the decoder's (:attr:`stop_when_done`).
    Returns the new state and a :class:`~medusa_jax.decoding.state.StepsOutput`.
    """
    if isinstance(configs, StepConfig):
      configs = (configs,)
    return self._multi(self.param_leaves, state, configs=tuple(configs),
                       branch_of_active=None if branch_of_active is None
                       else tuple(int(b) for b in branch_of_active),
                       num_steps=int(num_steps),
                       stop_when_done=self.stop_when_done if stop_when_done is None
                       else bool(stop_when_done))

  def replace_heads(self, heads_state) -> None:
    """Swaps the heads' arrays for others of the same structure and shapes (no recompilation).

    Args:
      heads_state: the new ``nnx.State`` of the heads (``nnx.split(heads)[1]``).

    Raises:
      ConfigError: the structure or an array's shape or dtype differs.
    """
    params = self.params.replace(heads=heads_state)
    leaves, params_def = jax.tree.flatten(params)
    if params_def != self._params_def:
      raise ConfigError("replace_heads: the heads' structure differs from the decoder's")
    for old, new in zip(self.param_leaves, leaves):
      if old.shape != new.shape or old.dtype != new.dtype:
        raise ConfigError(f"replace_heads: an array changes from {old.shape} {old.dtype} to"
                         f" {new.shape} {new.dtype}")
    self.params = params
    self.param_leaves = tuple(leaves)

  def decode_step(self, state: DecodeState):
    """LoRAX's I/O step (``step.decode_step``), routed per row by ``state.adapter_slot``.

    DONATES state.
    """
    return self._lorax(self.param_leaves, state)
