"""Acceptance strategies: how the target chooses tokens and which drafts it keeps.

A strategy is a frozen, hashable dataclass (a static argument of the jitted
steps) that carries its behaviour, as gemma's ``SamplingMethod`` does. Each
one implements three methods, called by the steps and by ``verify.py``:

* :meth:`Strategy.choose`: the target's token at one position (the first
  token after the prefill, a plain step, Typical's bonus);
* :meth:`Strategy.walk`: the accepted path down a candidate tree, from the
  target logits of its internal nodes;
* :meth:`Strategy.bonus`: the token emitted after the accepted path.

Temperatures and top-p are never fields of a strategy: they come per row from
:class:`~medusa_jax.decoding.state.RowParams` (the decode state's traced
arrays), so one compilation serves every value and greedy and sampled rows
share a batch. Adding a strategy is one subclass here.

* :class:`Greedy`: y_u = argmax. Output equals plain greedy decoding.
* :class:`Sampling`: y_u is a sample of the temperature/top-p warped target
  distribution. Each internal node is sampled once and the first child (in
  rank order) whose token equals the sample is followed, so every emitted
  token is an exact target sample given its prefix: the output has the
  target's distribution. The bonus at a node that has children is the very
  sample its children failed to match (drawing afresh there would bias it).
  Samples are drawn by inverse CDF, one uniform number per internal node.
* :class:`Typical`: FasterDecoding/Medusa's typical acceptance: accept child c
  of u iff p_u(token c) > min(eps, alpha * exp(-H(p_u))) with p_u at the
  row's temperature; the longest accepted path wins, ties by the largest sum
  of log p along it; the bonus is a sample of p_u* truncated to the tokens
  that pass the same threshold. Deterministic acceptance: it does not keep
  the target distribution.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from numbers import Real

import jax
import jax.numpy as jnp

from medusa_jax.decoding import sampling, verify
from medusa_jax.decoding.state import RowParams
from medusa_jax.decoding.tree import TreeBuffers
from medusa_jax.decoding.verify import Walk
from medusa_jax.errors import RequestError

Array = jax.Array


class Strategy(abc.ABC):
  """The rule of one call: root choice, tree walk and bonus token.

  Subclasses are ``@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)``
  so that they hash by value (one compilation per distinct strategy).
  """

  __slots__ = ()

  needs_key: bool = True
  """Whether the rule draws random numbers (and so needs a PRNG key)."""

  needs_rows: bool = True
  """Whether the rule reads the per-row temperatures and top-p."""

  def check(self, key: Array | None, rows: RowParams | None) -> None:
    """Raises RequestError when the rule lacks its key or its per-row options."""
    name = type(self).__name__
    if self.needs_key and key is None:
      raise RequestError(f"key: {name} needs a PRNG key, got None")
    if self.needs_rows and rows is None:
      raise RequestError(f"rows: {name} needs per-row temperatures and top-p (RowParams),"
                         f" got None")

  @abc.abstractmethod
  def choose(self, logits: Array, key: Array | None, rows: RowParams | None) -> Array:
    """The target's token at one position.

    Args:
      logits: [B, V] target logits.
      key: PRNG key (None allowed when ``needs_key`` is False).
      rows: per-row options (None allowed when ``needs_rows`` is False).

    Returns:
      [B] int32 tokens.
    """

  @abc.abstractmethod
  def walk(self, tree: TreeBuffers, tokens: Array, internal_logits: Array, key: Array | None,
           rows: RowParams | None) -> Walk:
    """The accepted path of each row.

    Args:
      tree: the static tree (T >= 2 nodes).
      tokens: [B, T] int32 tree tokens.
      internal_logits: [B, I, V] target logits at ``verify.internal_nodes(tree)``.
      key, rows: as in :meth:`choose`.
    """

  @abc.abstractmethod
  def bonus(self, tree: TreeBuffers, walk: Walk, best_logits: Array, key: Array | None,
            rows: RowParams | None) -> Array:
    """[B] int32 the token after the accepted path.

    Args:
      tree: the static tree.
      walk: this strategy's :meth:`walk` result.
      best_logits: [B, V] target logits at ``walk.best_node``.
      key: the key given to :meth:`walk`.
      rows: as in :meth:`choose`.
    """


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Greedy(Strategy):
  """Greedy decoding: the target's argmax; lossless speculation."""

  needs_key = False
  needs_rows = False

  def choose(self, logits, key=None, rows=None):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def walk(self, tree, tokens, internal_logits, key=None, rows=None):
    y_BxI = jnp.argmax(internal_logits, axis=-1).astype(jnp.int32)
    zero_B = jnp.zeros((tokens.shape[0],), jnp.float32)
    return verify.match_walk(tree, tokens, y_BxI, zero_B)

  def bonus(self, tree, walk, best_logits, key=None, rows=None):
    return verify.match_bonus(tree, walk, self.choose(best_logits))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Sampling(Strategy):
  """Sampling from the warped target (per-row temperature and top-p); lossless."""

  def choose(self, logits, key, rows):
    self.check(key, rows)
    lead = logits.shape[:-1]
    return sampling.sample(key, logits, _rows(rows.temperature, lead), _rows(rows.top_p, lead))

  def walk(self, tree, tokens, internal_logits, key, rows):
    self.check(key, rows)
    b, i = internal_logits.shape[:2]
    # One uniform per internal node, plus one for a leaf's bonus.
    uniform_BxI1 = jax.random.uniform(key, (b, i + 1), jnp.float32)
    y_BxI = sampling.inverse_cdf(_warp(internal_logits, rows), uniform_BxI1[:, :-1])
    return verify.match_walk(tree, tokens, y_BxI, uniform_BxI1[:, -1])

  def bonus(self, tree, walk, best_logits, key, rows):
    self.check(key, rows)
    fresh_B = sampling.inverse_cdf(_warp(best_logits, rows), walk.uniform)
    return verify.match_bonus(tree, walk, fresh_B)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Typical(Strategy):
  """Medusa's typical acceptance (deterministic, not distribution-preserving).

  p is the target at the row's temperature (``RowParams.temperature``).

  Attributes:
    posterior_threshold: eps, the hard cap of the acceptance threshold.
    posterior_alpha: delta, the scale of the entropy-dependent threshold.
  """

  posterior_threshold: float = 0.09
  posterior_alpha: float = 0.3

  def __post_init__(self):
    _set_float(self, "posterior_threshold", lo=0.0, hi=1.0, expect="a number in (0, 1]")
    _set_float(self, "posterior_alpha", lo=0.0, hi=math.inf, expect="a finite number > 0")

  def choose(self, logits, key, rows):
    self.check(key, rows)
    uniform = jax.random.uniform(key, logits.shape[:-1], jnp.float32)
    return sampling.inverse_cdf(self._log_probs(logits, rows), uniform)

  def walk(self, tree, tokens, internal_logits, key, rows):
    self.check(key, rows)
    parent = tree.parent
    _, slot = verify.internal_slots(tree)
    probs_BxIxV = _probs(internal_logits, rows)
    threshold_BxI = self._threshold(probs_BxIxV)
    b = tokens.shape[0]
    rows_Bx1 = jnp.arange(b)[:, None]
    par_slot_1xT = jnp.asarray(slot[parent[1:]], jnp.int32)[None, :]
    q_BxT = probs_BxIxV[rows_Bx1, par_slot_1xT, tokens[:, 1:]]
    ok_BxT = q_BxT > threshold_BxI[:, slot[parent[1:]]]
    ok_BxT = jnp.concatenate([jnp.ones_like(ok_BxT[:, :1]), ok_BxT], axis=1)
    logq_BxT = jnp.concatenate([jnp.zeros_like(q_BxT[:, :1]), jnp.log(q_BxT)], axis=1)
    accepted_BxT = verify.accept_down(tree, ok_BxT)
    score_BxT = verify.sum_down(tree, logq_BxT)
    depth_1xT = jnp.asarray(tree.node_depth)[None, :]
    reach_BxT = jnp.where(accepted_BxT, depth_1xT, -1)
    longest_BxT = reach_BxT == jnp.max(reach_BxT, axis=1, keepdims=True)
    best_B = jnp.argmax(jnp.where(longest_BxT, score_BxT, -jnp.inf), axis=1).astype(jnp.int32)
    zero_B = jnp.zeros((b,), jnp.int32)
    return Walk(best_node=best_B, choice=zero_B, uniform=zero_B.astype(jnp.float32))

  def bonus(self, tree, walk, best_logits, key, rows):
    return self.choose(best_logits, key, rows)

  def _log_probs(self, logits_xV: Array, rows: RowParams) -> Array:
    """log p at the rows' temperature, -inf below the typical threshold."""
    probs = _probs(logits_xV, rows)
    keep = probs >= self._threshold(probs)[..., None]
    # The argmax always passes when alpha <= 1; keep it in any case.
    keep = keep | sampling.argmax_mask(probs)
    return jnp.where(keep, jnp.log(probs), -jnp.inf)

  def _threshold(self, probs_xV: Array) -> Array:
    """min(eps, alpha * exp(-H)) per row of ``probs`` [..., V] (Medusa's entropy)."""
    entropy = -jnp.sum(probs_xV * jnp.log(probs_xV + 1e-5), axis=-1)
    return jnp.minimum(self.posterior_threshold, self.posterior_alpha * jnp.exp(-entropy))


