"""Engine-level tests: lossless greedy speculation on SmolLM2, sampling distribution,
bad requests, the chain guard, EOS handling and per-request statistics."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as scipy_stats

from medusa_jax.config import MedusaConfig
from medusa_jax.decoding import sampling
from medusa_jax.decoding.engine import Engine
from medusa_jax.decoding.requests import Speculate
from medusa_jax.errors import AssetError, RequestError
from medusa_jax.heads.modules import MedusaModel
from medusa_jax.models.chat import ChatTemplate
from medusa_jax.models.llama import KVCache, Llama, LlamaConfig, causal_mask


def _random_heads(hidden, n, seed, scale, max_batch_size=None):
  mc = MedusaConfig(base_model_name_or_path="test", medusa_num_heads=n, medusa_num_layers=1,
                    version=2.0)
  heads = MedusaModel(mc, hidden, rngs=nnx.Rngs(seed), max_batch_size=max_batch_size)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1000))
  heads.medusa.kernel[...] = scale * jax.random.normal(k1, heads.medusa.kernel[...].shape)
  heads.medusa.bias[...] = scale * jax.random.normal(k2, heads.medusa.bias[...].shape)
  return heads


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol():
  from medusa_jax.assets import cache as assets
  from medusa_jax.decoding.loading import load_tokenizer
  from medusa_jax.models.llama_weights import load_llama
  try:
    paths = assets.fetch(quiet=True)
  except AssetError as e:
    pytest.skip(f"SmolLM2 assets unavailable: {e}")
  llama = load_llama(paths.model_dir, dtype=jnp.float32)
  tokenizer, template = load_tokenizer(paths.model_dir)
  # Small random heads: close to the identity, so they often draft the base
  # model's own next token -- right on repetitive text, wrong elsewhere.
  heads = _random_heads(llama.cfg.hidden_size, 4, seed=0, scale=0.02)
  return Engine(llama, tokenizer, heads, max_cache_len=64, max_tree_rows=32,
                chat_template=template)


def test_greedy_chain_and_tree_equal_plain_on_smollm2(smol):
  tok = smol.tokenizer
  prompts = [tok.encode("The capital of France is"), tok.encode(" the") * 10,
             tok.encode("def fibonacci(n):\n    "), tok.encode("1, 2, 3, 4, 5,")]
  assert len({len(p) for p in prompts}) == 4
  new = 12
  plain = smol.generate(prompts, new, speculate="none")
  assert all(len(t) == new for t in plain.tokens)
  assert plain.steps == [new - 1] * 4
  accepted = rejected = 0
  # The chain at batch 4 and the adaptive tree at batch 4 and 1 (a bigger tree there).
  for mode, batch in (("chain", prompts), ("tree", prompts), ("tree", prompts[1:2])):
    res = smol.generate(batch, new, speculate=mode)
    want = plain.tokens if len(batch) == 4 else plain.tokens[1:2]
    assert res.tokens == want, (mode, len(batch))
    assert res.tree_nodes > 1 and not res.speculation_skipped
    for s in res.stats:
      accepted += sum(s.head_accepts)
      rejected += s.accept_hist[0]
      assert sum(s.accept_hist) == s.steps
      assert s.steps <= new - 1
  assert accepted > 0 and rejected > 0  # both verification outcomes were exercised
  assert plain.texts is not None and plain.texts[0].strip()


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny():
  cfg = LlamaConfig.tiny(vocab_size=8, eos_token_ids=())
  llama = Llama(cfg, rngs=nnx.Rngs(3))
  # Scale the embedding up so next-token distributions are far from uniform.
  llama.embed_tokens[...] = 1.0 * jax.random.normal(jax.random.PRNGKey(4),
                                                    llama.embed_tokens[...].shape)
  llama.lm_head_kernel[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(5),
                                                      llama.lm_head_kernel[...].shape)
  heads = _random_heads(cfg.hidden_size, 2, seed=7, scale=0.5)
  return llama, heads


SMALL_TREE = [[0], [1], [0, 0], [1, 0], [0, 1]]


def _pair_prob_fn(llama, heads, prompt_len):
  """A function prompt -> (p(t1, t2) [V, V] of plain sampling, head 0's draft ranking)."""
  v = llama.cfg.vocab_size
  width = prompt_len + 1
  graphdef, state = nnx.split((llama, heads))

  @jax.jit
  def run(state, rows):
    model, medusa = nnx.merge(graphdef, state)
    cache = KVCache.init(model.cfg, v, 16, jnp.float32)
    idx = jnp.zeros((v,), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (v, width))
    hidden, _ = model(rows, pos, cache, idx, causal_mask(idx, width, 16))
    _, draft = medusa(hidden[:1, -2], model.lm_head)
    return model.lm_head(hidden), draft[0, 0]

  def probs(prompt, temperature, top_p):
    rows = np.array([list(prompt) + [t] for t in range(v)], np.int32)
    logits, draft = run(state, jnp.asarray(rows))
    p1 = np.exp(np.asarray(sampling.warp(logits[0, -2], temperature, top_p), np.float64))
    p2 = np.exp(np.asarray(sampling.warp(logits[:, -1], temperature, top_p), np.float64))
    return p1[:, None] * p2, np.argsort(-np.asarray(draft), kind="stable")

  return probs


@pytest.mark.parametrize("mode,temperature,top_p", [("chain", 0.7, 1.0), ("tree", 1.0, 0.9)])
def test_sampling_keeps_the_distribution(tiny, mode, temperature, top_p):
  llama, heads = tiny
  # A prompt whose first drafts are often right, so both outcomes of the
  # verification shape the second token.
  rng = np.random.default_rng(12)
  drafted = 1 if mode == "chain" else 2  # depth-1 nodes: chain 1, SMALL_TREE 2
  pair_probs = _pair_prob_fn(llama, heads, 4)
  best = None
  for _ in range(16):
    prompt = [int(t) for t in rng.integers(0, 8, size=4)]
    probs, ranking = pair_probs(prompt, temperature, top_p)
    hit = probs[:, ranking[:drafted]].sum()
    if best is None or abs(hit - 0.5) < abs(best[0] - 0.5):
      best = (hit, prompt, probs)
  hit, prompt, probs = best
  assert 0.2 < hit < 0.9, hit
  n, n_greedy = 4000, 16
  eng = Engine(llama, None, heads, max_cache_len=64)
  tree = SMALL_TREE if mode == "tree" else None
  # Greedy rows ride along in the same batch (per-row temperatures).
  temps = [temperature] * n + [0.0] * n_greedy
  both = eng.generate([prompt] * (n + n_greedy), 2, speculate=mode, temperature=temps,
                      top_p=top_p, seed=11, tree=tree, adaptive=True)
  greedy = eng.generate([prompt], 2, speculate="none")
  assert all(t == greedy.tokens[0] for t in both.tokens[n:])
  res = dataclasses.replace(both, tokens=both.tokens[:n], stats=both.stats[:n])
  assert res.tree_nodes > 1
  accepted = sum(s.head_accepts[0] for s in res.stats)
  assert 0.5 * hit * n < accepted < n  # drafts accepted often, rejected often
  pairs = np.array(res.tokens)
  counts = np.zeros((8, 8))
  np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
  expected = n * probs
  assert counts[expected == 0].sum() == 0  # nothing outside the top-p support
  big = expected >= 5
  small = ~big & (expected > 0)
  obs = np.append(counts[big], counts[small].sum())
  exp = np.append(expected[big], expected[small].sum())
  keep = exp > 0
  p = scipy_stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
  assert p > 1e-3, p


def test_per_row_sampling_options_never_recompile(tiny):
  llama, heads = tiny
  eng = Engine(llama, None, heads, max_cache_len=32)
  rng = np.random.default_rng(21)
  prompts = [[int(t) for t in rng.integers(0, 8, size=n)] for n in (3, 5, 4, 6)]
  kw = dict(speculate="tree", tree=SMALL_TREE)
  greedy = eng.generate(prompts, 6, **kw)
  first = eng.generate(prompts, 6, temperature=0.7, seed=1, **kw)
  counts = dict(eng.decoder.trace_counts)
  second = eng.generate(prompts, 6, temperature=1.3, top_p=0.8, seed=1, **kw)
  mixed = eng.generate(prompts, 6, temperature=[0.0, 1.0, 0.0, 0.5], top_p=[1.0, 0.9, 0.5, 1.0],
                       seed=2, **kw)
  assert dict(eng.decoder.trace_counts) == counts  # one compilation serves every value
  assert first.tokens != second.tokens  # the values do reach the step
  assert mixed.tokens[0] == greedy.tokens[0] and mixed.tokens[2] == greedy.tokens[2]
  cold = eng.generate(prompts, 6, temperature=[1e-4, 1.0, 1e-4, 0.5], seed=2, **kw)
  assert cold.tokens[0] == greedy.tokens[0] and cold.tokens[2] == greedy.tokens[2]
  with pytest.raises(RequestError, match=r"temperature: expected one value per prompt \(4\)"):
    eng.generate(prompts, 6, temperature=[0.5, 0.5])
  with pytest.raises(RequestError, match=r"top_p=0.0: expected 0 < top_p <= 1"):
    eng.generate(prompts, 6, temperature=0.5, top_p=[1.0, 0.0, 1.0, 1.0])


def test_stream_yields_each_step_and_the_result(tiny):
  llama, heads = tiny
  eng = Engine(llama, None, heads, max_cache_len=32)
  rng = np.random.default_rng(8)
  prompts = [[int(t) for t in rng.integers(0, 8, size=n)] for n in (3, 6)] + [[]]
  want = eng.generate(prompts, [7, 4, 3], speculate="tree", tree=SMALL_TREE, on_error="skip")
  events = list(eng.stream(prompts, [7, 4, 3], speculate="tree", tree=SMALL_TREE,
                           on_error="skip"))
  assert events[-1].result is not None and all(e.result is None for e in events[:-1])
  assert [e.step for e in events[:-1]] == list(range(len(events) - 1))
  got = [[t for e in events for t in e.tokens[i]] for i in range(3)]
  assert got == want.tokens == events[-1].result.tokens
  assert all(len(e.tokens[0]) == 1 for e in events[:1])  # the prefill's token first
  assert all(e.tokens[2] == [] and e.done[2] for e in events)  # the failed request
  assert events[-2].done == [True, True, True]
  accepted = [e.accept_len[0] for e in events[1:-1] if e.tokens[0]]
  assert sum(accepted) == sum(want.stats[0].head_accepts)
  with pytest.raises(RequestError, match="max_new_tokens"):
    next(eng.stream(prompts[:1], 0))


def _random_weights(hidden, n, seed, scale):
  from medusa_jax.adapters.weights import MedusaWeights
  mc = MedusaConfig(base_model_name_or_path="test", medusa_num_heads=n, medusa_num_layers=1,
                    version=2.0)
  w = MedusaWeights.init(mc, hidden, seed=seed)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 500))
  w.model.medusa.kernel[...] = scale * jax.random.normal(k1, w.model.medusa.kernel[...].shape)
  w.model.medusa.bias[...] = scale * jax.random.normal(k2, w.model.medusa.bias[...].shape)
  return w


