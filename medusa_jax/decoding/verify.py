"""Verification of a Medusa candidate tree: the tree walk math.

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

The rule of steps 3 and 4 is the strategy's (``strategies.py``: Greedy,
Sampling, Typical): :func:`walk_tree` calls ``strategy.walk`` and
:func:`finish_walk` calls ``strategy.bonus``. This module holds what every
rule shares: the candidates, the verdict, and the walk primitives
(:func:`match_walk`, :func:`accept_down`, :func:`sum_down`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.decoding.state import RowParams
from medusa_jax.decoding.tree import TreeBuffers, TreeError
from medusa_jax.errors import RequestError

Array = jax.Array

REJECTED = -1  # placeholder in `emitted` past the bonus token

SHARED_HEAD_MAX_ROWS = 8
"""Most LM-head rows, B * T * (1 + D), for which a speculative step runs the
LM head and the Medusa heads once over every tree node (then picks the walk's
and the accepted node's rows) instead of twice (the internal nodes, then the
accepted node). At these sizes an LM-head call is bound by reading its
weight, so one call is cheaper than two: SmolLM2 on a 2-core CPU, batch 1,
the step over the 2-node chain took 28.6 ms instead of 32.3, over the 3-node
tree 32.6 instead of 34.7 (docs/perf.md). Past it the rows' compute wins and
the two calls stay. On a GPU the small call is weight-bound as well, and one
launch fewer (not measured here)."""


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


# ---- candidates and root choice --------------------------------------------


TOP_K_CHUNK = 1024
"""Entries per chunk of :func:`top_k_indices`' first pass on a GPU."""


def top_k_indices(x: Array, k: int, chunk: int | None = None) -> Array:
  """``lax.top_k(x, k)[1]``: indices [..., k] of the k largest of x [..., V] along V, by
  decreasing value, ties to the lower index; in two passes when ``V > 2 * chunk``.

  ``chunk`` None: :data:`TOP_K_CHUNK` on a GPU, one pass elsewhere (XLA:CPU's top-k of
  5 x 49,152 logits takes 0.7 ms in one pass and 1.35 ms in two).

  XLA's GPU top-k gives each row of ``x`` to one program, which walks the row alone: a
  draft top-k over 5 heads' 49,152 logits took 168 us of a 2.2 ms tree step on an H200
  (docs/perf.md). Here the first pass takes the top k of each of the C = ceil(V / chunk)
  chunks (C times the rows, side by side), the second the top k of those C * k
  candidates. The result is lax.top_k's, ties included: the global top k lie among the
  chunks' top k, and the candidates keep the order of their indices among equals (chunk
  by chunk, and by index within one). The last chunk is padded with -inf, after every
  real entry, so that a padded slot loses every tie.
  """
  if chunk is None:
    chunk = TOP_K_CHUNK if jax.default_backend() == "gpu" else 0
  v = x.shape[-1]
  if not chunk or v <= 2 * chunk or k > chunk:
    return jax.lax.top_k(x, k)[1]
  c = -(-v // chunk)
  if c * chunk > v:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c * chunk - v)], constant_values=-jnp.inf)
  vals_CxK, idx_CxK = jax.lax.top_k(x.reshape(*x.shape[:-1], c, chunk), k)
  offset_C = chunk * jnp.arange(c, dtype=idx_CxK.dtype)
  idx_CxK = idx_CxK + offset_C.reshape((1,) * (idx_CxK.ndim - 2) + (c, 1))
  flat = (*x.shape[:-1], c * k)
  _, pos_K = jax.lax.top_k(vals_CxK.reshape(flat), k)
  return jnp.take_along_axis(idx_CxK.reshape(flat), pos_K, axis=-1)


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
  top_BxDxk = top_k_indices(spec_logits[:, :tree.depth], tree.max_rank + 1)
  drafts_BxT1 = top_BxDxk[:, tree.node_depth[1:] - 1, tree.node_rank[1:]]
  return jnp.concatenate([root_Bx1, drafts_BxT1.astype(jnp.int32)], axis=1)


