"""Self-distillation with the frozen base model: greedy answers and hidden states.

``greedy_generate`` is a minimal batched greedy loop (prefill, then a
``lax.while_loop`` of one-token steps inside one jitted call per batch) so
that data generation runs as one device program per batch on any backend.
``hidden_rows`` runs whole training sequences through the base model once
and keeps, for every position that has a Medusa target, its final hidden
state.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.models.llama import KVCache, Llama, causal_mask
from medusa_jax.training.data import Example, Prompt, pad_examples
from medusa_jax.training.losses import IGNORE, medusa_targets
from medusa_jax.training.train import TokenRows

Progress = Callable[[int], None]


def _bucket(n: int, step: int) -> int:
  return max(step, -(-n // step) * step)


def lm_head_weight(llama: Llama) -> np.ndarray:
  """[V, H] float32: the base lm_head as rows (the tied embedding when tied)."""
  if llama.lm_head_kernel is None:
    return np.asarray(llama.embed_tokens[...], np.float32)
  return np.asarray(llama.lm_head_kernel[...], np.float32).T


def _generate_batch(graphdef, params, tokens_BxP, lengths_B, active_B, *, max_new: int, eos_ids):
  """Greedy answers of one right-padded batch.

  Args:
    tokens_BxP: [B, P] int32 prompts, right-padded.
    lengths_B: [B] int32 prompt lengths (>= 1).
    active_B: [B] bool; False marks filler rows of a short last batch.
    max_new: new tokens per row at most (static).
    eos_ids: stop tokens (static tuple).

  Returns:
    out [B, max_new] int32 (tokens after a row's eos are eos), n_new [B] int32
    (tokens up to and including the first eos).
  """
  model = nnx.merge(graphdef, params)
  b, p = tokens_BxP.shape
  length = p + max_new
  cache = KVCache.init(model.cfg, b, length, model.dtype)
  zero_B = jnp.zeros((b,), jnp.int32)
  pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
  hidden, cache = model(tokens_BxP, pos_BxP, cache, zero_B, causal_mask(zero_B, p, length))
  last_BxH = jnp.take_along_axis(hidden, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  first_B = jnp.argmax(model.lm_head(last_BxH), axis=-1).astype(jnp.int32)
  eos = jnp.asarray(eos_ids, jnp.int32)

  def is_eos(t_B):
    return jnp.any(t_B[:, None] == eos[None, :], axis=-1)

  out = jnp.full((b, max_new), eos[0], jnp.int32).at[:, 0].set(first_B)
  n_new = jnp.ones((b,), jnp.int32)
  done = is_eos(first_B) | ~active_B

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, cache, last_B, out, done, n_new = carry
    idx_B = lengths_B + i - 1  # slot of the token being fed (the i-th new one)
    h, cache = model(last_B[:, None], idx_B[:, None], cache, idx_B,
                     causal_mask(idx_B, 1, length))
    nxt_B = jnp.argmax(model.lm_head(h[:, 0]), axis=-1).astype(jnp.int32)
    nxt_B = jnp.where(done, eos[0], nxt_B)
    out = jax.lax.dynamic_update_slice(out, nxt_B[:, None], (0, i))
    n_new = n_new + (~done).astype(jnp.int32)
    done = done | is_eos(nxt_B)
    return i + 1, cache, nxt_B, out, done, n_new

  carry = (jnp.int32(1), cache, first_B, out, done, n_new)
  _, _, _, out, _, n_new = jax.lax.while_loop(cond, body, carry)
  return out, n_new


@functools.lru_cache(maxsize=8)
def _generate_fn(graphdef, max_new: int, eos_ids: tuple[int, ...]):
  return jax.jit(functools.partial(_generate_batch, graphdef, max_new=max_new, eos_ids=eos_ids))


def greedy_generate(llama: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    batch_size: int, eos_ids: Sequence[int], pad_id: int = 0,
                    length_bucket: int = 32, progress: Progress | None = None
                    ) -> list[list[int]]:
  """Greedy answers of the base model, batched (plain decoding, no speculation).

  Prompts are sorted by length into batches; batch shapes are bucketed (rows
  to ``batch_size``, prompt length to a multiple of ``length_bucket``) to
  bound compiles (one bucket >= the longest prompt gives one compile).

  Returns:
    One answer per prompt, in input order, ending with its eos token unless
    it hit ``max_new_tokens``.
  """
  graphdef, params = nnx.split(llama)
  fn = _generate_fn(graphdef, max_new_tokens, tuple(int(e) for e in eos_ids))
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  answers: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    p = _bucket(max(len(prompts[i]) for i in rows), length_bucket)
    tokens = np.full((batch_size, p), pad_id, np.int32)
    lengths = np.ones((batch_size,), np.int32)
    active = np.arange(batch_size) < len(rows)
    for r, i in enumerate(rows):
      tokens[r, :len(prompts[i])] = prompts[i]
      lengths[r] = len(prompts[i])
    out, n_new = jax.device_get(fn(params, tokens, lengths, active))
    for r, i in enumerate(rows):
      answers[i] = [int(t) for t in out[r, :n_new[r]]]
    if progress is not None:
      progress(len(rows))
  return answers


def make_examples(prompts: Sequence[Prompt], answers: Sequence[Sequence[int]]) -> list[Example]:
  """``prompt + answer`` examples (empty answers dropped)."""
  return [Example(conv_id=p.conv_id, split=p.split, ids=tuple(p.ids) + tuple(a),
                  prompt_len=len(p.ids)) for p, a in zip(prompts, answers) if a]


def _hidden_batch(graphdef, params, tokens_BxS):
  model = nnx.merge(graphdef, params)
  b, s = tokens_BxS.shape
  cache = KVCache.init(model.cfg, b, s, model.dtype)
  zero_B = jnp.zeros((b,), jnp.int32)
  pos_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
  hidden, _ = model(tokens_BxS, pos_BxS, cache, zero_B, causal_mask(zero_B, s, s))
  return hidden


@functools.lru_cache(maxsize=8)
def _hidden_fn(graphdef):
  return jax.jit(functools.partial(_hidden_batch, graphdef))


def hidden_rows(llama: Llama, examples: Sequence[Example], *, num_heads: int, batch_size: int,
                pad_id: int = 0, dtype=np.float16, length_bucket: int = 64,
                progress: Progress | None = None) -> TokenRows:
  """Token rows of the examples: base hidden states + Medusa targets.

  Only positions with at least one valid head target are kept. Sequences are
  right-padded (causal attention makes padding invisible to real tokens).

  Args:
    llama: the frozen base model.
    examples: training sequences with their answer masks.
    num_heads: n.
    batch_size: sequences per forward.
    pad_id: padding token.
    dtype: storage dtype of the hidden states.
    length_bucket: sequence lengths are padded to a multiple of this.

  Returns:
    TokenRows with hidden [R, H] (``dtype``) and targets [R, n] int32.
  """
  graphdef, params = nnx.split(llama)
  fn = _hidden_fn(graphdef)
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
  hs, ts = [], []
  for start in range(0, len(order), batch_size):
    batch = [examples[i] for i in order[start:start + batch_size]]
    s = _bucket(max(len(e.ids) for e in batch), length_bucket)
    ids, loss_mask, _ = pad_examples(batch + [batch[0]] * (batch_size - len(batch)), s, pad_id)
    hidden = np.asarray(jax.device_get(fn(params, ids)))[: len(batch)]
    targets = medusa_targets(ids[: len(batch)], loss_mask[: len(batch)], num_heads)
    keep = (targets != IGNORE).any(axis=-1)
    hs.append(hidden[keep].astype(dtype))
    ts.append(targets[keep])
    if progress is not None:
      progress(len(batch))
  h = llama.cfg.hidden_size
  return TokenRows(hidden=np.concatenate(hs) if hs else np.zeros((0, h), dtype),
                   targets=np.concatenate(ts) if ts else np.zeros((0, num_heads), np.int32))