def test_mixed_adapters_route_per_row(tiny):
  llama, _ = tiny
  hidden = llama.cfg.hidden_size
  w0, w1 = (_random_weights(hidden, 2, seed, 0.5) for seed in (31, 32))
  multi = Engine(llama, None, {0: w0, 1: w1, 2: None}, max_cache_len=32)
  alone = {0: Engine(llama, None, w0, max_cache_len=32),
           1: Engine(llama, None, w1, max_cache_len=32)}
  rng = np.random.default_rng(5)
  prompts = [[int(t) for t in rng.integers(0, 8, size=n)] for n in (3, 5, 4, 6)]
  ids = [1, 0, 2, 1]  # adapter 2 has no Medusa weights: the default's heads
  kw = dict(speculate="tree", tree=SMALL_TREE)
  mixed = multi.generate(prompts, 8, adapters=ids, **kw)
  counts = dict(multi.decoder.trace_counts)
  again = multi.generate(prompts, 8, adapters=[0, 1, 1, 2], **kw)
  assert dict(multi.decoder.trace_counts) == counts  # a new mix does not recompile
  hist = {}
  for a, e in alone.items():
    res = e.generate(prompts, 8, **kw)
    hist[a] = [s.accept_hist for s in res.stats]
    assert mixed.tokens == res.tokens  # greedy: the heads never change the tokens
  assert hist[0] != hist[1]  # the two adapters draft differently
  for row, a in enumerate(ids):
    assert mixed.stats[row].accept_hist == hist[0 if a == 2 else a][row], row
  for row, a in enumerate([0, 1, 1, 2]):
    assert again.stats[row].accept_hist == hist[0 if a == 2 else a][row], row
  with pytest.raises(RequestError, match=r"request 1: adapter 7; expected one of \[0, 1, 2\]"):
    multi.generate(prompts[:2], 4, adapters=[0, 7])
  with pytest.raises(RequestError, match=r"adapters: expected one adapter id per prompt \(2\)"):
    multi.generate(prompts[:2], 4, adapters=[0])


