"""The Medusa adapter file layout: tensor keys, shapes, and the file <-> memory conversion.

File layout (LoRAX/TGI, and the original Medusa ``medusa_lm_head.*`` files),
torch ``[out, in]``, for head ``i < n`` and block ``j < L``:

  ``{i}.{j}.linear.weight``  [H, H]
  ``{i}.{j}.linear.bias``    [H]
  ``{i}.{L}.weight``         [V, H]  (V1 only: a per-head output projection)

Full Medusa-2 model files carry the same keys under a ``medusa_head.`` prefix;
other tensors in such files are never read. Heads beyond ``n`` are ignored
(released Medusa files hold 5 heads while their config says 2).

In memory the arrays are ``[in, out]``; V2 holds the heads fused as
``kernel [H, n, H]`` and ``bias [n, H]`` (``heads.modules.stack_heads``, the
one fused <-> per-head conversion). :func:`file_tensors` is the one memory ->
file conversion; the reader (``adapters/io.py``) does the reverse through
:class:`AdapterLayout`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import ConfigError, MissingTensorError, TensorShapeError
from medusa_jax.heads.modules import MedusaModel, unstack_heads

PREFIX = "medusa_head."


def block_weight_key(head: int, block: int) -> str:
  """File key of ResBlock ``block`` of head ``head``: torch [out, in] = [H, H]."""
  return f"{head}.{block}.linear.weight"


def block_bias_key(head: int, block: int) -> str:
  """File key of the ResBlock bias: [H]."""
  return f"{head}.{block}.linear.bias"


def out_weight_key(head: int, num_layers: int) -> str:
  """File key of a V1 head's output projection: torch [out, in] = [V, H]."""
  return f"{head}.{num_layers}.weight"




