"""A measured speculation policy: for each batch size, the tree that decodes fastest (or none).

Speculation pays when a step's extra tokens outweigh its extra time. Both sides
are measured or estimated, never assumed per platform:

* **time**: :func:`measure_step_times` times the jitted step
  (``Decoder.step``) of every candidate tree, and of plain decoding, at each
  batch size on the device at hand;
* **tokens**: :func:`expected_tokens` gives the expected tokens per step of a
  tree from the heads' acceptance table ``acc[d, r]``, the probability that
  head d's rank-r token is the target's next-but-d token (greedy). A node is
  accepted iff every node on its path is, so with the heads taken as
  independent ``P(node) = prod_j acc[j, path_j]`` and

      E[tokens / step] = 1 + sum over nodes != root of P(node)

  (the 1 is the bonus token; under greedy at most one node per depth is
  accepted, so the sum is the expected accepted length). This is the product
  rule of ``tree.tree_from_accuracies``.

:class:`SpeculationPolicy` holds the time table and the acceptance table and
picks, per batch size, the candidate with the most expected tokens per second,
``E / t``, if it beats plain decoding (E = 1) by a margin (10 %: the
acceptance table is measured teacher-forced and runs a little high), else plain
decoding; so the choice is never slower than plain by the policy's own numbers. Candidates
(:func:`candidate_trees`): plain, the chain of the n heads, and the best-first
closed prefixes of the adapter's choices of 3, 7, 15, 31 and 63 nodes.

A static batch (``Engine.generate``) decodes until its slowest row is done, so
there the expected extra tokens ``E - 1`` are scaled by :meth:`SpeculationPolicy.
static_batch_factor`: the expected minimum over B rows of a row's relative extra
tokens per step, over a pool of observed rows (:attr:`SpeculationPolicy.row_spread`,
:func:`observe_rows`). The serving core, where a finished row takes the next
request at once, uses the mean (factor 1).

The acceptance table comes from the adapter (the bundled heads' recipe.json,
``val_accuracy.rank_acc``: :func:`acceptance_from_recipe`); without one,
:data:`DEFAULT_ACCEPTANCE` is a conservative stand-in. :func:`refine` updates
it from the accept-length histograms the engine observes, and re-picks.

Usage::

  policy = load_or_measure(decoder, choices=choices, num_heads=5,
                           acceptance=acceptance_from_recipe(adapter_dir),
                           batch_sizes=(1, 2, 4, 8), cache_len=512,
                           model_key="smollm2-135m-instruct")
  tree = policy.tree_for(batch)          # TreeBuffers, or None = plain decoding
  policy = refine(policy, accept_hist, tree=tree)

The measured table is cached as JSON under ``$MEDUSA_JAX_HOME/policy/``, keyed
by device kind, model, heads (count and choices), cache length, batch sizes
and JAX version; a file that does not parse or does not match its key is
measured again and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medusa_jax import __version__ as MEDUSA_JAX_VERSION
from medusa_jax import _atomic
from medusa_jax.decoding import tree as tree_lib
from medusa_jax.decoding.tree import Choices, TreeBuffers
from medusa_jax.errors import ConfigError

__all__ = ["DEFAULT_ACCEPTANCE", "DEFAULT_MARGIN", "DEFAULT_ROW_SPREAD", "PolicyError",
           "SpeculationPolicy", "acceptance_from_recipe", "cache_needed", "candidate_trees",
           "expected_tokens", "load_or_measure", "measure_step_times", "observe_rows", "refine",
           "row_spread", "tree_key"]

PREFIX_SIZES = (3, 7, 15, 31, 63)
"""Sizes (nodes below the root) of the best-first prefixes tried as candidates."""

_FORMAT = 1


def _default_acceptance(num_heads: int = 5, ranks: int = 10) -> tuple[tuple[float, ...], ...]:
  """acc[d, r] = 0.3 * 0.7^d * 0.5^r: below every trained head measured here."""
  return tuple(tuple(round(0.3 * 0.7 ** d * 0.5 ** r, 6) for r in range(ranks))
               for d in range(num_heads))


DEFAULT_ACCEPTANCE = _default_acceptance()
"""[5, 10] conservative acceptance for heads without a measured table.