def test_bad_requests_fail_alone(tiny):
  llama, heads = tiny
  eng = Engine(llama, None, heads, max_cache_len=32)
  rng = np.random.default_rng(0)
  good = [list(rng.integers(0, 8, size=n)) for n in (3, 5, 2)]
  bad = {1: [], 3: [2, 8, 1], 4: [1, -1], 5: [1, 2.5], 6: list(range(8)) * 4}
  prompts = [good[0], bad[1], good[1], bad[3], bad[4], bad[5], bad[6], good[2]]
  budgets = [6, 6, 6, 6, 6, 6, 6, 6]
  with pytest.raises(RequestError, match=r"request 1: empty prompt"):
    eng.generate(prompts, budgets, speculate="tree", tree=SMALL_TREE)
  res = eng.generate(prompts, budgets, speculate="tree", tree=SMALL_TREE, on_error="skip")
  alone = eng.generate(good, 6, speculate="tree", tree=SMALL_TREE)
  assert [res.tokens[i] for i in (0, 2, 7)] == alone.tokens
  assert all(len(t) == 6 for t in alone.tokens)
  for i, pattern in ((1, "request 1: empty prompt"), (3, r"request 3: token 1 = 8"),
                     (4, r"request 4: token 1 = -1"), (5, r"request 5: token 1 = 2.5"),
                     (6, r"request 6: .*exceeds max_cache_len \(32\)")):
    assert isinstance(res.errors[i], RequestError)
    assert res.tokens[i] == [] and res.stats[i] is None
    assert __import__("re").search(pattern, str(res.errors[i])), str(res.errors[i])
  assert [e is None for e in res.errors] == [True, False, True, False, False, False, False, True]
  with pytest.raises(RequestError, match=r"request 2: max_new_tokens=0"):
    eng.generate(good, [4, 4, 0])
  with pytest.raises(RequestError, match=r"max_new_tokens: expected one budget per prompt"):
    eng.generate(good, [4, 4])
  with pytest.raises(RequestError, match=r"request 0: a string prompt needs a tokenizer"):
    eng.generate(["hello"], 4)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(speculate="beam"), r"speculate='beam'; expected one of none, chain, tree"),
    (dict(temperature=-0.5), r"temperature=-0.5: expected >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan: expected a finite number"),
    (dict(top_p=0.0), r"top_p=0.0: expected 0 < top_p <= 1"),
    (dict(top_p=1.5), r"top_p=1.5"),
    (dict(on_error="ignore"), r"on_error='ignore'; expected one of raise, skip"),
    # Bad trees fail on the host, before any device work (tiny vocab: 8 tokens).
    (dict(speculate="tree", tree=[[0], [8]]), r"tree: uses top-9 ranks; expected at most the"
                                              r" vocabulary size \(8\)"),
    (dict(speculate="tree", tree=[[0], [0, 0], [0, 0, 0]]), r"depth 3 exceeds the 2 Medusa"),
])
def test_bad_options_raise_typed_errors(tiny, kwargs, pattern):
  llama, heads = tiny
  eng = Engine(llama, None, heads, max_cache_len=32)
  with pytest.raises(RequestError, match=pattern):
    eng.generate([[1, 2, 3]], 4, **kwargs)
  assert not eng.decoder.trace_counts  # nothing was traced or run


