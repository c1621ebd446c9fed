"""The Medusa head loss and its targets.

Indexing: the base ``lm_head`` at position t predicts token t+1, so head k
(0-based) at position t predicts token ``t + k + 2``. A target counts only
when that token is an answer (assistant) token; prompt and padding positions
get ``IGNORE``.

Loss: ``sum_k decay**k * mean_t CE(head k at t, token t+k+2)`` over the
valid targets of each head (Medusa-2's decayed weighting, gamma = 0.8).
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