``acc[d, r] = 0.3 * 0.7^d * 0.5^r``: head 0's top token right 30% of the time
(the bundled SmolLM2 heads: 38%; Medusa's Vicuna-7B heads: about 60%), each
deeper head 0.7x the one above, each rank half the one before. Rather too low
than too high: an overestimate picks trees that lose to plain decoding."""


DEFAULT_MARGIN = 0.1
"""Default :attr:`SpeculationPolicy.margin`."""

DEFAULT_ROW_SPREAD = (
    0.491, 0.497, 0.538, 0.545, 0.571, 0.587, 0.6, 0.628, 0.666, 0.731, 0.763, 0.77, 0.786,
    0.801, 0.801, 0.816, 0.824, 0.824, 0.838, 0.864, 0.874, 0.88, 0.88, 0.897, 0.934, 0.934,
    0.945, 0.946, 0.956, 0.967, 0.977, 1.001, 1.019, 1.019, 1.036, 1.053, 1.078, 1.095, 1.109,
    1.12, 1.126, 1.168, 1.171, 1.171, 1.205, 1.211, 1.214, 1.214, 1.224, 1.245, 1.304, 1.355,
    1.359, 1.372, 1.372, 1.38, 1.536, 1.831, 1.882)
"""Relative extra tokens per step of single rows (each row's ``tokens/step - 1`` over its
batch's mean), the prior of :attr:`SpeculationPolicy.row_spread`: SmolLM2-135M-Instruct with
the bundled heads, 32 MT-bench first turns in batches of 16, 256 new tokens, greedy, 4- and
8-node trees (2-core CPU, f32, 2026-12-02): 59 rows of at least 16 steps. Rows of one batch
accepted from 0.5x to 1.9x its mean; the batch's own tokens per step (plain steps over its
slowest row's) were 1.28 / 1.28 / 1.43 / 1.40 where the rows' mean was 1.54 / 1.47 / 1.72 /
1.64, and ``1 + (mean - 1) * static_batch_factor(16)`` gives 1.30 / 1.26 / 1.40 / 1.35."""

ROW_SPREAD_KEEP = 256
"""Most observed rows :func:`observe_rows` keeps (the latest)."""

ROW_SPREAD_MIN_STEPS = 16
"""Rows of fewer steps are not observed: their rate is mostly noise."""


class PolicyError(ConfigError):
  """A bad acceptance table, time table or policy file."""


# ----------------------------------------------------------------------------- tokens


def _acceptance_array(acceptance) -> np.ndarray:
  acc = np.asarray(acceptance, np.float64)
  if acc.ndim != 2 or acc.shape[0] < 1 or acc.shape[1] < 1:
    raise PolicyError(f"acceptance: expected a non-empty [n, k] table, got shape {acc.shape}")
  if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
    raise PolicyError("acceptance: expected finite probabilities in [0, 1]")
  return acc


def _path_probs(tree: TreeBuffers, acc: np.ndarray) -> np.ndarray:
  """[T] P(node accepted) = prod_j acc[j, path_j] (1 for the root; 0 past the table)."""
  n, k = acc.shape
  probs = np.ones(tree.num_nodes, np.float64)
  for i, path in enumerate(tree.choices, start=1):
    p = 1.0
    for d, r in enumerate(path):
      p *= acc[d, r] if d < n and r < k else 0.0
    probs[i] = p
  return probs


def expected_tokens(tree: TreeBuffers | None, node_acceptance) -> float:
  """Expected tokens per step of ``tree``: 1 + sum over nodes of P(node accepted).

  Args:
    tree: the candidate tree, or None (plain decoding: 1 token per step).
    node_acceptance: [n, k] ``acc[d, r]`` = P(head d's rank-r token is right),
      greedy; ranks or depths past the table count as never accepted.

  Returns:
    E >= 1, in float64 arithmetic.

  Raises:
    PolicyError: the table is not a finite [n, k] array in [0, 1].
  """
  acc = _acceptance_array(node_acceptance)
  if tree is None:
    return 1.0
  return float(_path_probs(tree, acc).sum())


def depth_probs(tree: TreeBuffers, node_acceptance) -> np.ndarray:
  """[D + 1] P(accept length >= d) under the table: the sum of P(node) over depth d."""
  probs = _path_probs(tree, _acceptance_array(node_acceptance))
  return np.bincount(tree.node_depth, weights=probs, minlength=tree.depth + 1)


def acceptance_from_recipe(path: str | os.PathLike) -> tuple[tuple[float, ...], ...] | None:
  """``val_accuracy.rank_acc`` of a training recipe.json (a file or its adapter directory).

  Returns None when the file or the table is missing (then use
  :data:`DEFAULT_ACCEPTANCE`).

  Raises:
    PolicyError: the file is not JSON, or the table is not a valid [n, k] table.
  """
  path = Path(path)
  if path.is_dir():
    path = path / "recipe.json"
  if not path.is_file():
    return None
  try:
    recipe = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise PolicyError(f"{path}: not a readable JSON file ({e})") from None
  table = (recipe.get("val_accuracy") or {}).get("rank_acc") if isinstance(recipe, dict) else None
  if table is None:
    return None
  acc = _acceptance_array(table)
  return tuple(tuple(float(x) for x in row) for row in acc)


# ----------------------------------------------------------------------------- candidates


def tree_key(tree: TreeBuffers | None) -> str:
  """A stable text key of a tree: "plain", or its paths ("0;1;0.0") and top-k."""
  if tree is None:
    return "plain"
  return ";".join(".".join(map(str, p)) for p in tree.choices) + f"@k{tree.topk}"


def candidate_trees(choices: Sequence[Sequence[int]] | str | None, num_heads: int, *,
                    topk: int = tree_lib.DEFAULT_TOPK,
                    sizes: Sequence[int] = PREFIX_SIZES) -> tuple[TreeBuffers | None, ...]:
  """Plain (None), the chain of ``num_heads`` drafts, and best-first prefixes of ``choices``.

  Args:
    choices: best-first paths (an adapter's ``medusa_choices``), a name of
      ``tree.NAMED_TREES``, or None for ``MC_SIM_7B_63``.
    num_heads: n; deeper paths are dropped.
    topk: k of the trees.
    sizes: prefix sizes (nodes below the root); each prefix is closed (paths
      whose ancestors are cut are dropped).

  Returns:
    Distinct candidates, plain first.

  Raises:
    TreeError: bad choices or num_heads < 1.
  """
  if choices is None:
    ordered = tree_lib.MC_SIM_7B_63
  elif isinstance(choices, str):
    if choices not in tree_lib.NAMED_TREES:
      raise tree_lib.TreeError(f"choices={choices!r}; expected one of"
                               f" {', '.join(tree_lib.NAMED_TREES)}")
    ordered = tree_lib.NAMED_TREES[choices]
  else:
    ordered = tuple(tuple(int(r) for r in p) for p in choices)
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
    raise tree_lib.TreeError(f"num_heads: expected a positive integer, got {num_heads!r}")
  tree_lib.build_tree(ordered, topk)  # validates the whole list once
  shallow = tuple(p for p in ordered if len(p) <= num_heads)
  out: list[TreeBuffers | None] = [None, tree_lib.build_tree(tree_lib.chain_choices(num_heads),
                                                             topk)]
  for size in sizes:
    prefix = tree_lib._closed_prefix(shallow, min(size, len(shallow)))
    if prefix:
      out.append(tree_lib.build_tree(prefix, topk))
  seen, unique = set(), []
  for t in out:
    if tree_key(t) not in seen:
      seen.add(tree_key(t))
      unique.append(t)
  return tuple(unique)


# ----------------------------------------------------------------------------- timing


def measure_step_times(decoder, trees: Sequence[TreeBuffers | None], batch_sizes: Sequence[int],
                       cache_len: int, *, repeats: int = 5, warmup: int = 2,
                       dtype=None, steps_per_call: int = 1,
                       acceptance=None) -> dict[tuple[str, int], float]:
  """Seconds per decode step, for each tree (None = plain) and batch size.

  Each call runs ``steps_per_call`` = K greedy steps (no EOS) in one device
  loop (``decoder.steps``, as the engine and the server do; K = 1 times the
  single jitted ``decoder.step``) on a state of ``batch`` rows with a quarter
  of the cache committed, and is ended by ``block_until_ready``, so the
  per-call dispatch is counted once per K steps as in the engine's loop. The
  first ``warmup`` calls (compilation included) are left out; the result is
  the median of ``repeats`` calls divided by K. The committed length is reset
  before each call, so every call sees the same cache state.

  With ``acceptance``, candidates are timed smallest first and one that
  cannot win is not timed (its entry is ``inf``): a tree of more nodes is
  taken to step no faster than the largest smaller one timed, so a candidate
  whose expected tokens over that time fall below the best rate so far
  cannot beat it. On a CPU, where every verified row costs compute, this
  leaves the big trees untimed (and uncompiled).

  Args:
    decoder: a ``Decoder`` with heads (for trees).
    trees: candidates; a tree deeper than the decoder's heads is refused.
    batch_sizes: B values (bucket sizes the engine uses).
    cache_len: L, cache slots per row (at least 4 * (T + 1) of the biggest tree).
    repeats: timed calls per entry.
    warmup: untimed calls per entry.
    dtype: cache dtype (default float32).
    steps_per_call: K, steps per timed call (the engine's ``steps_per_call``).
    acceptance: the [n, k] table (see :func:`expected_tokens`) that prunes
      candidates which cannot win; None: time every candidate.

  Returns:
    ``{(tree_key(tree), batch): seconds per step}``.

  Raises:
    PolicyError: bad batch sizes, cache length, repeats, or a tree deeper
      than the heads.
  """
  import jax
  import jax.numpy as jnp

  from medusa_jax.decoding.state import DecodeState, StepConfig
  from medusa_jax.decoding.strategies import Greedy

  batch_sizes = _positive_ints("batch_sizes", batch_sizes)
  for name, v in (("cache_len", cache_len), ("repeats", repeats),
                  ("steps_per_call", steps_per_call)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise PolicyError(f"{name}: expected a positive integer, got {v!r}")
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise PolicyError(f"warmup: expected a non-negative integer, got {warmup!r}")
  dtype = jnp.float32 if dtype is None else dtype
  vocab = decoder.cfg.vocab_size
  out: dict[tuple[str, int], float] = {}
  if acceptance is not None:
    acc = _acceptance_array(acceptance)
    trees = sorted(trees, key=lambda t: 1 if t is None else t.num_nodes)
  best_rate: dict[int, float] = {}   # batch -> best expected tokens/s so far
  slowest: dict[int, float] = {}     # batch -> longest step time timed so far
  for tree in trees:
    if tree is not None and (decoder.num_heads or 0) < tree.depth:
      raise PolicyError(f"tree {tree_key(tree)}: depth {tree.depth} needs {tree.depth} heads;"
                        f" the decoder has {decoder.num_heads}")
    config = StepConfig(tree=tree, strategy=Greedy(), eos_ids=())
    need = cache_needed(tree, steps_per_call)
    if need > cache_len:
      raise PolicyError(f"cache_len={cache_len}: too short for tree {tree_key(tree)}"
                        f" ({config.num_nodes} nodes, {steps_per_call} steps per call);"
                        f" expected >= {need}")
    for batch in batch_sizes:
      if acceptance is not None:
        tokens_e = expected_tokens(tree, acc)
        if batch in slowest and tokens_e / slowest[batch] < best_rate[batch]:
          out[(tree_key(tree), batch)] = math.inf  # cannot win: not timed
          continue
      committed = np.full((batch,), cache_len // 4, np.int32)  # host copy: state is donated
      rng = np.random.default_rng(batch)
      tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, config.num_nodes)), jnp.int32)
      state = DecodeState(cache=decoder.init_cache(batch, cache_len, dtype),
                          lengths=jnp.asarray(committed),
                          tokens=tokens, generated=jnp.zeros((batch,), jnp.int32),
                          max_new=jnp.full((batch,), 1 << 30, jnp.int32),
                          done=jnp.zeros((batch,), bool), rng=jax.random.PRNGKey(batch))
      times = []
      for i in range(warmup + repeats):
        state = state.replace(lengths=jnp.asarray(committed))
        t0 = time.perf_counter()
        if steps_per_call == 1:
          state, step_out = decoder.step(state, config=config)
        else:
          state, step_out = decoder.steps(state, configs=config, num_steps=steps_per_call)
        jax.block_until_ready((state, step_out))
        if i >= warmup:
          times.append((time.perf_counter() - t0) / steps_per_call)
      seconds = float(statistics.median(times))
      out[(tree_key(tree), batch)] = seconds
      if acceptance is not None:
        slowest[batch] = max(slowest.get(batch, 0.0), seconds)
        best_rate[batch] = max(best_rate.get(batch, 0.0), tokens_e / seconds)
  return out


def cache_needed(tree: TreeBuffers | None, steps_per_call: int = 1) -> int:
  """Cache slots :func:`measure_step_times` needs to time ``tree``.

  A quarter of the cache is committed; then K steps of at most depth + 1
  tokens each and one more tree must fit.
  """
  nodes, width = (1, 1) if tree is None else (int(tree.num_nodes), int(tree.depth) + 1)
  return max(4 * (nodes + width), -(-4 * (steps_per_call * width + nodes + width) // 3))


def _positive_ints(name: str, values) -> tuple[int, ...]:
  values = tuple(values)
  if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                       for v in values):
    raise PolicyError(f"{name}: expected positive integers, got {values!r}")
  return tuple(int(v) for v in values)


# ----------------------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SpeculationPolicy:
  """Per batch size, the candidate with the most expected tokens per second.

  Attributes:
    candidates: the candidate trees' choices; None = plain decoding (always
      among them).
    batch_sizes: measured B values, increasing.
    step_times: ``step_times[i][c]`` seconds per step of candidate c at
      ``batch_sizes[i]`` (> 0; ``inf``: not timed, as it could not win;
      plain is always timed).
    acceptance: [n, k] acceptance table (see :func:`expected_tokens`).
    topk: k of the candidate trees.
    margin: how much more a tree must promise than plain decoding to be
      chosen (0.1: 10 % more expected tokens per second). The acceptance
      table is measured teacher-forced and overstated what decoding saw by
      2-11 % (bundled heads, MT-bench, H200 and CPU, 2026-12-02), and step
      times are noisy; a tree within the margin of plain is not worth it.
    row_spread: a pool of rows' relative extra tokens per step (mean about 1;
      :func:`row_spread`), for :meth:`static_batch_factor`; empty: factor 1.

  A batch size between two measured ones uses the next larger one (the
  engine's batch buckets are the measured sizes); past the largest, the
  largest.
  """
  candidates: tuple[Choices | None, ...]
  batch_sizes: tuple[int, ...]
  step_times: tuple[tuple[float, ...], ...]
  acceptance: tuple[tuple[float, ...], ...] = DEFAULT_ACCEPTANCE
  topk: int = tree_lib.DEFAULT_TOPK
  margin: float = DEFAULT_MARGIN
  row_spread: tuple[float, ...] = DEFAULT_ROW_SPREAD

  def __post_init__(self):
    if (isinstance(self.margin, bool) or not isinstance(self.margin, (int, float))
        or not math.isfinite(self.margin) or self.margin < 0):
      raise PolicyError(f"margin: expected a finite number >= 0, got {self.margin!r}")
    object.__setattr__(self, "margin", float(self.margin))
    cands = tuple(None if c is None else tuple(tuple(int(r) for r in p) for p in c)
                  for c in self.candidates)
    if None not in cands:
      raise PolicyError("candidates: plain decoding (None) must be among the candidates")
    for c in cands:
      if c is not None:
        tree_lib.build_tree(c, self.topk)  # validates
    sizes = _positive_ints("batch_sizes", self.batch_sizes)
    if list(sizes) != sorted(set(sizes)):
      raise PolicyError(f"batch_sizes: expected strictly increasing sizes, got {sizes}")
    times = tuple(tuple(float(t) for t in row) for row in self.step_times)
    if len(times) != len(sizes) or any(len(row) != len(cands) for row in times):
      raise PolicyError(f"step_times: expected [{len(sizes)}][{len(cands)}] seconds"
                        f" (batch sizes x candidates), got {[len(r) for r in times]}")
    if any(math.isnan(t) or t <= 0 for row in times for t in row):
      raise PolicyError("step_times: expected positive seconds (inf: not timed)")
    plain = cands.index(None)
    if any(not math.isfinite(row[plain]) for row in times):
      raise PolicyError("step_times: plain decoding must be timed at every batch size")
    acc = _acceptance_array(self.acceptance)
    spread = tuple(float(r) for r in self.row_spread)
    if any(not math.isfinite(r) or r < 0 for r in spread):
      raise PolicyError(f"row_spread: expected finite values >= 0, got {self.row_spread!r}")
    object.__setattr__(self, "row_spread", spread)
    object.__setattr__(self, "candidates", cands)
    object.__setattr__(self, "batch_sizes", sizes)
    object.__setattr__(self, "step_times", times)
    object.__setattr__(self, "acceptance", tuple(tuple(float(x) for x in row) for row in acc))

  @classmethod
  def from_times(cls, times: Mapping[tuple[str, int], float],
                 trees: Sequence[TreeBuffers | None], *, acceptance=DEFAULT_ACCEPTANCE,
                 topk: int | None = None) -> SpeculationPolicy:
    """A policy from :func:`measure_step_times`'s table over ``trees``.

    Raises:
      PolicyError: an entry of the table is missing.
    """
    sizes = sorted({b for _, b in times})
    rows = []
    for b in sizes:
      row = []
      for t in trees:
        if (tree_key(t), b) not in times:
          raise PolicyError(f"times: no entry for tree {tree_key(t)} at batch {b}")
        row.append(times[(tree_key(t), b)])
      rows.append(tuple(row))
    if topk is None:
      topk = next((t.topk for t in trees if t is not None), tree_lib.DEFAULT_TOPK)
    return cls(candidates=tuple(None if t is None else t.choices for t in trees),
               batch_sizes=tuple(sizes), step_times=tuple(rows), acceptance=acceptance,
               topk=topk)

  def trees(self) -> tuple[TreeBuffers | None, ...]:
    """The candidates as trees (None = plain)."""
    return tuple(None if c is None else tree_lib.build_tree(c, self.topk)
                 for c in self.candidates)

  def _bucket(self, batch: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
      raise PolicyError(f"batch: expected a positive integer, got {batch!r}")
    i = int(np.searchsorted(np.asarray(self.batch_sizes), batch))
    return min(i, len(self.batch_sizes) - 1)

  def static_batch_factor(self, batch: int) -> float:
    """E[min of ``batch`` rows' relative extra tokens] / E[one row's], rows drawn from
    :attr:`row_spread` (1.0 for one row or an empty pool).

    A static batch of B rows, each making N tokens, steps until its slowest
    row is done: ``N / min_i(1 + (E - 1) r_i)`` steps, where plain decoding
    takes N. So its expected tokens per step are ``1 + (E - 1) * factor``.
    With the pool sorted, ``r_(1) <= ... <= r_(n)``, drawing B with
    replacement, ``E[min] = sum_k r_(k) * (((n-k+1)/n)^B - ((n-k)/n)^B)``.
    """
    _positive_ints("batch", (batch,))
    r = np.sort(np.asarray(self.row_spread, np.float64))
    if batch == 1 or r.size == 0 or r.mean() <= 0:
      return 1.0
    n = r.size
    k = np.arange(1, n + 1)
    weight = ((n - k + 1) / n) ** batch - ((n - k) / n) ** batch
    return float(np.dot(r, weight) / r.mean())

  def rates(self, batch: int, *, static: bool = False) -> tuple[float, ...]:
    """Expected tokens per second of each candidate at ``batch``'s bucket, per row.

    ``static``: for a static batch of ``batch`` rows (its extra tokens scaled
    by :meth:`static_batch_factor`); else each row's own mean (serving).
    """
    row = self.step_times[self._bucket(batch)]
    return tuple(e / s for e, s in zip(self._batch_tokens(batch, static), row))

  def _batch_tokens(self, batch: int, static: bool) -> list[float]:
    """Expected tokens per step of each candidate (``static``: ``1 + factor * (E - 1)``)."""
    factor = self.static_batch_factor(batch) if static else 1.0
    return [1.0 + factor * (expected_tokens(t, self.acceptance) - 1.0) for t in self.trees()]

  def choice(self, batch: int, *, static: bool = False) -> int:
    """Index of the chosen candidate at ``batch``: the best rate if it beats plain's by the margin."""
    rates = self.rates(batch, static=static)
    plain = self.candidates.index(None)
    best = max(range(len(rates)), key=lambda c: (rates[c], c == plain))
    return best if rates[best] > (1.0 + self.margin) * rates[plain] else plain

  def tree_for(self, batch: int, *, static: bool = False) -> TreeBuffers | None:
    """The tree to verify at ``batch`` rows, or None for plain decoding (``static``: a
    static batch of that many rows, see :meth:`rates`)."""
    c = self.candidates[self.choice(batch, static=static)]
    return None if c is None else tree_lib.build_tree(c, self.topk)

  def table(self, *, static: bool = False) -> list[dict[str, Any]]:
    """Rows (batch, candidate, nodes, ms, expected tokens, tokens/s, chosen) for printing
    (``static``: expected tokens and tokens/s of a static batch, see :meth:`rates`)."""
    out = []
    for b in self.batch_sizes:
      chosen, row = self.choice(b, static=static), self.step_times[self._bucket(b)]
      factor = self.static_batch_factor(b) if static else 1.0
      tokens = self._batch_tokens(b, static)
      for c, (t, s, e) in enumerate(zip(self.trees(), row, tokens)):
        out.append({"batch": b, "tree": tree_key(t), "nodes": 1 if t is None else t.num_nodes,
                    "ms": s * 1e3, "expected_tokens": e, "tokens_per_s": b * e / s,
                    "batch_factor": factor, "chosen": c == chosen})
    return out

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict (:meth:`from_json` reads it back)."""
    return {"format": _FORMAT, "topk": self.topk, "margin": self.margin,
            "batch_sizes": list(self.batch_sizes),
            "candidates": [None if c is None else [list(p) for p in c] for c in self.candidates],
            "step_times_s": [[t if math.isfinite(t) else None for t in r]
                             for r in self.step_times],
            "acceptance": [list(r) for r in self.acceptance],
            "row_spread": list(self.row_spread)}

  @classmethod
  def from_json(cls, obj: Any) -> SpeculationPolicy:
    """The policy of a :meth:`to_json` dict.

    Raises:
      PolicyError: not a policy of this format, or invalid values.
    """
    if not isinstance(obj, dict):
      raise PolicyError(f"policy: expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != _FORMAT:
      raise PolicyError(f"policy: expected format {_FORMAT}, got {obj.get('format')!r}")
    try:
      return cls(candidates=tuple(obj["candidates"]), batch_sizes=tuple(obj["batch_sizes"]),
                 step_times=tuple(tuple(math.inf if t is None else t for t in r)
                                  for r in obj["step_times_s"]),
                 acceptance=tuple(tuple(r) for r in obj["acceptance"]), topk=obj["topk"],
                 margin=obj.get("margin", DEFAULT_MARGIN),
                 row_spread=tuple(obj.get("row_spread", DEFAULT_ROW_SPREAD)))
    except (KeyError, TypeError, ValueError) as e:
      if isinstance(e, PolicyError):
        raise
      raise PolicyError(f"policy: malformed ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- online update


def refine(policy: SpeculationPolicy, accept_hist: Sequence[int], *,
           tree: TreeBuffers | None = None, batch: int = 1,
           prior_steps: float = 32.0) -> SpeculationPolicy:
  """The policy with its acceptance table fitted to observed accept lengths, re-picked.

  ``accept_hist[a]`` counts the steps of ``tree`` that accepted a drafts
  (the engine's per-request ``hist``, a = 0..D). Accept lengths do not say
  which rank was right, so each head's row is scaled by one factor f_d:
  with ``P_d = P(a >= d)`` under the table (:func:`depth_probs`) and the
  observed ``S_d = (#(a >= d) + prior_steps * P_d) / (N + prior_steps)``
  (the table as a prior worth ``prior_steps`` steps),

      prod_{j < d} f_j = S_d / P_d,   so   f_{d-1} = (S_d / P_d) / (S_{d-1} / P_{d-1}),

  and ``acc'[d-1, r] = min(1, f_{d-1} * acc[d-1, r])``. Heads below the
  tree's depth keep their rows. Repeated calls with fresh counts refine it
  online.

  Args:
    policy: the current policy.
    accept_hist: [D + 1] non-negative counts.
    tree: the tree the counts are of (default: ``policy.tree_for(batch)``);
      None = plain decoding, which says nothing about the heads.
    batch: used for the default tree.
    prior_steps: weight of the current table (>= 0).

  Returns:
    A new :class:`SpeculationPolicy` (the same one when there is nothing to learn).

  Raises:
    PolicyError: counts that are negative, not finite, or longer than D + 1.
  """
  if tree is None:
    tree = policy.tree_for(batch)
  if tree is None:
    return policy
  hist = np.asarray(accept_hist, np.float64)
  if hist.ndim != 1 or hist.size > tree.depth + 1 or not np.all(np.isfinite(hist)) or (
      hist.size and hist.min() < 0):
    raise PolicyError(f"accept_hist: expected at most {tree.depth + 1} non-negative counts"
                      f" (accept lengths 0..{tree.depth}), got {accept_hist!r}")
  if not math.isfinite(prior_steps) or prior_steps < 0:
    raise PolicyError(f"prior_steps: expected a number >= 0, got {prior_steps!r}")
  hist = np.pad(hist, (0, tree.depth + 1 - hist.size))
  total = hist.sum()
  if total == 0:
    return policy
  acc = np.array(policy.acceptance, np.float64)
  model_D1 = depth_probs(tree, acc)                      # P_d, P_0 = 1
  at_least_D1 = np.cumsum(hist[::-1])[::-1]              # #(a >= d)
  seen_D1 = (at_least_D1 + prior_steps * model_D1) / (total + prior_steps)
  for d in range(1, min(tree.depth, acc.shape[0]) + 1):
    if model_D1[d] <= 0 or model_D1[d - 1] <= 0 or seen_D1[d - 1] <= 0:
      continue
    factor = (seen_D1[d] / model_D1[d]) / (seen_D1[d - 1] / model_D1[d - 1])
    acc[d - 1] = np.minimum(1.0, acc[d - 1] * factor)
  return dataclasses.replace(policy, acceptance=tuple(tuple(float(x) for x in r) for r in acc))


def row_spread(tokens: Sequence[int], steps: Sequence[int], *,
               min_steps: int = ROW_SPREAD_MIN_STEPS) -> tuple[float, ...]:
  """Each row's extra tokens per step over the mean of the rows of one batch (one tree).

  Args:
    tokens: [R] tokens each row emitted (the first one, made by the prefill, not counted).
    steps: [R] decode steps each row took.
    min_steps: rows of fewer steps are left out (their rate is mostly noise).

  Returns:
    The rows' relative rates (mean 1), or () when fewer than two rows qualify
    or none accepted a draft.

  Raises:
    PolicyError: lists of different lengths or negative counts.
  """
  t = np.asarray(tokens, np.float64)
  s = np.asarray(steps, np.float64)
  if t.shape != s.shape or t.ndim != 1 or (t.size and (t.min() < 0 or s.min() < 0)):
    raise PolicyError(f"row_spread: expected two equal-length lists of counts >= 0, got"
                      f" {len(t)} and {len(s)}")
  keep = s >= max(1, min_steps)
  if keep.sum() < 2:
    return ()  # one row over its own mean is 1.0 whatever it did: no spread to learn
  extra = np.maximum(t[keep] - 1.0, 0.0) / s[keep] - 1.0
  extra = np.maximum(extra, 0.0)
  mean = extra.mean()
  if mean <= 0:
    return ()
  return tuple(float(x) for x in extra / mean)


def observe_rows(pool: Sequence[float], spread: Sequence[float], *,
                 keep: int = ROW_SPREAD_KEEP) -> tuple[float, ...]:
  """A row pool (:attr:`SpeculationPolicy.row_spread`) with ``spread`` (:func:`row_spread`
  of one batch) added.

  The prior (:data:`DEFAULT_ROW_SPREAD` at the front of the pool) stays until
  the observed rows are as many, then only the latest ``keep`` rows count.

  Raises:
    PolicyError: negative or non-finite values, or ``keep < 1``.
  """
  new = tuple(float(r) for r in spread)
  if any(not math.isfinite(r) or r < 0 for r in new):
    raise PolicyError(f"spread: expected finite values >= 0, got {spread!r}")
  _positive_ints("keep", (keep,))
  pool = tuple(float(r) for r in pool)
  prior = len(DEFAULT_ROW_SPREAD)
  if pool[:prior] == DEFAULT_ROW_SPREAD and len(pool) - prior + len(new) >= prior:
    pool = pool[prior:]  # enough observed rows: the prior goes
  return (pool + new)[-keep:]


# ----------------------------------------------------------------------------- cache


def _json_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
  """``options`` as the JSON cache file reads it back (keys sorted, tuples as lists), so that
  a cached key compares equal to a fresh one.

  Raises:
    PolicyError: a value JSON cannot hold.
  """
  try:
    return json.loads(json.dumps({str(k): v for k, v in (options or {}).items()},
                                 sort_keys=True))
  except (TypeError, ValueError) as e:
    raise PolicyError(f"model_options: {e}") from None


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def load_or_measure(decoder, *, choices, num_heads: int, acceptance=None,
                    batch_sizes: Sequence[int], cache_len: int,
                    cache_dir: str | os.PathLike | None = None, device_kind: str | None = None,
                    model_key: str, repeats: int = 5, topk: int = tree_lib.DEFAULT_TOPK,
                    dtype=None, steps_per_call: int = 1, margin: float = DEFAULT_MARGIN,
                    model_options: Mapping[str, Any] | None = None,
                    log=None) -> SpeculationPolicy:
  """The policy from the cached time table of this device, model and heads, else measured.

  Args:
    decoder: the ``Decoder`` to time (its heads must have ``num_heads`` heads).
    choices: the adapter's best-first choices (see :func:`candidate_trees`).
    num_heads: n.
    acceptance: [n, k] table, or None for :data:`DEFAULT_ACCEPTANCE`; the
      candidates it rules out are not timed (:func:`measure_step_times`), so
      the cached table is kept per acceptance table.
    batch_sizes: B values to measure.
    cache_len: L of the timed steps.
    cache_dir: where the JSON goes (default ``$MEDUSA_JAX_HOME/policy``).
    device_kind: the device's kind (default ``jax.devices()[0].device_kind``).
    model_key: names the base model (its step time is what is measured).
    repeats: timed calls per entry when measuring.
    topk: k of the candidate trees.
    dtype: cache dtype of the timed steps (default float32).
    steps_per_call: K steps per timed device loop (see :func:`measure_step_times`).
    margin: see :attr:`SpeculationPolicy.margin` (a choice, not part of the cache).
    model_options: how the model runs its step (``Llama.static_options``: attention,
      kernel layout, ...), part of the key with medusa_jax's version: either changes the
      kernels a step runs, so a table timed under other ones is not reused.
    log: called with one line when measuring or replacing a bad file.

  Returns:
    The :class:`SpeculationPolicy`.

  Raises:
    PolicyError: bad arguments (see :func:`measure_step_times`).
    WriteError: the cache file cannot be written.
  """
  import jax

  from medusa_jax.assets.cache import default_home

  log = log or (lambda line: None)
  # Trees too big to time in this cache are no candidates (the engine's
  # cache_len is at most its max_cache_len).
  trees = tuple(t for t in candidate_trees(choices, num_heads, topk=topk)
                if cache_needed(t, steps_per_call) <= cache_len)
  sizes = tuple(sorted(set(_positive_ints("batch_sizes", batch_sizes))))
  device_kind = device_kind or jax.devices()[0].device_kind
  key = {"device_kind": device_kind, "model": model_key, "num_heads": num_heads,
         "candidates": [tree_key(t) for t in trees], "cache_len": cache_len,
         "batch_sizes": list(sizes), "jax": jax.__version__,
         "dtype": np.dtype(dtype or np.float32).name, "steps_per_call": int(steps_per_call),
         "medusa_jax": MEDUSA_JAX_VERSION,
         "model_options": _json_options(model_options)}
  directory = Path(cache_dir) if cache_dir is not None else default_home() / "policy"
  acceptance = DEFAULT_ACCEPTANCE if acceptance is None else acceptance
  # Candidates that cannot win under this acceptance are left untimed, so the
  # table belongs to it too.
  key["pruned_for"] = hashlib.sha256(json.dumps(
      np.round(_acceptance_array(acceptance), 4).tolist()).encode()).hexdigest()[:12]
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  path = directory / f"{_slug(device_kind)}-{_slug(model_key)}-{digest}.json"
  if path.exists():
    try:
      cached = json.loads(path.read_text(encoding="utf-8"))
      if not isinstance(cached, dict) or cached.get("key") != key:
        raise PolicyError("its key does not match")
      policy = SpeculationPolicy.from_json(cached["policy"])
      if policy.candidates != tuple(None if t is None else t.choices for t in trees):
        raise PolicyError("its candidates do not match")
      return dataclasses.replace(policy, acceptance=acceptance, margin=margin)
    except (OSError, ValueError, KeyError, TypeError) as e:
      log(f"policy cache {path}: unusable ({e}); measuring again")
  log(f"measuring {len(trees)} candidates x {len(sizes)} batch sizes on {device_kind}")
  times = measure_step_times(decoder, trees, sizes, cache_len, repeats=repeats, dtype=dtype,
                             steps_per_call=steps_per_call, acceptance=acceptance)
  policy = dataclasses.replace(
      SpeculationPolicy.from_times(times, trees, acceptance=acceptance, topk=topk), margin=margin)
  directory.mkdir(parents=True, exist_ok=True)
  _atomic.write_json(path, {"key": key, "policy": policy.to_json()}, overwrite=True)
  return policy
