"""Tests of medusa_jax.decoding.sampling: warping and sampling vs float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.decoding import sampling
from medusa_jax.errors import RequestError


def _warp_reference(logits, temperature, top_p):
  """float64 NumPy: temperature softmax, then the smallest nucleus >= top_p."""
  x = np.asarray(logits, np.float64)
  out = np.empty_like(x)
  t = np.broadcast_to(np.asarray(temperature, np.float64), x.shape[:-1])
  p_top = np.broadcast_to(np.asarray(top_p, np.float64), x.shape[:-1])
  for idx in np.ndindex(x.shape[:-1]):
    z = x[idx] / t[idx]
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(p.size, bool)
    mass = 0.0
    for i in order:
      keep[i] = True
      mass += p[i]
      if mass >= p_top[idx]:
        break
    q = np.where(keep, p, 0.0)
    with np.errstate(divide="ignore"):
      out[idx] = np.log(q / q.sum())
  return out


def _both(fn, *static):
  """The function run eagerly and under jit (static trailing options)."""
  return [fn, jax.jit(fn, static_argnums=static)]


@pytest.mark.parametrize("jit, temperature, top_p", [
    (True, 1.0, 1.0), (True, 0.7, 1.0), (False, 1.3, 0.9), (True, 1.3, 0.9), (True, 0.5, 0.5),
    (True, 2.0, 0.05)])
def test_warp_scalar_options_vs_numpy(jit, temperature, top_p):
  rng = np.random.default_rng(int(temperature * 100 + top_p * 10))
  logits = rng.normal(0, 2, (3, 4, 37)).astype(np.float32)
  fn = lambda x: sampling.warp(x, temperature, top_p)
  got = np.asarray((jax.jit(fn) if jit else fn)(jnp.asarray(logits)))
  ref = _warp_reference(logits, temperature, top_p)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_warp_per_row_options_vs_numpy(jit):
  rng = np.random.default_rng(7)
  logits = rng.normal(0, 2, (5, 23)).astype(np.float32)
  temperature = rng.uniform(0.3, 2.0, 5).astype(np.float32)
  top_p = rng.uniform(0.2, 1.0, 5).astype(np.float32)
  fn = sampling.warp
  if jit:
    fn = jax.jit(fn)
  got = np.asarray(fn(jnp.asarray(logits), jnp.asarray(temperature), jnp.asarray(top_p)))
  ref = _warp_reference(logits, temperature, top_p)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_warp_per_row_zero_temperature_is_greedy():
  rng = np.random.default_rng(11)
  logits = rng.normal(0, 2, (6, 29)).astype(np.float32)
  temperature = rng.uniform(0.3, 2.0, 6).astype(np.float32)
  temperature[[1, 4]] = 0.0
  top_p = rng.uniform(0.2, 1.0, 6).astype(np.float32)
  got = np.asarray(jax.jit(sampling.warp)(jnp.asarray(logits), jnp.asarray(temperature),
                                          jnp.asarray(top_p)))
  for row in range(6):
    if temperature[row] == 0:
      want = np.full(29, -np.inf)
      want[np.argmax(logits[row])] = 0.0
      np.testing.assert_array_equal(got[row], want)
    else:
      ref = _warp_reference(logits[row], temperature[row], top_p[row])
      np.testing.assert_array_equal(np.isneginf(got[row]), np.isneginf(ref))
      fin = np.isfinite(ref)
      np.testing.assert_allclose(got[row][fin], ref[fin], rtol=1e-5, atol=1e-5)
  key = jax.random.PRNGKey(3)
  tokens = np.asarray(sampling.sample(key, jnp.asarray(logits), jnp.asarray(temperature)))
  np.testing.assert_array_equal(tokens[[1, 4]], np.argmax(logits[[1, 4]], axis=-1))


def test_top_p_keeps_the_smallest_nucleus_and_the_top_token():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 1.5, (50, 11)).astype(np.float32)
  warp = jax.jit(sampling.warp)
  for top_p in (1e-6, 0.3, 0.75, 0.999):
    logp = np.asarray(warp(jnp.asarray(logits), 1.0, jnp.full((50,), top_p)), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kept = np.isfinite(logp)
    assert kept[np.arange(50), logits.argmax(-1)].all()
    mass = np.where(kept, p, 0).sum(-1)
    smallest = np.where(kept, p, np.inf).min(-1)
    assert (mass >= top_p - 1e-6).all()
    assert (mass - smallest < top_p + 1e-6).all()  # dropping any kept token falls short
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-5)


def test_greedy_warp_and_sample_are_argmax():
  rng = np.random.default_rng(11)
  logits = jnp.asarray(rng.normal(0, 1, (4, 3, 17)), jnp.bfloat16)
  top = np.asarray(jnp.argmax(logits.astype(jnp.float32), -1))
  logp = np.asarray(sampling.warp(logits, 0, 0.5))
  np.testing.assert_array_equal(logp.argmax(-1), top)
  assert np.isfinite(logp).sum() == top.size
  for fn in _both(lambda x: sampling.sample(None, x, 0.0)):
    got = fn(logits)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, top)


@pytest.mark.parametrize("jit", [True])
def test_sample_frequencies_match_the_warped_distribution(jit):
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 1, (6,)).astype(np.float32)
  n = 40_000
  tiled = jnp.broadcast_to(jnp.asarray(logits), (n, 6))
  fn = lambda k, x: sampling.sample(k, x, 0.8, 0.9)
  draws = np.asarray((jax.jit(fn) if jit else fn)(jax.random.key(0), tiled))
  expect = np.exp(_warp_reference(logits, 0.8, 0.9)) * n
  counts = np.bincount(draws, minlength=6)
  assert (counts[expect == 0] == 0).all()
  live = expect > 0
  stat = ((counts[live] - expect[live]) ** 2 / expect[live]).sum()
  assert stat < 30.0  # chi-square, df <= 5: P(stat > 30) < 2e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature: expected a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature: expected a finite number >= 0"),
    (dict(temperature=True), "temperature: expected a number >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p: expected a number in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p: expected a number in \(0, 1\]"),
    (dict(temperature=0, top_p=-1.0), r"top_p: expected a number in \(0, 1\]"),
])
def test_option_errors(kwargs, match):
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5)), jnp.float32)
  with pytest.raises(RequestError, match=match):
    sampling.warp(logits, kwargs.pop("temperature"), **kwargs)


def test_sample_needs_a_key():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5)), jnp.float32)
  with pytest.raises(RequestError, match="key: sampling with temperature > 0 needs a PRNG key"):
    sampling.sample(None, logits, 1.0)


def test_inverse_cdf_hand_table():
  logp = jnp.log(jnp.asarray([[0.2, 0.0, 0.5, 0.3]] * 5 + [[0.5, 0.5, 0.0, 0.0]], jnp.float32))
  u = jnp.asarray([0.1, 0.2, 0.69, 0.71, 0.99999994, 0.99999994], jnp.float32)
  # cdf [.2, .2, .7, 1]: u*1 in [0, .2) -> 0, [.2, .7) -> 2 (skipping the empty token 1), else 3;
  # the last row would round past its last possible token 1 without the clamp.
  np.testing.assert_array_equal(sampling.inverse_cdf(logp, u), [0, 2, 2, 3, 3, 1])
