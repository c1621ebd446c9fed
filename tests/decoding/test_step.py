"""The decode steps (jitted by the Decoder) on a tiny random Llama: LoRAX I/O, compaction,
acceptance, frozen rows."""

import jax
import jax.numpy as jnp
import numpy as np

from medusa_files import random_v2_heads
from step_cases import CACHE, CONFIG, ROWS, TREE, forward_all, prefill
from medusa_jax.decoding.decoder import Decoder
from medusa_jax.decoding.state import DecodeState

def _greedy(llama, prompt, n):
  toks = list(prompt)
  for _ in range(n):
    _, logits, _ = forward_all(llama, toks)
    toks.append(int(jnp.argmax(logits[-1])))
  return toks[len(prompt):]


def test_decode_step_matches_heads_on_last_hidden(tiny):
  cfg, llama, heads, dec = tiny
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(3, cfg.vocab_size, size=n)) for n in (4, 7, 2)]
  state, _ = prefill(dec, prompts)  # row 3 pads
  fed = rng.integers(3, cfg.vocab_size, size=ROWS).astype(np.int32)
  state = state.replace(tokens=state.tokens.at[:, 0].set(jnp.asarray(fed)))
  lengths_before = np.asarray(state.lengths)
  logits, draft, new_state = dec.decode_step(state)
  assert draft is not None and draft.shape == (ROWS, 3, cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(new_state.lengths), lengths_before + [1, 1, 1, 0])
  for b, p in enumerate(prompts):
    hidden, _, _ = forward_all(llama, p + [int(fed[b])])
    want_logits, want_draft = heads(hidden[-1:], llama.lm_head)
    np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(want_logits[0]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(draft[b]), np.asarray(want_draft[0]),
                               rtol=1e-5, atol=1e-5)


def test_decode_step_honours_the_heads_guard(tiny):
  cfg, llama, _, _ = tiny
  guarded = Decoder(llama, random_v2_heads(cfg, 2, seed=9, max_batch_size=2))
  rng = np.random.default_rng(2)
  rows = 3
  state = DecodeState(
      cache=guarded.init_cache(rows, CACHE, jnp.float32), lengths=jnp.zeros((rows,), jnp.int32),
      tokens=jnp.asarray(rng.integers(3, cfg.vocab_size, size=(rows, 1)), jnp.int32),
      generated=jnp.zeros((rows,), jnp.int32), max_new=jnp.full((rows,), 4, jnp.int32),
      done=jnp.zeros((rows,), bool), rng=jax.random.PRNGKey(0))
  logits, draft, _ = guarded.decode_step(state)
  assert draft is None  # 3 rows > max_batch_size 2: LoRAX skips drafting
  assert logits.shape == (rows, cfg.vocab_size)


def test_speculative_step_compacts_cache_like_plain_decoding(tiny):
  cfg, llama, _, dec = tiny
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(3, cfg.vocab_size, size=n)) for n in (5, 3)]
  g0, g1 = [_greedy(llama, p, 4) for p in prompts]
  state, out = prefill(dec, prompts)
  assert [int(t) for t in np.asarray(out.tokens)[:2, 0]] == [g0[0], g1[0]]
  v = cfg.vocab_size
  planted = np.array(state.tokens)
  planted[0] = [g0[0], (g0[1] + 1) % v, g0[1], rng.integers(v), g0[2]]  # path 0, 2, 4
  planted[1] = [g1[0], (g1[1] + 1) % v, (g1[1] + 2) % v, g1[2], g1[2]]  # nothing accepted
  state = state.replace(tokens=jnp.asarray(planted))
  lengths = np.asarray(state.lengths)
  new_state, out = dec.step(state, config=CONFIG)
  np.testing.assert_array_equal(np.asarray(out.accept_len)[:2], [2, 0])
  np.testing.assert_array_equal(np.asarray(out.count)[:2], [3, 1])
  np.testing.assert_array_equal(np.asarray(out.tokens)[:2], [[g0[1], g0[2], g0[3]],
                                                             [g1[1], -1, -1]])
  np.testing.assert_array_equal(np.asarray(new_state.lengths)[:2], lengths[:2] + [3, 1])
  committed = [prompts[0] + [g0[0], g0[1], g0[2]], prompts[1] + [g1[0]]]
  for b, toks in enumerate(committed):
    _, _, ref = forward_all(llama, toks)
    n = len(toks)
    for layer in range(cfg.num_hidden_layers):
      for got, want in ((new_state.cache.k[layer], ref.k[layer]),
                        (new_state.cache.v[layer], ref.v[layer])):
        np.testing.assert_allclose(np.asarray(got[b, :n]), np.asarray(want[0, :n]),
                                   rtol=1e-5, atol=1e-5)
  # Next tree: the bonus is the root; the drafts come from the heads at the accepted node.
  np.testing.assert_array_equal(np.asarray(new_state.tokens[:2, 0]), [g0[3], g1[1]])


