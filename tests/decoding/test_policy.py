"""The measured speculation policy: expected tokens, the choice rule, the cache, refine."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_jax.decoding import policy as P
from medusa_jax.decoding import tree as tree_lib

CHOICES = ((0,), (1,), (0, 0), (2,), (0, 1), (1, 0), (0, 0, 0))


def _reference_expected(tree, acc) -> float:
  """1 + sum over nodes of prod along the path, by walking parents, in float64."""
  acc = np.asarray(acc, np.float64)
  total = 1.0
  for node in range(1, tree.num_nodes):
    p, u = 1.0, node
    while u > 0:
      d, r = int(tree.node_depth[u]) - 1, int(tree.node_rank[u])
      p *= acc[d, r] if d < acc.shape[0] and r < acc.shape[1] else 0.0
      u = int(tree.parent[u])
    total += p
  return total


def test_expected_tokens_hand_checked():
  acc = [[0.5, 0.25], [0.4, 0.1]]
  chain = tree_lib.build_tree(tree_lib.chain_choices(2))
  assert P.expected_tokens(chain, acc) == pytest.approx(1 + 0.5 + 0.5 * 0.4)
  wide = tree_lib.build_tree(((0,), (1,), (1, 0)))
  assert P.expected_tokens(wide, acc) == pytest.approx(1 + 0.5 + 0.25 + 0.25 * 0.4)
  assert P.expected_tokens(None, acc) == 1.0
  # A rank past the table is never accepted.
  assert P.expected_tokens(tree_lib.build_tree(((0,), (5,))), acc) == pytest.approx(1.5)


@pytest.mark.parametrize("seed", range(4))
def test_expected_tokens_against_float64_reference(seed):
  rng = np.random.default_rng(seed + np.random.default_rng().integers(1 << 20))
  acc = rng.uniform(0.01, 0.9, size=(4, 10))
  size = int(rng.integers(2, 40))
  tree = tree_lib.build_tree(tree_lib.tree_from_accuracies(acc, size))
  assert P.expected_tokens(tree, acc) == pytest.approx(_reference_expected(tree, acc), rel=1e-12)
  depth = P.depth_probs(tree, acc)
  assert depth[0] == 1.0 and depth.sum() == pytest.approx(P.expected_tokens(tree, acc))


def test_bad_acceptance_is_refused():
  tree = tree_lib.build_tree(((0,),))
  for bad in ([[1.5]], [[math.nan]], [1.0, 2.0], [[]]):
    with pytest.raises(P.PolicyError, match="acceptance"):
      P.expected_tokens(tree, bad)


def test_candidates_plain_chain_and_prefixes():
  cands = P.candidate_trees(CHOICES, 2)
  assert cands[0] is None
  assert cands[1].choices == ((0,), (0, 0))
  keys = [P.tree_key(t) for t in cands]
  assert len(keys) == len(set(keys))
  assert all(t is None or t.depth <= 2 for t in cands)
  # The 3-path prefix of the depth-2 list: (0,), (1,), (0, 0).
  assert tree_lib.build_tree(((0,), (1,), (0, 0))) in cands


_TIMES = st.lists(st.floats(1e-4, 1.0), min_size=4, max_size=4)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(_TIMES, min_size=1, max_size=3),
       acc=st.lists(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), min_size=2,
                    max_size=2))
def test_choice_never_slower_than_plain(rows, acc):
  trees = P.candidate_trees(CHOICES, 2)[:4]
  policy = P.SpeculationPolicy(candidates=tuple(None if t is None else t.choices for t in trees),
                               batch_sizes=tuple(range(1, len(rows) + 1)),
                               step_times=tuple(tuple(r) for r in rows), acceptance=acc)
  for b in policy.batch_sizes:
    rates, chosen = policy.rates(b), policy.choice(b)
    plain_rate = 1.0 / rows[b - 1][0]
    assert rates[chosen] >= plain_rate * (1 - 1e-12)
    if chosen != 0:  # a tree only when the best, and by the margin over plain
      assert rates[chosen] == max(rates) and rates[chosen] > 1.1 * plain_rate
    else:
      assert max(rates) <= 1.1 * plain_rate * (1 + 1e-12)
    tree = policy.tree_for(b)
    assert (tree is None) == (chosen == 0)


def test_a_tree_must_beat_plain_by_the_margin():
  trees = P.candidate_trees(CHOICES, 2)[:2]
  cands = tuple(None if t is None else t.choices for t in trees)
  acc = ((0.5,) * 3,) * 2
  gain = P.expected_tokens(trees[1], acc)  # tokens per step of the tree
  for ratio, margin, want in ((1.05, 0.1, None), (1.15, 0.1, cands[1]), (1.05, 0.0, cands[1])):
    # the tree's step costs gain / ratio plain steps: it promises `ratio` x plain's rate
    policy = P.SpeculationPolicy(candidates=cands, batch_sizes=(1,), acceptance=acc,
                                 step_times=((1.0, gain / ratio),), margin=margin)
    assert (None if policy.tree_for(1) is None else policy.tree_for(1).choices) == want
  with pytest.raises(P.PolicyError, match="margin"):
    P.SpeculationPolicy(candidates=cands, batch_sizes=(1,), step_times=((1.0, 1.0),), margin=-1)


def test_bucket_and_json_round_trip():
  trees = P.candidate_trees(CHOICES, 2)[:3]
  times = {(P.tree_key(t), b): s for b, row in ((1, (1.0, 1.1, 1.2)), (4, (1.0, 3.0, 3.0)))
           for t, s in zip(trees, row)}
  acc = [[0.6, 0.3, 0.1], [0.5, 0.2, 0.1]]
  policy = P.SpeculationPolicy.from_times(times, trees, acceptance=acc)
  assert policy.tree_for(1) is not None      # 1.6+ tokens for 1.1-1.2x the time
  assert policy.tree_for(3) is None          # bucket 4: 3x the time, never worth it
  assert policy.tree_for(100) is None        # past the largest bucket: the largest
  again = P.SpeculationPolicy.from_json(json.loads(json.dumps(policy.to_json())))
  assert again == policy
  with pytest.raises(P.PolicyError, match="format"):
    P.SpeculationPolicy.from_json({"format": 99})
  with pytest.raises(P.PolicyError, match="step_times"):
    P.SpeculationPolicy(candidates=(None,), batch_sizes=(1,), step_times=((-1.0,),))


def test_refine_moves_acceptance_toward_observed():
  tree = tree_lib.build_tree(tree_lib.chain_choices(2))
  policy = P.SpeculationPolicy(candidates=(None, tree.choices), batch_sizes=(1,),
                               step_times=((1.0, 1.05),), acceptance=[[0.5, 0.1], [0.5, 0.1]])
  # Heads far worse than the table: nearly every step accepts nothing.
  worse = P.refine(policy, [1000, 10, 1], tree=tree, prior_steps=0)
  assert worse.acceptance[0][0] == pytest.approx(11 / 1011)
  assert worse.acceptance[1][0] == pytest.approx(1 / 11)
  assert worse.tree_for(1) is None and policy.tree_for(1) is not None
  # Heads that match the table leave it unchanged (counts in proportion 0.5 / 0.25 / 0.25).
  same = P.refine(policy, [500, 250, 250], tree=tree, prior_steps=16)
  np.testing.assert_allclose(same.acceptance, policy.acceptance, rtol=1e-12)
  assert P.refine(policy, [0, 0, 0], tree=tree) is policy
  with pytest.raises(P.PolicyError, match="accept_hist"):
    P.refine(policy, [1, 2, 3, 4], tree=tree)


def test_acceptance_from_bundled_recipe():
  from medusa_jax.bundled import __path__ as bundled
  acc = P.acceptance_from_recipe(f"{bundled[0]}/heads/smollm2-135m-instruct")
  assert acc is not None and len(acc) == 5 and acc[0][0] == pytest.approx(0.38351)


# ---- on the tiny model: timing, cache round trip, a corrupt cache file


_REAL_MEASURE = P.measure_step_times


def _measure(tiny, tmp_path, monkeypatch, calls, **kw):
  _, _, _, dec = tiny

  def counted(*args, **kwargs):
    calls.append(1)
    return _REAL_MEASURE(*args, **kwargs)
  monkeypatch.setattr(P, "measure_step_times", counted)
  return P.load_or_measure(dec, choices=((0,), (1,), (0, 0)), num_heads=2, acceptance=None,
                           batch_sizes=(1, 2), cache_len=32, cache_dir=tmp_path,
                           device_kind="cpu-test", model_key="tiny", repeats=1, **kw)


def test_tiny_timing_cache_round_trip_and_corrupt_file(tiny, tmp_path, monkeypatch):
  calls = []
  policy = _measure(tiny, tmp_path, monkeypatch, calls)
  assert len(calls) == 1
  assert all(t > 0 for row in policy.step_times for t in row)
  assert policy.candidates[0] is None and len(policy.candidates) >= 2
  for b in (1, 2, 3):
    tree = policy.tree_for(b)
    assert tree is None or tree.choices in policy.candidates
  (path,) = tmp_path.iterdir()
  # Cached: read back, not measured.
  assert _measure(tiny, tmp_path, monkeypatch, calls) == policy and len(calls) == 1
  # Corrupt file (fault injection): measured again and replaced by a valid one.
  path.write_text('{"key": {"device_kind": "cpu-test"}, "policy": [1, 2')
  again = _measure(tiny, tmp_path, monkeypatch, calls)
  assert len(calls) == 2 and again.candidates == policy.candidates
  assert json.loads(path.read_text())["policy"]["format"] == 1
  # A file whose table does not fit its candidates is refused the same way.
  obj = json.loads(path.read_text())
  obj["policy"]["step_times_s"] = [[1.0]]
  path.write_text(json.dumps(obj))
  _measure(tiny, tmp_path, monkeypatch, calls)
  assert len(calls) == 3
  # The model's options are part of the key, as the file reads them back (a tuple is a
  # list there): the same options find the table again; values JSON cannot hold are refused.
  opts = dict(layout="out_in", sizes=(1, 2))
  _measure(tiny, tmp_path, monkeypatch, calls, model_options=opts)
  _measure(tiny, tmp_path, monkeypatch, calls, model_options=dict(reversed(opts.items())))
  assert len(calls) == 4
  with pytest.raises(P.PolicyError, match="model_options"):
    _measure(tiny, tmp_path, monkeypatch, calls, model_options=dict(x=object()))
  # Another medusa_jax version's table (its kernels may differ) is not reused.
  monkeypatch.setattr(P, "MEDUSA_JAX_VERSION", "0.0.0-other")
  _measure(tiny, tmp_path, monkeypatch, calls)
  assert len(calls) == 5 and len(list(tmp_path.iterdir())) == 3


# ---- pruning: candidates that cannot win are not timed


def test_candidates_that_cannot_win_are_not_timed(tiny):
  _, _, _, dec = tiny
  trees = P.candidate_trees(((0,), (1,), (0, 0)), 2)
  assert len(trees) >= 3
  # Heads that never hit: each tree's 1 expected token over a step at least as
  # long as the slowest timed one cannot beat plain decoding, so after the
  # first tree nothing more is timed.
  never = ((0.0,) * 3,) * 2
  times = P.measure_step_times(dec, trees, (1,), 64, repeats=1, warmup=1, acceptance=never)
  finite = [k for k, t in times.items() if math.isfinite(t)]
  assert ("plain", 1) in finite and len(finite) == 2 and len(times) == len(trees)
  policy = P.SpeculationPolicy.from_times(times, trees, acceptance=never)
  assert math.isfinite(policy.step_times[0][policy.choice(1)])  # an untimed one never wins
  back = P.SpeculationPolicy.from_json(json.loads(json.dumps(policy.to_json())))
  assert back == policy and sum(math.isinf(t) for t in back.step_times[0]) == len(trees) - 2
  # Without an acceptance table nothing is pruned.
  times = P.measure_step_times(dec, trees, (1,), 64, repeats=1, warmup=1)
  assert all(math.isfinite(t) for t in times.values())
  # K steps per timed call: a cache too short for K steps of the deepest tree is refused.
  with pytest.raises(P.PolicyError, match="16 steps per call"):
    P.measure_step_times(dec, trees[-1:], (1,), 40, repeats=1, steps_per_call=16)
  with pytest.raises(P.PolicyError, match="plain decoding must be timed"):
    P.SpeculationPolicy(candidates=(None,), batch_sizes=(1,), step_times=((math.inf,),))


def test_engine_measures_its_tree_policy_once_per_batch_bucket(tiny, tmp_path, monkeypatch):
  from medusa_jax.decoding.engine import Engine
  cfg, llama, heads, _ = tiny
  monkeypatch.setenv("MEDUSA_JAX_HOME", str(tmp_path))
  calls = []

  def counted(decoder, trees, batch_sizes, *args, **kwargs):
    calls.append(tuple(batch_sizes))
    return _REAL_MEASURE(decoder, trees, batch_sizes, *args, **kwargs)
  monkeypatch.setattr(P, "measure_step_times", counted)
  choices = ((0,),)  # candidates: plain, the chain, the one-draft tree
  eng = Engine(llama, None, heads, max_cache_len=128, tree_choices=choices, tree_policy="measured")
  rng = np.random.default_rng()
  prompts = [list(map(int, rng.integers(0, cfg.vocab_size, 4)))]
  want = eng.generate(prompts, 7).tokens  # plain: nothing timed
  assert calls == []
  one = eng.generate(prompts[:1], 7, speculate="tree")
  assert calls == [(1,)] and set(eng.measured) == {1}
  assert one.tokens == want[:1]
  assert one.speculation_skipped == (eng.measured[1].tree_for(1) is None)
  eng.generate(prompts[:1], 7, speculate="tree")
  assert calls == [(1,)]                            # measured once per bucket
  # A new engine on the same device and model reads the table from disk.
  again = Engine(llama, None, heads, max_cache_len=128, tree_choices=choices,
                 tree_policy="measured")
  assert again.generate(prompts[:1], 7, speculate="tree").tokens == want[:1]
  assert calls == [(1,)] and len(list((tmp_path / "policy").iterdir())) == 1
  # The same model running other kernels (here: its other projection layout) is timed anew.
  layout = "out_in" if llama.kernel_layout == "in_out" else "in_out"
  other = Engine(llama.with_kernel_layout(layout), None, heads, max_cache_len=128,
                 tree_choices=choices, tree_policy="measured")
  assert other.generate(prompts[:1], 7, speculate="tree").tokens == want[:1]
  assert calls == [(1,), (1,)] and len(list((tmp_path / "policy").iterdir())) == 2
  budget = Engine(llama, None, heads, max_cache_len=128, tree_choices=choices,
                  tree_policy="budget")
  assert budget.context.tree_policy is None


# ---- static batches: valued by their slowest rows


def _brute_force_min(pool, batch):
  """E[min of `batch` draws with replacement] by enumerating every draw (float64)."""
  import itertools
  pool = np.asarray(pool, np.float64)
  draws = list(itertools.product(pool, repeat=batch))
  return float(np.mean([min(d) for d in draws]))


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_static_batch_factor_is_the_expected_minimum(batch):
  rng = np.random.default_rng()
  pool = tuple(float(x) for x in rng.uniform(0.2, 2.0, size=rng.integers(2, 6)))
  policy = P.SpeculationPolicy(candidates=(None,), batch_sizes=(1,), step_times=((1.0,),),
                               row_spread=pool)
  want = _brute_force_min(pool, batch) / np.mean(pool)
  assert policy.static_batch_factor(batch) == pytest.approx(want, rel=1e-12)


def test_static_batch_factor_limits_and_errors():
  def factor(pool, batch):
    return P.SpeculationPolicy(candidates=(None,), batch_sizes=(1,), step_times=((1.0,),),
                               row_spread=pool).static_batch_factor(batch)
  assert factor((), 16) == 1.0 and factor((0.7, 0.7, 0.7), 64) == pytest.approx(1.0)
  assert factor((0.0, 0.0), 4) == 1.0          # nothing ever accepted: no scaling to do
  pool = (0.5, 1.0, 1.5)
  values = [factor(pool, b) for b in (1, 2, 4, 16, 256)]
  assert values[0] == 1.0 and all(a > b for a, b in zip(values, values[1:]))
  assert values[-1] == pytest.approx(0.5, rel=1e-6)  # -> min / mean
  assert 0.5 < factor(P.DEFAULT_ROW_SPREAD, 16) < 0.6
  with pytest.raises(P.PolicyError, match="batch"):
    factor(pool, 0)
  with pytest.raises(P.PolicyError, match="row_spread"):
    factor((1.0, -0.5), 2)


def test_a_static_batch_needs_its_slowest_rows_to_gain():
  """The same times and acceptance: a tree for serving rows (each at its own mean) and for
  one row, plain decoding for a static batch of 16 whose rows accept unevenly."""
  trees = P.candidate_trees(CHOICES, 2)[:2]
  cands = tuple(None if t is None else t.choices for t in trees)
  acc = ((0.6,) * 3,) * 2
  e = P.expected_tokens(trees[1], acc)
  policy = P.SpeculationPolicy(candidates=cands, batch_sizes=(16,), acceptance=acc,
                               step_times=((1.0, e / 1.3),), row_spread=P.DEFAULT_ROW_SPREAD)
  assert policy.tree_for(16) is not None and policy.tree_for(1, static=True) is not None
  assert policy.tree_for(16, static=True) is None
  f = policy.static_batch_factor(16)
  rates = policy.rates(16, static=True)
  assert rates[1] == pytest.approx((1 + f * (e - 1)) / (e / 1.3))
  rows = policy.table(static=True)
  assert [r["chosen"] for r in rows] == [True, False] and rows[1]["batch_factor"] == f
  even = P.SpeculationPolicy(candidates=cands, batch_sizes=(16,), acceptance=acc,
                             step_times=((1.0, e / 1.3),), row_spread=(1.0,) * 8)
  assert even.tree_for(16, static=True) is not None


def test_row_spread_from_rows_and_the_pool():
  got = P.row_spread([256, 256, 101, 10], [128, 200, 50, 5], min_steps=16)
  extra = np.array([255 / 128 - 1, 255 / 200 - 1, 100 / 50 - 1])
  np.testing.assert_allclose(got, extra / extra.mean())
  assert P.row_spread([5, 5], [4, 4]) == ()             # too few steps
  assert P.row_spread([100, 5, 6], [40, 4, 4]) == ()    # one row alone says nothing
  assert P.row_spread([20, 20], [19, 19], min_steps=1) == ()  # nothing accepted
  for bad in (([1, 2], [3]), ([-1], [20])):
    with pytest.raises(P.PolicyError, match="row_spread"):
      P.row_spread(*bad)
  prior = P.DEFAULT_ROW_SPREAD
  pool = P.observe_rows(prior, (1.0, 2.0))
  assert pool == prior + (1.0, 2.0)                      # the prior stays while few are seen
  seen = tuple(float(x) for x in np.linspace(0.5, 1.5, len(prior)))
  assert P.observe_rows(pool, seen) == (1.0, 2.0) + seen  # as many seen: the prior goes
  assert P.observe_rows((), seen, keep=4) == seen[-4:]
  assert P.observe_rows(pool, ()) == pool
  with pytest.raises(P.PolicyError, match="spread"):
    P.observe_rows(pool, (float("nan"),))
  with pytest.raises(P.PolicyError, match="keep"):
    P.observe_rows(pool, (1.0,), keep=0)


def test_json_keeps_the_row_pool_and_old_files_get_the_prior():
  policy = P.SpeculationPolicy(candidates=(None,), batch_sizes=(1,), step_times=((1.0,),),
                               row_spread=(0.5, 1.5))
  obj = json.loads(json.dumps(policy.to_json()))
  assert P.SpeculationPolicy.from_json(obj) == policy
  del obj["row_spread"]
  assert P.SpeculationPolicy.from_json(obj).row_spread == P.DEFAULT_ROW_SPREAD


def test_engine_values_a_static_batch_by_the_rows_it_has_seen(tiny, tmp_path, monkeypatch):
  """The engine's measured choice for a batch uses its observed row pool; a tree call of
  several rows adds them to it."""
  from medusa_jax.decoding.engine import Engine
  cfg, llama, heads, _ = tiny
  monkeypatch.setenv("MEDUSA_JAX_HOME", str(tmp_path))
  choices = ((0,),)
  eng = Engine(llama, None, heads, max_cache_len=128, tree_choices=choices,
               tree_policy="measured")
  trees = P.candidate_trees(choices, heads.num_heads)
  cands = tuple(None if t is None else t.choices for t in trees)
  acc = ((0.9,) * 10,) * heads.num_heads
  gains = [P.expected_tokens(t, acc) for t in trees]
  for rows in (1, 4):  # every tree promises 1.3x plain per row
    eng.measured[rows] = P.SpeculationPolicy(
        candidates=cands, batch_sizes=(rows,), acceptance=acc,
        step_times=(tuple(1.0 if t is None else g / 1.3 for t, g in zip(trees, gains)),))
  rng = np.random.default_rng()
  prompts = [list(map(int, rng.integers(0, cfg.vocab_size, 4))) for _ in range(4)]
  eng.row_spread = (0.0, 2.0)  # half the rows never accept: a batch of 4 waits for one
  assert eng.generate(prompts, 6, speculate="tree").tree_nodes == 1
  assert eng.generate(prompts[:1], 6, speculate="tree").tree_nodes > 1
  eng.use_policy(eng.measured[4])  # a policy object: valued by the engine's rows too
  assert eng.generate(prompts, 6, speculate="tree").tree_nodes == 1
  assert eng.generate(prompts[:1], 6, speculate="tree").tree_nodes > 1
  eng.use_policy("measured")
  eng.row_spread = (1.0,) * 4  # rows alike: the batch gains as one row
  before = eng.row_spread
  four = eng.generate(prompts, 24, speculate="tree")
  assert four.tree_nodes > 1
  assert eng.row_spread == P.observe_rows(before, P.row_spread(
      [len(t) for t in four.tokens], four.steps))
