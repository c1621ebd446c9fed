"""KV-cache bookkeeping for speculative steps: masks over the cache and compaction.

A row ``b`` of the cache holds ``lengths[b]`` committed tokens in slots
``0 .. lengths[b]-1``. A verification forward writes the T tree nodes' K/V at
slots ``lengths[b] + t``; afterwards the accepted path (root, then one node per
depth) must sit contiguously at ``lengths[b] + j``. Slots at or beyond the new
length hold stale values that no query ever reads (the masks below stop at the
committed length) and that the next forward overwrites.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medusa_jax.pallas import compact_cache as compact_kernel

Array = jax.Array


def tree_attention_mask(lengths: Array, tree_mask: Array, cache_len: int) -> Array:
  """Mask of a tree-verification forward over the whole cache.

  Query node t of row b sees every committed slot ``s < lengths[b]`` and the
  tree slots ``lengths[b] + u`` of its ancestors-or-self ``u``
  (``tree_mask[t, u]``).

  Args:
    lengths: [B] int32 committed tokens per row.
    tree_mask: [T, T] bool, ancestor-or-self.
    cache_len: L, the cache's static length.

  Returns:
    [B, T, L] bool.
  """
  num_nodes = tree_mask.shape[0]
  slot_L = jnp.arange(cache_len, dtype=jnp.int32)
  rel_BxL = slot_L[None, :] - lengths[:, None]
  committed_BxL = rel_BxL < 0
  in_tree_BxL = (rel_BxL >= 0) & (rel_BxL < num_nodes)
  # Gather column u = rel of the tree mask for every slot; out-of-tree slots are
  # clipped and then masked off.
  cols_BxL = jnp.clip(rel_BxL, 0, num_nodes - 1)
  tree_BxTxL = jnp.take(tree_mask.astype(bool), cols_BxL, axis=1)  # [T, B, L]
  tree_BxTxL = jnp.transpose(tree_BxTxL, (1, 0, 2))
  return committed_BxL[:, None, :] | (tree_BxTxL & in_tree_BxL[:, None, :])


def prefill_attention_mask(prompt_lens: Array, num_tokens: int, cache_len: int) -> Array:
  """Causal mask of a prefill forward written at slot 0, padded rows included.

  Query t of row b sees slots ``s <= t``; the padding after ``prompt_lens[b]``
  attends too (its outputs are never read) so that no row of the softmax is
  empty.

  Args:
    prompt_lens: [B] int32 (only its shape is used; kept for symmetry).
    num_tokens: T, the padded prompt length.
    cache_len: L.

  Returns:
    [B, T, L] bool.
  """
  q_T = jnp.arange(num_tokens, dtype=jnp.int32)
  slot_L = jnp.arange(cache_len, dtype=jnp.int32)
  causal_TxL = slot_L[None, :] <= q_T[:, None]
  return jnp.broadcast_to(causal_TxL[None], (prompt_lens.shape[0], num_tokens, cache_len))


def compact_layer(kv: Array, lengths: Array, path_nodes: Array) -> Array:
  """Moves the accepted path's entries to contiguous slots in one layer's K or V.

  ``kv[b, lengths[b] + j] <- kv[b, lengths[b] + path_nodes[b, j]]`` for
  ``j = 0 .. D``. The reads happen before the writes (a gather, then a
  scatter), so overlapping source and destination slots are safe. Entries of
  ``path_nodes`` past the accepted length repeat the best node; they write
  stale slots beyond the new length, which is harmless.

  Args:
    kv: [B, L, G, D] one layer's keys or values.
    lengths: [B] int32 committed length before the step.
    path_nodes: [B, D+1] int32 tree node per path position (node 0 = root).

  Returns:
    [B, L, G, D], same dtype.
  """
  batch, cache_len = kv.shape[0], kv.shape[1]
  width = path_nodes.shape[1]
  rows_Bx1 = jnp.arange(batch, dtype=jnp.int32)[:, None]
  src_BxP = jnp.clip(lengths[:, None] + path_nodes, 0, cache_len - 1)
  dst_BxP = lengths[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
  moved = kv[rows_Bx1, src_BxP]  # [B, P, G, D]
  return kv.at[rows_Bx1, dst_BxP].set(moved, mode="drop")


def compact_cache(cache, lengths: Array, path_nodes: Array, *, kernel: bool = False):
  """:func:`compact_layer` for every layer's K and V.

  Args:
    cache: a ``KVCache`` (fields ``k``, ``v``: tuples of [B, L, G, D]).
    lengths: [B] int32 committed length before the step.
    path_nodes: [B, D+1] int32.
    kernel: move every array's entries with the two Pallas kernels of
      :func:`medusa_jax.pallas.compact_cache.compact_cache` (Triton: one GPU)
      instead of a gather and a scatter per array.

  Returns:
    The compacted ``KVCache``.
  """
  if kernel:
    moved = compact_kernel.compact_cache(cache.k + cache.v, lengths, path_nodes)
    n = len(cache.k)
    return cache.replace(k=tuple(moved[:n]), v=tuple(moved[n:]))
  k = tuple(compact_layer(x, lengths, path_nodes) for x in cache.k)
  v = tuple(compact_layer(x, lengths, path_nodes) for x in cache.v)
  return cache.replace(k=k, v=v)
