"""The Medusa head loss and its targets.

Indexing: the base ``lm_head`` at position t predicts token t+1, so head k
(0-based) at position t predicts token ``t + k + 2``. A target counts only
when that token is an answer (assistant) token; prompt and padding positions
get ``IGNORE``.

Losses (``TrainConfig.loss``), both ``sum_k decay**k * mean_t L_k(t)`` over
the valid targets of each head (Medusa-2's decayed weighting, gamma = 0.8):

* ``ce``: L = CE(head k at t, token t+k+2), the greedy token only.
* ``kl``: Medusa-2's self-distillation, L = KL(p || q) from the base model's
  next-token distribution p at position t+k+1 (the one that chose token
  t+k+2) to head k's distribution q at t. p is stored as its top-K (ids and
  log-probabilities, ``teacher_targets``) and renormalised over those K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -1


def medusa_targets(ids: np.ndarray, loss_mask: np.ndarray, num_heads: int) -> np.ndarray:
  """Per-position targets of every head.

  Args:
    ids: [..., S] int token ids.
    loss_mask: [..., S] bool, True where a token may be a target (answer
      tokens; False on prompt and padding).
    num_heads: n.

  Returns:
    [..., S, n] int32: ``ids[..., t + k + 2]`` where that position exists and
    is in the loss mask, else ``IGNORE``.
  """
  ids = np.asarray(ids)
  loss_mask = np.asarray(loss_mask, bool)
  s = ids.shape[-1]
  out = np.full(ids.shape + (num_heads,), IGNORE, np.int32)
  for k in range(num_heads):
    shift = k + 2
    if shift >= s:
      continue
    out[..., : s - shift, k] = np.where(loss_mask[..., shift:], ids[..., shift:], IGNORE)
  return out


def teacher_targets(topk_ids: np.ndarray, topk_logp: np.ndarray, num_heads: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Per-position teacher distributions of every head, from per-position top-K.

  Args:
    topk_ids: [..., S, K] int, the base model's top-K next-token ids at each
      position (position t predicts token t+1).
    topk_logp: [..., S, K] float, their log-probabilities.
    num_heads: n.

  Returns:
    ids [..., S, n, K] int32 and logp [..., S, n, K] float16: head k at
    position t gets position t+k+1's top-K (the distribution of token
    t+k+2); where that position does not exist, ids 0 and logp 0 (masked by
    the ``IGNORE`` targets of :func:`medusa_targets`).
  """
  topk_ids = np.asarray(topk_ids)
  topk_logp = np.asarray(topk_logp)
  *lead, s, k = topk_ids.shape
  ids = np.zeros((*lead, s, num_heads, k), np.int32)
  logp = np.zeros((*lead, s, num_heads, k), np.float16)
  for h in range(num_heads):
    shift = h + 1
    if shift >= s:
      continue
    ids[..., : s - shift, h, :] = topk_ids[..., shift:, :]
    logp[..., : s - shift, h, :] = topk_logp[..., shift:, :]
  return ids, logp


