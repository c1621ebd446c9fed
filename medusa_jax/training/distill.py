"""Self-distillation with the frozen base model: greedy answers and hidden states.

``greedy_generate`` is a minimal batched greedy loop (prefill, then a
``lax.while_loop`` of one-token steps inside one jitted call per batch) so
that data generation runs as one device program per batch on any backend.
``hidden_rows`` runs whole training sequences through the base model once
and keeps, for every position that has a Medusa target, its final hidden
state (and optionally the base model's top-K teacher distributions).
``generate_rows`` does both in one pass: the generation loop keeps the
hidden states and top-K it computes anyway.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.models.llama import KVCache, Llama, causal_mask
from medusa_jax.training.data import Example, Prompt, pad_examples
from medusa_jax.training.losses import IGNORE, medusa_targets, teacher_targets
from medusa_jax.training.train import TokenRows

Progress = Callable[[int], None]


def _bucket(n: int, step: int) -> int:
  return max(step, -(-n // step) * step)


def lm_head_weight(llama: Llama) -> np.ndarray:
  """[V, H] float32: the base lm_head as rows (the tied embedding when tied)."""
  if llama.lm_head_kernel is None:
    return np.asarray(llama.embed_tokens[...], np.float32)
  return np.asarray(llama.lm_head_kernel[...], np.float32).T


def _generate_batch(graphdef, params, tokens_BxP, lengths_B, active_B, *, max_new: int, eos_ids,
                    window: int = 0, topk: int = 0, out_dtype: str = "float16"):
  """Greedy answers of one right-padded batch.

  Args:
    tokens_BxP: [B, P] int32 prompts, right-padded.
    lengths_B: [B] int32 prompt lengths (>= 1).
    active_B: [B] bool; False marks filler rows of a short last batch.
    max_new: new tokens per row at most (static).
    eos_ids: stop tokens (static tuple).
    window: > 0 also returns the hidden states of the last ``window`` prompt
      positions and of every answer position (static).
    topk: with ``window``, K > 0 also returns the top-K next-token ids and
      log-probs at the last prompt position and every answer position (static).
    out_dtype: storage dtype of the returned hidden states (static).

  Returns:
    out [B, max_new] int32 (tokens after a row's eos are eos), n_new [B] int32
    (tokens up to and including the first eos); with ``window`` also
    hidden [B, window + max_new, H] (slot j holds position
    ``length - window + j``; slots before position 0 are filler), and with
    ``topk`` ids [B, window + max_new, K] int32 and logp [..., K] float16
    in the same slots (only slots from ``window - 1`` on are filled).
  """
  model = nnx.merge(graphdef, params)
  b, p = tokens_BxP.shape
  length = p + max_new
  cache = KVCache.init(model.cfg, b, length, model.dtype)
  zero_B = jnp.zeros((b,), jnp.int32)
  pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
  hidden, cache = model(tokens_BxP, pos_BxP, cache, zero_B, causal_mask(zero_B, p, length))
  last_BxH = jnp.take_along_axis(hidden, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  first_logits_BxV = model.lm_head(last_BxH)
  first_B = jnp.argmax(first_logits_BxV, axis=-1).astype(jnp.int32)
  eos = jnp.asarray(eos_ids, jnp.int32)
  slots = window + max_new

  def is_eos(t_B):
    return jnp.any(t_B[:, None] == eos[None, :], axis=-1)

  def top(logits_BxV):
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    logp_BxK, ids_BxK = jax.lax.top_k(logp_BxV, topk)
    return ids_BxK.astype(jnp.int32), logp_BxK.astype(jnp.float16)

  rec = {}
  if window:
    idx_BxW = jnp.maximum(lengths_B[:, None] - window + jnp.arange(window)[None, :], 0)
    win_BxWxH = jnp.take_along_axis(hidden, idx_BxW[..., None], axis=1)
    rec["hidden"] = jnp.zeros((b, slots, hidden.shape[-1]), out_dtype).at[:, :window].set(
        win_BxWxH.astype(out_dtype))
    if topk:
      ids_BxK, logp_BxK = top(first_logits_BxV)
      rec["ids"] = jnp.zeros((b, slots, topk), jnp.int32).at[:, window - 1].set(ids_BxK)
      rec["logp"] = jnp.zeros((b, slots, topk), jnp.float16).at[:, window - 1].set(logp_BxK)

  out = jnp.full((b, max_new), eos[0], jnp.int32).at[:, 0].set(first_B)
  n_new = jnp.ones((b,), jnp.int32)
  done = is_eos(first_B) | ~active_B

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, cache, last_B, out, done, n_new, rec = carry
    idx_B = lengths_B + i - 1  # slot of the token being fed (the i-th new one)
    h, cache = model(last_B[:, None], idx_B[:, None], cache, idx_B,
                     causal_mask(idx_B, 1, length))
    logits_BxV = model.lm_head(h[:, 0])
    nxt_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    nxt_B = jnp.where(done, eos[0], nxt_B)
    out = jax.lax.dynamic_update_slice(out, nxt_B[:, None], (0, i))
    n_new = n_new + (~done).astype(jnp.int32)
    done = done | is_eos(nxt_B)
    if window:  # position length + i - 1 lives in slot window + i - 1
      slot = window + i - 1
      rec = dict(rec)
      rec["hidden"] = jax.lax.dynamic_update_slice(
          rec["hidden"], h.astype(out_dtype), (0, slot, 0))
      if topk:
        ids_BxK, logp_BxK = top(logits_BxV)
        rec["ids"] = jax.lax.dynamic_update_slice(rec["ids"], ids_BxK[:, None], (0, slot, 0))
        rec["logp"] = jax.lax.dynamic_update_slice(rec["logp"], logp_BxK[:, None],
                                                   (0, slot, 0))
    return i + 1, cache, nxt_B, out, done, n_new, rec

  carry = (jnp.int32(1), cache, first_B, out, done, n_new, rec)
  _, _, _, out, _, n_new, rec = jax.lax.while_loop(cond, body, carry)
  if not window:
    return out, n_new
  return out, n_new, rec


@functools.lru_cache(maxsize=8)
def _generate_fn(graphdef, max_new: int, eos_ids: tuple[int, ...], window: int = 0,
                 topk: int = 0, out_dtype: str = "float16"):
  return jax.jit(functools.partial(_generate_batch, graphdef, max_new=max_new, eos_ids=eos_ids,
                                   window=window, topk=topk, out_dtype=out_dtype))


def _batches(prompts: Sequence[Sequence[int]], batch_size: int, length_bucket: int, pad_id: int,
             shuffle_seed: int | None = None):
  """(rows, tokens [B, P], lengths [B], active [B]) per batch, prompts sorted by length.

  With ``shuffle_seed`` the batches (each still of similar lengths) come in a
  seeded random order, so that any prefix of them is a fair sample.
  """
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  starts = list(range(0, len(order), batch_size))
  if shuffle_seed is not None:
    starts = [starts[j] for j in np.random.default_rng(shuffle_seed).permutation(len(starts))]
  for start in starts:
    rows = order[start:start + batch_size]
    p = _bucket(max(len(prompts[i]) for i in rows), length_bucket)
    tokens = np.full((batch_size, p), pad_id, np.int32)
    lengths = np.ones((batch_size,), np.int32)
    active = np.arange(batch_size) < len(rows)
    for r, i in enumerate(rows):
      tokens[r, :len(prompts[i])] = prompts[i]
      lengths[r] = len(prompts[i])
    yield rows, tokens, lengths, active


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
  answers: list[list[int]] = [[] for _ in prompts]
  for rows, tokens, lengths, active in _batches(prompts, batch_size, length_bucket, pad_id):
    out, n_new = jax.device_get(fn(params, tokens, lengths, active))
    for r, i in enumerate(rows):
      answers[i] = [int(t) for t in out[r, :n_new[r]]]
    if progress is not None:
      progress(len(rows))
  return answers


class _RowBuffer:
  """Token rows of one split, gathered batch by batch."""

  def __init__(self):
    self.parts: dict[str, list[np.ndarray]] = {}

  def add(self, **arrays):
    for k, v in arrays.items():
      self.parts.setdefault(k, []).append(v)

  def rows(self, hidden_size: int, num_heads: int, topk: int, dtype) -> TokenRows:
    def cat(key, shape, dt):
      return np.concatenate(self.parts[key]) if key in self.parts else np.zeros(shape, dt)
    teacher = {}
    if topk:
      teacher = {"teacher_ids": cat("teacher_ids", (0, num_heads, topk), np.int32),
                 "teacher_logp": cat("teacher_logp", (0, num_heads, topk), np.float16)}
    return TokenRows(hidden=cat("hidden", (0, hidden_size), dtype),
                     targets=cat("targets", (0, num_heads), np.int32), **teacher)


def generate_rows(llama: Llama, prompts: Sequence[Prompt], *, max_new_tokens: int,
                  batch_size: int, eos_ids: Sequence[int], num_heads: int,
                  teacher_topk: int = 0, pad_id: int = 0, length_bucket: int = 32,
                  dtype=np.float16, time_budget_s: float | None = None, seed: int = 0,
                  progress: Progress | None = None
                  ) -> tuple[list[list[int]], dict[str, TokenRows]]:
  """Greedy answers and their token rows in one pass (no second forward).

  The generation loop already computes the final hidden state of every
  answer position and the next-token logits that chose each answer token;
  it keeps them (and the hidden states of the last ``num_heads + 1`` prompt
  positions, the only prompt positions with a Medusa target), so the rows
  equal :func:`hidden_rows` of ``make_examples(prompts, answers)`` up to the
  rounding of incremental decoding.

  Args:
    llama, prompts, max_new_tokens, batch_size, eos_ids, pad_id,
      length_bucket: as :func:`greedy_generate` (prompts carry their split).
    num_heads: n.
    teacher_topk: K > 0 also keeps each head's teacher top-K
      (``losses.teacher_targets``).
    dtype: storage dtype of the hidden states.
    time_budget_s: no new batch (after the first) starts after this many
      seconds; the prompts
      of the batches not run get empty answers and no rows. Batches then run
      in a seeded random order (``seed``), so the prompts done are a fair
      sample of all lengths. None: every batch, shortest prompts first.
    seed: the batch order's seed (with ``time_budget_s``).

  Returns:
    (answers in input order, {"train": TokenRows, "val": TokenRows}).
  """
  graphdef, params = nnx.split(llama)
  window = num_heads + 1
  topk = int(teacher_topk)
  fn = _generate_fn(graphdef, max_new_tokens, tuple(int(e) for e in eos_ids), window, topk,
                    np.dtype(dtype).name)
  answers: list[list[int]] = [[] for _ in prompts]
  buffers = {"train": _RowBuffer(), "val": _RowBuffer()}
  ids_list = [p.ids for p in prompts]
  t0 = time.perf_counter()
  batches = _batches(ids_list, batch_size, length_bucket, pad_id,
                     None if time_budget_s is None else seed)
  for b, (rows, tokens, lengths, active) in enumerate(batches):
    if b and time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
      break
    out, n_new, rec = jax.device_get(fn(params, tokens, lengths, active))
    for r, i in enumerate(rows):
      answer = out[r, :n_new[r]]
      answers[i] = [int(t) for t in answer]
      plen = int(lengths[r])
      w = min(window, plen)
      ids = np.concatenate([np.asarray(ids_list[i][plen - w:], np.int32), answer])
      mask = np.arange(len(ids)) >= w
      targets = medusa_targets(ids, mask, num_heads)
      keep = (targets != IGNORE).any(axis=-1)
      sl = slice(window - w, window + len(answer))
      arrays = {"hidden": rec["hidden"][r, sl][keep].astype(dtype), "targets": targets[keep]}
      if topk:
        t_ids, t_logp = teacher_targets(rec["ids"][r, sl], rec["logp"][r, sl], num_heads)
        arrays.update(teacher_ids=t_ids[keep], teacher_logp=t_logp[keep])
      buffers[prompts[i].split].add(**arrays)
    if progress is not None:
      progress(len(rows))
  h = llama.cfg.hidden_size
  return answers, {k: b.rows(h, num_heads, topk, dtype) for k, b in buffers.items()}


def make_examples(prompts: Sequence[Prompt], answers: Sequence[Sequence[int]]) -> list[Example]:
  """``prompt + answer`` examples (empty answers dropped)."""
  return [Example(conv_id=p.conv_id, split=p.split, ids=tuple(p.ids) + tuple(a),
                  prompt_len=len(p.ids)) for p, a in zip(prompts, answers) if a]


def _hidden_batch(graphdef, params, tokens_BxS, *, topk: int, out_dtype):
  """Final hidden states [B, S, H] (``out_dtype``) and, for ``topk`` > 0, the
  base model's top-K next-token ids [B, S, K] int32 and log-probs [B, S, K]
  float16 at every position."""
  model = nnx.merge(graphdef, params)
  b, s = tokens_BxS.shape
  cache = KVCache.init(model.cfg, b, s, model.dtype)
  zero_B = jnp.zeros((b,), jnp.int32)
  pos_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
  hidden, _ = model(tokens_BxS, pos_BxS, cache, zero_B, causal_mask(zero_B, s, s))
  if not topk:
    return hidden.astype(out_dtype), None, None
  logp_BxSxV = jax.nn.log_softmax(model.lm_head(hidden).astype(jnp.float32), axis=-1)
  logp_BxSxK, ids_BxSxK = jax.lax.top_k(logp_BxSxV, topk)
  return hidden.astype(out_dtype), ids_BxSxK.astype(jnp.int32), logp_BxSxK.astype(jnp.float16)


@functools.lru_cache(maxsize=8)
def _hidden_fn(graphdef, topk: int, out_dtype: str):
  return jax.jit(functools.partial(_hidden_batch, graphdef, topk=topk, out_dtype=out_dtype))


def hidden_rows(llama: Llama, examples: Sequence[Example], *, num_heads: int, batch_size: int,
                pad_id: int = 0, dtype=np.float16, length_bucket: int = 64,
                teacher_topk: int = 0, progress: Progress | None = None) -> TokenRows:
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
    teacher_topk: K > 0 also keeps each head's teacher distribution (the
      base model's top-K at the position that predicts the head's token,
      ``losses.teacher_targets``); 0 keeps none.

  Returns:
    TokenRows with hidden [R, H] (``dtype``), targets [R, n] int32 and, for
    ``teacher_topk`` > 0, teacher_ids [R, n, K] int32 / teacher_logp
    [R, n, K] float16.
  """
  graphdef, params = nnx.split(llama)
  fn = _hidden_fn(graphdef, int(teacher_topk), np.dtype(dtype).name)
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
  hs, ts, t_ids, t_logp = [], [], [], []
  for start in range(0, len(order), batch_size):
    batch = [examples[i] for i in order[start:start + batch_size]]
    s = _bucket(max(len(e.ids) for e in batch), length_bucket)
    ids, loss_mask, _ = pad_examples(batch + [batch[0]] * (batch_size - len(batch)), s, pad_id)
    hidden, top_ids, top_logp = jax.device_get(fn(params, ids))
    targets = medusa_targets(ids[: len(batch)], loss_mask[: len(batch)], num_heads)
    keep = (targets != IGNORE).any(axis=-1)
    hs.append(np.asarray(hidden)[: len(batch)][keep].astype(dtype))
    ts.append(targets[keep])
    if teacher_topk:
      b_ids, b_logp = teacher_targets(np.asarray(top_ids)[: len(batch)],
                                      np.asarray(top_logp)[: len(batch)], num_heads)
      t_ids.append(b_ids[keep])
      t_logp.append(b_logp[keep])
    if progress is not None:
      progress(len(batch))
  h = llama.cfg.hidden_size
  teacher = {}
  if teacher_topk:
    k = int(teacher_topk)
    teacher = {"teacher_ids": (np.concatenate(t_ids) if t_ids
                               else np.zeros((0, num_heads, k), np.int32)),
               "teacher_logp": (np.concatenate(t_logp) if t_logp
                                else np.zeros((0, num_heads, k), np.float16))}
  return TokenRows(hidden=np.concatenate(hs) if hs else np.zeros((0, h), dtype),
                   targets=np.concatenate(ts) if ts else np.zeros((0, num_heads), np.int32),
                   **teacher)