def test_speculate_is_parsed_once():
  assert Speculate.parse("TREE") is Speculate.TREE
  assert Speculate.parse(Speculate.CHAIN) is Speculate.CHAIN
  with pytest.raises(RequestError, match="expected one of none, chain, tree"):
    Speculate.parse(3)


def test_chain_guard_turns_speculation_off_for_the_whole_call(tiny):
  llama, _ = tiny
  heads = _random_heads(llama.cfg.hidden_size, 3, seed=8, scale=0.5, max_batch_size=8)
  eng = Engine(llama, None, heads, max_cache_len=32)
  assert eng.max_batch_size == 8
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, 8, size=n)) for n in (2, 4, 3)]
  two = eng.generate(prompts[:2], 5, speculate="chain")        # 2 * (3 + 1) = 8 <= 8
  three = eng.generate(prompts, 5, speculate="chain")          # 12 > 8: plain
  lifted = eng.generate(prompts, 5, speculate="chain", adaptive=True)
  assert not two.speculation_skipped and two.tree_nodes == 4
  assert three.speculation_skipped and three.tree_nodes == 1
  assert all(s.steps == 4 for s in three.stats)
  assert not lifted.speculation_skipped and lifted.tree_nodes == 4
  assert three.tokens == lifted.tokens and three.tokens[:2] == two.tokens