def per_head_kl(logits_RxnxV: jax.Array, teacher_ids_RxnxK: jax.Array,
                teacher_logp_RxnxK: jax.Array, targets_Rxn: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Summed KL(teacher || head) and valid-target count per head.

  Args:
    logits_RxnxV: [R, n, V] head logits (log-softmax in f32).
    teacher_ids_RxnxK: [R, n, K] int32 teacher top-K token ids.
    teacher_logp_RxnxK: [R, n, K] teacher log-probabilities (any float
      dtype); renormalised over the K ids.
    targets_Rxn: [R, n] int32; rows with ``IGNORE`` count nothing.

  Returns:
    kl_sum [n] float32, count [n] float32.
  """
  logq_RxnxV = jax.nn.log_softmax(logits_RxnxV.astype(jnp.float32), axis=-1)
  logq_RxnxK = jnp.take_along_axis(logq_RxnxV, teacher_ids_RxnxK, axis=-1)
  logp_RxnxK = jax.nn.log_softmax(teacher_logp_RxnxK.astype(jnp.float32), axis=-1)
  kl_Rxn = jnp.sum(jnp.exp(logp_RxnxK) * (logp_RxnxK - logq_RxnxK), axis=-1)
  valid_Rxn = targets_Rxn != IGNORE
  kl_Rxn = jnp.where(valid_Rxn, kl_Rxn, 0.0)
  return kl_Rxn.sum(axis=0), valid_Rxn.astype(jnp.float32).sum(axis=0)


def medusa_kl_loss(logits_RxnxV: jax.Array, teacher_ids_RxnxK: jax.Array,
                   teacher_logp_RxnxK: jax.Array, targets_Rxn: jax.Array, decay: float
                   ) -> tuple[jax.Array, jax.Array]:
  """Weighted self-distillation loss over token rows.

  Args:
    logits_RxnxV: [R, n, V].
    teacher_ids_RxnxK, teacher_logp_RxnxK: [R, n, K] teacher top-K.
    targets_Rxn: [R, n] int32; ``IGNORE`` marks rows without a target.
    decay: head k weighs ``decay**k``.

  Returns:
    loss [] float32; per-head mean KL [n] float32 (0 for a head with no target).
  """
  kl_sum, count = per_head_kl(logits_RxnxV, teacher_ids_RxnxK, teacher_logp_RxnxK,
                              targets_Rxn)
  head_kl = kl_sum / jnp.maximum(count, 1.0)
  w = jnp.asarray(head_weights(targets_Rxn.shape[-1], decay))
  return jnp.sum(w * head_kl), head_kl


def per_head_ce(logits_RxnxV: jax.Array, targets_Rxn: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy and valid-target count per head.

  Args:
    logits_RxnxV: [R, n, V] head logits (any float dtype; softmax in f32).
    targets_Rxn: [R, n] int32, ``IGNORE`` where there is no target.

  Returns:
    ce_sum [n] float32, count [n] float32.
  """
  logp_RxnxV = jax.nn.log_softmax(logits_RxnxV.astype(jnp.float32), axis=-1)
  valid_Rxn = targets_Rxn != IGNORE
  safe_Rxn = jnp.where(valid_Rxn, targets_Rxn, 0)
  nll_Rxn = -jnp.take_along_axis(logp_RxnxV, safe_Rxn[..., None], axis=-1)[..., 0]
  nll_Rxn = jnp.where(valid_Rxn, nll_Rxn, 0.0)
  return nll_Rxn.sum(axis=0), valid_Rxn.astype(jnp.float32).sum(axis=0)


def head_weights(num_heads: int, decay: float) -> np.ndarray:
  """[n] float32 loss weights ``decay**k``."""
  return (decay ** np.arange(num_heads)).astype(np.float32)


def medusa_loss(logits_RxnxV: jax.Array, targets_Rxn: jax.Array, decay: float
                ) -> tuple[jax.Array, jax.Array]:
  """Weighted Medusa loss over token rows.

  Args:
    logits_RxnxV: [R, n, V].
    targets_Rxn: [R, n] int32 (``IGNORE`` = no target).
    decay: per-head weight factor; head k weighs ``decay**k``.

  Returns:
    loss [] float32; per-head mean CE [n] float32 (0 for a head with no target).
  """
  ce_sum, count = per_head_ce(logits_RxnxV, targets_Rxn)
  head_ce = ce_sum / jnp.maximum(count, 1.0)
  w = jnp.asarray(head_weights(targets_Rxn.shape[-1], decay))
  return jnp.sum(w * head_ce), head_ce


def sequence_medusa_loss(logits_BxSxnxV: jax.Array, ids_BxS: jax.Array,
                         loss_mask_BxS: jax.Array, decay: float
                         ) -> tuple[jax.Array, jax.Array]:
  """The same loss over whole sequences (head logits at every position).

  Args:
    logits_BxSxnxV: [B, S, n, V]; ``[:, t, k]`` is head k at position t.
    ids_BxS: [B, S] int token ids.
    loss_mask_BxS: [B, S] bool, True on answer tokens.
    decay: head k weighs ``decay**k``.

  Returns:
    loss [] float32; per-head mean CE [n] float32.
  """
  b, s, n, v = logits_BxSxnxV.shape
  ce = []
  for k in range(n):  # static, small: each head has its own shift
    shift = k + 2
    logits_BxTxV = logits_BxSxnxV[:, : s - shift, k]
    tgt_BxT = jnp.where(loss_mask_BxS[:, shift:], ids_BxS[:, shift:], IGNORE)
    ce_sum, count = per_head_ce(logits_BxTxV.reshape(-1, 1, v), tgt_BxT.reshape(-1, 1))
    ce.append(ce_sum[0] / jnp.maximum(count[0], 1.0))
  head_ce = jnp.stack(ce)
  return jnp.sum(jnp.asarray(head_weights(n, decay)) * head_ce), head_ce