def choose_root(logits: Array, strategy, key: Array | None = None,
                rows: RowParams | None = None) -> Array:
  """The target's token choice from one position (prefill or plain decode).

  Args:
    logits: [B, V] target logits.
    strategy: a ``strategies.Strategy`` (static).
    key: PRNG key; unused (may be None) for Greedy.
    rows: the per-row temperatures and top-p (unused by Greedy).

  Returns:
    [B] int32 tokens.
  """
  return _check_strategy(strategy).choose(logits, key, rows)


# ---- verification --------------------------------------------------------------


def verify_tree(tree: TreeBuffers, tree_tokens: Array, logits: Array, strategy,
                key: Array | None = None, rows: RowParams | None = None) -> Verdict:
  """Accepts the longest valid path of each row's tree.

  Args:
    tree: the static tree.
    tree_tokens: [B, T] int, from :func:`tree_candidates` (token of node 0 is
      the pending root).
    logits: [B, T, V] target logits at every tree node.
    strategy: a ``strategies.Strategy`` (static).
    key: PRNG key; unused (may be None) for Greedy.
    rows: the per-row temperatures and top-p (unused by Greedy).

  Returns:
    The :class:`Verdict`.

  Raises:
    TreeError: shapes do not match the tree.
  """
  b, t = tree_tokens.shape
  if t != tree.num_nodes or logits.ndim != 3 or logits.shape[:2] != (b, t):
    raise TreeError(f"expected tree_tokens [B, {tree.num_nodes}] and logits [B, {tree.num_nodes},"
                    f" V]; got {tree_tokens.shape} and {logits.shape}")
  _check_strategy(strategy).check(key, rows)
  tokens_BxT = tree_tokens.astype(jnp.int32)
  if t == 1:
    best_B = jnp.zeros((b,), jnp.int32)
    return verdict(tree, tokens_BxT, best_B, strategy.choose(logits[:, 0], key, rows))
  walk = walk_tree(tree, tokens_BxT, logits[:, internal_nodes(tree)], strategy, key, rows)
  logits_best_BxV = jnp.take_along_axis(logits, walk.best_node[:, None, None], axis=1)[:, 0]
  return finish_walk(tree, tokens_BxT, walk, logits_best_BxV, strategy, key, rows)


def internal_nodes(tree: TreeBuffers) -> np.ndarray:
  """Indices [I] of the nodes with children: the only ones the walk reads logits of."""
  return internal_slots(tree)[0]


def walk_tree(tree: TreeBuffers, tree_tokens: Array, internal_logits: Array, strategy,
              key: Array | None = None, rows: RowParams | None = None) -> Walk:
  """Walks down the tree with the target logits of its internal nodes only.

  Verification reads the logits of leaves only for the bonus token at the
  accepted node, so a step can run the LM head over the I internal nodes,
  then over the accepted node alone (together with the Medusa heads' drafts
  there) and call :func:`finish_walk`; the result equals :func:`verify_tree`.

  Args:
    tree: the static tree (T >= 2 nodes).
    tree_tokens: [B, T] int.
    internal_logits: [B, I, V] target logits at :func:`internal_nodes`.
    strategy, key, rows: as in :func:`verify_tree`.

  Returns:
    The :class:`Walk` (``strategy.walk``).
  """
  return _check_strategy(strategy).walk(tree, tree_tokens.astype(jnp.int32), internal_logits,
                                        key, rows)


def finish_walk(tree: TreeBuffers, tree_tokens: Array, walk: Walk, best_logits: Array,
                strategy, key: Array | None = None, rows: RowParams | None = None) -> Verdict:
  """The bonus token (``strategy.bonus``) and the :class:`Verdict` of a :func:`walk_tree`.

  Args:
    tree, tree_tokens, strategy, rows: as given to :func:`walk_tree`.
    walk: its result.
    best_logits: [B, V] target logits at ``walk.best_node``.
    key: the key given to :func:`walk_tree`.
  """
  bonus_B = _check_strategy(strategy).bonus(tree, walk, best_logits, key, rows)
  return verdict(tree, tree_tokens.astype(jnp.int32), walk.best_node, bonus_B)