def test_engine_config_and_the_lorax_guard_variable(tiny, monkeypatch):
  """The guard comes from the config, else the heads, else LORAX_SPECULATION_MAX_BATCH_SIZE."""
  from medusa_jax.config import MAX_BATCH_ENV, EngineConfig
  llama, _ = tiny
  monkeypatch.setenv(MAX_BATCH_ENV, "5")
  assert Engine(llama, max_cache_len=32).max_batch_size == 5  # no heads: the variable
  heads = _random_heads(llama.cfg.hidden_size, 3, seed=9, scale=0.5, max_batch_size=8)
  assert Engine(llama, None, heads, max_cache_len=32).max_batch_size == 8
  cfg = EngineConfig(max_cache_len=32, max_batch_size=4, max_tree_rows=7)
  eng = Engine(llama, None, heads, config=cfg)
  assert eng.config is cfg and eng.max_batch_size == 4 and eng.max_tree_rows == 7
  rng = np.random.default_rng(10)
  prompts = [list(rng.integers(0, 8, size=3))]
  assert not eng.generate(prompts, 3, speculate="chain").speculation_skipped  # 1 * 4 <= 4
  assert Engine(llama, None, heads, config=cfg, max_batch_size=3).generate(
      prompts, 3, speculate="chain").speculation_skipped  # 4 > 3


def test_rows_stop_independently_at_eos(tiny):
  llama, heads = tiny
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(0, 8, size=n)) for n in (3, 6, 4, 5)]
  free = Engine(llama, None, heads, max_cache_len=32).generate(prompts, 10)
  eos = free.tokens[0][3]  # a token row 0 emits at position 3 (maybe earlier too)
  eng = Engine(llama, None, heads, max_cache_len=32, eos_ids=(eos,))
  for mode in ("none", "tree"):
    res = eng.generate(prompts, 10, speculate=mode, tree=SMALL_TREE)
    for row, got in zip(free.tokens, res.tokens):
      cut = row.index(eos) + 1 if eos in row else len(row)
      assert got == row[:cut]
  assert len(res.tokens[0]) <= 4


def test_stats_are_consistent(tiny):
  llama, heads = tiny
  eng = Engine(llama, None, heads, max_cache_len=32)
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(0, 8, size=n)) for n in (3, 5)]
  res = eng.generate(prompts, [9, 5], speculate="tree", tree=SMALL_TREE)
  for s, toks in zip(res.stats, res.tokens):
    assert s.new_tokens == len(toks)
    emitted = sum((a + 1) * c for a, c in enumerate(s.accept_hist))
    assert s.steps <= emitted and s.new_tokens - 1 <= emitted  # the last step may be cut
    assert math.isclose(s.tokens_per_step, (s.new_tokens - 1) / s.steps)
    assert len(s.head_accepts) == 2 and s.head_accepts[0] >= s.head_accepts[1]
    assert s.wall_s > 0
  assert res.steps == [s.steps for s in res.stats]