def test_planted_perfect_drafts_are_all_accepted(tiny):
  cfg, llama, _, dec = tiny
  rng = np.random.default_rng(4)
  prompt = list(rng.integers(3, cfg.vocab_size, size=6))
  g = _greedy(llama, prompt, 4)
  state, _ = prefill(dec, [prompt])
  planted = np.array(state.tokens)
  planted[0] = [g[0], g[1], (g[1] + 1) % cfg.vocab_size, g[2], rng.integers(cfg.vocab_size)]
  state, out = dec.step(state.replace(tokens=jnp.asarray(planted)), config=CONFIG)
  assert int(out.accept_len[0]) == TREE.depth
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), g[1:4])
  assert int(state.generated[0]) == 4


def test_finished_and_padding_rows_are_frozen(tiny):
  cfg, _, _, dec = tiny
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(3, cfg.vocab_size, size=4)) for _ in range(3)]
  state, out = prefill(dec, prompts, max_new=2)  # row 3 pads
  assert not bool(out.active[3]) and int(out.count[3]) == 0
  for _ in range(3):
    before = np.asarray(state.lengths)
    state, out = dec.step(state, config=CONFIG)
  assert np.all(np.asarray(state.done))
  assert np.all(np.asarray(state.generated)[:3] == 2)
  np.testing.assert_array_equal(np.asarray(state.lengths), before)
  assert np.all(np.asarray(out.count) == 0) and np.all(np.asarray(out.tokens) == -1)


def test_one_pass_lm_head_equals_two_passes(tiny, monkeypatch):
  """A small tree's single LM-head pass over every node gives the two-pass step's result."""
  from medusa_jax.decoding import verify
  from medusa_jax.decoding.state import StepConfig
  from medusa_jax.decoding.strategies import Greedy
  from medusa_jax.decoding.tree import build_tree
  cfg, llama, heads, _ = tiny
  tree = build_tree([[0], [1]])  # B * T * (1 + D) = 1 * 3 * 2 rows: one pass
  config = StepConfig(tree=tree, strategy=Greedy())
  assert 3 * (1 + tree.depth) <= verify.SHARED_HEAD_MAX_ROWS
  rng = np.random.default_rng()
  prompt = list(rng.integers(3, cfg.vocab_size, size=5))
  g = _greedy(llama, prompt, 3)
  results = []
  for max_rows in (verify.SHARED_HEAD_MAX_ROWS, 0):
    monkeypatch.setattr(verify, "SHARED_HEAD_MAX_ROWS", max_rows)
    dec = Decoder(llama, heads)  # a fresh jit cache, traced under this setting
    state, _ = prefill(dec, [prompt], config=config, rows=1)
    # The rank-1 draft is the target's next token: node 2 is accepted.
    planted = np.array([[g[0], (g[1] + 1) % cfg.vocab_size, g[1]]], np.int32)
    state, out = dec.step(state.replace(tokens=jnp.asarray(planted)), config=config)
    results.append((state, out))
  (s1, o1), (s2, o2) = results
  assert int(o1.accept_len[0]) == 1
  np.testing.assert_array_equal(np.asarray(o1.tokens), np.asarray(o2.tokens))
  np.testing.assert_array_equal(np.asarray(o1.tokens[0]), g[1:3])
  np.testing.assert_array_equal(np.asarray(s1.tokens), np.asarray(s2.tokens))
  for a, b in zip(s1.cache.k + s1.cache.v, s2.cache.k + s2.cache.v):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
