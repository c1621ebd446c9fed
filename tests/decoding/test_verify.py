"""Tests of medusa_jax.decoding.verify: candidates, tree verification under each strategy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_h

from medusa_jax.decoding import strategies as st
from medusa_jax.decoding import tree as tr
from medusa_jax.decoding import verify as vf
from medusa_jax.decoding.state import RowParams
from medusa_jax.errors import RequestError

_verify_jit = jax.jit(vf.verify_tree, static_argnames=("tree", "strategy"))


def _rows(batch, temperature, top_p=1.0):
  return RowParams.full(batch, temperature, top_p)
_candidates_jit = jax.jit(vf.tree_candidates, static_argnames="tree")

TWO_BRANCH = tr.build_tree([(0,), (1,), (0, 0), (1, 0)])  # nodes 1=(0,) 2=(1,) 3=(0,0) 4=(1,0)


def _verify(jit):
  return _verify_jit if jit else vf.verify_tree


def _logits_with_argmax(targets, vocab, rng):
  """[B, T, V] random logits whose argmax at [b, t] is targets[b][t]."""
  targets = np.asarray(targets)
  logits = rng.normal(0, 1, targets.shape + (vocab,))
  np.put_along_axis(logits, targets[..., None], 8.0, axis=-1)
  return jnp.asarray(logits, jnp.float32)


def _check_verdict(v, accept, best, path, emitted, next_root):
  np.testing.assert_array_equal(v.accept_len, accept)
  np.testing.assert_array_equal(v.best_node, best)
  np.testing.assert_array_equal(v.path_nodes, path)
  np.testing.assert_array_equal(v.emitted, emitted)
  np.testing.assert_array_equal(v.num_emitted, np.asarray(accept) + 1)
  np.testing.assert_array_equal(v.next_root, next_root)
  for field in (v.accept_len, v.best_node, v.path_nodes, v.emitted, v.num_emitted, v.next_root):
    assert field.dtype == jnp.int32


# ---- hand-checkable tables ----------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_greedy_chain_table(jit):
  chain = tr.build_tree(tr.chain_choices(3))
  tokens = [[0, 1, 2, 3]] * 4  # root 0, drafts [1, 2, 3]
  targets = [
      [1, 5, 3, 4],  # early mismatch: draft [1,2,3], target [1,5,3] -> [1, 5]
      [1, 2, 3, 4],  # all accepted -> [1, 2, 3, 4]
      [7, 2, 3, 4],  # first rejected -> [7]
      [1, 2, 9, 4],  # last rejected -> [1, 2, 9]
  ]
  v = _verify(jit)(chain, jnp.asarray(tokens), _logits_with_argmax(targets, 10, np.random.default_rng(0)),
                   st.Greedy())
  _check_verdict(
      v, accept=[1, 3, 0, 2], best=[1, 3, 0, 2],
      path=[[0, 1, 1, 1], [0, 1, 2, 3], [0, 0, 0, 0], [0, 1, 2, 2]],
      emitted=[[1, 5, -1, -1], [1, 2, 3, 4], [7, -1, -1, -1], [1, 2, 9, -1]],
      next_root=[5, 4, 7, 9])


@pytest.mark.parametrize("jit", [True])
def test_greedy_two_branch_table(jit):
  tokens = [[0, 1, 2, 3, 4]] * 4  # node tokens: (0,)=1 (1,)=2 (0,0)=3 (1,0)=4
  targets = [
      [2, 0, 4, 0, 5],  # second child matches, then its child: [2, 4, 5]
      [1, 9, 0, 0, 0],  # first child, its child rejected: [1, 9]
      [0, 0, 0, 0, 0],  # nothing: [0]
      [1, 3, 0, 6, 0],  # first branch to the end: [1, 3, 6]
  ]
  v = _verify(jit)(TWO_BRANCH, jnp.asarray(tokens),
                   _logits_with_argmax(targets, 10, np.random.default_rng(1)), st.Greedy())
  _check_verdict(v, accept=[2, 1, 0, 2], best=[4, 1, 0, 3],
                 path=[[0, 2, 4], [0, 1, 1], [0, 0, 0], [0, 1, 3]],
                 emitted=[[2, 4, 5], [1, 9, -1], [0, -1, -1], [1, 3, 6]],
                 next_root=[5, 9, 0, 6])


@pytest.mark.parametrize("strategy, jit", [(st.Greedy(), True), (st.Sampling(), False)])
def test_equal_sibling_tokens_follow_the_first(strategy, jit):
  # (0,) and (1,) both carry 5; only (1,)'s child would match, but (0,) is followed.
  tokens = jnp.asarray([[0, 5, 5, 7, 8]])
  targets = [[5, 9, 8, 0, 0]]
  v = _verify(jit)(TWO_BRANCH, tokens, _logits_with_argmax(targets, 10, np.random.default_rng(2)),
                   strategy, jax.random.key(0), _rows(1, 1.0, 1e-6))
  _check_verdict(v, accept=[1], best=[1], path=[[0, 1, 1]], emitted=[[5, 9, -1]], next_root=[9])


def _log(p):
  return np.log(np.asarray(p, np.float64))


@pytest.mark.parametrize("jit", [False, True])
def test_typical_chain_table(jit):
  # p_root = [.6, .25, .1, .05]: H = 1.033, 0.3 exp(-H) = 0.107, threshold = min(.09, .107) = .09,
  # so tokens 0, 1, 2 pass and 3 does not. Uniform p at node 1: threshold .075 < .25, all pass.
  # Node 2 (and a rejected root) peak on token 0, so the bonus is 0 whatever the key.
  strategy = st.Typical()
  root = _log([0.6, 0.25, 0.1, 0.05])
  uniform = np.zeros(4)
  peak = np.array([12.0, 0.0, 0.0, 0.0])
  chain = tr.build_tree(tr.chain_choices(2))
  logits = jnp.asarray([[root, uniform, peak], [root, uniform, peak]], jnp.float32)
  tokens = jnp.asarray([[1, 2, 3], [1, 3, 1]])
  v = _verify(jit)(chain, tokens, logits, strategy, jax.random.key(3), _rows(2, 1.0))
  np.testing.assert_array_equal(v.accept_len, [2, 0])
  np.testing.assert_array_equal(v.emitted[0], [2, 3, 0])
  # Row 1 ends at the root, whose bonus is a sample of tokens {0, 1, 2}.
  assert int(v.emitted[1, 0]) in (0, 1, 2) and list(v.emitted[1, 1:]) == [-1, -1]


@pytest.mark.parametrize("jit", [True])
def test_typical_tree_table(jit):
  # Medusa's test tree: 1=(0,) 2=(1,) 3=(0,0). Root as above; (0,) carries 2 (p=.1), (1,) carries
  # 0 (p=.6): both pass. Row 0: (0,0) is rejected, so the tie at depth 1 goes to the likelier
  # (1,). Row 1: (0,0) passes, so the longer path through the less likely (0,) wins.
  strategy = st.Typical()
  t = tr.build_tree([[0], [1], [0, 0]])
  root = _log([0.6, 0.25, 0.1, 0.05])
  peak = np.array([12.0, 0.0, 0.0, 0.0])
  node1_rejects_3 = _log([0.7, 0.2, 0.09, 0.01])
  logits = jnp.asarray([[root, node1_rejects_3, peak, peak], [root, peak, peak, peak]], jnp.float32)
  tokens = jnp.asarray([[1, 2, 0, 3], [1, 2, 0, 0]])
  v = _verify(jit)(t, tokens, logits, strategy, jax.random.key(4), _rows(2, 1.0))
  _check_verdict(v, accept=[1, 2], best=[2, 3], path=[[0, 2, 2], [0, 1, 3]],
                 emitted=[[0, 0, -1], [2, 0, 0]], next_root=[0, 0])


def test_root_only_tree():
  t = tr.build_tree([])
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(3, 1, 7)), jnp.float32)
  for strategy, temperature in ((st.Greedy(), 0.0), (st.Sampling(), 0.5), (st.Typical(), 0.7)):
    v = _verify_jit(t, jnp.asarray([[1], [2], [3]]), logits, strategy, jax.random.key(1),
                    _rows(3, temperature))
    np.testing.assert_array_equal(v.accept_len, 0)
    np.testing.assert_array_equal(v.path_nodes, [[0]] * 3)
    assert v.emitted.shape == (3, 1)
    np.testing.assert_array_equal(v.emitted[:, 0], v.next_root)
  v = vf.verify_tree(t, jnp.asarray([[1], [2], [3]]), logits, st.Greedy())
  np.testing.assert_array_equal(v.next_root, np.asarray(logits[:, 0]).argmax(-1))


# ---- random trees vs a float64 reference walk ----------------------------------


def _random_tree(rng, max_paths=14, max_depth=4, topk=4):
  paths = []
  for _ in range(int(rng.integers(1, max_paths + 1))):
    parents = [()] + [p for p in paths if len(p) < max_depth]
    parent = parents[rng.integers(len(parents))]
    used = {p[-1] for p in paths if p[:-1] == parent and len(p) == len(parent) + 1}
    free = [r for r in range(topk) if r not in used]
    if free:
      paths.append(parent + (int(rng.choice(free)),))
  return tr.build_tree(paths, topk=topk)


def _greedy_reference(t, tokens, logits):
  """Walks down one row: follow the first child whose token is the argmax."""
  node = 0
  while True:
    y = int(np.argmax(logits[node]))
    nxt = [c for c in t.children[node] if c >= 0 and tokens[c] == y]
    if not nxt:
      return node, y
    node = nxt[0]


def _typical_reference(t, tokens, logits, s, temperature):
  """FasterDecoding/Medusa's fast typical posterior over retrieve_indices, in float64."""
  z = np.asarray(logits, np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  entropy = -(p * np.log(p + 1e-5)).sum(-1)
  thr = np.minimum(s.posterior_threshold, s.posterior_alpha * np.exp(-entropy))
  ends = []
  for row in t.retrieve_indices:
    nodes = [int(u) for u in row if u >= 0]
    length, loglik = 0, 0.0
    for u, c in zip(nodes[:-1], nodes[1:]):
      q = p[u, tokens[c]]
      if not q > thr[u]:
        break
      length, loglik = length + 1, loglik + np.log(q)
    ends.append((length, loglik, -nodes[length]))
  # Longest, then likeliest; exact ties (equal sibling tokens) go to the lower node index.
  return -max(ends)[2], p, thr


@pytest.mark.parametrize("seed", [10, 20, 30])
def test_greedy_random_trees_vs_reference(seed):
  rng = np.random.default_rng(seed)
  for jit in (True,):
    t = _random_tree(rng)
    b, v = 12, 5
    tokens = rng.integers(0, v, (b, t.num_nodes))
    logits = rng.normal(0, 1, (b, t.num_nodes, v))
    # Bias each node's argmax to one of its children so that paths go deep.
    for i in range(b):
      for u in range(t.num_nodes):
        kids = t.children[u][t.children[u] >= 0]
        if kids.size and rng.random() < 0.8:
          logits[i, u, tokens[i, rng.choice(kids)]] += 6.0
    got = _verify(jit)(t, jnp.asarray(tokens), jnp.asarray(logits, jnp.float32), st.Greedy())
    for i in range(b):
      node, y = _greedy_reference(t, tokens[i], logits[i])
      a = int(t.node_depth[node])
      path = t.path_to_node[node]
      assert int(got.best_node[i]) == node and int(got.accept_len[i]) == a
      np.testing.assert_array_equal(got.path_nodes[i], path)
      expect = list(tokens[i, path[1:a + 1]]) + [y] + [-1] * (t.depth - a)
      np.testing.assert_array_equal(got.emitted[i], expect)


@pytest.mark.parametrize("seed", [11, 21, 31])
def test_typical_random_trees_vs_reference(seed):
  rng = np.random.default_rng(seed)
  strategy = st.Typical(posterior_threshold=0.09, posterior_alpha=0.3)
  for jit in (True,):
    t = _random_tree(rng)
    b, v = 12, 7
    tokens = rng.integers(0, v, (b, t.num_nodes))
    logits = rng.normal(0, 1.5, (b, t.num_nodes, v))
    got = _verify(jit)(t, jnp.asarray(tokens), jnp.asarray(logits, jnp.float32), strategy,
                       jax.random.key(7), _rows(b, 0.7))
    for i in range(b):
      node, p, thr = _typical_reference(t, tokens[i], logits[i], strategy, 0.7)
      a = int(t.node_depth[node])
      assert int(got.best_node[i]) == node
      np.testing.assert_array_equal(got.path_nodes[i], t.path_to_node[node])
      bonus = int(got.next_root[i])
      assert p[node, bonus] >= thr[node] - 1e-6  # the bonus passes the typical threshold
      expect = list(tokens[i, t.path_to_node[node][1:a + 1]]) + [bonus] + [-1] * (t.depth - a)
      np.testing.assert_array_equal(got.emitted[i], expect)


@pytest.mark.parametrize("seed", [12, 22])
def test_sampling_verdicts_are_consistent_paths(seed):
  rng = np.random.default_rng(seed)
  jit = True
  for _ in range(1):
    t = _random_tree(rng)
    b, v = 16, 4
    tokens = rng.integers(0, v, (b, t.num_nodes))
    logits = jnp.asarray(rng.normal(0, 1, (b, t.num_nodes, v)), jnp.float32)
    got = _verify(jit)(t, jnp.asarray(tokens), logits, st.Sampling(),
                       jax.random.key(int(rng.integers(1 << 30))), _rows(b, 0.9, 0.95))
    parent = t.parent
    for i in range(b):
      a = int(got.accept_len[i])
      path = np.asarray(got.path_nodes[i])
      assert path[0] == 0 and all(parent[path[j + 1]] == path[j] for j in range(a))
      assert (path[a:] == path[a]).all() and t.node_depth[path[a]] == a
      np.testing.assert_array_equal(got.emitted[i, :a], tokens[i, path[1:a + 1]])
      assert int(got.emitted[i, a]) == int(got.next_root[i])
      assert (np.asarray(got.emitted[i, a + 1:]) == -1).all()
    # A nucleus of one token makes sampling greedy.
    tiny = _verify(jit)(t, jnp.asarray(tokens), logits, st.Sampling(), jax.random.key(0),
                        _rows(b, 1.0, 1e-6))
    greedy = _verify(jit)(t, jnp.asarray(tokens), logits, st.Greedy())
    jax.tree.map(np.testing.assert_array_equal, tiny, greedy)


# ---- candidates and root choice ------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_tree_candidates_vs_numpy(jit):
  rng = np.random.default_rng(13)
  t = tr.build_tree(tr.MC_SIM_7B_63)
  spec = rng.normal(0, 1, (3, 5, 50)).astype(np.float32)
  root = rng.integers(0, 50, 3)
  fn = _candidates_jit if jit else vf.tree_candidates
  got = np.asarray(fn(t, jnp.asarray(root, jnp.int32), jnp.asarray(spec)))
  assert got.shape == (3, 64) and got.dtype == np.int32
  order = np.argsort(-spec, axis=-1, kind="stable")  # [B, n, V], ranks per head
  top = np.concatenate([root[:, None], order[:, :t.depth, :t.topk].reshape(3, -1)], axis=1)
  np.testing.assert_array_equal(got, top[:, t.candidate_index])
  for b in range(3):
    for u, path in enumerate(t.choices, start=1):
      assert got[b, u] == order[b, len(path) - 1, path[-1]]


@settings(max_examples=20, deadline=None)
@given(shape=st_h.tuples(st_h.integers(1, 3), st_h.integers(1, 4), st_h.integers(1, 300)),
       k=st_h.integers(1, 12), chunk=st_h.sampled_from([0, 4, 16, 64]),
       levels=st_h.sampled_from([3, 50, 0]), seed=st_h.integers(0, 2 ** 31 - 1))
def test_top_k_indices_is_lax_top_k_ties_included(shape, k, chunk, levels, seed):
  """Both passes (chunks of 4-64, a last chunk padded) against a stable NumPy sort: values
  from a few levels (many ties) or continuous, with -inf entries."""
  rng = np.random.default_rng(seed)
  k = min(k, shape[-1])
  x = (rng.integers(0, levels, shape) if levels else rng.standard_normal(shape)).astype(np.float32)
  x[rng.random(shape) < 0.1] = -np.inf
  got = np.asarray(vf.top_k_indices(jnp.asarray(x), k, chunk=chunk))
  want = np.argsort(-x.astype(np.float64), axis=-1, kind="stable")[..., :k]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1]))