def _rows(value_B: Array, shape: tuple[int, ...]) -> Array:
  """A per-row [B] option broadcast to ``shape`` = (B, ...)."""
  value = jnp.asarray(value_B, jnp.float32)
  return jnp.broadcast_to(value.reshape(value.shape + (1,) * (len(shape) - 1)), shape)


def _warp(logits_xV: Array, rows: RowParams) -> Array:
  """log-probabilities [..., V] of the rows' temperature/top-p warped target."""
  lead = logits_xV.shape[:-1]
  return sampling.warp(logits_xV, _rows(rows.temperature, lead), _rows(rows.top_p, lead))


def _probs(logits_xV: Array, rows: RowParams) -> Array:
  """p at the rows' temperature (no top-p), float32 [..., V]."""
  return jnp.exp(sampling.warp(logits_xV, _rows(rows.temperature, logits_xV.shape[:-1])))


def _set_float(obj, name: str, *, lo: float, hi: float, expect: str) -> None:
  """Validates ``lo < obj.name <= hi`` (finite) and stores it as a float."""
  value = getattr(obj, name)
  if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
      or not lo < value <= hi):
    raise RequestError(f"{type(obj).__name__}.{name}: expected {expect}, got {value!r}")
  object.__setattr__(obj, name, float(value))
