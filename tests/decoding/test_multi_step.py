"""K steps per call in one device loop, and sub-trees of a carried tree switched per occupancy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.config import EngineConfig
from medusa_jax.decoding import tree as tree_mod
from medusa_jax.decoding.engine import Engine
from medusa_jax.decoding.state import StepConfig
from medusa_jax.decoding.strategies import Greedy
from medusa_jax.errors import ConfigError

B, L = 4, 128


def _prompts(cfg, seed):
  rng = np.random.default_rng(seed)
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 8)), jnp.int32)
  lens = jnp.asarray(rng.integers(1, 9, B), jnp.int32)
  budget = jnp.asarray(rng.integers(1, 30, B), jnp.int32)
  return prompt, lens, budget


def _tokens_of(out, b):
  return list(np.asarray(out.tokens[b, :out.count[b]]))


def _run(dec, cfg, seed, prefill_config, call):
  prompt, lens, budget = _prompts(cfg, seed)
  state, first = dec.prefill(dec.init_cache(B, L, jnp.float32), prompt, lens, budget,
                             jnp.zeros(B, bool), jax.random.PRNGKey(0), config=prefill_config)
  toks = [_tokens_of(first, b) for b in range(B)]
  for _ in range(40):
    state, outs = call(state)
    for o in outs:
      for b in range(B):
        toks[b] += _tokens_of(o, b)
  return toks


def _single(dec, config):
  def call(state):
    state, out = dec.step(state, config=config)
    return state, [out]
  return call


def _multi(dec, configs, k, table=None, stop_when_done=None):
  def call(state):
    state, out = dec.steps(state, configs=configs, num_steps=k, branch_of_active=table,
                           stop_when_done=stop_when_done)
    out = jax.device_get(out)
    return state, [out.step(j) for j in range(int(out.steps))]
  return call


def test_k_steps_per_call_equal_single_steps_and_stop_on_the_device(tiny):
  cfg, _, _, dec = tiny
  seed = int(np.random.default_rng().integers(1 << 30))
  plain = StepConfig(tree=None, strategy=Greedy())
  want = _run(dec, cfg, seed, plain, _single(dec, plain))
  for k in (1, 3, 8):
    assert _run(dec, cfg, seed, plain, _multi(dec, (plain,), k)) == want
  prompt, lens, budget = _prompts(cfg, seed)
  state, _ = dec.prefill(dec.init_cache(B, L, jnp.float32), prompt, lens, budget,
                         jnp.zeros(B, bool), jax.random.PRNGKey(0), config=plain)
  state, out = dec.steps(state, configs=plain, num_steps=64)
  assert int(out.steps) == int(jnp.max(budget)) - 1  # stopped once every row was done
  assert not np.asarray(out.active[int(out.steps):]).any()


def test_a_loop_of_known_trip_count_gives_the_same_tokens(tiny):
  """stop_when_done=False (the GPU's loop): K iterations always, finished rows emit nothing."""
  cfg, _, _, dec = tiny
  seed = int(np.random.default_rng().integers(1 << 30))
  g = Greedy()
  plain = StepConfig(tree=None, strategy=g)
  want = _run(dec, cfg, seed, plain, _single(dec, plain))
  assert _run(dec, cfg, seed, plain, _multi(dec, (plain,), 3, stop_when_done=False)) == want
  carrier = tree_mod.build_tree(tree_mod._closed_prefix(tree_mod.MC_SIM_7B_63, 7))
  configs = (StepConfig(tree=None, strategy=g, carrier=carrier),
             StepConfig(tree=carrier, strategy=g))
  full = StepConfig(tree=carrier, strategy=g)
  assert _run(dec, cfg, seed, full, _multi(dec, configs, 4, (0, 1, 0, 1, 1),
                                           stop_when_done=False)) == want
  prompt, lens, budget = _prompts(cfg, seed)
  state, _ = dec.prefill(dec.init_cache(B, L, jnp.float32), prompt, lens, budget,
                         jnp.zeros(B, bool), jax.random.PRNGKey(0), config=plain)
  state, out = dec.steps(state, configs=plain, num_steps=40, stop_when_done=False)
  ran = int(jnp.max(budget)) - 1
  assert int(out.steps) == ran
  assert (np.asarray(out.branch[:ran]) == 0).all() and (np.asarray(out.branch[ran:]) == -1).all()
  assert not np.asarray(out.active[ran:]).any() and not np.asarray(out.count[ran:]).any()


def test_plain_chain_and_sub_trees_follow_one_another_on_one_carried_state(tiny):
  cfg, _, _, dec = tiny
  seed = int(np.random.default_rng().integers(1 << 30))
  g = Greedy()
  carrier = tree_mod.build_tree(tree_mod._closed_prefix(tree_mod.MC_SIM_7B_63, 15))
  sub = tree_mod.build_tree(tree_mod._closed_prefix(tree_mod.MC_SIM_7B_63, 3))
  chain = tree_mod.build_tree(tree_mod.chain_choices(3))
  plain = StepConfig(tree=None, strategy=g)
  want = _run(dec, cfg, seed, plain, _single(dec, plain))
  configs = (StepConfig(tree=None, strategy=g, carrier=carrier),
             StepConfig(tree=chain, strategy=g, carrier=carrier),
             StepConfig(tree=sub, strategy=g, carrier=carrier),
             StepConfig(tree=carrier, strategy=g))
  full = StepConfig(tree=carrier, strategy=g)
  table = (0, 3, 2, 1, 0)  # a config per count of active rows: all four, as rows finish
  assert _run(dec, cfg, seed, full, _multi(dec, configs, 5, table)) == want


def test_a_tree_outside_its_carrier_and_mismatched_configs_are_refused(tiny):
  cfg, _, _, dec = tiny
  g = Greedy()
  carrier = tree_mod.build_tree(tree_mod.chain_choices(2))
  with pytest.raises(tree_mod.TreeError, match="sub-tree"):
    StepConfig(tree=tree_mod.build_tree([[1]]), strategy=g, carrier=carrier).tree_index
  prompt, lens, budget = _prompts(cfg, 0)
  state, _ = dec.prefill(dec.init_cache(B, L, jnp.float32), prompt, lens, budget,
                         jnp.zeros(B, bool), jax.random.PRNGKey(0),
                         config=StepConfig(tree=None, strategy=g))
  two = (StepConfig(tree=None, strategy=g), StepConfig(tree=carrier, strategy=g))
  with pytest.raises(ValueError, match="carrier"):
    dec.steps(state, configs=two, num_steps=2, branch_of_active=(0,) * (B + 1))


def test_engine_output_does_not_depend_on_steps_per_call(tiny):
  cfg, llama, heads, _ = tiny
  rng = np.random.default_rng()
  prompts = [list(map(int, rng.integers(0, cfg.vocab_size, int(n)))) for n in (3, 9, 1)]
  budgets = [int(b) for b in rng.integers(1, 24, 3)]
  outs = [Engine(llama, None, heads, max_cache_len=128, steps_per_call=k)
          .generate(prompts, budgets, speculate="tree").tokens for k in (1, 5)]
  assert outs[0] == outs[1]
  assert [len(t) for t in outs[0]] == budgets
  with pytest.raises(ConfigError, match="steps_per_call"):
    EngineConfig(steps_per_call=0)


def test_a_measured_policy_picks_the_engines_tree_or_plain_decoding(tiny):
  from medusa_jax.decoding.policy import SpeculationPolicy
  cfg, llama, heads, _ = tiny
  chain = tree_mod.chain_choices(3)
  policy = SpeculationPolicy(candidates=(None, chain), batch_sizes=(1, 2),
                             step_times=((1.0, 1.05), (1.0, 9.0)),
                             acceptance=((0.9,) * 4,) * 3)
  eng = Engine(llama, None, heads, max_cache_len=128)
  rng = np.random.default_rng()
  prompts = [list(map(int, rng.integers(0, cfg.vocab_size, 5))) for _ in range(2)]
  want = eng.generate(prompts, 9).tokens
  eng.use_policy(policy)
  one = eng.generate(prompts[:1], 9, speculate="tree")
  assert one.tree_nodes == len(chain) + 1 and not one.speculation_skipped
  two = eng.generate(prompts, 9, speculate="tree")
  assert two.tree_nodes == 1 and two.speculation_skipped  # plain pays best at batch 2
  assert one.tokens == want[:1] and two.tokens == want
  eng.use_policy(None)
  assert eng.generate(prompts, 9, speculate="tree").tree_nodes > 1


def test_tree_decoding_through_the_compaction_kernels_gives_the_same_tokens(tiny):
  """Llama(compact_kernel=True) (interpreted off a GPU) decodes exactly as XLA's compaction."""
  cfg, llama, heads, _ = tiny
  assert llama.compact_kernel is (jax.default_backend() == "gpu")  # None: the GPU's default
  assert llama.with_compact_kernel(True).with_compact_kernel(None).compact_kernel \
      is llama.compact_kernel
  rng = np.random.default_rng()
  prompts = [list(map(int, rng.integers(0, cfg.vocab_size, int(n)))) for n in (2, 6)]
  budgets = [int(b) for b in rng.integers(8, 20, 2)]
  outs = [Engine(llama.with_compact_kernel(k), None, heads, max_cache_len=64, steps_per_call=4)
          .generate(prompts, budgets, speculate="tree") for k in (False, True)]
  assert outs[0].tree_nodes > 1 and outs[1].tree_nodes == outs[0].tree_nodes
  assert outs[1].tokens == outs[0].tokens
  assert outs[0].tokens == Engine(llama, None, heads, max_cache_len=64).generate(
      prompts, budgets).tokens  # greedy: the tree's tokens are plain decoding's
