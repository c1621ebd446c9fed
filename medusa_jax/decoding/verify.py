"""Verification of a Medusa candidate tree: which drafted tokens to keep.

One speculative step, for each row b of the batch:

1. The pending root token r_b (chosen by the target, not yet in the KV cache)
   and the heads' draft logits give the tree tokens (:func:`tree_candidates`).
2. One base-model forward over the T tree tokens (positions L_b + depth, tree
   attention mask) gives the target logits of every node.
3. :func:`verify_tree` walks down from the root. At node u the target makes
   its choice y_u; a child c of u is accepted iff token(c) == y_u (greedy and
   sampling) or iff Medusa's typical criterion holds (typical). The deepest
   accepted node u* ends the path root -> ... -> u*, of depth a = accept_len.
4. The path's tokens c_0 = r, ..., c_a are committed to the cache; the new
   tokens emitted are c_1..c_a and the bonus y_{u*} (a + 1 tokens); the bonus
   is the next pending root.

Strategies:

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
  strategy's temperature; the longest accepted path wins, ties by the largest
  sum of log p along it; the bonus is a sample of p_u* truncated to the tokens
  that pass the same threshold. Deterministic acceptance: it does not keep the
  target distribution.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.decoding import sampling
from medusa_jax.decoding.tree import TreeBuffers, TreeError
from medusa_jax.errors import RequestError

Array = jax.Array

REJECTED = -1  # placeholder in `emitted` past the bonus token


# ---- strategies --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Greedy:
  """Greedy decoding: the target's argmax; lossless speculation."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Typical:
  """Medusa's typical acceptance (deterministic, not distribution-preserving).

  Attributes:
    posterior_threshold: eps, the hard cap of the acceptance threshold.
    posterior_alpha: delta, the scale of the entropy-dependent threshold.
    temperature: the temperature of p (> 0; use :class:`Greedy` for 0).
  """

  posterior_threshold: float = 0.09
  posterior_alpha: float = 0.3
  temperature: float = 0.7

  def __post_init__(self):
    _set_float(self, "posterior_threshold", lo=0.0, hi=1.0, expect="a number in (0, 1]")
    _set_float(self, "posterior_alpha", lo=0.0, hi=math.inf, expect="a finite number > 0")
    _set_float(self, "temperature", lo=0.0, hi=math.inf, expect="a finite number > 0")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
  """Sampling from the warped target; speculation keeps its distribution.

  Attributes:
    temperature: > 0 (use :class:`Greedy` for 0).
    top_p: nucleus mass in (0, 1]; 1 disables top-p.
  """

  temperature: float = 1.0
  top_p: float = 1.0

  def __post_init__(self):
    _set_float(self, "temperature", lo=0.0, hi=math.inf, expect="a finite number > 0")
    _set_float(self, "top_p", lo=0.0, hi=1.0, expect="a number in (0, 1]")


Strategy = Greedy | Typical | Sampling


