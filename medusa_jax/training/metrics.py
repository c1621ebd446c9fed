"""Per-head accuracy of Medusa heads: rank-exact and top-k.

``rank_hits[k, r]`` counts targets that are exactly head k's r-th most
likely token; its running sum over r gives top-k hits. The rank-exact rates
are what the tree construction multiplies along a path (Medusa's
``heads_accuracy``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.training.losses import IGNORE


def rank_hits(logits_RxnxV: jax.Array, targets_Rxn: jax.Array, max_rank: int
              ) -> tuple[jax.Array, jax.Array]:
  """Counts, per head, how often the target sits at each top-k rank.

  Args:
    logits_RxnxV: [R, n, V].
    targets_Rxn: [R, n] int32, ``IGNORE`` = no target.
    max_rank: ranks counted (top-``max_rank``).

  Returns:
    hits [n, max_rank] int32, count [n] int32 (valid targets per head).
  """
  _, top_RxnxK = jax.lax.top_k(logits_RxnxV.astype(jnp.float32), max_rank)
  valid_Rxn = targets_Rxn != IGNORE
  eq_RxnxK = (top_RxnxK == targets_Rxn[..., None]) & valid_Rxn[..., None]
  return eq_RxnxK.astype(jnp.int32).sum(axis=0), valid_Rxn.astype(jnp.int32).sum(axis=0)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HeadAccuracy:
  """Accumulated per-head accuracy.

  Attributes:
    hits: [n, K] int64, targets found at exactly rank r.
    count: [n] int64, valid targets per head.
  """
  hits: np.ndarray
  count: np.ndarray

  @classmethod
  def empty(cls, num_heads: int, max_rank: int) -> "HeadAccuracy":
    return cls(hits=np.zeros((num_heads, max_rank), np.int64),
               count=np.zeros((num_heads,), np.int64))

  def add(self, hits: Any, count: Any) -> "HeadAccuracy":
    return HeadAccuracy(hits=self.hits + np.asarray(hits, np.int64),
                        count=self.count + np.asarray(count, np.int64))

  @property
  def rank_acc(self) -> np.ndarray:
    """[n, K] float64: P(target is exactly the head's rank-r token)."""
    return self.hits / np.maximum(self.count, 1)[:, None]

  @property
  def topk_acc(self) -> np.ndarray:
    """[n, K] float64: P(target is among the head's top r+1 tokens)."""
    return np.cumsum(self.rank_acc, axis=1)

  def summary(self) -> dict[str, Any]:
    """JSON-ready: top-1 and top-5 per head, rank-exact table, counts."""
    top = self.topk_acc
    k5 = min(5, top.shape[1]) - 1
    return {
        "top1": [round(float(x), 5) for x in top[:, 0]],
        "top5": [round(float(x), 5) for x in top[:, k5]],
        "rank_acc": [[round(float(x), 5) for x in row] for row in self.rank_acc],
        "count": [int(c) for c in self.count],
    }