def test_tree_candidates_chain_is_argmax_and_errors():
  rng = np.random.default_rng(14)
  spec = jnp.asarray(rng.normal(size=(2, 3, 9)), jnp.float32)
  got = vf.tree_candidates(tr.build_tree(tr.chain_choices(3)), jnp.asarray([4, 5]), spec)
  np.testing.assert_array_equal(got[:, 1:], np.asarray(spec).argmax(-1))
  np.testing.assert_array_equal(got[:, 0], [4, 5])
  with pytest.raises(tr.TreeError, match="depth 4 needs 4 Medusa heads; spec_logits has 3"):
    vf.tree_candidates(tr.build_tree(tr.chain_choices(4)), jnp.asarray([4, 5]), spec)
  with pytest.raises(tr.TreeError, match="top-10 ranks but the vocabulary has 9"):
    vf.tree_candidates(tr.build_tree([(9,)]), jnp.asarray([4, 5]), spec)
  with pytest.raises(tr.TreeError, match=r"root_token: expected shape \(2,\)"):
    vf.tree_candidates(TWO_BRANCH, jnp.asarray([4]), spec)


def test_verify_argument_errors():
  rng = np.random.default_rng(16)
  logits = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 6, (2, 5)))
  with pytest.raises(tr.TreeError, match=r"expected tree_tokens \[B, 4\]"):
    vf.verify_tree(tr.build_tree([[0], [1], [0, 0]]), tokens, logits, st.Greedy())
  with pytest.raises(tr.TreeError, match=r"logits \[B, 5, V\]"):
    vf.verify_tree(TWO_BRANCH, tokens, logits[:, :4], st.Greedy())
  with pytest.raises(RequestError, match="key: Sampling needs a PRNG key"):
    vf.verify_tree(TWO_BRANCH, tokens, logits, st.Sampling())
  with pytest.raises(RequestError, match=r"rows: Sampling needs per-row temperatures"):
    vf.verify_tree(TWO_BRANCH, tokens, logits, st.Sampling(), jax.random.key(0))
  with pytest.raises(RequestError, match="rows: Typical needs per-row temperatures"):
    vf.verify_tree(TWO_BRANCH, tokens, logits, st.Typical(), jax.random.key(0))
  with pytest.raises(RequestError, match="strategy: expected Greedy, Typical or Sampling"):
    vf.verify_tree(TWO_BRANCH, tokens, logits, "greedy")


