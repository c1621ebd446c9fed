"""AdapterRegistry: which Medusa adapters are loaded, under LoRAX's loading rules.

Adapter index 0 is the static default (LoRAX's ``--adapter-id``): loading it
enables speculation and fixes the number of draft tokens to its head count.
Any other index is a dynamic (per-request) adapter, accepted only when

1. a default is loaded,
2. its ``version`` is at least 2, and
3. it has as many heads as the default,

checked in that order, as LoRAX does. One more check, which LoRAX leaves to a
later crash, is made at load time: the adapter must have the default's
architecture (V2, or V1 with the same L and V) and hidden size, because
per-row routing stacks the weights of all adapters of a batch.
Requests whose adapter has no Medusa heads use the default's
(:meth:`AdapterRegistry.medusa_id_for`).
"""

from __future__ import annotations

from typing import Iterator

from medusa_jax.errors import AdapterLoadError
from medusa_jax.adapters.weights import MedusaWeights

DEFAULT_INDEX = 0
MIN_DYNAMIC_VERSION = 2.0


class AdapterRegistry:
  """The Medusa adapters of one engine, by adapter index. Holds no global state."""

  def __init__(self):
    self._adapters: dict[int, MedusaWeights] = {}

  # -- loading ----------------------------------------------------------------------------------

  def load_default(self, weights: MedusaWeights) -> None:
    """Loads the static default adapter at index 0 and enables speculation.

    Raises:
      AdapterLoadError: a default is already loaded.
    """
    if DEFAULT_INDEX in self._adapters:
      raise AdapterLoadError(
          f"adapter {DEFAULT_INDEX}: a default Medusa adapter"
          f" ({_describe(self._adapters[DEFAULT_INDEX])}) is already loaded; unload it first")
    self._adapters[DEFAULT_INDEX] = weights

  def load_dynamic(self, index: int, weights: MedusaWeights) -> None:
    """Loads a per-request adapter at ``index`` (>= 1).

    Raises:
      AdapterLoadError: the index is invalid or taken, no default is loaded,
        the version is below 2, or the head count, architecture (V1/V2, L, V)
        or hidden size differs from the default's.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
      raise AdapterLoadError(
          f"adapter index {index!r}: dynamic adapters need an integer index >= 1"
          f" (index {DEFAULT_INDEX} is the static default; use load_default)")
    if index in self._adapters:
      raise AdapterLoadError(
          f"adapter {index}: already loaded ({_describe(self._adapters[index])}); unload it"
          " first")
    default = self._adapters.get(DEFAULT_INDEX)
    if default is None:
      raise AdapterLoadError(
          f"adapter {index}: Medusa adapters can only be loaded at request time when the"
          " engine was initialized with a default Medusa adapter (load_default first).")
    version = weights.config.version
    if version < MIN_DYNAMIC_VERSION:
      raise AdapterLoadError(
          f"adapter {index}: Dynamic adapter loading is not supported for Medusa version"
          f" {version} at this time. Instead, initialize the engine with this Medusa adapter"
          " as the default (load_default) and it will be applied to every request, or migrate"
          " to a v2 adapter (\"version\": 2 in its config.json).")
    if weights.speculative_tokens != default.speculative_tokens:
      raise AdapterLoadError(
          f"adapter {index}: Cannot load a Medusa adapter dynamically with a different number"
          f" of heads ({weights.speculative_tokens}) from the default speculative tokens"
          f" ({default.speculative_tokens}).")
    if _architecture(weights) != _architecture(default):
      raise AdapterLoadError(
          f"adapter {index}: {_architecture_text(weights)}; expected"
          f" {_architecture_text(default)} like the default adapter (rows of one batch are"
          " routed through stacked weights of one architecture)")
    self._adapters[index] = weights

  def unload(self, index: int) -> MedusaWeights:
    """Removes and returns the adapter at ``index``.

    Raises:
      AdapterLoadError: nothing is loaded there, or it is the default while
        dynamic adapters still depend on it.
    """
    if index not in self._adapters:
      raise AdapterLoadError(f"adapter {index!r}: no Medusa adapter loaded there; loaded:"
                             f" {list(self.medusa_ids)}")
    if index == DEFAULT_INDEX and len(self._adapters) > 1:
      dynamic = [i for i in self.medusa_ids if i != DEFAULT_INDEX]
      raise AdapterLoadError(f"adapter {DEFAULT_INDEX}: cannot unload the default Medusa"
                             f" adapter while dynamic adapters {dynamic} are loaded")
    return self._adapters.pop(index)

  # -- queries ----------------------------------------------------------------------------------

  @property
  def enabled(self) -> bool:
    """Whether speculation is on (a default adapter is loaded)."""
    return DEFAULT_INDEX in self._adapters

  @property
  def speculative_tokens(self) -> int:
    """Draft tokens per step: the default's head count, or 0 when disabled."""
    default = self._adapters.get(DEFAULT_INDEX)
    return 0 if default is None else default.speculative_tokens

  @property
  def default(self) -> MedusaWeights | None:
    return self._adapters.get(DEFAULT_INDEX)

  @property
  def medusa_ids(self) -> tuple[int, ...]:
    """Indices of the loaded Medusa adapters, ascending (0 first when loaded)."""
    return tuple(sorted(self._adapters))

  def get(self, index: int) -> MedusaWeights | None:
    """The adapter loaded at ``index``, or None."""
    return self._adapters.get(index)

  def medusa_id_for(self, adapter_index: int) -> int | None:
    """The Medusa adapter that drafts for requests of ``adapter_index``.

    The request's own adapter when it has Medusa heads, else the default (0);
    None when speculation is disabled.
    """
    if adapter_index in self._adapters:
      return adapter_index
    return DEFAULT_INDEX if self.enabled else None

  def items(self) -> Iterator[tuple[int, MedusaWeights]]:
    """(index, weights) pairs in index order."""
    return iter(sorted(self._adapters.items()))

  def __contains__(self, index: object) -> bool:
    return index in self._adapters

  def __len__(self) -> int:
    return len(self._adapters)

  def __repr__(self) -> str:
    return (f"AdapterRegistry(ids={list(self.medusa_ids)},"
            f" speculative_tokens={self.speculative_tokens})")


def _architecture(weights: MedusaWeights) -> tuple:
  """What must agree for per-row routing: V1/V2, H, and for V1 also L and V."""
  if weights.is_v2:
    return ("V2", weights.hidden_size)
  return ("V1", weights.hidden_size, weights.config.medusa_num_layers, weights.vocab_size)


def _architecture_text(weights: MedusaWeights) -> str:
  if weights.is_v2:
    return f"V2 heads with H={weights.hidden_size}"
  return (f"V1 heads with H={weights.hidden_size}, L={weights.config.medusa_num_layers},"
          f" V={weights.vocab_size}")


def _describe(weights: MedusaWeights) -> str:
  source = f" from {weights.source}" if weights.source else ""
  return (f"n={weights.speculative_tokens}, version {weights.config.version}{source}")
