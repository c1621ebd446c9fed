"""What a generation call returns: per-row statistics, the whole result, stream events."""

from __future__ import annotations

import dataclasses
from typing import Any

from medusa_jax.decoding.requests import Speculate
from medusa_jax.errors import RequestError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RowStats:
  """Per-request statistics.

  Attributes:
    new_tokens: tokens generated (the first comes from the prefill).
    steps: decode steps the request took part in (prefill not counted).
    tokens_per_step: tokens emitted by decode steps / steps (1.0 when plain).
    accept_hist: ``accept_hist[a]`` = steps that accepted ``a`` drafts (0..D).
    head_accepts: ``head_accepts[k]`` = steps in which head k's draft (depth
      k+1) was accepted.
    wall_s: seconds from the start of the call until the row finished.
    tokens_per_s: new_tokens / wall_s.
  """
  new_tokens: int
  steps: int
  tokens_per_step: float
  accept_hist: tuple[int, ...]
  head_accepts: tuple[int, ...]
  wall_s: float
  tokens_per_s: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResult:
  """The output of :meth:`Engine.generate`, one entry per request, in order.

  Attributes:
    tokens: new token ids per request (EOS included when hit; [] on error).
    steps: decode steps per request.
    texts: decoded texts without special tokens (None without a tokenizer).
    stats: per-request :class:`RowStats` (None on error).
    errors: per-request RequestError, or None.
    speculate: the mode asked for.
    tree_nodes: T, tokens verified per row per step (1 when plain).
    speculation_skipped: True when the chain guard turned speculation off.
    wall_s: whole call, compile included.
    decode_s: decode calls after the first (K steps each; the first paid for
      any compilation); when every row finished within the first call, all
      decode calls.
    decode_tokens: tokens those calls emitted.
  """
  tokens: list[list[int]]
  steps: list[int]
  texts: list[str] | None
  stats: list[RowStats | None]
  errors: list[RequestError | None]
  speculate: Speculate
  tree_nodes: int
  speculation_skipped: bool
  wall_s: float
  decode_s: float
  decode_tokens: int

  @property
  def tokens_per_s(self) -> float:
    """Steady-state throughput: tokens of decode steps 2.. over their time."""
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

  @property
  def tokens_per_step(self) -> float:
    """Mean tokens per decode step over the successful requests."""
    done = [s for s in self.stats if s is not None and s.steps]
    if not done:
      return float("nan")
    return sum(s.tokens_per_step * s.steps for s in done) / sum(s.steps for s in done)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEvent:
  """One step of :meth:`Engine.stream`: what each request emitted.

  The per-request lists are built on access (a serving loop that does not
  read them pays no per-row Python work).

  Attributes:
    step: 0 for the first token (from the prefill), then one per decode step.
    result: the :class:`GenerationResult`, on the last event only (whose
      ``tokens`` are then empty).
  """
  step: int
  host: Any = None
  rows: tuple[int, ...] = ()
  num_requests: int = 0
  result: "GenerationResult | None" = None

  @property
  def tokens(self) -> list[list[int]]:
    """New tokens per request this step ([] for finished, failed or idle ones)."""
    out: list[list[int]] = [[] for _ in range(self.num_requests)]
    if self.host is not None:
      for b, i in enumerate(self.rows):
        out[i] = [int(t) for t in self.host.tokens[b, :self.host.count[b]]]
    return out

  @property
  def accept_len(self) -> list[int]:
    """Drafts accepted per request this step (0 for the first event)."""
    out = [0] * self.num_requests
    if self.host is not None and self.step > 0:
      for b, i in enumerate(self.rows):
        out[i] = int(self.host.accept_len[b])
    return out

  @property
  def done(self) -> list[bool]:
    """Per request: finished after this step (failed requests count as done)."""
    out = [True] * self.num_requests
    if self.host is not None:
      for b, i in enumerate(self.rows):
        out[i] = bool(self.host.done[b])
    return out
