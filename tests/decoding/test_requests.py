"""The one request validator: SamplingParams, validate, choose_tree, encode_prompt.

Every error path, each message naming its field or request. No model is needed:
the validator sees an engine only through its RequestContext.
"""

import re

import numpy as np
import pytest

from medusa_jax.decoding import requests as rq
from medusa_jax.decoding import tree as tr
from medusa_jax.decoding.requests import OnError, RequestContext, SamplingParams, Speculate
from medusa_jax.decoding.strategies import Greedy, Sampling, Typical
from medusa_jax.errors import RequestError
from medusa_jax.models.chat import ChatTemplate

VOCAB = 50


class _CharTokenizer:
  def encode(self, text):
    return [ord(c) % VOCAB for c in text]


def _ctx(**kw):
  base = dict(vocab_size=VOCAB, max_cache_len=100, num_heads=3, max_batch_size=8,
              max_tree_rows=16, eos_ids=(2,), tokenizer=_CharTokenizer())
  return RequestContext(**{**base, **kw})


def _prompts(rng, *lengths):
  return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


# ----------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(speculate="beam"), r"speculate='beam'; expected one of none, chain, tree"),
    (dict(speculate=3), r"speculate=3; expected one of"),
    (dict(temperature=-0.5), r"temperature=-0.5: expected >= 0 \(0 = greedy\)"),
    (dict(temperature=float("nan")), r"temperature=nan: expected a finite number"),
    (dict(temperature=float("inf")), r"temperature=inf: expected a finite number"),
    (dict(temperature=True), r"temperature=True: expected a finite number"),
    (dict(temperature="0.7"), r"temperature='0.7': expected a finite number"),
    (dict(temperature=[0.5, -1.0]), r"temperature=-1.0: expected >= 0"),
    (dict(top_p=0.0), r"top_p=0.0: expected 0 < top_p <= 1"),
    (dict(top_p=1.5), r"top_p=1.5: expected 0 < top_p <= 1"),
    (dict(top_p=float("nan")), r"top_p=nan: expected a finite number"),
    (dict(top_p=[1.0, False]), r"top_p=False: expected a finite number"),
    (dict(typical="yes"), r"typical='yes': expected a bool"),
    (dict(max_new_tokens=0), r"max_new_tokens=0; expected an integer >= 1"),
    (dict(max_new_tokens=True), r"max_new_tokens=True; expected an integer >= 1"),
    (dict(max_new_tokens=2.5), r"max_new_tokens=2.5; expected an integer >= 1"),
    (dict(max_new_tokens="8"), r"max_new_tokens='8'; expected an integer >= 1"),
    (dict(seed=1.5), r"seed=1.5: expected an integer"),
    (dict(seed=True), r"seed=True: expected an integer"),
    (dict(adaptive="no"), r"adaptive='no': expected a bool or None"),
])
def test_sampling_params_reject_bad_values(kwargs, pattern):
  with pytest.raises(RequestError, match=pattern):
    SamplingParams(**kwargs)


def test_sampling_params_normalise_and_choose_the_strategy():
  p = SamplingParams(speculate="TREE", temperature=[0, 0.5], top_p=np.array([1, 0.9]),
                     max_new_tokens=[3, 4], seed=np.int64(7), tree=[[0], [1], [0, 0]])
  assert p.speculate is Speculate.TREE
  assert p.temperature == (0.0, 0.5) and p.top_p == (1.0, 0.9)
  assert p.max_new_tokens == (3, 4) and p.seed == 7 and type(p.seed) is int
  assert isinstance(p.tree, tr.TreeBuffers) and p.tree.num_nodes == 4
  assert hash(p) == hash(SamplingParams(speculate=Speculate.TREE, temperature=(0.0, 0.5),
                                        top_p=(1.0, 0.9), max_new_tokens=(3, 4), seed=7,
                                        tree=tr.build_tree([[0], [1], [0, 0]])))
  assert p.strategy == Sampling()
  assert SamplingParams(temperature=0.7, typical=True).strategy == Typical()
  assert SamplingParams(temperature=[0.0, 0.0], typical=True).strategy == Greedy()
  assert SamplingParams().strategy == Greedy() and SamplingParams().speculate is Speculate.NONE
  with pytest.raises(tr.TreeError, match="duplicates"):
    SamplingParams(tree=[[0], [0]])


def test_make_replaces_fields_and_names_unknown_options():
  base = SamplingParams(temperature=0.5, seed=3)
  made = SamplingParams.make(base, speculate="chain", max_new_tokens=9)
  assert (made.temperature, made.seed, made.speculate, made.max_new_tokens) == (
      0.5, 3, Speculate.CHAIN, 9)
  assert SamplingParams.make(base) is base
  assert SamplingParams.make(temperature=0.2) == SamplingParams(temperature=0.2)
  with pytest.raises(RequestError, match=r"temprature: unknown option; expected one of"
                                         r" speculate, temperature, top_p"):
    SamplingParams.make(temprature=0.2)
  with pytest.raises(RequestError, match=r"params: expected SamplingParams, got dict"):
    SamplingParams.make({"temperature": 0.2})
  with pytest.raises(RequestError, match=r"top_p=2.0"):
    SamplingParams.make(base, top_p=2.0)