@flax.struct.dataclass
class RowParams:
  """Per-row sampling options, traced (one compilation serves every value).

  When given to :func:`choose_root` / :func:`verify_tree`, they replace the
  strategy's own ``temperature`` (and ``top_p`` for :class:`Sampling`); the
  strategy then only says which rule applies. A row at temperature 0 takes
  the greedy limit, so greedy and sampled requests can share a batch.

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


def _rows(value_B: Array, shape: tuple[int, ...]) -> Array:
  """A per-row [B] option broadcast to ``shape`` = (B, ...)."""
  value = jnp.asarray(value_B, jnp.float32)
  return jnp.broadcast_to(value.reshape(value.shape + (1,) * (len(shape) - 1)), shape)


def _temperature(strategy, params: "RowParams | None", shape):
  if params is None:
    return strategy.temperature
  return _rows(params.temperature, shape)


def _top_p(strategy, params: "RowParams | None", shape):
  if params is None:
    return strategy.top_p
  return _rows(params.top_p, shape)


def parse_strategy(temperature=0.0, top_p=1.0, typical: bool = False) -> Strategy:
  """Maps request options to a strategy.

  Args:
    temperature: >= 0; 0 selects :class:`Greedy` (whatever ``typical``).
    top_p: in (0, 1]; used by :class:`Sampling` only.
    typical: use Medusa's typical acceptance (default eps and alpha) instead
      of distribution-preserving sampling.

  Raises:
    RequestError: a bad temperature, top_p or typical flag.
  """
  if isinstance(temperature, bool) or not isinstance(temperature, Real) or not (
      math.isfinite(temperature) and temperature >= 0):
    raise RequestError(f"temperature: expected a finite number >= 0, got {temperature!r}")
  if isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1:
    raise RequestError(f"top_p: expected a number in (0, 1], got {top_p!r}")
  if not isinstance(typical, bool):
    raise RequestError(f"typical: expected a bool, got {typical!r}")
  if temperature == 0:
    return Greedy()
  if typical:
    return Typical(temperature=float(temperature))
  return Sampling(temperature=float(temperature), top_p=float(top_p))


# ---- results -------------------------------------------------------------------


@flax.struct.dataclass
class Verdict:
  """Outcome of verifying one tree per row (D = the tree's depth).

  Attributes:
    accept_len: [B] int32, a in [0, D]: drafted tokens accepted.
    best_node: [B] int32, u*: the deepest accepted node.
    path_nodes: [B, D+1] int32, the nodes root..u*, padded by repeating u*.
      The KV entries of tree node ``path_nodes[b, j]`` (cache slot
      L_b + path_nodes[b, j]) belong at slot L_b + j, for j <= a.
    emitted: [B, D+1] int32, the new tokens c_1..c_a, then the bonus at index
      a, then REJECTED (-1).
    num_emitted: [B] int32, a + 1.
    next_root: [B] int32, the bonus token: the next step's pending root.
  """

  accept_len: Array
  best_node: Array
  path_nodes: Array
  emitted: Array
  num_emitted: Array
  next_root: Array


# ---- candidates and root choice --------------------------------------------


def tree_candidates(tree: TreeBuffers, root_token: Array, spec_logits: Array) -> Array:
  """Tokens of every tree node.

  Args:
    tree: the static tree.
    root_token: [B] int, the pending root tokens.
    spec_logits: [B, n, V] draft logits of the n heads at the last committed
      position (n >= tree.depth; heads beyond the depth are unused).

  Returns:
    [B, T] int32: the root, then for each node ``top_k(spec[:, depth-1])[rank]``
    (ranks by decreasing logit, ties to the lower token id).

  Raises:
    TreeError: the tree is deeper than n, or uses ranks beyond V.
  """
  b, n, v = spec_logits.shape
  if root_token.shape != (b,):
    raise TreeError(f"root_token: expected shape ({b},), got {root_token.shape}")
  if tree.depth > n:
    raise TreeError(f"tree of depth {tree.depth} needs {tree.depth} Medusa heads; spec_logits"
                    f" has {n} (shape {spec_logits.shape})")
  if tree.max_rank + 1 > v:
    raise TreeError(f"tree uses top-{tree.max_rank + 1} ranks but the vocabulary has {v} tokens")
  root_Bx1 = root_token.astype(jnp.int32)[:, None]
  if tree.num_nodes == 1:
    return root_Bx1
  _, top_BxDxk = jax.lax.top_k(spec_logits[:, :tree.depth], tree.max_rank + 1)
  drafts_BxT1 = top_BxDxk[:, tree.node_depth[1:] - 1, tree.node_rank[1:]]
  return jnp.concatenate([root_Bx1, drafts_BxT1.astype(jnp.int32)], axis=1)


def choose_root(logits: Array, strategy: Strategy, key: Array | None = None,
                params: RowParams | None = None) -> Array:
  """The target's token choice from one position (prefill or plain decode).

  Args:
    logits: [B, V] target logits.
    strategy: Greedy (argmax), Sampling (a warped sample) or Typical (a sample
      of p at the strategy's temperature truncated by the typical threshold).
    key: PRNG key; unused (may be None) for Greedy.
    params: per-row options replacing the strategy's (see :class:`RowParams`).

  Returns:
    [B] int32 tokens.
  """
  if isinstance(strategy, Greedy):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise RequestError(f"key: {type(strategy).__name__} needs a PRNG key, got None")
  if isinstance(strategy, Sampling):
    lead = logits.shape[:-1]
    return sampling.sample(key, logits, _temperature(strategy, params, lead),
                           _top_p(strategy, params, lead))
  if isinstance(strategy, Typical):
    uniform = jax.random.uniform(key, logits.shape[:-1], jnp.float32)
    return sampling.inverse_cdf(_typical_log_probs(logits, strategy, params), uniform)
  raise RequestError(f"strategy: expected Greedy, Typical or Sampling, got {strategy!r}")


# ---- verification --------------------------------------------------------------


def verify_tree(tree: TreeBuffers, tree_tokens: Array, logits: Array, strategy: Strategy,
                key: Array | None = None, params: RowParams | None = None) -> Verdict:
  """Accepts the longest valid path of each row's tree.

  Args:
    tree: the static tree.
    tree_tokens: [B, T] int, from :func:`tree_candidates` (token of node 0 is
      the pending root).
    logits: [B, T, V] target logits at every tree node.
    strategy: Greedy, Sampling or Typical (static).
    key: PRNG key; unused (may be None) for Greedy.
    params: per-row options replacing the strategy's (see :class:`RowParams`).

  Returns:
    The :class:`Verdict`.

  Raises:
    TreeError: shapes do not match the tree.
  """
  b, t = tree_tokens.shape
  if t != tree.num_nodes or logits.ndim != 3 or logits.shape[:2] != (b, t):
    raise TreeError(f"expected tree_tokens [B, {tree.num_nodes}] and logits [B, {tree.num_nodes},"
                    f" V]; got {tree_tokens.shape} and {logits.shape}")
  if not isinstance(strategy, (Greedy, Typical, Sampling)):
    raise RequestError(f"strategy: expected Greedy, Typical or Sampling, got {strategy!r}")
  if not isinstance(strategy, Greedy) and key is None:
    raise RequestError(f"key: {type(strategy).__name__} needs a PRNG key, got None")
  tokens_BxT = tree_tokens.astype(jnp.int32)
  if t == 1:
    best_B = jnp.zeros((b,), jnp.int32)
    return _verdict(tree, tokens_BxT, best_B, choose_root(logits[:, 0], strategy, key, params))
  internal, _ = _internal_slots(tree)
  walk = walk_tree(tree, tokens_BxT, logits[:, internal], strategy, key, params)
  logits_best_BxV = jnp.take_along_axis(logits, walk.best_node[:, None, None], axis=1)[:, 0]
  return finish_walk(tree, tokens_BxT, walk, logits_best_BxV, strategy, key, params)


def internal_nodes(tree: TreeBuffers) -> np.ndarray:
  """Indices [I] of the nodes with children: the only ones the walk reads logits of."""
  return _internal_slots(tree)[0]


@flax.struct.dataclass
class Walk:
  """The first half of :func:`verify_tree`: the accepted path, before the bonus.

  Attributes:
    best_node: [B] int32, the deepest accepted node u*.
    choice: [B] int32, the target's choice at u* when u* has children (the
      sample its children failed to match); unused at a leaf.
    uniform: [B] float32, the random number reserved for a leaf's bonus.
  """
  best_node: Array
  choice: Array
  uniform: Array


def walk_tree(tree: TreeBuffers, tree_tokens: Array, internal_logits: Array, strategy: Strategy,
              key: Array | None = None, params: RowParams | None = None) -> Walk:
  """Walks down the tree with the target logits of its internal nodes only.

  Verification reads the logits of leaves only for the bonus token at the
  accepted node, so a step can run the LM head over the I internal nodes,
  then over the accepted node alone (together with the Medusa heads' drafts
  there) and call :func:`finish_walk`; the result equals :func:`verify_tree`.

  Args:
    tree: the static tree (T >= 2 nodes).
    tree_tokens: [B, T] int.
    internal_logits: [B, I, V] target logits at :func:`internal_nodes`.
    strategy, key, params: as in :func:`verify_tree`.

  Returns:
    The :class:`Walk`.
  """
  tokens_BxT = tree_tokens.astype(jnp.int32)
  if isinstance(strategy, Typical):
    return _walk_typical(tree, tokens_BxT, internal_logits, strategy, params)
  return _walk_match(tree, tokens_BxT, internal_logits, strategy, key, params)


def finish_walk(tree: TreeBuffers, tree_tokens: Array, walk: Walk, best_logits: Array,
                strategy: Strategy, key: Array | None = None,
                params: RowParams | None = None) -> Verdict:
  """The bonus token and the :class:`Verdict` of a :func:`walk_tree`.

  Args:
    tree, tree_tokens, strategy, params: as given to :func:`walk_tree`.
    walk: its result.
    best_logits: [B, V] target logits at ``walk.best_node``.
    key: the key given to :func:`walk_tree`.
  """
  tokens_BxT = tree_tokens.astype(jnp.int32)
  best_B = walk.best_node
  if isinstance(strategy, Typical):
    bonus_B = choose_root(best_logits, strategy, key, params)
  else:
    if isinstance(strategy, Greedy):
      fresh_B = jnp.argmax(best_logits, axis=-1).astype(jnp.int32)
    else:
      fresh_B = sampling.inverse_cdf(_warp(best_logits, strategy, params), walk.uniform)
    bonus_B = jnp.where(jnp.asarray(tree.is_leaf)[best_B], fresh_B, walk.choice)
  return _verdict(tree, tokens_BxT, best_B, bonus_B)


def _walk_match(tree, tokens_BxT, logits_BxIxV, strategy, key, params=None) -> Walk:
  """Sample-then-match (or argmax-then-match) walk over internal-node logits."""
  parent = tree.parent
  internal, slot = _internal_slots(tree)
  b = tokens_BxT.shape[0]
  # Only internal nodes need a choice for the walk; a leaf's is drawn if it ends it.
  if isinstance(strategy, Greedy):
    y_BxI = jnp.argmax(logits_BxIxV, axis=-1).astype(jnp.int32)
  else:
    # One uniform per internal node, plus one for a leaf's bonus.
    uniform_BxI1 = jax.random.uniform(key, (b, internal.size + 1), jnp.float32)
    y_BxI = sampling.inverse_cdf(_warp(logits_BxIxV, strategy, params), uniform_BxI1[:, :-1])
  match_BxT = tokens_BxT[:, 1:] == y_BxI[:, slot[parent[1:]]]
  match_BxT = jnp.concatenate([jnp.ones_like(match_BxT[:, :1]), match_BxT], axis=1)
  # Siblings with equal tokens (only possible for hand-made tree tokens): the
  # first in rank order is followed, whatever lies below the others, so the
  # choice never looks at later samples.
  earlier_TxT = _earlier_sibling(parent)
  blocked_BxT = jnp.einsum("bs,cs->bc", match_BxT.astype(jnp.int32), earlier_TxT) > 0
  accepted_BxT = _accept_down(tree, match_BxT & ~blocked_BxT)
  best_B = _deepest(tree, accepted_BxT)
  y_best_B = jnp.take_along_axis(y_BxI, jnp.asarray(slot, jnp.int32)[best_B][:, None], axis=1)[:, 0]
  uniform_B = (jnp.zeros((b,), jnp.float32) if isinstance(strategy, Greedy)
               else uniform_BxI1[:, -1])
  return Walk(best_node=best_B, choice=y_best_B, uniform=uniform_B)


def _internal_slots(tree: TreeBuffers) -> tuple[np.ndarray, np.ndarray]:
  """Nodes with children, and each node's index among them (0 for leaves)."""
  internal = np.flatnonzero(~tree.is_leaf)
  slot = np.zeros(tree.num_nodes, np.int64)
  slot[internal] = np.arange(internal.size)
  return internal, slot


def _warp(logits_xV: Array, strategy: Sampling, params: RowParams | None = None) -> Array:
  lead = logits_xV.shape[:-1]
  return sampling.warp(logits_xV, _temperature(strategy, params, lead),
                       _top_p(strategy, params, lead))


def _probs(logits_xV: Array, strategy: Typical, params: RowParams | None) -> Array:
  """p at the strategy's (or the rows') temperature, float32 [..., V]."""
  if params is None:
    return jax.nn.softmax(logits_xV.astype(jnp.float32) / strategy.temperature, axis=-1)
  return jnp.exp(sampling.warp(logits_xV, _rows(params.temperature, logits_xV.shape[:-1])))


def _walk_typical(tree, tokens_BxT, logits_BxIxV, strategy, params=None) -> Walk:
  """Medusa's typical acceptance walk over internal-node logits."""
  parent = tree.parent
  internal, slot = _internal_slots(tree)
  probs_BxIxV = _probs(logits_BxIxV, strategy, params)
  threshold_BxI = _typical_threshold(probs_BxIxV, strategy)
  b = tokens_BxT.shape[0]
  rows_Bx1 = jnp.arange(b)[:, None]
  par_slot_1xT = jnp.asarray(slot[parent[1:]], jnp.int32)[None, :]
  q_BxT = probs_BxIxV[rows_Bx1, par_slot_1xT, tokens_BxT[:, 1:]]
  ok_BxT = q_BxT > threshold_BxI[:, slot[parent[1:]]]
  ok_BxT = jnp.concatenate([jnp.ones_like(ok_BxT[:, :1]), ok_BxT], axis=1)
  logq_BxT = jnp.concatenate([jnp.zeros_like(q_BxT[:, :1]), jnp.log(q_BxT)], axis=1)
  accepted_BxT = _accept_down(tree, ok_BxT)
  score_BxT = _sum_down(tree, logq_BxT)
  depth_1xT = jnp.asarray(tree.node_depth)[None, :]
  reach_BxT = jnp.where(accepted_BxT, depth_1xT, -1)
  longest_BxT = reach_BxT == jnp.max(reach_BxT, axis=1, keepdims=True)
  best_B = jnp.argmax(jnp.where(longest_BxT, score_BxT, -jnp.inf), axis=1).astype(jnp.int32)
  zero_B = jnp.zeros((b,), jnp.int32)
  return Walk(best_node=best_B, choice=zero_B, uniform=zero_B.astype(jnp.float32))


def _typical_log_probs(logits_xV: Array, strategy: Typical,
                       params: RowParams | None = None) -> Array:
  """log p at the strategy's temperature, -inf below the typical threshold."""
  probs = _probs(logits_xV, strategy, params)
  keep = probs >= _typical_threshold(probs, strategy)[..., None]
  # The argmax always passes when alpha <= 1; keep it in any case.
  keep = keep | sampling.argmax_mask(probs)
  return jnp.where(keep, jnp.log(probs), -jnp.inf)


def _typical_threshold(probs_xV: Array, strategy: Typical) -> Array:
  """min(eps, alpha * exp(-H)) per row of ``probs`` [..., V] (Medusa's entropy)."""
  entropy = -jnp.sum(probs_xV * jnp.log(probs_xV + 1e-5), axis=-1)
  return jnp.minimum(strategy.posterior_threshold, strategy.posterior_alpha * jnp.exp(-entropy))


def _accept_down(tree: TreeBuffers, ok_BxT: Array) -> Array:
  """accepted[c] = ok[c] & accepted[parent[c]], one depth level at a time."""
  parent, depth = tree.parent, tree.node_depth
  levels = [ok_BxT[:, :1]]
  for d in range(1, tree.depth + 1):
    lo, hi = np.searchsorted(depth, d), np.searchsorted(depth, d, side="right")
    above_BxS = jnp.concatenate(levels, axis=1)  # nodes [0, lo): all parents of level d
    levels.append(ok_BxT[:, lo:hi] & above_BxS[:, parent[lo:hi]])
  return jnp.concatenate(levels, axis=1)


def _sum_down(tree: TreeBuffers, value_BxT: Array) -> Array:
  """Sums of ``value`` along each root-to-node path."""
  paths_TxP = tree.path_to_node
  # path_to_node repeats the node itself past its depth; count it once.
  first_TxP = np.concatenate([np.ones((tree.num_nodes, 1), bool),
                              paths_TxP[:, 1:] != paths_TxP[:, :-1]], axis=1)
  gathered_BxTxP = value_BxT[:, paths_TxP]
  return jnp.sum(jnp.where(first_TxP[None], gathered_BxTxP, 0.0), axis=2)


def _deepest(tree: TreeBuffers, accepted_BxT: Array) -> Array:
  """The deepest accepted node, the lowest index among equally deep ones."""
  t = tree.num_nodes
  rank_T = tree.node_depth.astype(np.int64) * t + (t - 1 - np.arange(t))
  score_BxT = jnp.where(accepted_BxT, jnp.asarray(rank_T, jnp.int32)[None, :], -1)
  return jnp.argmax(score_BxT, axis=1).astype(jnp.int32)


def _earlier_sibling(parent: np.ndarray) -> np.ndarray:
  """[T, T] int32: m[c, s] = 1 iff s is a sibling of c with a smaller index."""
  idx = np.arange(parent.size)
  m = (parent[:, None] == parent[None, :]) & (idx[None, :] < idx[:, None])
  m[0, :] = False
  m[:, 0] = False
  return m.astype(np.int32)


def _verdict(tree: TreeBuffers, tokens_BxT: Array, best_B: Array, bonus_B: Array) -> Verdict:
  d = tree.depth
  path_BxP = jnp.asarray(tree.path_to_node)[best_B]
  accept_B = jnp.asarray(tree.node_depth)[best_B]
  path_tokens_BxP = jnp.take_along_axis(tokens_BxT, path_BxP, axis=1)
  shifted_BxP = jnp.concatenate([path_tokens_BxP[:, 1:], path_tokens_BxP[:, :1]], axis=1)
  j_1xP = jnp.arange(d + 1, dtype=jnp.int32)[None, :]
  a_Bx1 = accept_B[:, None]
  bonus_B = bonus_B.astype(jnp.int32)
  emitted = jnp.where(j_1xP < a_Bx1, shifted_BxP,
                      jnp.where(j_1xP == a_Bx1, bonus_B[:, None], REJECTED))
  return Verdict(accept_len=accept_B, best_node=best_B.astype(jnp.int32), path_nodes=path_BxP,
                 emitted=emitted.astype(jnp.int32), num_emitted=accept_B + 1, next_root=bonus_B)


def _set_float(obj, name: str, *, lo: float, hi: float, expect: str) -> None:
  """Validates ``lo < obj.name <= hi`` (finite) and stores it as a float."""
  value = getattr(obj, name)
  if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
      or not lo < value <= hi):
    raise RequestError(f"{type(obj).__name__}.{name}: expected {expect}, got {value!r}")
  object.__setattr__(obj, name, float(value))