# ---- sample-then-match keeps the target distribution ---------------------------------

VOCAB = 6
CHI_TREE = tr.build_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
CHI_CHAIN = tr.build_tree(tr.chain_choices(3))


def _warped_table(table, temperature, top_p):
  """float64 warped next-token distributions W[prev, cur, :] of a trigram logits table."""
  z = np.asarray(table, np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  order = np.argsort(-p, axis=-1, kind="stable")
  sorted_p = np.take_along_axis(p, order, -1)
  keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, -1)
  q = np.where(keep, p, 0.0)
  return q / q.sum(-1, keepdims=True)


def _first_two_tokens(tree, strategy, table, rows, key, temperature, top_p, context=(2, 4)):
  """Two speculative steps over `rows` independent copies of one context.

  The target is a trigram model: the logits of the token after (prev, cur) are
  table[prev, cur]. Drafts are random per row and per step. Returns the first
  two new tokens of every row: from step 1, or step 1's first and step 2's
  first when step 1 accepted nothing.
  """
  heads = tree.depth
  table = jnp.asarray(table, jnp.float32)
  draft_bias = jnp.asarray([[[2.0, 1.0, 0.0, -0.5, -1.0, 1.5]]], jnp.float32)
  parent = np.maximum(tree.parent, 0)
  is_root_1xT = jnp.asarray(tree.parent < 0)[None, :]

  def step(prev_B, root_B, k_draft, k_verify):
    # Drafts prefer some tokens over others, as real heads do; with uniform
    # drafts some biased verifiers would go unnoticed.
    spec = 2.0 * jax.random.normal(k_draft, (rows, heads, VOCAB)) + draft_bias
    tokens_BxT = vf.tree_candidates(tree, root_B, spec)
    prev_BxT = jnp.where(is_root_1xT, prev_B[:, None], tokens_BxT[:, parent])
    return vf.verify_tree(tree, tokens_BxT, table[prev_BxT, tokens_BxT], strategy, k_verify,
                          _rows(rows, temperature, top_p))

  @jax.jit
  def run(key):
    k = jax.random.split(key, 4)
    prev = jnp.full((rows,), context[0], jnp.int32)
    cur = jnp.full((rows,), context[1], jnp.int32)
    v1 = step(prev, cur, k[0], k[1])
    v2 = step(cur, v1.next_root, k[2], k[3])  # used only where step 1 accepted nothing
    second = jnp.where(v1.num_emitted >= 2, v1.emitted[:, 1], v2.emitted[:, 0])
    return v1.emitted[:, 0], second, v1.accept_len

  return [np.asarray(x) for x in run(key)]


