"""What the decode steps pass around: static config, device state, outputs, split params.

* :class:`StepConfig`: the static knobs of a step (hashable; one compilation
  per value).
* :class:`DecodeState`: the per-row device state between steps (donated).
* :class:`RowParams`: the per-row sampling options the strategies read.
* :class:`StepOutput`: what the host reads after a step.
* :class:`Graphs` / :class:`Params`: the static and array halves of
  ``nnx.split`` of the base model and the heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import numpy as np

from medusa_jax.decoding.tree import TreeError
import jax
import jax.numpy as jnp

Array = jax.Array

EMPTY = -1
"""Token id written in output slots that carry no token."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StepConfig:
  """Static knobs of a step; hashable, one compilation per value.

  Attributes:
    tree: the candidate tree (``TreeBuffers``); None = plain decoding.
    strategy: the acceptance / sampling rule (a ``strategies.Strategy``:
      ``Greedy()``, ``Sampling()``, ``Typical()``), also used to choose the
      root; its temperatures come from the state's per-row arrays.
    eos_ids: ids that end a row (the EOS itself is emitted).
    carrier: the tree whose candidates the state carries between steps, when
      it is not ``tree`` (None: ``tree``). ``tree`` must then be a sub-tree
      of it (every path of ``tree`` is a path of ``carrier``): the step
      verifies the carried candidates of ``tree``'s nodes and drafts the
      whole carrier again, so steps of different sub-trees (or plain steps)
      can follow one another on the same state. A plain step leaves stale
      drafts behind; they only cost acceptance, never correctness.
  """
  tree: Any = None
  strategy: Any
  eos_ids: tuple[int, ...] = ()
  carrier: Any = None

  @property
  def num_nodes(self) -> int:
    """T: tokens fed per step (1 for plain decoding)."""
    return 1 if self.tree is None else int(self.tree.num_nodes)

  @property
  def width(self) -> int:
    """Most tokens a step can emit: tree depth + 1."""
    return 1 if self.tree is None else int(self.tree.depth) + 1

  @property
  def state_tree(self):
    """The tree whose candidates ``DecodeState.tokens`` holds (or None: plain)."""
    return self.tree if self.carrier is None else self.carrier

  @property
  def state_nodes(self) -> int:
    """Columns of ``DecodeState.tokens``: the carried tree's nodes (1 when plain)."""
    tree = self.state_tree
    return 1 if tree is None else int(tree.num_nodes)

  @property
  def tree_index(self) -> np.ndarray | None:
    """[T] column of ``DecodeState.tokens`` holding each node of ``tree``; None: all, in order.

    Raises:
      TreeError: ``tree`` is not a sub-tree of ``carrier``.
    """
    if self.carrier is None or self.tree is None or self.carrier == self.tree:
      return None
    column = {path: i + 1 for i, path in enumerate(self.carrier.choices)}
    missing = [p for p in self.tree.choices if p not in column]
    if missing or self.tree.topk != self.carrier.topk:
      raise TreeError(f"StepConfig: tree is not a sub-tree of carrier (paths {missing[:4]}"
                      f" missing, or topk {self.tree.topk} != {self.carrier.topk})")
    return np.asarray([0] + [column[p] for p in self.tree.choices], np.int32)


