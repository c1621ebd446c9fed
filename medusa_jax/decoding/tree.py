"""Medusa candidate trees: ``medusa_choices`` -> static tree buffers.

A tree is a set of *choices*: paths ``(i_1, ..., i_d)`` of top-k ranks. The
node reached by a path of length d takes token ``topk(spec[d - 1])[i_d]``,
where ``spec[d - 1]`` is head d-1's logits at the last committed position
(every depth-d node draws from the same head; parents do not condition their
children). Node 0 is the root: the pending token already chosen by the target.

Nodes are numbered as in FasterDecoding/Medusa: the root, then the paths
sorted by ``(len, path)``. Consequences used throughout the decoding code:

* a parent's index is smaller than its child's;
* depth is non-decreasing with the index, so the nodes of depth d form a
  contiguous range;
* the children of one node are contiguous and sorted by rank.

All buffers are derived once, on the host, and stored as tuples, so a
:class:`TreeBuffers` is hashable and can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Mapping, Sequence

import numpy as np

from medusa_jax.errors import ConfigError, RequestError

Path = tuple[int, ...]
Choices = tuple[Path, ...]

DEFAULT_TOPK = 10


class TreeError(ConfigError):
  """Bad Medusa tree choices, or a tree that does not fit the heads or vocab."""


# ---- validation helpers ----------------------------------------------------


def _check_int(name: str, value, *, error: type[Exception] = TreeError) -> int:
  if isinstance(value, bool):
    raise error(f"{name}: expected an integer, got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise error(f"{name}: expected an integer, got {value!r}") from None


def _as_path(path, where: str) -> Path:
  if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) and not isinstance(
      path, np.ndarray):
    raise TreeError(f"{where}: expected a sequence of ranks, got {path!r}")
  out = tuple(_check_int(f"{where}[{j}]", r) for j, r in enumerate(path))
  if not out:
    raise TreeError(f"{where}: empty path; expected at least one rank")
  return out


def _canonical_choices(choices, topk: int) -> Choices:
  if isinstance(choices, (str, bytes)) or not isinstance(choices, (Sequence, np.ndarray)):
    raise TreeError(f"choices: expected a sequence of paths, got {type(choices).__name__}")
  paths = [_as_path(p, f"choices[{i}]") for i, p in enumerate(choices)]
  seen: dict[Path, int] = {}
  for i, path in enumerate(paths):
    for r in path:
      if r < 0:
        raise TreeError(f"choices[{i}]={path}: rank {r} is negative; expected 0 <= rank < {topk}")
      if r >= topk:
        raise TreeError(f"choices[{i}]={path}: rank {r} >= topk={topk}")
    if path in seen:
      raise TreeError(f"choices[{i}]={path}: duplicates choices[{seen[path]}]")
    seen[path] = i
  for i, path in enumerate(paths):
    if len(path) > 1 and path[:-1] not in seen:
      raise TreeError(f"choices[{i}]={path}: its parent path {path[:-1]} is missing")
  return tuple(sorted(paths, key=lambda p: (len(p), p)))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TreeBuffers:
  """Static buffers of one Medusa candidate tree.

  Build with :func:`build_tree`. Equality and hashing use ``choices`` and
  ``topk`` only; everything else is derived.

  Attributes:
    choices: the paths, sorted by ``(len, path)``; node ``i + 1`` is
      ``choices[i]``.
    topk: k of the per-head top-k lists the ranks index (Medusa's TOPK).

  Array properties (fresh NumPy arrays, int32 unless stated; T = num_nodes
  including the root, D = depth, P = num_paths, C = max_children):

    node_depth [T]            0 for the root; ``position_ids`` is an alias.
    node_rank [T]             rank within its head's top-k; -1 for the root.
    parent [T]                parent node; -1 for the root.
    attn_mask [T, T] bool     node i sees node j iff j is i or an ancestor.
    candidate_index [T]       index into ``concat([root], topk_Dxk.ravel())``
                              (Medusa's ``tree_indices``).
    retrieve_indices [P, D+1] root-to-leaf node lists, -1 padded, in Medusa's
                              order.
    children [T, C]           children in rank order, -1 padded.
    path_to_node [T, D+1]     node lists root..i, padded by repeating i.
    is_leaf [T] bool
  """

  choices: Choices
  topk: int = DEFAULT_TOPK
  _depth: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _parent: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    topk = _check_int("topk", self.topk)
    if topk < 1:
      raise TreeError(f"topk: expected a positive integer, got {self.topk!r}")
    choices = _canonical_choices(self.choices, topk)
    index = {path: i + 1 for i, path in enumerate(choices)}
    object.__setattr__(self, "topk", topk)
    object.__setattr__(self, "choices", choices)
    object.__setattr__(self, "_depth", (0,) + tuple(len(p) for p in choices))
    object.__setattr__(self, "_parent",
                       (-1,) + tuple(index.get(p[:-1], 0) for p in choices))

  # ---- sizes -------------------------------------------------------------

  @property
  def num_nodes(self) -> int:
    """T: tree nodes including the root (rows verified per sequence)."""
    return len(self.choices) + 1

  @property
  def depth(self) -> int:
    """D: the longest path; the number of Medusa heads the tree uses."""
    return self._depth[-1]

  @property
  def num_paths(self) -> int:
    """P: root-to-leaf paths."""
    return int(self.is_leaf.sum())

  @property
  def max_children(self) -> int:
    """C: the most children of any node (at least 1)."""
    counts = np.bincount(np.asarray(self._parent[1:], np.int64), minlength=1)
    return max(1, int(counts.max()) if counts.size else 1)

  @property
  def max_rank(self) -> int:
    """The largest rank used (-1 for a root-only tree); top-(max_rank+1) suffices."""
    return max((p[-1] for p in self.choices), default=-1)

  # ---- per-node buffers --------------------------------------------------

  @property
  def node_depth(self) -> np.ndarray:
    return np.asarray(self._depth, np.int32)

  @property
  def position_ids(self) -> np.ndarray:
    """Position offsets of the nodes (= depth); add the committed length L."""
    return self.node_depth

  @property
  def node_rank(self) -> np.ndarray:
    return np.asarray((-1,) + tuple(p[-1] for p in self.choices), np.int32)

  @property
  def parent(self) -> np.ndarray:
    return np.asarray(self._parent, np.int32)

  @property
  def is_leaf(self) -> np.ndarray:
    leaf = np.ones(self.num_nodes, bool)
    leaf[np.asarray(self._parent[1:], np.int64)] = False
    return leaf

  @property
  def candidate_index(self) -> np.ndarray:
    depth, rank = self.node_depth, self.node_rank
    return np.where(depth == 0, 0, 1 + self.topk * (depth - 1) + rank).astype(np.int32)

  @property
  def path_to_node(self) -> np.ndarray:
    """[T, D+1]: ``path_to_node[i, j]`` is i's ancestor at depth min(j, depth(i))."""
    t, d = self.num_nodes, self.depth
    out = np.empty((t, d + 1), np.int32)
    for i in range(t):
      chain = [i]
      while self._parent[chain[-1]] >= 0:
        chain.append(self._parent[chain[-1]])
      chain.reverse()
      out[i] = chain + [i] * (d + 1 - len(chain))
    return out

  @property
  def attn_mask(self) -> np.ndarray:
    t = self.num_nodes
    mask = np.zeros((t, t), bool)
    paths = self.path_to_node
    mask[np.arange(t)[:, None], paths] = True
    return mask

  @property
  def children(self) -> np.ndarray:
    out = np.full((self.num_nodes, self.max_children), -1, np.int32)
    fill = np.zeros(self.num_nodes, np.int64)
    for child in range(1, self.num_nodes):
      p = self._parent[child]
      out[p, fill[p]] = child
      fill[p] += 1
    return out

  @property
  def retrieve_indices(self) -> np.ndarray:
    """[P, D+1]: one row per leaf, in FasterDecoding/Medusa's order, -1 padded."""
    leaves = [i for i in range(self.num_nodes - 1, -1, -1) if self.is_leaf[i]]
    paths = self.path_to_node
    out = np.full((len(leaves), self.depth + 1), -1, np.int32)
    for row, leaf in enumerate(leaves):
      n = self._depth[leaf] + 1
      out[row, :n] = paths[leaf, :n]
    return out


def build_tree(choices: Sequence[Sequence[int]], topk: int = DEFAULT_TOPK) -> TreeBuffers:
  """Builds the static buffers of a Medusa tree.

  Args:
    choices: paths of top-k ranks (Medusa's ``medusa_choices``), in any
      order; every proper prefix of a path must be a path too. An empty
      sequence gives the root-only tree (no speculation).
    topk: k of the per-head top-k lists.

  Returns:
    The tree's :class:`TreeBuffers`.

  Raises:
    TreeError: an empty path, a negative or non-integer rank, a rank >= topk,
      a path whose parent path is missing, or a duplicate path.
  """
  return TreeBuffers(choices=choices, topk=topk)


def chain_choices(n: int) -> Choices:
  """LoRAX's chain as a tree: ``((0,), (0, 0), ...)``, n nodes below the root."""
  n = _check_int("n", n)
  if n < 0:
    raise TreeError(f"n: expected a non-negative integer, got {n}")
  return tuple((0,) * d for d in range(1, n + 1))


# The 63-node tree FasterDecoding/Medusa ships as its v0.1 default
# (``mc_sim_7b_63``), listed in the order its greedy expected-acceptance
# construction added the nodes: every prefix of this list is itself a tree.
MC_SIM_7B_63: Choices = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0),
    (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2),
    (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0),
    (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

# Greedy prefixes of MC_SIM_7B_63: the best trees of 31, 15, 7 and 3 nodes
# under the same head-accuracy estimates (32, 16, 8 and 4 rows with the root).
NAMED_TREES: Mapping[str, Choices] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "mc_sim_7b_31": MC_SIM_7B_63[:31],
    "mc_sim_7b_15": MC_SIM_7B_63[:15],
    "mc_sim_7b_7": MC_SIM_7B_63[:7],
    "mc_sim_7b_3": MC_SIM_7B_63[:3],
    "chain_1": chain_choices(1),
    "chain_2": chain_choices(2),
    "chain_3": chain_choices(3),
    "chain_4": chain_choices(4),
    "chain_5": chain_choices(5),
}

# Tree sizes (nodes below the root) the adaptive policy steps through, so a
# growing batch visits a few static shapes only.
_LADDER = (63, 31, 15, 7, 3)


def tree_for_batch(batch_size: int, num_heads: int, *, max_tree_rows: int,
                   choices: str | Sequence[Sequence[int]] | None = None,
                   topk: int = DEFAULT_TOPK) -> TreeBuffers:
  """Picks a tree whose verification stays within a row budget.

  The candidates are prefixes of ``choices`` (taken in their given order, which
  should be best-first, as ``MC_SIM_7B_63`` and :func:`tree_from_accuracies`
  are) of 63, 31, 15, 7 and 3 nodes, each with paths deeper than ``num_heads``
  dropped. The largest candidate with ``batch_size * T <= max_tree_rows`` and
  at least as many rows as the chain of ``num_heads`` drafts wins; failing
  that, the full chain (LoRAX's scheme) if it fits. Below that the policy
  shrinks the chain instead of switching speculation off: the best-first
  prefix of ``max_tree_rows // batch_size - 1`` paths (so at least one
  draft, whatever the budget), so large batches still speculate with the
  rows they can afford. T never grows with the batch size.

  Args:
    batch_size: B, sequences verified together.
    num_heads: n, Medusa heads available (the tree's depth is at most n).
    max_tree_rows: budget on B * T, the rows of one verification forward
      (the engine's default is per platform: ``config.TREE_ROWS``).
    choices: a name from :data:`NAMED_TREES`, a list of paths, or None for
      ``MC_SIM_7B_63``.
    topk: k of the per-head top-k lists.

  Returns:
    The chosen :class:`TreeBuffers` (equal inputs give equal, hashable trees).

  Raises:
    RequestError: batch_size or max_tree_rows is not a positive integer.
    TreeError: num_heads < 1, an unknown tree name, or bad choices.
  """
  batch_size = _check_int("batch_size", batch_size, error=RequestError)
  if batch_size < 1:
    raise RequestError(f"batch_size: expected a positive integer, got {batch_size}")
  max_tree_rows = _check_int("max_tree_rows", max_tree_rows, error=RequestError)
  if max_tree_rows < 1:
    raise RequestError(f"max_tree_rows: expected a positive integer, got {max_tree_rows}")
  num_heads = _check_int("num_heads", num_heads)
  if num_heads < 1:
    raise TreeError(f"num_heads: expected a positive integer, got {num_heads}")
  if choices is None:
    ordered = MC_SIM_7B_63
  elif isinstance(choices, str):
    if choices not in NAMED_TREES:
      raise TreeError(f"choices={choices!r}; expected one of {', '.join(NAMED_TREES)}")
    ordered = NAMED_TREES[choices]
  else:
    ordered = tuple(_as_path(p, f"choices[{i}]") for i, p in enumerate(choices))
  return _tree_for_budget(max_tree_rows // batch_size, num_heads, ordered, topk)


@functools.lru_cache(maxsize=256)
def _tree_for_budget(max_nodes: int, num_heads: int, ordered: Choices, topk: int) -> TreeBuffers:
  build_tree(ordered, topk)  # validates the whole list once
  chain = build_tree(chain_choices(num_heads), topk)
  shallow = tuple(p for p in ordered if len(p) <= num_heads)
  for size in sorted({min(s, len(shallow)) for s in _LADDER} | {len(shallow)}, reverse=True):
    tree = build_tree(_closed_prefix(shallow, size), topk)
    if chain.num_nodes <= tree.num_nodes <= max_nodes:
      return tree
  if chain.num_nodes <= max_nodes:
    return chain
  # Fewer rows than the chain: the best-first paths that fit, at least one.
  small = _closed_prefix(shallow, max(1, max_nodes - 1)) if shallow else ()
  if not small or (0,) not in small:
    return build_tree(chain_choices(min(num_heads, max(1, max_nodes - 1))), topk)
  return build_tree(small, topk)


def _closed_prefix(ordered: Choices, size: int) -> Choices:
  """The first ``size`` paths, minus any whose ancestors are not among them."""
  head = set(ordered[:size])
  return tuple(p for p in ordered[:size] if all(p[:d] in head for d in range(1, len(p))))


def tree_from_accuracies(head_topk_acc, num_nodes: int) -> Choices:
  """Medusa's greedy tree construction from measured head accuracies.

  The expected acceptance of a node is the product, along its path, of
  ``head_topk_acc[d, rank_d]``: the probability that head d's rank-r token is
  the right one. Starting from ``(0,)``, the construction repeatedly adds the
  neighbour of the current tree (the next sibling rank of a node, or its first
  child) with the largest expectation (first found on ties) until the tree has
  ``num_nodes`` nodes counting the root, or no neighbour is left.

  Args:
    head_topk_acc: [n, k] probabilities in [0, 1]; row d is head d (depth d+1).
    num_nodes: T, tree size including the root (64 gives a 63-path tree like
      ``MC_SIM_7B_63``).

  Returns:
    The paths in the order they were added (every prefix is a tree), ready
    for :func:`build_tree` or :func:`tree_for_batch`.

  Raises:
    TreeError: the table is not a finite [n, k] array in [0, 1], or
      num_nodes < 1.
  """
  acc = np.asarray(head_topk_acc, np.float64)
  if acc.ndim != 2 or acc.shape[0] < 1 or acc.shape[1] < 1:
    raise TreeError(f"head_topk_acc: expected a non-empty [n, k] array, got shape {acc.shape}")
  if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
    raise TreeError("head_topk_acc: expected finite probabilities in [0, 1]")
  num_nodes = _check_int("num_nodes", num_nodes)
  if num_nodes < 1:
    raise TreeError(f"num_nodes: expected a positive integer, got {num_nodes}")
  n, k = acc.shape

  def expectation(path: Path) -> float:
    return math.prod(acc[d, r] for d, r in enumerate(path))

  chosen: list[Path] = []
  taken: set[Path] = set()
  frontier: list[Path] = [(0,)]  # candidates, in discovery order
  while len(chosen) < num_nodes - 1 and frontier:
    best = max(range(len(frontier)), key=lambda i: (expectation(frontier[i]), -i))
    path = frontier.pop(best)
    chosen.append(path)
    taken.add(path)
    if path[-1] + 1 < k:
      frontier.append(path[:-1] + (path[-1] + 1,))
    if len(path) < n:
      frontier.append(path + (0,))
    frontier = [p for p in frontier if p not in taken]
  return tuple(chosen)