def test_per_prompt_values_must_match_the_prompt_count():
  p = SamplingParams(temperature=[0.1, 0.2, 0.3], max_new_tokens=[1, 2])
  assert p.per_prompt("temperature", 3) == [0.1, 0.2, 0.3]
  assert p.per_prompt("top_p", 3) == [1.0, 1.0, 1.0]
  with pytest.raises(RequestError, match=r"temperature: expected one value per prompt \(2\),"
                                         r" got 3"):
    p.per_prompt("temperature", 2)
  with pytest.raises(RequestError, match=r"max_new_tokens: expected one budget per prompt"
                                         r" \(3\), got 2"):
    p.per_prompt("max_new_tokens", 3)


# ----------------------------------------------------------------------------- validate


def test_validate_builds_rows_and_the_step_config():
  rng = np.random.default_rng(1)
  prompts = _prompts(rng, 3, 5) + ["hi"]
  params = SamplingParams(speculate="tree", temperature=[0.0, 0.7, 0.3], top_p=0.9,
                          max_new_tokens=[4, 5, 6])
  batch = rq.validate(prompts, params, _ctx(adapter_slots={0: 0, 4: 1}), adapters=[4, 0, 4])
  assert batch.errors == (None, None, None) and not batch.speculation_skipped
  r0, r1, r2 = batch.valid
  assert r0.prompt == tuple(prompts[0]) and r2.prompt == tuple(ord(c) % VOCAB for c in "hi")
  assert [r.max_new_tokens for r in batch.valid] == [4, 5, 6]
  assert [r.temperature for r in batch.valid] == [0.0, 0.7, 0.3]
  assert [r.top_p for r in batch.valid] == [0.9] * 3
  assert [r.adapter_slot for r in batch.valid] == [1, 0, 1]
  assert batch.config.strategy == Sampling() and batch.config.eos_ids == (2,)
  # The adaptive tree for 3 rows within 16 rows: at most 5 nodes, at least the chain.
  assert batch.config.tree == tr.tree_for_batch(3, 3, max_tree_rows=16)


def test_chat_prompts_use_the_template():
  template = ChatTemplate()
  batch = rq.validate(["hi"], SamplingParams(), _ctx(max_cache_len=512, chat_template=template),
                      chat=True)
  want = rq.chat_prompt([{"role": "user", "content": "hi"}], _ctx(chat_template=template))
  assert batch.valid[0].prompt == tuple(want) and len(want) > 2
  with pytest.raises(RequestError, match=r"request 0: this model has no chat template.*"
                     r"vicuna_v1\.1"):
    rq.validate(["hi"], SamplingParams(), _ctx(), chat=True)


@pytest.mark.parametrize("prompt, pattern", [
    ([], r"request 1: empty prompt; expected at least one token"),
    ([1, VOCAB], rf"request 1: token 1 = {VOCAB}; expected an integer id in \[0, {VOCAB}\)"),
    ([1, -1], r"request 1: token 1 = -1"),
    ([1, 2.5], r"request 1: token 1 = 2.5"),
    ([True], r"request 1: token 0 = True"),
    (7, r"request 1: expected a list of token ids or a string, got int"),
    (b"ab", r"request 1: expected a list of token ids or a string, got bytes"),
    ([1] * 97, r"request 1: prompt \(97 tokens\) \+ max_new_tokens \(3\) \+ tree nodes \(1\)"
               r" = 101 exceeds max_cache_len \(100\)"),
])
def test_a_bad_prompt_fails_alone(prompt, pattern):
  rng = np.random.default_rng(2)
  good = _prompts(rng, 4, 2)
  prompts = [good[0], prompt, good[1]]
  with pytest.raises(RequestError, match=pattern):
    rq.validate(prompts, SamplingParams(max_new_tokens=3), _ctx())
  batch = rq.validate(prompts, SamplingParams(max_new_tokens=3), _ctx(), on_error="skip")
  assert batch.requests[1] is None and re.search(pattern, str(batch.errors[1]))
  assert [r.index for r in batch.valid] == [0, 2]
  assert [r.prompt for r in batch.valid] == [tuple(good[0]), tuple(good[1])]


def test_per_request_budgets_fail_alone_and_the_first_error_raises():
  prompts = _prompts(np.random.default_rng(3), 2, 3, 4)
  params = SamplingParams(max_new_tokens=[5, 0, True])
  with pytest.raises(RequestError, match=r"request 1: max_new_tokens=0; expected an integer"):
    rq.validate(prompts, params, _ctx())
  batch = rq.validate(prompts, params, _ctx(), on_error=OnError.SKIP)
  assert [e is None for e in batch.errors] == [True, False, False]
  assert "request 2: max_new_tokens=True" in str(batch.errors[2])


