"""Tests of medusa_jax.decoding.strategies: root choice, per-row options, fields, extension."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.decoding import sampling
from medusa_jax.decoding import strategies as st
from medusa_jax.decoding import tree as tr
from medusa_jax.decoding import verify as vf
from medusa_jax.decoding.state import RowParams
from medusa_jax.errors import RequestError


def test_choose_root():
  choose = jax.jit(vf.choose_root, static_argnames="strategy")
  rng = np.random.default_rng(15)
  logits = jnp.asarray(rng.normal(0, 2, (4000, 6)), jnp.float32)
  np.testing.assert_array_equal(choose(logits, st.Greedy()), np.asarray(logits).argmax(-1))
  rows = RowParams.full(4000, 0.8, 0.7)
  np.testing.assert_array_equal(
      choose(logits, st.Sampling(), jax.random.key(2), rows),
      sampling.sample(jax.random.key(2), logits, 0.8, 0.7))
  typ = st.Typical()
  picks = np.asarray(choose(logits, typ, jax.random.key(3), RowParams.full(4000, 0.7)))
  z = np.asarray(logits, np.float64) / 0.7
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  thr = np.minimum(0.09, 0.3 * np.exp((p * np.log(p + 1e-5)).sum(-1)))  # exp(-H)
  assert (p[np.arange(4000), picks] >= thr - 1e-6).all()
  assert (picks != p.argmax(-1)).any()  # a sample, not the argmax
  with pytest.raises(RequestError, match="key: Typical needs a PRNG key"):
    vf.choose_root(logits, typ)
  with pytest.raises(RequestError, match="rows: Typical needs per-row temperatures"):
    vf.choose_root(logits, typ, jax.random.key(3))


@pytest.mark.parametrize("jit", [False, True])
def test_per_row_options_are_the_only_temperature(jit):
  """Row b's choice depends on rows[b] alone: a row at 0 is the argmax, a tiny nucleus too,
  and one compiled function serves rows of any values."""
  rng = np.random.default_rng(40)
  logits = jnp.asarray(rng.normal(0, 1.5, (6, 9)), jnp.float32)
  temps = jnp.asarray([0.0, 1.3, 0.0, 0.6, 2.0, 1.0], jnp.float32)
  top_ps = jnp.asarray([1.0, 1.0, 0.5, 0.9, 1e-6, 1.0], jnp.float32)
  choose = (jax.jit(vf.choose_root, static_argnames="strategy") if jit else vf.choose_root)
  key = jax.random.key(41)
  got = np.asarray(choose(logits, st.Sampling(), key, RowParams(temperature=temps, top_p=top_ps)))
  argmax = np.asarray(logits).argmax(-1)
  np.testing.assert_array_equal(got[[0, 2, 4]], argmax[[0, 2, 4]])
  # The same rows alone, each with its own options, draw the same tokens.
  for b in (1, 3, 5):
    want = sampling.sample(key, logits, temps, top_ps)[b]
    assert int(got[b]) == int(want)


def test_typical_at_temperature_zero_is_greedy():
  rng = np.random.default_rng(42)
  logits = jnp.asarray(rng.normal(0, 1, (5, 7)), jnp.float32)
  got = vf.choose_root(logits, st.Typical(), jax.random.key(0), RowParams.full(5, 0.0))
  np.testing.assert_array_equal(got, np.asarray(logits).argmax(-1))


@pytest.mark.parametrize("make, match", [
    (lambda: st.Typical(posterior_threshold=0.0),
     r"Typical.posterior_threshold: expected a number in \(0, 1\]"),
    (lambda: st.Typical(posterior_threshold=1.5), "Typical.posterior_threshold"),
    (lambda: st.Typical(posterior_alpha=float("nan")), "Typical.posterior_alpha"),
    (lambda: st.Typical(posterior_alpha="0.3"), "Typical.posterior_alpha"),
    (lambda: st.Typical(posterior_alpha=True), "Typical.posterior_alpha"),
])
def test_strategy_errors(make, match):
  with pytest.raises(RequestError, match=match):
    make()


def test_strategies_carry_no_temperature_and_hash_by_value():
  for cls in (st.Greedy, st.Sampling, st.Typical):
    names = {f.name for f in dataclasses.fields(cls)}
    assert not names & {"temperature", "top_p"}, cls
    with pytest.raises(TypeError):
      cls(temperature=0.7)
  assert hash(st.Typical(posterior_alpha=1)) == hash(st.Typical(posterior_alpha=1.0))
  assert isinstance(st.Typical(posterior_alpha=1).posterior_alpha, float)
  assert st.Sampling() == st.Sampling() and st.Sampling() != st.Greedy()
  assert {st.Greedy(): 1, st.Sampling(): 2}[st.Sampling()] == 2


def test_a_new_strategy_is_one_class():
  """A subclass (here: accept nothing, emit the argmax) runs through verify unchanged."""

  @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
  class NoDrafts(st.Strategy):
    needs_key = False
    needs_rows = False

    def choose(self, logits, key=None, rows=None):
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def walk(self, tree, tokens, internal_logits, key=None, rows=None):
      zero_B = jnp.zeros((tokens.shape[0],), jnp.int32)
      return vf.Walk(best_node=zero_B, choice=zero_B, uniform=zero_B.astype(jnp.float32))

    def bonus(self, tree, walk, best_logits, key=None, rows=None):
      return self.choose(best_logits)

  rng = np.random.default_rng(43)
  chain = tr.build_tree(tr.chain_choices(2))
  logits = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
  argmax = np.asarray(logits).argmax(-1)
  # Drafts a greedy walk accepts in full: node k carries the argmax at node k - 1.
  tokens = jnp.asarray(np.concatenate([rng.integers(0, 5, (3, 1)), argmax[:, :2]], axis=1))
  verify = jax.jit(vf.verify_tree, static_argnames=("tree", "strategy"))
  greedy = verify(chain, tokens, logits, st.Greedy())
  np.testing.assert_array_equal(greedy.accept_len, [2, 2, 2])
  v = verify(chain, tokens, logits, NoDrafts())
  np.testing.assert_array_equal(v.accept_len, [0, 0, 0])
  np.testing.assert_array_equal(v.next_root, argmax[:, 0])
