"""Tests of medusa_jax.decoding.tree: buffers, named trees, adaptive policy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.decoding import tree as tr
from medusa_jax.errors import ConfigError, RequestError


def _random_choices(rng, num_paths, max_depth, topk):
  """A random prefix-closed set of rank paths, in random order."""
  num_paths = min(num_paths, sum(topk ** d for d in range(1, max_depth + 1)))
  paths = []
  while len(paths) < num_paths:
    parents = [()] + [p for p in paths if len(p) < max_depth]
    parent = parents[rng.integers(len(parents))]
    used = {p[-1] for p in paths if p[:-1] == parent and len(p) == len(parent) + 1}
    free = [r for r in range(topk) if r not in used]
    if free:
      paths.append(parent + (int(rng.choice(free)),))
  rng.shuffle(paths)
  return paths


def test_medusa_test_vector():
  t = tr.build_tree([[0], [1], [0, 0]])
  assert t.num_nodes == 4 and t.depth == 2 and t.num_paths == 2
  np.testing.assert_array_equal(
      t.attn_mask, np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool))
  np.testing.assert_array_equal(t.candidate_index, [0, 1, 2, 11])
  np.testing.assert_array_equal(t.position_ids, [0, 1, 1, 2])
  np.testing.assert_array_equal(t.retrieve_indices, [[0, 1, 3], [0, 2, -1]])
  np.testing.assert_array_equal(t.parent, [-1, 0, 0, 1])
  np.testing.assert_array_equal(t.node_rank, [-1, 0, 1, 0])
  np.testing.assert_array_equal(t.children, [[1, 2], [3, -1], [-1, -1], [-1, -1]])
  np.testing.assert_array_equal(t.path_to_node, [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3]])
  np.testing.assert_array_equal(t.is_leaf, [False, False, True, True])
  assert t.node_depth.dtype == np.int32 and t.attn_mask.dtype == bool


def test_mc_sim_7b_63_shape():
  t = tr.build_tree(tr.MC_SIM_7B_63)
  assert (t.num_nodes, t.depth, t.num_paths, t.max_children) == (64, 4, 42, 10)
  np.testing.assert_array_equal(np.bincount(t.node_depth), [1, 10, 28, 23, 2])


@pytest.mark.parametrize("seed", range(6))
def test_buffers_match_definitions(seed):
  rng = np.random.default_rng(seed)
  topk = int(rng.integers(2, 6))
  choices = _random_choices(rng, int(rng.integers(1, 20)), int(rng.integers(1, 5)), topk)
  t = tr.build_tree(choices, topk=topk)
  paths = [()] + sorted((tuple(p) for p in choices), key=lambda p: (len(p), p))
  assert t.choices == tuple(paths[1:])
  n = len(paths)
  for i, j in itertools.product(range(n), range(n)):
    assert t.attn_mask[i, j] == (paths[i][:len(paths[j])] == paths[j])
  for i, p in enumerate(paths):
    assert t.node_depth[i] == len(p)
    assert t.parent[i] == (paths.index(p[:-1]) if p else -1)
    assert t.node_rank[i] == (p[-1] if p else -1)
    assert t.candidate_index[i] == (1 + topk * (len(p) - 1) + p[-1] if p else 0)
    kids = [k for k, q in enumerate(paths) if q[:-1] == p and len(q) == len(p) + 1]
    assert list(t.children[i][t.children[i] >= 0]) == kids
    assert t.is_leaf[i] == (not kids)
    chain = [paths.index(p[:d]) for d in range(len(p) + 1)]
    assert list(t.path_to_node[i]) == chain + [i] * (t.depth + 1 - len(chain))
  # Medusa's retrieval order: leaves from the last node to the first.
  leaves = [i for i in range(n - 1, -1, -1) if t.is_leaf[i]]
  assert t.num_paths == len(leaves) == t.retrieve_indices.shape[0]
  for row, leaf in zip(t.retrieve_indices, leaves):
    expect = [paths.index(paths[leaf][:d]) for d in range(len(paths[leaf]) + 1)]
    assert list(row) == expect + [-1] * (t.depth + 1 - len(expect))


def test_equal_trees_hash_equal_and_are_static_jit_args():
  a = tr.build_tree([(1,), (0, 0), (0,)])
  b = tr.build_tree([[0], [1], [0, 0]])
  c = tr.build_tree([[0], [1], [0, 0]], topk=4)
  assert a == b and hash(a) == hash(b) and a != c

  calls = []

  def depth_sum(tree, x):
    calls.append(1)
    return x + jnp.asarray(tree.node_depth).sum()

  f = jax.jit(depth_sum, static_argnames="tree")
  assert int(f(a, 1)) == 5 and int(f(b, 2)) == 6
  assert len(calls) == 1


def test_root_only_tree():
  t = tr.build_tree([])
  assert (t.num_nodes, t.depth, t.num_paths, t.max_rank) == (1, 0, 1, -1)
  np.testing.assert_array_equal(t.retrieve_indices, [[0]])
  np.testing.assert_array_equal(t.attn_mask, [[True]])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_chain(n):
  choices = tr.chain_choices(n)
  assert choices == tuple((0,) * d for d in range(1, n + 1))
  t = tr.build_tree(choices)
  assert (t.num_nodes, t.depth, t.num_paths) == (n + 1, n, 1)
  np.testing.assert_array_equal(t.attn_mask, np.tril(np.ones((n + 1, n + 1), bool)))
  np.testing.assert_array_equal(t.retrieve_indices, [np.arange(n + 1)])


@pytest.mark.parametrize("choices, match", [
    ([[0], []], r"choices\[1\]: empty path"),
    ([[0], [0, -1]], r"choices\[1\]=\(0, -1\): rank -1 is negative"),
    ([[0], [10]], r"choices\[1\]=\(10,\): rank 10 >= topk=10"),
    ([[0], [1, 0]], r"choices\[1\]=\(1, 0\): its parent path \(1,\) is missing"),
    ([[0], [1], (0,)], r"choices\[2\]=\(0,\): duplicates choices\[0\]"),
    ([[0], [True]], r"choices\[1\]\[0\]: expected an integer"),
    ([[0], [0.5]], r"choices\[1\]\[0\]: expected an integer"),
    ([[0], 3], r"choices\[1\]: expected a sequence of ranks"),
    ("0", r"choices: expected a sequence of paths"),
])
def test_build_tree_errors(choices, match):
  with pytest.raises(tr.TreeError, match=match):
    tr.build_tree(choices)


def test_tree_error_is_a_config_error():
  assert issubclass(tr.TreeError, ConfigError) and issubclass(tr.TreeError, ValueError)
  with pytest.raises(tr.TreeError, match="topk: expected a positive integer"):
    tr.build_tree([[0]], topk=0)
  with pytest.raises(tr.TreeError, match="n: expected a non-negative integer"):
    tr.chain_choices(-1)


def test_named_trees_are_trees_and_greedy_prefixes():
  for name, choices in tr.NAMED_TREES.items():
    t = tr.build_tree(choices)
    assert t.num_nodes == len(choices) + 1, name
  for k in range(1, len(tr.MC_SIM_7B_63) + 1):
    tr.build_tree(tr.MC_SIM_7B_63[:k])  # every prefix is prefix-closed
  assert [tr.build_tree(tr.NAMED_TREES[f"mc_sim_7b_{k}"]).num_nodes
          for k in (63, 31, 15, 7, 3)] == [64, 32, 16, 8, 4]


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("budget", [64, 256, 1024])
def test_tree_for_batch_shrinks_with_batch(num_heads, budget):
  chain_rows = num_heads + 1
  sizes = []
  for batch in (1, 2, 3, 4, 8, 16, 32, 64, 128, 512, 2048):
    t = tr.tree_for_batch(batch, num_heads, max_tree_rows=budget)
    assert t.depth <= num_heads
    assert t.num_nodes >= 2  # always at least one draft
    assert batch * t.num_nodes <= budget or t.num_nodes == 2
    if batch * chain_rows <= budget:
      assert t.num_nodes >= chain_rows  # never less than the chain when it fits
    assert t.choices == tuple(sorted(t.choices, key=lambda p: (len(p), p)))
    sizes.append(t.num_nodes)
  assert sizes == sorted(sizes, reverse=True), sizes
  assert sizes[-1] == 2  # huge batches still speculate, with one draft


def test_tree_for_batch_values():
  assert tr.tree_for_batch(1, 4, max_tree_rows=256).choices == tr.build_tree(tr.MC_SIM_7B_63).choices
  assert tr.tree_for_batch(8, 4, max_tree_rows=256).num_nodes == 32
  # 4 rows per sequence: less than the 5-node chain, so the best-first 3 paths.
  assert tr.tree_for_batch(64, 4, max_tree_rows=256).choices == tr.build_tree(
      tr.MC_SIM_7B_63[:3]).choices
  assert tr.tree_for_batch(64, 4, max_tree_rows=320).choices == tr.chain_choices(4)
  # A chain list shortens to the drafts that fit, down to one.
  assert tr.tree_for_batch(16, 4, max_tree_rows=48, choices="chain_5").choices == (
      tr.chain_choices(2))
  assert tr.tree_for_batch(64, 4, max_tree_rows=64, choices="chain_5").choices == ((0,),)
  assert tr.tree_for_batch(64, 4, max_tree_rows=64).choices == ((0,),)
  shallow = tr.tree_for_batch(1, 2, max_tree_rows=256)
  assert shallow.depth == 2
  assert set(shallow.choices) == {p for p in tr.MC_SIM_7B_63 if len(p) <= 2}
  assert tr.tree_for_batch(1, 3, max_tree_rows=256, choices="chain_5").choices == tr.chain_choices(3)
  custom = [(0,), (1,), (0, 0), (2,)]
  assert tr.tree_for_batch(1, 4, max_tree_rows=256, choices=custom) == tr.build_tree(custom)
  assert tr.tree_for_batch(4, 4, max_tree_rows=256) is tr.tree_for_batch(4, 4, max_tree_rows=256)


def test_tree_for_batch_closes_unordered_prefixes():
  # Listed children-first: a prefix may miss a parent; such paths are dropped.
  ordered = [(0, 0), (0, 1), (0,), (1,), (2,), (1, 0), (3,), (4,), (0, 0, 0)]
  t = tr.tree_for_batch(1, 3, choices=ordered, max_tree_rows=5)
  assert t.choices == ((0,), (0, 0), (0, 1))
  assert tr._closed_prefix(((1,), (0, 0), (0, 1), (0,)), 3) == ((1,),)
  assert tr._closed_prefix(((1,), (0, 0), (0, 1), (0,)), 4) == ((1,), (0, 0), (0, 1), (0,))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=0, num_heads=4), RequestError, "batch_size: expected a positive"),
    (dict(batch_size=2.0, num_heads=4), RequestError, "batch_size: expected an integer"),
    (dict(batch_size=1, num_heads=0), tr.TreeError, "num_heads: expected a positive"),
    (dict(batch_size=1, num_heads=4, max_tree_rows=0), RequestError, "max_tree_rows"),
    (dict(batch_size=1, num_heads=4, choices="nope"), tr.TreeError, "choices='nope'; expected one of"),
    (dict(batch_size=1, num_heads=4, choices=[(0,), (2, 0)]), tr.TreeError, "parent path"),
])
def test_tree_for_batch_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    tr.tree_for_batch(**{"max_tree_rows": 256, **kwargs})


def _reference_greedy_tree(acc, num_nodes):
  """Restated: grow from (0,) by the best next-sibling or first-child path."""
  n, k = acc.shape
  tree = [(0,)] if num_nodes > 1 else []
  while 0 < len(tree) < num_nodes - 1:
    cands = ({q[:-1] + (q[-1] + 1,) for q in tree if q[-1] + 1 < k}
             | {q + (0,) for q in tree if len(q) < n}) - set(tree)
    if not cands:
      break
    tree.append(max(sorted(cands), key=lambda q: np.prod([acc[d, r] for d, r in enumerate(q)])))
  return tuple(tree)


def test_tree_from_accuracies_hand_example():
  acc = np.array([[0.6, 0.2], [0.5, 0.1]])
  assert tr.tree_from_accuracies(acc, 4) == ((0,), (0, 0), (1,))
  assert tr.tree_from_accuracies(acc, 100) == ((0,), (0, 0), (1,), (1, 0), (0, 1), (1, 1))
  assert tr.tree_from_accuracies(acc, 1) == ()


@pytest.mark.parametrize("seed", range(4))
def test_tree_from_accuracies_vs_reference(seed):
  rng = np.random.default_rng(seed)
  n, k = int(rng.integers(1, 5)), int(rng.integers(1, 8))
  # Decreasing in rank and in depth, like real head accuracies.
  acc = np.sort(rng.uniform(0.01, 0.7, (n, k)), axis=1)[:, ::-1] * 0.8 ** np.arange(n)[:, None]
  num_nodes = int(rng.integers(2, 40))
  got = tr.tree_from_accuracies(acc, num_nodes)
  assert got == _reference_greedy_tree(acc, num_nodes)
  assert len(got) == min(num_nodes - 1, sum(k ** d for d in range(1, n + 1)))
  for m in range(1, len(got) + 1):
    tr.build_tree(got[:m], topk=k)


@pytest.mark.parametrize("acc, num_nodes, match", [
    (np.full((3,), 0.5), 4, r"expected a non-empty \[n, k\] array"),
    (np.full((2, 3), 1.5), 4, "probabilities in"),
    (np.array([[0.5, np.nan]]), 4, "probabilities in"),
    (np.full((2, 3), 0.5), 0, "num_nodes: expected a positive integer"),
])
def test_tree_from_accuracies_errors(acc, num_nodes, match):
  with pytest.raises(tr.TreeError, match=match):
    tr.tree_from_accuracies(acc, num_nodes)
