"""Logits warping (temperature, top-p) and sampling, jittable and batched.

``temperature == 0`` means greedy. As a Python number, the choice between
argmax and sampling is made when tracing. Temperatures and top-p may also be
arrays of the logits' leading shape (one value per row, so one compilation
serves every value); rows whose temperature is 0 then take the greedy limit
(all mass on the argmax) inside the same computation.
"""

from __future__ import annotations

import math
from numbers import Real

import jax
import jax.numpy as jnp

from medusa_jax.errors import RequestError

Array = jax.Array


def is_greedy(temperature) -> bool:
  """True iff ``temperature`` is the Python (or NumPy scalar) number 0."""
  return isinstance(temperature, Real) and not isinstance(temperature, bool) and temperature == 0


def warp(logits: Array, temperature, top_p=1.0) -> Array:
  """Log-probabilities of the warped distribution.

  Temperature divides the logits; top-p then keeps the smallest set of most
  likely tokens whose probability sums to at least ``top_p`` (always at least
  the top token; tokens tied with the last one kept are kept too) and
  renormalises over it.

  Args:
    logits: [..., V] any float dtype; computed in float32.
    temperature: a Python number >= 0, or an array >= 0 of shape [...].
      0 gives the greedy limit: log-probability 0 at the argmax, -inf elsewhere.
    top_p: a Python number in (0, 1], or an array of shape [...].

  Returns:
    [..., V] float32 log-probabilities; -inf for removed tokens.

  Raises:
    RequestError: a Python temperature < 0 or non-finite, or a Python top_p
      outside (0, 1].
  """
  _check_scalar_options(temperature, top_p)
  logits = logits.astype(jnp.float32)  # softmax statistics in f32
  if is_greedy(temperature):
    return jnp.where(argmax_mask(logits), 0.0, -jnp.inf)
  if isinstance(temperature, Real):
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  else:
    # Per-row temperatures: rows at 0 take the greedy limit, the others sample.
    t_x1 = _per_row(temperature)
    sampled = jax.nn.log_softmax(logits / jnp.where(t_x1 > 0, t_x1, 1.0), axis=-1)
    logp = jnp.where(t_x1 > 0, sampled, jnp.where(argmax_mask(logits), 0.0, -jnp.inf))
  if isinstance(top_p, Real) and top_p >= 1:
    return logp
  return _top_p_log_probs(logp, top_p)


def sample(key: Array, logits: Array, temperature, top_p=1.0) -> Array:
  """Draws one token per row of the warped distribution.

  Args:
    key: a PRNG key (unused, and may be None, when greedy).
    logits: [..., V].
    temperature: as in :func:`warp`; 0 (a Python number) gives the argmax.
    top_p: as in :func:`warp`.

  Returns:
    [...] int32 token ids.
  """
  if is_greedy(temperature):
    _check_scalar_options(temperature, top_p)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise RequestError("key: sampling with temperature > 0 needs a PRNG key, got None")
  uniform = jax.random.uniform(key, logits.shape[:-1], jnp.float32)
  return inverse_cdf(warp(logits, temperature, top_p), uniform)


def inverse_cdf(log_probs: Array, uniform: Array) -> Array:
  """Turns one uniform number per row into a token of that row's distribution.

  Inverse-CDF sampling needs one random number per row instead of one per
  token (as Gumbel-max does), which keeps the random-bit work of a [B, T, V]
  verification small.

  Args:
    log_probs: [..., V] log-probabilities (need not be normalised; -inf for
      impossible tokens).
    uniform: [...] float32 in [0, 1).

  Returns:
    [...] int32: the first token whose cumulative probability exceeds
    ``uniform`` times the total; never a token of probability 0.
  """
  probs = jnp.exp(log_probs.astype(jnp.float32) - jnp.max(log_probs, axis=-1, keepdims=True))
  cdf = jnp.cumsum(probs, axis=-1)
  target = (uniform.astype(jnp.float32) * cdf[..., -1])[..., None]
  token = jnp.sum((cdf <= target).astype(jnp.int32), axis=-1)
  # Rounding can put `target` at the very end: fall back to the last possible token.
  vocab = log_probs.shape[-1]
  last = vocab - 1 - jnp.argmax(jnp.flip(probs > 0, axis=-1), axis=-1).astype(jnp.int32)
  return jnp.minimum(token, last)


def argmax_mask(x: Array) -> Array:
  """[..., V] bool, True at the (first) argmax of each row of ``x`` [..., V]."""
  ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return ids == jnp.argmax(x, axis=-1).astype(jnp.int32)[..., None]


def _top_p_log_probs(logp: Array, top_p) -> Array:
  """Keeps the nucleus of ``logp`` [..., V] and renormalises."""
  sorted_logp = jnp.flip(jnp.sort(logp, axis=-1), axis=-1)  # descending
  sorted_p = jnp.exp(sorted_logp)
  mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  # Token i (in descending order) is kept while the mass of the tokens before
  # it is still short of top_p; the first token has mass_before = 0.
  keep = mass_before < _per_row(top_p)
  keep = keep.at[..., 0].set(True)
  cutoff = jnp.min(jnp.where(keep, sorted_logp, jnp.inf), axis=-1, keepdims=True)
  kept = jnp.where(logp >= cutoff, logp, -jnp.inf)
  return kept - jax.nn.logsumexp(kept, axis=-1, keepdims=True)


def _per_row(value):
  """A per-row option as something that broadcasts against [..., V]."""
  if isinstance(value, Real):
    return value
  value = jnp.asarray(value, jnp.float32)
  return value if value.ndim == 0 else value[..., None]


def _check_scalar_options(temperature, top_p) -> None:
  if isinstance(temperature, bool):
    raise RequestError(f"temperature: expected a number >= 0, got {temperature!r}")
  if isinstance(temperature, Real) and not (math.isfinite(temperature) and temperature >= 0):
    raise RequestError(f"temperature: expected a finite number >= 0, got {temperature!r}")
  if isinstance(top_p, bool):
    raise RequestError(f"top_p: expected a number in (0, 1], got {top_p!r}")
  if isinstance(top_p, Real) and not 0 < top_p <= 1:
    raise RequestError(f"top_p: expected a number in (0, 1], got {top_p!r}")