@flax.struct.dataclass
class DecodeState:
  """Device state of a batch between steps (donated to every step).

  Attributes:
    cache: the ``KVCache`` ([B, L, G, D] per layer).
    lengths: [B] int32 committed tokens per row.
    tokens: [B, T] int32 inputs of the next step; column 0 is the pending
      root, columns 1.. the draft candidates of the tree (T = 1 when plain).
    generated: [B] int32 tokens emitted so far.
    max_new: [B] int32 per-row budget of new tokens.
    done: [B] bool; finished and padding rows.
    rng: PRNG key, split once per step.
    temperature: [B] float32 per-row temperature (0 = greedy), or None (a
      greedy-only state). The only source of temperatures: strategies carry
      none, so any mix of values shares one compilation.
    top_p: [B] float32 per-row nucleus mass, or None (with ``temperature``).
    adapter_slot: [B] int32 per-row weight slot of ``BatchMedusaWeights``
      heads (traced: the batch's adapter mix never recompiles), or None.
  """
  cache: Any
  lengths: Array
  tokens: Array
  generated: Array
  max_new: Array
  done: Array
  rng: Array
  temperature: Array | None = None
  top_p: Array | None = None
  adapter_slot: Array | None = None

  @property
  def rows(self) -> "RowParams | None":
    """The per-row sampling options, or None for a greedy-only state."""
    if self.temperature is None:
      return None
    top_p = jnp.ones_like(self.temperature) if self.top_p is None else self.top_p
    return RowParams(temperature=self.temperature, top_p=top_p)


@flax.struct.dataclass
class StepOutput:
  """What the host reads after a step (one ``jax.device_get``).

  Attributes:
    tokens: [B, W] int32 emitted tokens, ``EMPTY`` after ``count``.
    count: [B] int32 tokens emitted this step (0 for finished rows).
    accept_len: [B] int32 draft tokens accepted (0..D; 0 when plain).
    active: [B] bool rows that took part in this step (not done before it).
    done: [B] bool rows finished after this step.
    finite: [B] bool False for an active row whose base logits held NaN or inf
      this step (a corrupt or overflowing model): the row emits nothing and
      stops, and the engine fails its request alone.
  """
  tokens: Array
  count: Array
  accept_len: Array
  active: Array
  done: Array
  finite: Array


@flax.struct.dataclass
class StepsOutput:
  """What the host reads after a call of K steps (one ``jax.device_get``).

  Attributes:
    tokens: [K, B, W] int32 emitted tokens per step, ``EMPTY`` after ``count``.
    count: [K, B] int32 tokens emitted per step.
    accept_len: [K, B] int32 draft tokens accepted per step.
    active: [K, B] bool rows that took part in each step.
    done: [K, B] bool rows finished after each step.
    finite: [K, B] bool (see :class:`StepOutput`).
    steps: [] int32 steps that ran (the loop stops when every row is done).
    branch: [K] int32 index of the step config each step ran (-1: not run).
  """
  tokens: Array
  count: Array
  accept_len: Array
  active: Array
  done: Array
  finite: Array
  steps: Array
  branch: Array

  def step(self, k: int) -> StepOutput:
    """Step ``k``'s :class:`StepOutput` (works on host copies too)."""
    return StepOutput(tokens=self.tokens[k], count=self.count[k],
                      accept_len=self.accept_len[k], active=self.active[k],
                      done=self.done[k], finite=self.finite[k])


@dataclasses.dataclass(frozen=True)
class Graphs:
  """The static halves of ``nnx.split``: base model and heads (or None)."""
  llama: Any
  heads: Any


@flax.struct.dataclass
class Params:
  """The array halves of ``nnx.split``: base model and heads state (or None).

  Attributes:
    llama: the base model's state.
    heads: the heads' state, or None.
    lm_head_t: [H, V] a transposed copy of a tied embedding, or None (see
      :class:`Decoder`).
  """
  llama: Any
  heads: Any
  lm_head_t: Any = None


@flax.struct.dataclass
class RowParams:
  """Per-row sampling options, traced (one compilation serves every value).

  The strategies read temperature and top-p from here only. A row at
  temperature 0 takes the greedy limit, so greedy and sampled requests can
  share a batch.

  Attributes:
    temperature: [B] float32 >= 0.
    top_p: [B] float32 in (0, 1].
  """
  temperature: Array
  top_p: Array

  @classmethod
  def full(cls, batch: int, temperature: float = 0.0, top_p: float = 1.0) -> "RowParams":
    """The same options for ``batch`` rows."""
    return cls(temperature=jnp.full((batch,), temperature, jnp.float32),
               top_p=jnp.full((batch,), top_p, jnp.float32))
