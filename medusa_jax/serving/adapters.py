"""AdapterPool: Medusa adapters by name, in a fixed number of weight slots, loaded at run time.

The decode core routes every row through stacked weights
(``BatchMedusaWeights``, ``[A, H, n, H]`` for V2) whose A slots never change
shape, so loading or evicting an adapter rewrites one slice of the stack and
recompiles nothing. Slot 0 holds the default adapter for good. Other names are
looked up as sub-directories of ``adapter_dir`` and loaded under LoRAX's rules
through an :class:`~medusa_jax.adapters.registry.AdapterRegistry` (a default
must exist; a dynamic adapter needs ``version >= 2`` and the default's head
count and architecture). When every slot is taken, the least recently used
adapter that no running request holds is evicted.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Mapping

from flax import nnx

from medusa_jax.adapters.registry import DEFAULT_INDEX, AdapterRegistry
from medusa_jax.adapters.weights import MedusaWeights, load_medusa_adapter
from medusa_jax.errors import AdapterLoadError, AdapterNotFoundError, ConfigError, MedusaError
from medusa_jax.heads.routed import BatchMedusaWeights


def _check_name(name: str) -> str:
  if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
      or "\\" in name or name.startswith(".")):
    raise AdapterNotFoundError(f"adapter {name!r}: not a valid adapter name")
  return name


class AdapterPool:
  """The Medusa adapters a server routes requests to, by name.

  Thread-safety: :meth:`check` and :meth:`names` may be called from any
  thread; :meth:`acquire` / :meth:`release` from the scheduler thread only.
  """

  def __init__(self, default: MedusaWeights | None, *, max_adapters: int = 4,
               adapter_dir: str | os.PathLike | None = None,
               adapters: Mapping[str, MedusaWeights] | None = None, default_name: str = "default"):
    """Args:
      default: the default adapter (slot 0), or None (no speculation, no adapters).
      max_adapters: A, weight slots including the default's.
      adapter_dir: a directory whose sub-directories are adapters loadable by name.
      adapters: adapters given by name up front (loaded into slots now).
      default_name: the name that selects the default adapter.

    Raises:
      ConfigError: max_adapters < 1, or adapters without a default.
      AdapterLoadError: an adapter of ``adapters`` breaks LoRAX's rules.
    """
    if isinstance(max_adapters, bool) or not isinstance(max_adapters, int) or max_adapters < 1:
      raise ConfigError(f"max_adapters: expected a positive integer, got {max_adapters!r}")
    adapters = dict(adapters or {})
    if default is None and (adapters or adapter_dir is not None):
      raise ConfigError("adapters by name need a default Medusa adapter (LoRAX's rule)")
    self.adapter_dir = None if adapter_dir is None else os.fspath(adapter_dir)
    if self.adapter_dir is not None and not os.path.isdir(self.adapter_dir):
      raise ConfigError(f"adapter_dir {self.adapter_dir!r}: not a directory")
    self.default = default
    self.default_name = default_name
    self.registry = AdapterRegistry()
    self._lock = threading.Lock()
    self._slot_of: dict[str, int] = {}
    self._pins: collections.Counter = collections.Counter()
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.on_update = None  # called with the new heads after a slot is rewritten
    if default is None:
      self.num_slots, self.heads = 0, None
      return
    self.registry.load_default(default)
    # Dynamic adapters need V2 (LoRAX): a V1 default serves alone.
    self.num_slots = max_adapters if default.model.is_v2 else 1
    if self.num_slots == 1:
      self.heads = default.model
    else:
      self.heads = BatchMedusaWeights.load({i: default for i in range(self.num_slots)}, [0])
    for name, weights in adapters.items():
      slot = self._load(_check_name(name), weights)
      if slot is None:
        raise ConfigError(f"adapters: {len(adapters)} given, but only {self.num_slots - 1}"
                          " weight slots besides the default's (raise max_adapters)")

  # -- any thread ---------------------------------------------------------------------------

  def names(self) -> list[str]:
    """The default's name, then loaded and loadable adapter names (sorted)."""
    with self._lock:
      names = set(self._slot_of)
    if self.adapter_dir is not None:
      try:
        names |= {d for d in os.listdir(self.adapter_dir)
                  if not d.startswith(".") and os.path.isdir(os.path.join(self.adapter_dir, d))}
      except OSError:
        pass
    names.discard(self.default_name)
    return [self.default_name] + sorted(names)

  def check(self, name: str | None) -> None:
    """Raises AdapterNotFoundError unless ``name`` is the default, loaded, or loadable."""
    if name is None or name == self.default_name:
      return
    _check_name(name)
    if self.default is None:
      raise AdapterNotFoundError(f"adapter {name!r}: this server has no Medusa adapters")
    with self._lock:
      if name in self._slot_of:
        return
    if self.adapter_dir is None or not os.path.isdir(os.path.join(self.adapter_dir, name)):
      where = f" in {self.adapter_dir}" if self.adapter_dir else ""
      raise AdapterNotFoundError(f"adapter {name!r}: not found{where}; available:"
                                 f" {', '.join(self.names())}")
    if self.num_slots < 2:
      raise AdapterLoadError(
          f"adapter {name!r}: Dynamic adapter loading is not supported for Medusa version"
          f" {self.default.config.version} at this time (the default adapter is version 1);"
          " serve this adapter as the default instead.")

  # -- the scheduler thread -----------------------------------------------------------------

  def acquire(self, name: str | None) -> int | None:
    """The weight slot of ``name``, loading it if needed, pinned until :meth:`release`.

    Returns:
      The slot, or None when every slot is held by running requests (retry
      when one is released).

    Raises:
      AdapterNotFoundError: unknown name.
      AdapterLoadError: the adapter breaks LoRAX's rules (version, heads,
        architecture) or its files are bad (the underlying error is chained).
    """
    if self.default is None:
      return 0
    if name is None or name == self.default_name:
      slot = DEFAULT_INDEX
    else:
      self.check(name)
      with self._lock:
        slot = self._slot_of.get(name)
      if slot is None:
        path = os.path.join(self.adapter_dir, name)
        dtype = self.heads.fused_w.dtype
        try:
          weights = load_medusa_adapter(path, dtype=dtype)
        except MedusaError as e:
          raise AdapterLoadError(f"adapter {name!r}: {e}") from e
        slot = self._load(name, weights)
        if slot is None:
          return None
    self._pins[slot] += 1
    self._touch(slot)
    return slot

  def release(self, slot: int) -> None:
    """Unpins a slot taken by :meth:`acquire`."""
    if self._pins[slot] > 0:
      self._pins[slot] -= 1

  def slot_of(self, name: str | None) -> int | None:
    """The slot ``name`` is loaded in, or None."""
    if name is None or name == self.default_name:
      return DEFAULT_INDEX
    with self._lock:
      return self._slot_of.get(name)

  # -- internals ----------------------------------------------------------------------------

  def _touch(self, slot: int) -> None:
    self._lru.pop(slot, None)
    self._lru[slot] = None

  def _free_slot(self) -> int | None:
    used = set(self._slot_of.values())
    for s in range(1, self.num_slots):
      if s not in used:
        return s
    for s in self._lru:  # least recently used first
      if s != DEFAULT_INDEX and self._pins[s] == 0:
        victim = next(n for n, v in self._slot_of.items() if v == s)
        with self._lock:
          del self._slot_of[victim]
        self.registry.unload(s)
        return s
    return None

  def _load(self, name: str, weights: MedusaWeights) -> int | None:
    if self.num_slots < 2:
      raise AdapterLoadError(f"adapter {name!r}: the default adapter is version 1; dynamic"
                             " adapters are not supported with it")
    slot = self._free_slot()
    if slot is None:
      return None
    try:
      self.registry.load_dynamic(slot, weights)  # LoRAX's rules, LoRAX's messages
    except AdapterLoadError as e:
      text = str(e).removeprefix(f"adapter {slot}: ")  # the slot is internal; name the adapter
      raise AdapterLoadError(f"adapter {name!r}: {text}") from e
    heads = self.heads
    medusa = weights.model.medusa
    heads.fused_w = heads.fused_w.at[slot].set(medusa.kernel[...].astype(heads.fused_w.dtype))
    heads.fused_b = heads.fused_b.at[slot].set(medusa.bias[...].astype(heads.fused_b.dtype))
    with self._lock:
      self._slot_of[name] = slot
    self._touch(slot)
    if self.on_update is not None:
      self.on_update(nnx.split(heads)[1])
    return slot