def _chi_square(counts, probs):
  """(statistic, conservative 1e-5 quantile) of counts vs exact probabilities.

  Cells of probability 0 must be empty (else the statistic is inf); cells
  expecting fewer than 5 counts are pooled.
  """
  counts, probs = counts.ravel().astype(np.float64), probs.ravel()
  n = counts.sum()
  if counts[probs == 0].sum() > 0:
    return math.inf, 0.0
  expect = probs * n
  small = (expect < 5) & (probs > 0)
  big = expect >= 5
  obs = np.append(counts[big], counts[small].sum())
  exp = np.append(expect[big], expect[small].sum())
  obs, exp = obs[exp > 0], exp[exp > 0]
  stat = float(((obs - exp) ** 2 / exp).sum())
  df = obs.size - 1
  z = 4.265  # upper 1e-5 normal quantile; Wilson-Hilferty chi-square approximation
  quantile = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
  return stat, quantile


def _distribution_stats(tree, strategy, temperature, top_p, rows=60_000, seed=0):
  rng = np.random.default_rng(seed)
  table = rng.normal(0, 1.2, (VOCAB, VOCAB, VOCAB))
  first, second, accepted = _first_two_tokens(tree, strategy, table, rows, jax.random.key(seed),
                                              temperature, top_p)
  w = _warped_table(table, temperature, top_p)
  p1 = w[2, 4]
  p12 = p1[:, None] * w[4]  # P(t1 = x, t2 = y) = W[2,4,x] W[4,x,y]
  c1 = np.bincount(first, minlength=VOCAB)
  c12 = np.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB).reshape(VOCAB, VOCAB)
  return _chi_square(c1, p1), _chi_square(c12, p12), accepted


@pytest.mark.parametrize("tree, temperature, top_p", [
    (CHI_CHAIN, 1.0, 1.0), (CHI_TREE, 1.0, 1.0), (CHI_TREE, 0.7, 0.8)])
def test_sampling_keeps_the_target_distribution(tree, temperature, top_p):
  strategy = st.Sampling()
  (s1, q1), (s12, q12), accepted = _distribution_stats(tree, strategy, temperature, top_p)
  assert s1 < q1, (s1, q1)
  assert s12 < q12, (s12, q12)
  # Not vacuous: speculation both succeeds and fails, and step 2 is exercised.
  assert 0.1 < (accepted >= 1).mean() < 0.95
  assert (accepted >= 2).any()


def test_chi_square_rejects_a_biased_acceptance():
  # Typical acceptance at the same temperature is not distribution-preserving: the test must see it.
  (s1, q1), (s12, q12), _ = _distribution_stats(CHI_TREE, st.Typical(), 1.0, 1.0)
  assert s1 > q1 or s12 > q12, (s1, q1, s12, q12)