@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdapterLayout:
  """The heads' sizes, and the shape each file tensor must have.

  Attributes:
    num_heads: n.
    num_layers: L, ResBlocks per head.
    hidden: H.
    vocab: V of the per-head output projections; set iff V1.
  """
  num_heads: int
  num_layers: int
  hidden: int
  vocab: int | None

  @property
  def per_head(self) -> bool:
    """True for V1 heads (own output projections)."""
    return self.vocab is not None

  @classmethod
  def infer(cls, config: MedusaConfig, index) -> "AdapterLayout":
    """H from ``0.0.linear.weight``; V1 iff L > 1 or ``0.{L}.weight`` exists (LoRAX's rule).

    Raises:
      MissingTensorError: head 0 has fewer ResBlocks than the config says.
      TensorShapeError: ``0.0.linear.weight`` is not square, or ``0.{L}.weight``
        is not [V, H].
    """
    n, num_layers = config.medusa_num_heads, config.medusa_num_layers
    # Sizes are checked against the keys present before any key list is built,
    # so a config claiming 1e12 heads costs nothing.
    present = count_heads(index)
    if 0 < present < n:
      raise MissingTensorError(
          f"{block_weight_key(present, 0)}: missing from {', '.join(index.files)}; the config"
          f" says medusa_num_heads={n} but the files hold Medusa heads"
          f" {list(range(present))}")
    key = block_weight_key(0, 0)
    shape = index.shape(key)
    if len(shape) != 2 or shape[0] != shape[1]:
      raise TensorShapeError(f"{key} in {index.file_of(key)}: expected a square [H, H] matrix,"
                             f" got {list(shape)}")
    hidden = shape[0]
    found = 0
    while index.has(block_weight_key(0, found)):
      found += 1
    if found < num_layers:
      raise MissingTensorError(
          f"{block_weight_key(0, found)}: missing from {', '.join(index.files)}; the config"
          f" says medusa_num_layers={num_layers} but head 0 in the files has {found}"
          " ResBlock(s)")
    if found > num_layers:
      raise ConfigError(
          f"medusa_num_layers={num_layers} in the config disagrees with"
          f" {index.file_of(block_weight_key(0, found - 1))}, whose head 0 has {found}"
          " ResBlocks; fix the config (reading fewer would give other heads)")
    vocab = None
    key = out_weight_key(0, num_layers)
    if num_layers > 1 or index.has(key):
      shape = index.shape(key)
      if len(shape) != 2 or shape[1] != hidden:
        raise TensorShapeError(f"{key} in {index.file_of(key)}: expected [V, {hidden}], got"
                               f" {list(shape)}")
      vocab = shape[0]
    return cls(num_heads=n, num_layers=num_layers, hidden=hidden, vocab=vocab)

  def v1_param_keys(self) -> dict[str, tuple[str, bool]]:
    """V1 heads: parameter path in ``MedusaModel`` -> (file key, stored transposed?).

    Paths are ``/``-joined NNX state paths (``medusa/heads/0/blocks/1/kernel``);
    kernels are ``[in, out]`` in memory and ``[out, in]`` in files.
    """
    keys = {}
    for i in range(self.num_heads):
      for j in range(self.num_layers):
        block = f"medusa/heads/{i}/blocks/{j}"
        keys[f"{block}/kernel"] = (block_weight_key(i, j), True)
        keys[f"{block}/bias"] = (block_bias_key(i, j), False)
      keys[f"medusa/heads/{i}/out"] = (out_weight_key(i, self.num_layers), True)
    return keys

  def file_keys(self) -> list[str]:
    """Every file key the heads read, head by head."""
    if self.per_head:
      return [key for key, _ in self.v1_param_keys().values()]
    return [key for i in range(self.num_heads)
            for key in (block_weight_key(i, 0), block_bias_key(i, 0))]

  def expected(self, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, how it was derived) of the file tensor ``key``."""
    origin = f"H={self.hidden} from {block_weight_key(0, 0)}"
    if key.endswith(".linear.weight"):
      return (self.hidden, self.hidden), f"[H, H] with {origin}"
    if key.endswith(".linear.bias"):
      return (self.hidden,), f"[H] with {origin}"
    return ((self.vocab, self.hidden),
            f"[V, H] with V={self.vocab} from {out_weight_key(0, self.num_layers)}, {origin}")

  def check_shapes(self, index) -> None:
    """Checks every needed tensor is present with its shape, reading no data.

    Raises:
      MissingTensorError / TensorShapeError: naming the first bad tensor.
    """
    for key in self.file_keys():
      index.check_shape(key, self.expected(key))


def count_heads(index) -> int:
  """Heads 0..k-1 whose first ResBlock weight the files hold (bounded by the keys present)."""
  heads = {int(k.split(".")[0]) for k in index.medusa_keys()
           if k.split(".")[1:] == ["0", "linear", "weight"]}
  count = 0
  while count in heads:
    count += 1
  return count


def canonical_key(key: str) -> tuple[str, int]:
  """(key without any ``...medusa_head.`` prefix, priority: 0 = bare key, 1 = prefixed)."""
  at = key.rfind(PREFIX)
  if at < 0:
    return key, 0
  return key[at + len(PREFIX):], 1


def is_medusa_key(key: str) -> bool:
  parts = key.split(".")
  return (len(parts) in (3, 4) and parts[0].isdigit() and parts[1].isdigit()
          and (parts[2:] in (["weight"], ["linear", "weight"], ["linear", "bias"])))


def file_tensors(model: MedusaModel, dtype=None) -> dict[str, np.ndarray]:
  """The heads as file tensors: LoRAX keys, torch ``[out, in]`` layout, on the host.

  Sharded parameters are gathered. Args: ``dtype``: cast to it (None keeps
  the parameter dtype).

  Returns:
    ``{key: array}``, e.g. ``"0.0.linear.weight"`` [H, H], ``"0.0.linear.bias"`` [H],
    and for V1 ``"0.{L}.weight"`` [V, H].
  """
  def host(a) -> np.ndarray:
    a = np.asarray(jax.device_get(a))
    if dtype is None:
      return a
    with np.errstate(over="ignore"):  # an overflowing cast is reported by the caller
      return a.astype(np.dtype(dtype))

  out: dict[str, np.ndarray] = {}
  medusa = model.medusa
  if model.is_v2:
    for i, (w_HxH, b_H) in enumerate(unstack_heads(host(medusa.kernel[...]),
                                                  host(medusa.bias[...]))):
      out[block_weight_key(i, 0)] = np.ascontiguousarray(w_HxH.T)
      out[block_bias_key(i, 0)] = np.ascontiguousarray(b_H)
    return out
  for i, head in enumerate(medusa.heads):
    for j, block in enumerate(head.blocks):
      out[block_weight_key(i, j)] = np.ascontiguousarray(host(block.kernel[...]).T)
      out[block_bias_key(i, j)] = np.ascontiguousarray(host(block.bias[...]))
    out[out_weight_key(i, len(head.blocks))] = np.ascontiguousarray(host(head.out[...]).T)
  return out