class _CharTokenizer:
  """Characters to ids modulo a small vocabulary; enough to drive the string path."""

  def __init__(self, vocab):
    self.vocab = vocab
    self.seen = []

  def encode(self, text):
    self.seen.append(text)
    return [ord(c) % self.vocab for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_string_prompts_use_the_tokenizer_and_chat_template(tiny):
  llama, heads = tiny
  tok = _CharTokenizer(llama.cfg.vocab_size)
  eng = Engine(llama, tok, heads, max_cache_len=256, chat_template=ChatTemplate())
  res = eng.generate(["hi", "hello there"], 3, chat=True)
  assert "<|im_start|>user\nhi<|im_end|>" in tok.seen[0]
  assert tok.seen[0].endswith("<|im_start|>assistant\n")
  by_ids = eng.generate([tok.encode(tok.seen[0]), tok.encode(tok.seen[1])], 3)
  assert res.tokens == by_ids.tokens
  assert res.texts == ["".join(chr(ord("a") + i) for i in t) for t in res.tokens]


def test_typical_acceptance_runs_and_stays_in_vocab(tiny):
  llama, heads = tiny
  eng = Engine(llama, None, heads, max_cache_len=32)
  rng = np.random.default_rng(4)
  prompts = [list(rng.integers(0, 8, size=n)) for n in (3, 6)]
  res = eng.generate(prompts, 8, speculate="tree", tree=SMALL_TREE, temperature=0.7,
                     typical=True, seed=3)
  assert all(len(t) == 8 and all(0 <= x < 8 for x in t) for t in res.tokens)
  again = eng.generate(prompts, 8, speculate="tree", tree=SMALL_TREE, temperature=0.7,
                       typical=True, seed=3)
  assert again.tokens == res.tokens  # seeded
  assert sum(sum(s.head_accepts) for s in res.stats) > 0


def test_mixed_adapters_speculate_above_the_max_batch_size(tiny):
  """40 rows (> the V2 guard's 32): routed heads still draft, per row, under the tree policy."""
  llama, _ = tiny
  hidden = llama.cfg.hidden_size
  w0, w1 = (_random_weights(hidden, 2, seed, 0.5) for seed in (41, 42))
  multi = Engine(llama, None, {0: w0, 1: w1}, max_cache_len=32)
  rng = np.random.default_rng(6)
  prompts = [[int(t) for t in rng.integers(0, 8, size=int(rng.integers(2, 6)))]
             for _ in range(40)]
  ids = [int(a) for a in rng.integers(0, 2, size=40)]
  got = multi.generate(prompts, 4, adapters=ids, speculate="tree")
  plain = Engine(llama, None, w0, max_cache_len=32).generate(prompts, 4)
  assert not got.speculation_skipped and got.tree_nodes > 1
  assert got.tokens == plain.tokens
  assert sum(sum(s.head_accepts) for s in got.stats) > 0  # drafts were made and accepted


# ----------------------------------------------------- issue 14: health of the numbers, typed errors


def _poisoned_setup(seed):
  """A tiny untied model, three prompts, and a token p the first two never meet (in
  their prompts or clean outputs) but the third emits mid-answer: with p's
  embedding row set to NaN, request 2 turns NaN mid-decode, a prompt holding p
  at the prefill, and requests 0 and 1 must not change."""
  cfg = LlamaConfig.tiny(vocab_size=40, eos_token_ids=())
  llama = Llama(cfg, rngs=nnx.Rngs(seed))
  llama.embed_tokens[...] = jax.random.normal(jax.random.PRNGKey(seed + 1),
                                              llama.embed_tokens[...].shape)
  heads = _random_heads(cfg.hidden_size, 2, seed=seed + 2, scale=0.5)
  rng = np.random.default_rng(seed)
  eng = Engine(llama, None, heads, max_cache_len=64)
  for _ in range(50):
    prompts = [list(rng.integers(1, 40, size=n)) for n in (3, 5, 4)]
    clean = eng.generate(prompts, 6).tokens
    # Token 0 pads prompts in the batch: a NaN row there reaches every padded row.
    seen = set(prompts[0] + prompts[1] + clean[0] + clean[1] + prompts[2] + clean[2][:1]) | {0}
    late = [t for t in clean[2][1:-1] if t not in seen]
    if late:
      return llama, heads, prompts, clean, late[0]
  pytest.skip("no token separates the rows for this seed")


@pytest.mark.parametrize("mode", ["none", "tree"])
def test_nan_logits_fail_their_request_alone(mode):
  from medusa_jax.errors import NonFiniteLogitsError
  llama, heads, prompts, clean, p = _poisoned_setup(int(np.random.default_rng().integers(1000)))
  llama.embed_tokens[...] = llama.embed_tokens[...].at[p].set(jnp.nan)
  eng = Engine(llama, None, heads, max_cache_len=64)
  batch = prompts + [[5, p, 7]]
  opts = dict(speculate=mode) if mode == "none" else dict(speculate="tree", tree=SMALL_TREE)
  res = eng.generate(batch, 6, on_error="skip", **opts)
  assert isinstance(res.errors[3], NonFiniteLogitsError)
  assert "request 3: the model's logits became NaN or infinite at step 0" in str(res.errors[3])
  assert isinstance(res.errors[2], NonFiniteLogitsError)
  assert "request 2:" in str(res.errors[2]) and "at step 0" not in str(res.errors[2])
  for i in (2, 3):
    assert res.tokens[i] == [] and res.stats[i] is None
  for i in (0, 1):  # never silently wrong: the clean answer, or (tree: p was drafted) an error
    if mode == "none" or res.errors[i] is None:
      assert res.errors[i] is None and res.tokens[i] == clean[i], i
  with pytest.raises(NonFiniteLogitsError) as e:
    eng.generate(prompts, 6, **opts)  # on_error="raise": the first row to fail names itself
  failed = [i for i in range(3) if res.errors[i] is not None]
  assert any(str(e.value).startswith(f"request {i}: the model's logits became NaN")
             for i in failed), (str(e.value), failed)


def test_prompt_preparation_errors_fail_alone_and_odd_options_are_typed(tiny):
  """A lone surrogate makes the tokenizer raise a bare TypeError; it fails its request."""
  from medusa_jax.errors import ArchitectureError

  class Strict(_CharTokenizer):
    def encode(self, text):
      text.encode("utf-8")  # UnicodeEncodeError on '\ud800', like the Rust tokenizer's TypeError
      if "boom" in text:
        raise TypeError("TextInputSequence must be str")
      return super().encode(text)
  llama, heads = tiny
  eng = Engine(llama, Strict(llama.cfg.vocab_size), heads, max_cache_len=64)
  res = eng.generate(["ab", "\ud800", "boom", "cd"], 3, on_error="skip")
  assert [e is None for e in res.errors] == [True, False, False, True]
  assert "request 1: cannot prepare the prompt (UnicodeEncodeError" in str(res.errors[1])
  assert "request 2: cannot prepare the prompt (TypeError: TextInputSequence" in str(res.errors[2])
  assert res.tokens[0] == eng.generate(["ab"], 3).tokens[0]
  with pytest.raises(RequestError, match="request 1: cannot prepare the prompt"):
    eng.generate(["ab", "\ud800"], 3)
  for seed in (2**63, -2**63 - 1, 2**70):
    with pytest.raises(RequestError, match=r"seed=\d+|seed=-\d+"):
      eng.generate([[1, 2]], 3, seed=seed)
  # A root-only tree speculates nothing: it decodes plainly, the same tokens.
  assert (eng.generate([[1, 2, 3]], 4, speculate="tree", tree=[]).tokens
          == eng.generate([[1, 2, 3]], 4).tokens)
  wrong = _random_heads(llama.cfg.hidden_size + 8, 2, seed=1, scale=0.1)
  with pytest.raises(ArchitectureError, match=r"hidden size 40; expected the base model's 32"):
    Engine(llama, None, wrong)


def test_trees_through_the_row_kernels_give_plain_decoding_s_tokens(tiny):
  """``row_kernels`` with ``row_kernel_rows=64`` (interpreted): the prefill and the tree's
  verify steps of two rows run the row kernels (q/k/v with RoPE and the cache write, the
  splits' combine in o), and greedy tree decoding still gives XLA's plain tokens, row by
  row."""
  llama, heads = tiny
  fused = llama.fuse_projections()
  rows = fused.with_row_kernels(True).with_row_kernel_rows(64)
  rng = np.random.default_rng(9)
  prompts = [[int(t) for t in rng.integers(0, 8, size=n)] for n in (3, 6)]
  want = Engine(fused, None, heads, max_cache_len=32).generate(prompts, 7, speculate="none")
  eng = Engine(rows, None, heads, max_cache_len=32)
  tree = eng.generate(prompts, 7, speculate="tree", tree=SMALL_TREE)
  assert tree.tree_nodes > 1 and tree.tokens == want.tokens