# ---- walk primitives -------------------------------------------------------------


def match_walk(tree: TreeBuffers, tokens_BxT: Array, y_BxI: Array, uniform_B: Array) -> Walk:
  """Follows, from the root, the child whose token is the target's choice at its parent.

  Args:
    tree: the static tree (T >= 2 nodes).
    tokens_BxT: [B, T] int32 tree tokens.
    y_BxI: [B, I] int32 the target's choice (argmax or sample) at each
      internal node.
    uniform_B: [B] float32 kept for a leaf's bonus (see :class:`Walk`).
  """
  parent = tree.parent
  _, slot = internal_slots(tree)
  match_BxT = tokens_BxT[:, 1:] == y_BxI[:, slot[parent[1:]]]
  match_BxT = jnp.concatenate([jnp.ones_like(match_BxT[:, :1]), match_BxT], axis=1)
  # Siblings with equal tokens (only possible for hand-made tree tokens): the
  # first in rank order is followed, whatever lies below the others, so the
  # choice never looks at later samples.
  earlier_TxT = _earlier_sibling(parent)
  blocked_BxT = jnp.einsum("bs,cs->bc", match_BxT.astype(jnp.int32), earlier_TxT) > 0
  accepted_BxT = accept_down(tree, match_BxT & ~blocked_BxT)
  best_B = _deepest(tree, accepted_BxT)
  y_best_B = jnp.take_along_axis(y_BxI, jnp.asarray(slot, jnp.int32)[best_B][:, None], axis=1)[:, 0]
  return Walk(best_node=best_B, choice=y_best_B, uniform=uniform_B)


def match_bonus(tree: TreeBuffers, walk: Walk, fresh_B: Array) -> Array:
  """[B] the bonus of a :func:`match_walk`: a fresh choice at a leaf, else the unmatched one."""
  return jnp.where(jnp.asarray(tree.is_leaf)[walk.best_node], fresh_B, walk.choice)


def internal_slots(tree: TreeBuffers) -> tuple[np.ndarray, np.ndarray]:
  """Nodes with children, and each node's index among them (0 for leaves)."""
  internal = np.flatnonzero(~tree.is_leaf)
  slot = np.zeros(tree.num_nodes, np.int64)
  slot[internal] = np.arange(internal.size)
  return internal, slot


def accept_down(tree: TreeBuffers, ok_BxT: Array) -> Array:
  """accepted[c] = ok[c] & accepted[parent[c]], one depth level at a time."""
  parent, depth = tree.parent, tree.node_depth
  levels = [ok_BxT[:, :1]]
  for d in range(1, tree.depth + 1):
    lo, hi = np.searchsorted(depth, d), np.searchsorted(depth, d, side="right")
    above_BxS = jnp.concatenate(levels, axis=1)  # nodes [0, lo): all parents of level d
    levels.append(ok_BxT[:, lo:hi] & above_BxS[:, parent[lo:hi]])
  return jnp.concatenate(levels, axis=1)


def sum_down(tree: TreeBuffers, value_BxT: Array) -> Array:
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


def verdict(tree: TreeBuffers, tokens_BxT: Array, best_B: Array, bonus_B: Array) -> Verdict:
  """The :class:`Verdict` of rows ending at ``best_B`` [B] with bonus tokens ``bonus_B`` [B]."""
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


def _check_strategy(strategy):
  if not callable(getattr(strategy, "walk", None)) or not callable(
      getattr(strategy, "bonus", None)):
    raise RequestError(f"strategy: expected Greedy, Typical or Sampling (a Strategy), got"
                       f" {strategy!r}")
  return strategy