def test_string_prompts_need_a_tokenizer():
  with pytest.raises(RequestError, match=r"request 0: a string prompt needs a tokenizer"):
    rq.validate(["hello"], SamplingParams(), _ctx(tokenizer=None))
  with pytest.raises(RequestError, match=r"this model has no tokenizer.json"):
    rq.chat_prompt("hello", _ctx(tokenizer=None))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(on_error="ignore"), r"on_error='ignore'; expected one of raise, skip"),
    (dict(chat="yes"), r"chat='yes': expected a bool"),
    (dict(adapters=[0]), r"adapters: expected one adapter id per prompt \(2\), got \[0\]"),
    (dict(adapters="01"), r"adapters: expected one adapter id per prompt \(2\)"),
    (dict(adapters=[0, 7]), r"request 1: adapter 7; expected one of \[0, 3\]"),
    (dict(adapters=[True, 0]), r"request 0: adapter True; expected one of \[0, 3\]"),
])
def test_call_level_errors(kwargs, pattern):
  prompts = _prompts(np.random.default_rng(4), 2, 3)
  with pytest.raises(RequestError, match=pattern):
    rq.validate(prompts, SamplingParams(), _ctx(adapter_slots={0: 0, 3: 1}), **kwargs)


def test_unknown_adapter_on_a_one_adapter_engine():
  with pytest.raises(RequestError, match=r"request 0: adapter 1; expected one of \[0\]"):
    rq.validate([[1, 2]], SamplingParams(), _ctx(), adapters=[1])


@pytest.mark.parametrize("prompts, pattern", [
    ("hello", r"prompts: expected a list of prompts, got str"),
    (None, r"prompts: expected a list of prompts, got NoneType"),
])
def test_prompts_must_be_a_list(prompts, pattern):
  with pytest.raises(RequestError, match=pattern):
    rq.validate(prompts, SamplingParams(), _ctx())


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_speculation_needs_heads(mode):
  with pytest.raises(RequestError, match=rf"speculate='{mode}': this engine has no Medusa heads"):
    rq.validate([[1, 2]], SamplingParams(speculate=mode), _ctx(num_heads=None))
  batch = rq.validate([[1, 2]], SamplingParams(), _ctx(num_heads=None))
  assert batch.config.tree is None


@pytest.mark.parametrize("tree, pattern", [
    ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], r"tree: depth 4 exceeds the 3 Medusa heads"),
    ([[0], [9]], r"tree: uses top-10 ranks; expected at most the vocabulary size \(9\)"),
])
def test_given_trees_must_fit_the_heads_and_vocabulary(tree, pattern):
  with pytest.raises(RequestError, match=pattern):
    rq.validate([[1, 2]], SamplingParams(speculate="tree", tree=tree), _ctx(vocab_size=9))


def test_chain_guard_and_tree_policy():
  ctx = _ctx(max_batch_size=8)  # 3 heads: a chain verifies 4 rows per request
  two = rq.choose_tree(SamplingParams(speculate="chain"), ctx, 2)    # 2 * 4 = 8 <= 8
  three = rq.choose_tree(SamplingParams(speculate="chain"), ctx, 3)  # 12 > 8
  lifted = rq.choose_tree(SamplingParams(speculate="chain", adaptive=True), ctx, 3)
  assert two == (tr.build_tree(tr.chain_choices(3)), False)
  assert three == (None, True)
  assert lifted == (tr.build_tree(tr.chain_choices(3)), False)
  assert rq.choose_tree(SamplingParams(), ctx, 3) == (None, False)
  tree, skipped = rq.choose_tree(SamplingParams(speculate="tree"), ctx, 1)
  assert not skipped and tree == tr.tree_for_batch(1, 3, max_tree_rows=16)
  given = tr.build_tree([[0], [1]])
  assert rq.choose_tree(SamplingParams(speculate="tree", tree=given), ctx, 5) == (given, False)
  chain5 = _ctx(tree_choices="chain_5")
  assert rq.choose_tree(SamplingParams(speculate="tree"), chain5, 1)[0] == tr.tree_for_batch(
      1, 3, max_tree_rows=16, choices="chain_5")


def test_the_cache_check_counts_the_tree_nodes():
  ctx = _ctx(max_cache_len=12)
  tree = tr.build_tree([[0], [1], [0, 0]])  # 4 nodes
  params = SamplingParams(speculate="tree", tree=tree, max_new_tokens=4)
  ok = rq.validate([[1, 2, 3, 4]], params, ctx)                  # 4 + 4 + 4 = 12
  assert ok.errors == (None,)
  with pytest.raises(RequestError, match=r"request 0: prompt \(5 tokens\) \+ max_new_tokens \(4\)"
                                         r" \+ tree nodes \(4\) = 13 exceeds max_cache_len \(12\)"):
    rq.validate([[1, 2, 3, 4, 5]], params, ctx)
